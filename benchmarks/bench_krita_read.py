"""How long the plugin takes, in real Krita, to read and encode 8 layers of a 4096² document.

    python benchmarks/bench_krita_read.py [--size 4096] [--layers 8] [--u16]

Starts ``kritarunner`` (headless, throwaway HOME) with this file as the script. Inside Krita it
builds an RGBA 8-bit document of painted-looking layers (gradients with alpha, one covering the
canvas, others partly, one partly outside the canvas), then times `document.read_layers` (what
Generate does before sending): reading pixels from Krita, cropping to content, PNG encoding.
Reported for the document size (no scaling) and for the "Fit 1024 px" size policy; for one layer
also Qt's PNG encoder against the pure-Python one, and zlib levels. With --u16 the same document
in 16-bit is read through the converted clone.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


# -- inside Krita --------------------------------------------------------------------------------------


def gradient_layer(w: int, h: int, seed: int, depth: str) -> bytes:
    """w×h pixels that look painted (horizontal and vertical gradients, soft edges), fast to build."""
    # One row of BGRA: a gradient whose hue shifts with the seed; rows are that row rotated.
    row = bytearray()
    for x in range(w):
        t = (x * 255) // max(1, w - 1)
        alpha = 255 if 8 < x < w - 8 else 128
        row += bytes(((t + seed * 40) % 256, (255 - t + seed * 20) % 256, (t // 2 + seed * 70) % 256, alpha))
    row = bytes(row)
    step = 4 * ((seed % 5) + 1)
    rows = [row[(y * step) % len(row) :] + row[: (y * step) % len(row)] for y in range(64)]
    data = b"".join(rows[y % 64] for y in range(h))
    if depth == "U16":  # each byte as the high byte of a 16-bit channel
        out = bytearray(len(data) * 2)
        out[1::2] = data
        data = bytes(out)
    return data


def build(size: int, layers: int, depth: str):
    from krita import Krita

    app = Krita.instance()
    doc = app.createDocument(size, size, "bench", "RGBA", depth, "", 300.0)
    doc.setBatchmode(True)
    root = doc.rootNode()
    boxes = []
    for i in range(layers):
        if i == 0:
            box = (0, 0, size, size)  # a full-canvas background
        elif i == layers - 1:
            box = (-size // 8, size // 3, size // 2, size // 2)  # partly outside the canvas
        else:
            w, h = size // 2 + (i * size) // 16, size // 3 + (i * size) // 20
            box = ((i * size) // 13 % (size - w), (i * size) // 7 % (size - h), w, h)
        node = doc.createNode(f"layer {i}", "paintlayer")
        root.addChildNode(node, None)
        node.setPixelData(gradient_layer(box[2], box[3], i, depth), *box)
        boxes.append(box)
    doc.waitForDone()
    return doc, boxes


def measure(size: int, layers: int, depth: str) -> dict:
    from collage_diffusion import collage, document, pixels, qt, wire

    t = time.perf_counter()
    doc, _ = build(size, layers, depth)
    out = {"size": size, "layers": layers, "depth": depth, "build_s": round(time.perf_counter() - t, 2)}
    for policy in ("document", "1024"):
        target = collage.generation_size(size, size, policy)
        t = time.perf_counter()
        records, stats = document.read_layers(doc, target)
        total = time.perf_counter() - t
        out[policy] = {
            "generation_size": list(target),
            "total_s": round(total, 3),
            "read_s": round(stats.read_s, 3),
            "encode_s": round(stats.encode_s, 3),
            "convert_s": round(stats.convert_s, 3),
            "layers_sent": len(records),
            "png_mib": round(sum(len(r.png) for r in records) / 2**20, 1),
            "request_json_mib": round(
                len(wire.JobRequest(prompt="p", layers=[], width=target[0], height=target[1]).to_json())
                / 2**20
                + sum(len(r.png) for r in records) * 4 / 3 / 2**20,
                1,
            ),
        }
    if depth == "U8":
        # One full layer: Qt's encoder at zlib levels 1 and 6 against the pure-Python one.
        node = doc.rootNode().childNodes()[1]
        data = bytes(node.pixelData(0, 0, size, size))
        box = pixels.alpha_box(size, size, data)
        one = {}
        for level in (1, 6):  # Qt's own PNG writer (libpng's adaptive row filters)
            t = time.perf_counter()
            image = qt.QImage(data, size, size, size * 4, qt.QImage.Format.Format_ARGB32).copy(qt.QRect(*box))
            png = qt.png_bytes(image, level)
            one[f"qt_level{level}_s"] = round(time.perf_counter() - t, 3)
            one[f"qt_level{level}_mib"] = round(len(png) / 2**20, 1)
        t = time.perf_counter()  # what the plugin does: Qt crops and converts, zlib deflates
        png = document.encode_bgra(data, size, size, box, box[2:], 1)
        one["plugin_level1_s"] = round(time.perf_counter() - t, 3)
        one["plugin_level1_mib"] = round(len(png) / 2**20, 1)
        t = time.perf_counter()
        pixels.alpha_box(size, size, data)
        one["alpha_box_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        rgba = pixels.bgra_to_rgba(pixels.crop(size, data, box))
        png = wire.encode_png(box[2], box[3], rgba, level=1)
        one["pure_python_level1_s"] = round(time.perf_counter() - t, 3)
        one["pure_python_level1_mib"] = round(len(png) / 2**20, 1)
        # Worst case for PNG: noise (a photo is between the two).
        noise = bytearray(os.urandom(size * size * 4))
        noise[3::4] = b"\xff" * (size * size)
        noise = bytes(noise)
        full = (0, 0, size, size)
        t = time.perf_counter()
        png = document.encode_bgra(noise, size, size, full, full[2:], 1)
        one["noise_plugin_level1_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        png = wire.encode_png(size, size, pixels.bgra_to_rgba(noise), level=1)
        one["noise_pure_python_level1_s"] = round(time.perf_counter() - t, 3)
        one["qt_binding"] = qt.QT_BINDING
        out["one_layer"] = one
    doc.close()
    return out


def __main__(args):  # kritarunner's entry point
    size = int(os.environ.get("BENCH_SIZE", "4096"))
    layers = int(os.environ.get("BENCH_LAYERS", "8"))
    depths = ["U8", "U16"] if os.environ.get("BENCH_U16") else ["U8"]
    results = [measure(size, layers, depth) for depth in depths]
    Path(os.environ["BENCH_REPORT"]).write_text(json.dumps(results, indent=2))


# -- outside Krita: the launcher -------------------------------------------------------------------------


def main() -> int:
    import argparse
    import shutil
    import subprocess
    import tempfile

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument(
        "--u16", action="store_true", help="also a 16-bit document (read through a converted clone)"
    )
    args = p.parse_args()
    kritarunner = shutil.which("kritarunner")
    if kritarunner is None:
        sys.exit("kritarunner is not installed (apt-get install krita python3-pyqt5)")
    with tempfile.TemporaryDirectory(prefix="bench-krita-") as tmp:
        sys.path.insert(0, str(ROOT / "tests" / "krita"))
        import harness  # the Krita tests' throwaway home: nothing of the user's Krita is touched

        home = Path(tmp)
        report = home / "report.json"
        env = harness.throwaway_home(
            home,
            PYTHONPATH=os.pathsep.join([str(HERE), str(ROOT / "krita_plugin")]),
            BENCH_REPORT=str(report),
            BENCH_SIZE=str(args.size),
            BENCH_LAYERS=str(args.layers),
            BENCH_U16="1" if args.u16 else "",
        )
        done = subprocess.run(
            [kritarunner, "-s", "bench_krita_read"], env=env, capture_output=True, text=True
        )
        if not report.exists():
            sys.exit(f"Krita wrote no report:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        results = json.loads(report.read_text())
    for r in results:
        print(
            f"{r['layers']} layers of a {r['size']}×{r['size']} RGBA {r['depth']} document (built in {r['build_s']} s):"
        )
        for policy in ("document", "1024"):
            m = r[policy]
            w, h = m["generation_size"]
            print(
                f"  read + crop + encode at {w}×{h}: {m['total_s']:.2f} s"
                f" (pixels from Krita and cropping {m['read_s']:.2f} s, PNG {m['encode_s']:.2f} s"
                + (f", colour conversion {m['convert_s']:.2f} s" if m["convert_s"] else "")
                + f"); {m['layers_sent']} PNGs, {m['png_mib']} MiB, request ≈ {m['request_json_mib']} MiB"
            )
        if "one_layer" in r:
            o = r["one_layer"]
            print(
                f"  one layer: alpha box {o['alpha_box_s']:.3f} s; PNG as the plugin makes it (Qt converts,"
                f" zlib level 1) {o['plugin_level1_s']:.2f} s ({o['plugin_level1_mib']} MiB);"
                f" Qt's PNG writer level 1 {o['qt_level1_s']:.2f} s"
                f" ({o['qt_level1_mib']} MiB), level 6 {o['qt_level6_s']:.2f} s ({o['qt_level6_mib']} MiB);"
                f" pure Python level 1 {o['pure_python_level1_s']:.2f} s ({o['pure_python_level1_mib']} MiB)"
                f" (PyQt{o['qt_binding']})"
            )
            print(
                f"  one layer of noise (PNG's worst case): the plugin's encoding {o['noise_plugin_level1_s']:.2f} s,"
                f" pure Python level 1 {o['noise_pure_python_level1_s']:.2f} s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
