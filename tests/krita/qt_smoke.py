"""The plugin's Qt code on PyQt5 or PyQt6, outside Krita (stand-in documents from fakekrita.py).

    COLLAGE_QT=6 python tests/krita/qt_smoke.py REPORT.json

Krita 5 embeds PyQt5 and Krita 6 PyQt6; this runs the same code (images, the bridge client, the
model, writing results, the dock's widgets, the local bridge) on whichever binding COLLAGE_QT
names, so both are exercised where a Python with that binding exists (tests/test_plugin_qt.py).
Environment: COLLAGE_TEST_BRIDGE (a demo-model bridge; those checks skip without it),
COLLAGE_BRIDGE_CONFIG (for the local bridge check). Writes a JSON report like krita_suite.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "krita_plugin")]

import fakekrita  # noqa: E402
import qt_smoke_pickers  # noqa: E402
from harness import Skip, run_check  # noqa: E402

CHECKS = []


def check(fn):
    CHECKS.append(fn)
    return fn


def eq(actual, expected, what):
    if actual != expected:
        raise AssertionError(f"{what}: expected {expected!r}, got {actual!r}")


def bridge_url() -> str:
    url = os.environ.get("COLLAGE_TEST_BRIDGE")
    if not url:
        raise Skip("no COLLAGE_TEST_BRIDGE")
    return url


def decode(png: bytes):
    from collage_diffusion import qt

    image = qt.QImage.fromData(png, "PNG").convertToFormat(qt.QImage.Format.Format_ARGB32)
    return image.width(), image.height(), qt.image_bytes(image)


@check
def binding_and_images(report):
    from collage_diffusion import qt

    eq(qt.QT_BINDING, int(os.environ.get("COLLAGE_QT", qt.QT_BINDING)), "binding")
    bgra = bytes([10, 20, 30, 255, 0, 0, 0, 0, 1, 2, 3, 128, 4, 5, 6, 7]) * 4
    image = qt.image_from_bgra(bgra, 4, 4)
    eq(qt.image_bytes(image), bgra, "BGRA through QImage")
    for level in (0, 1, 9):
        eq(decode(qt.png_bytes(image, level)), (4, 4, bgra), f"PNG round trip at level {level}")
    eq(bytes(qt.qbytes("é")), "é".encode(), "qbytes")
    report["detail"] = f"PyQt{qt.QT_BINDING}"


@check
def reading_with_qt(report):
    from collage_diffusion import document

    doc = fakekrita.sample_stack()
    records, stats = document.read_layers(doc)
    eq([r.name for r in records], ["ground", "cat", "ball", "sign"], "layers")
    w, h, data = decode(records[1].png)
    eq((w, h, data[:4]), (16, 16, bytes((30, 140, 240, 255))), "cat's pixels")
    small, _ = document.read_layers(doc, (32, 32))
    eq([(r.x, r.y, decode(r.png)[:2]) for r in small][:2], [(0, 24, (32, 8)), (4, 4, (8, 8))], "scaled")


@check
def writing_results(report):
    from collage_diffusion import collage, qt, results

    doc = fakekrita.sample_stack()
    root = doc.rootNode()
    user = root.childNodes()[0]
    before = user.pixelData(0, 0, 64, 64)
    root.addChildNode(fakekrita.Node("painted later", box=(0, 0, 4, 4)), None)  # above the results group
    img = qt.QImage(32, 32, qt.QImage.Format.Format_RGB888)
    img.fill(qt.QColor(200, 100, 50))
    group, nodes = results.write_results(doc, [(qt.png_bytes(img), "a"), (qt.png_bytes(img), "b")])
    eq(root.childNodes()[-1].name(), collage.RESULTS_GROUP_NAME, "group back on top")
    eq([n.name() for n in group.childNodes()], ["old result", "b", "a"], "new layers, first on top")
    eq([n.visible() for n in nodes], [True, False], "first variant visible")
    eq(nodes[0].pixelData(0, 0, 1, 1), bytes((50, 100, 200, 255)), "scaled to the document, BGRA")
    eq(user.pixelData(0, 0, 64, 64), before, "user layer")
    results.show_only(group, nodes[1].uniqueId().toString(), [n.uniqueId().toString() for n in nodes])
    eq([n.visible() for n in nodes], [False, True], "picked")
    eq(results.top_visible_result(doc), nodes[1], "regenerate base")


@check
def dock_panel(report):
    from collage_diffusion import dock, document, qt
    from collage_diffusion.settings import LayerSettings

    doc = fakekrita.sample_stack()

    panel = dock.CollagePanel(fakekrita.Host(doc))
    panel.refresh()
    eq(
        sorted(r.info.name for r in panel.rows.values()),
        ["ball", "cat", "empty", "far away", "ghost", "ground", "sign"],
        "rows",
    )
    marks = {r.info.name: r.mark.text() for r in panel.rows.values() if r.reason}
    eq(
        marks,
        {
            "empty": "left out: empty",
            "far away": "left out: no pixel on the canvas",
            "ghost": "left out: hidden by group 'hidden group'",
        },
        "marks",
    )
    empty = next(r for r in panel.rows.values() if r.info.name == "empty")
    eq((empty.enabled.isChecked(), empty.enabled.isEnabled()), (False, False), "marked: unticked, greyed")
    far = next(n for n in doc.rootNode().childNodes() if n.name() == "far away")
    far.setPixelData(fakekrita.fill(4, 4, (1, 2, 3, 255)), 60, 60, 4, 4)  # moved onto the canvas
    panel.refresh()
    far_row = next(r for r in panel.rows.values() if r.info.name == "far away")
    eq((far_row.reason, far_row.enabled.isChecked()), ("", True), "the mark goes with its cause")
    panel.prompt.setPlainText("a cat")
    cat = next(r for r in panel.rows.values() if r.info.name == "cat")
    cat.text.setText("a ginger cat")
    cat.text.textEdited.emit("a ginger cat")
    cat.attention.slider.setValue(40)  # 2.0
    panel.save_settings()
    stored = document.load_settings(doc)
    eq(stored.prompt, "a cat", "prompt stored")
    entry = stored.layers[cat.info.uid]
    eq((entry.text, entry.attention_weight), ("a ginger cat", 2.0), "row stored")
    # the look: the weight is the reference's alone
    eq(
        [cat.appearance.itemText(i) for i in range(cat.appearance.count())],
        ["off", "reference", "learned", "ip-adapter"],
        "looks",
    )
    eq((cat.appearance.currentText(), cat.appearance_weight.isEnabled()), ("off", False), "look off")
    cat.appearance.setCurrentIndex(1)
    eq(cat.appearance_weight.isEnabled(), True, "reference: weight enabled")
    cat.appearance_weight.setValue(2.5)
    panel.save_settings()
    entry = document.load_settings(doc).layers[cat.info.uid]
    eq((entry.appearance, entry.appearance_weight), ("reference", 2.5), "look stored")
    cat.appearance.setCurrentIndex(2)
    eq(cat.appearance_weight.isEnabled(), False, "learned: no weight")
    cat.load(LayerSettings(appearance="reference", appearance_weight=3.0))
    eq((cat.appearance.currentText(), cat.appearance_weight.value()), ("reference", 3.0), "look loaded")
    eq(cat.appearance_weight.isEnabled(), True, "loaded reference: weight enabled")
    panel.resize(360, 900)
    panel.show()
    qt.spin(lambda: False, 50)
    if panel.grab().isNull():
        raise AssertionError("the panel does not render")
    doc.close()  # a document closed while the dock still shows it: the dock lets it go
    panel.refresh()
    eq((panel.doc, panel.rows), (None, {}), "closed document let go")
    panel.shutdown()


def library_info(loras=("ink.safetensors", "xl/detail.safetensors", "sd1-style.safetensors")):
    """/info of a bridge on the demo model with model folders: an SDXL checkpoint, LoRAs of no
    known family, of SDXL and of SD 1.x (as tests/test_plugin_choices.py, without pytest)."""
    from collage_diffusion import wire

    sd1, xl = ("sd1", "Stable Diffusion 1.x"), ("sdxl", "Stable Diffusion XL")
    families = {"xl/detail.safetensors": xl, "sd1-style.safetensors": sd1}
    return wire.InfoResponse.from_dict(
        {
            "api_version": wire.API_VERSION,
            "version": "test",
            "model": "demo",
            "models": ["demo", "tiny-xl"],
            "model_loaded": True,
            "device": "cpu",
            "dtype": "float32",
            "queue_length": 0,
            "running": None,
            "versions": {},
            "limits": {},
            "model_details": [
                wire.ModelDetails("demo", *sd1, 64).to_dict(),
                wire.ModelDetails("tiny-xl", *xl, 256, 64).to_dict(),
            ],
            "checkpoints": [wire.LibraryEntry("tiny-xl", "checkpoint", *xl).to_dict()],
            "loras": [wire.LibraryEntry(n, "lora", *families.get(n, ("", ""))).to_dict() for n in loras],
        }
    )


def combo_items(combo) -> list:
    return [(combo.itemText(i), combo.itemData(i)) for i in range(combo.count())]


@check
def dock_model_and_loras(report):
    """The model picker and the LoRA list: filled from /info, following the model's family,
    saved in the document, shown again by a new panel (a reopened document), refreshed when /info
    changes; a saved model the bridge lacks is shown as such and Generate refuses it."""
    from collage_diffusion import dock, document, qt
    from collage_diffusion.model import CollageModel

    doc = fakekrita.sample_stack()
    model = CollageModel("http://127.0.0.1:9")  # never asked: /info is given below
    model._set_info(library_info())
    panel = dock.CollagePanel(fakekrita.Host(doc), model)
    panel.refresh()
    m = panel.model_section
    eq(
        combo_items(m.model),
        [("default (demo) · Stable Diffusion 1.x", ""), ("tiny-xl · Stable Diffusion XL", "tiny-xl")],
        "models",
    )
    eq([d for _, d in combo_items(m.add_combo)], ["ink.safetensors", "sd1-style.safetensors"], "sd1 LoRAs")
    m.model.setCurrentIndex(1)  # the painter picks the SDXL model: the SDXL LoRAs are offered
    eq([d for _, d in combo_items(m.add_combo)], ["ink.safetensors", "xl/detail.safetensors"], "sdxl LoRAs")
    m.all_families.setChecked(True)
    eq(
        combo_items(m.add_combo)[-1],
        ("sd1-style.safetensors (for Stable Diffusion 1.x)", "sd1-style.safetensors"),
        "marked",
    )
    m.all_families.setChecked(False)
    m.add_combo.setCurrentIndex(1)
    m.add_button.click()
    m.rows[0].weight.setValue(0.65)
    eq(m.add_lora("ink.safetensors", -1.5), True, "second LoRA added")
    eq([d for _, d in combo_items(m.add_combo)], [None], "nothing left to add")
    eq(
        (m.rows[0].weight.minimum(), m.rows[0].weight.maximum(), m.rows[0].weight.singleStep()),
        (-4.0, 4.0, 0.05),
        "weight range",
    )
    panel.save_settings()
    stored = document.load_settings(doc)
    eq(
        (stored.model, [(lora.name, lora.weight) for lora in stored.loras]),
        ("tiny-xl", [("xl/detail.safetensors", 0.65), ("ink.safetensors", -1.5)]),
        "stored",
    )
    panel.shutdown()

    again = dock.CollagePanel(fakekrita.Host(doc), model)  # the document shown anew
    again.refresh()
    m = again.model_section
    eq(m.model.currentData(), "tiny-xl", "model shown again")
    eq(
        [(r.name, r.weight.value()) for r in m.rows],
        [("xl/detail.safetensors", 0.65), ("ink.safetensors", -1.5)],
        "LoRAs shown again",
    )
    m.model.setCurrentIndex(0)  # back to the SD 1.x default: the SDXL LoRA is marked
    eq(m.rows[0].label.text(), "xl/detail.safetensors (for Stable Diffusion XL, not this model)", "mark")
    m.rows[0].remove.click()
    again.save_settings()
    stored = document.load_settings(doc)
    eq((stored.model, [lora.name for lora in stored.loras]), ("", ["ink.safetensors"]), "after removing")

    model._set_info(library_info(loras=("ink.safetensors", "new.safetensors")))  # /info fetched again
    eq([d for _, d in combo_items(m.add_combo)], ["new.safetensors"], "refreshed LoRAs")
    again.shutdown()

    stored.model = "gone.safetensors"  # a document from another bridge
    document.save_settings(doc, stored)
    third = dock.CollagePanel(fakekrita.Host(doc), model)
    third.refresh()
    m = third.model_section
    eq(m.model.currentText(), "gone.safetensors (not on this bridge)", "missing model shown")
    eq(m.note.isHidden(), False, "note shown")
    eq(model.generate(doc), False, "generate refused")
    if not model.last_error.startswith(
        "The model 'gone.safetensors' chosen for this document is not on this bridge"
    ):
        raise AssertionError(model.last_error)
    eq(third.error.text(), model.last_error, "error shown in the dock")
    third.resize(360, 1000)
    third.show()
    qt.spin(lambda: False, 50)
    if third.grab().isNull():
        raise AssertionError("the panel does not render")
    third.shutdown()
    report["detail"] = "picker, LoRA list, save, reopen, refresh, missing model"


check(qt_smoke_pickers.dock_controlnet_and_clip_skip)
check(qt_smoke_pickers.dock_ip_adapter_look)


@check
def generate_regenerate_and_errors(report):
    from collage_diffusion import collage, document, results
    from collage_diffusion.model import CONNECTED, DISCONNECTED, CollageModel

    url = bridge_url()
    doc = fakekrita.sample_stack()
    s = document.load_settings(doc)
    s.prompt, s.steps, s.seed = "a cat and a ball", 3, 11
    document.save_settings(doc, s)
    model = CollageModel(url)
    model.check_connection().wait(15)
    eq(model.state, CONNECTED, "connected")
    progress = []
    model.progress.connect(lambda text, fraction: progress.append(text))
    if not model.generate(doc):
        raise AssertionError(model.last_error)
    model.wait_idle(120)
    eq(model.last_error, "", "error")
    group = results.find_results_group(doc)
    eq(
        [n.name() for n in group.childNodes()],
        ["old result", collage.result_layer_name("a cat and a ball", 11)],
        "layers",
    )
    if not any(t.startswith("sampling") for t in progress):
        raise AssertionError(f"no sampling progress: {progress}")
    cat = next(n for n in document.list_layers(doc) if n.name == "cat")
    if not model.generate(doc, "regenerate", active_uid=cat.uid):
        raise AssertionError(model.last_error)
    model.wait_idle(120)
    eq(model.last_error, "", "regenerate error")
    eq(len(group.childNodes()), 3, "regenerated layer")
    down = CollageModel("http://127.0.0.1:9")
    down.generate(doc)
    down.wait_idle(30)
    eq(down.state, DISCONNECTED, "state after a refused connection")
    if "Cannot reach the bridge" not in down.last_error:
        raise AssertionError(down.last_error)
    eq(len(group.childNodes()), 3, "nothing written when the bridge is down")
    report["detail"] = f"{len(progress)} progress updates"


class FakeBridge:
    """A stdlib HTTP server playing the bridge for one job, failing on purpose: the first long
    polls get dropped connections, the next a 503, then the job is done."""

    JOB = "ab" * 16

    def __init__(self, port: int = 0):
        import http.server
        import threading

        from collage_diffusion import wire

        fake = self
        self.polls = 0
        png = wire.encode_png(64, 64, bytes((10, 200, 30, 255)) * (64 * 64))

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, status, body, kind="application/json"):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                job = f"/jobs/{fake.JOB}"
                if self.path.startswith("/info"):
                    info = wire.InfoResponse(1, "t", "demo", ["demo"], True, "cpu", "f32", 0, None, {}, {})
                    self.send(200, info.to_dict())
                elif self.path.startswith(job + "/events"):
                    fake.polls += 1
                    if fake.polls <= 2:  # dropped, twice: Qt itself retries a GET once
                        self.close_connection = True
                        return
                    if fake.polls == 3:
                        self.send(503, {"status": 503, "error": "busy"})
                        return
                    event = wire.ProgressEvent(1, fake.JOB, wire.EVENT_STATE, wire.DONE, 0.0)
                    self.send(200, wire.EventsResponse(fake.JOB, wire.DONE, True, 1, [event]).to_dict())
                elif self.path == job:
                    result = wire.ResultInfo(0, 5, 64, 64, job + "/results/0")
                    status = wire.JobStatus(fake.JOB, wire.DONE, 0.0, "demo", results=[result], last_seq=1)
                    self.send(200, status.to_dict())
                elif self.path == job + "/results/0":
                    self.send(200, png, "image/png")
                else:
                    self.send(404, {"status": 404, "error": "no"})

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@check
def reconnects(report):
    """A job followed through a dropped connection and a 503 (with back-off), and a dock that
    reconnects by itself once the bridge is back."""
    import socket

    from collage_diffusion import client, model, qt

    fake = FakeBridge()
    try:
        follower = client.JobFollower(client.BridgeClient(fake.url), FakeBridge.JOB)
        retries, done = [], []
        follower.retrying.connect(retries.append)
        follower.succeeded.connect(lambda status, results: done.append(results))
        follower.start()
        follower.wait(30)
        eq((follower.error, len(done), fake.polls), ("", 1, 4), "followed to the end")
        eq(len(retries), 2, f"retries {retries}")
        if "closed the connection" not in retries[0] or "busy" not in retries[1]:
            raise AssertionError(retries)
        eq(wire_size(done[0][0][1]), (64, 64), "result fetched")
    finally:
        fake.close()
    # The monitor: down, then the bridge comes up on that port, and the state follows.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model.CHECK_DISCONNECTED_S = 0.2
    m = model.CollageModel(f"http://127.0.0.1:{port}")
    states = []
    m.connection_changed.connect(lambda state, text: states.append(state))
    m.start_monitor()
    qt.spin(lambda: m.state == model.DISCONNECTED, 10000)
    fake = FakeBridge(port)
    try:
        qt.spin(lambda: m.state == model.CONNECTED, 10000)
        eq(m.state, model.CONNECTED, f"reconnected by itself ({states})")
    finally:
        m.stop_monitor()
        fake.close()
    report["detail"] = f"states {states}"


def wire_size(png):
    from collage_diffusion import wire

    return wire.png_size(png)


@check
def local_bridge(report):
    from collage_diffusion import bridge_process, client, qt

    env = bridge_process.load_config()
    if env is None or not os.environ.get("COLLAGE_BRIDGE_CONFIG"):
        raise Skip("no COLLAGE_BRIDGE_CONFIG")
    bridge = bridge_process.make_local_bridge()
    ready, stopped = [], []
    bridge.ready.connect(ready.append)
    bridge.stopped.connect(stopped.append)
    eq(bridge.start(int(os.environ.get("COLLAGE_TEST_LOCAL_PORT", "17871")), env=env), "", "start")
    qt.spin(lambda: ready or stopped, 90000)
    if not ready:
        raise AssertionError(f"not up: {stopped} {bridge.lines[-5:]}")
    eq(client.BridgeClient(ready[0]).health().wait(10).ok, True, "health")
    bridge.stop()
    qt.spin(lambda: stopped, 10000)
    eq(stopped, ["The local bridge was stopped."], "stopped")
    missing = bridge_process.BridgeEnv(python="/nonexistent/python")
    if "does not exist" not in bridge_process.make_local_bridge().start(1, env=missing):
        raise AssertionError("a missing Python is not reported")


def main() -> int:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from collage_diffusion import qt

    app = qt.QtWidgets.QApplication.instance() or qt.QtWidgets.QApplication([])
    checks = {}
    for fn in CHECKS:
        entry = run_check(fn)
        checks[fn.__name__] = entry
        print(
            f"[qt_smoke] {fn.__name__}: {'ok' if entry['ok'] else entry['skipped'] or 'FAILED'}", flush=True
        )
    report = {"checks": checks, "qt": qt.QT_BINDING, "python": sys.version.split()[0]}
    Path(sys.argv[1]).write_text(json.dumps(report, indent=2))
    del app
    return 0


if __name__ == "__main__":
    sys.exit(main())
