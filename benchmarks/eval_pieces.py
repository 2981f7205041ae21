"""Does each Collage Diffusion piece improve its own fidelity measure? A table on held-out collages.

The collages (benchmarks/held_out.py, with the measures) are built from the synthetic vocabulary
the demo model was trained on (`training.data`), from a seed the training never used, so every
object has a known colour, shape, texture and mask. For each measure the plain composite + SDEdit baseline is compared with
the piece that targets it switched on:

* spatial accuracy (masked cross-attention, §1): generate at strength 1 (only the prompt and the
  attention bias know the layout); a layer counts as placed when its colour covers at least 30 %
  of its mask and at least half of that colour's pixels in the image lie inside the mask.
* appearance (textual inversion, §2, or masked reference attention): each collage has one striped/dotted object whose text and
  prompt do not name the pattern; mean |generated - layer| (0..255) inside the object, and the
  Wasserstein-1 distance of the colour distributions there (blind to the stripes' phase).
* structure (ControlNet, §3): share of the layers' Canny edges found again (±1 px) in the
  result, without and with the model's edge ControlNet on every layer (`training.train_controlnet`
  trains the demo model's).
* harmonization vs fidelity per layer (per-layer strength, §4): two objects come as cut-outs with
  a patch of a different background around them (hard seams); the first is to be kept, the second
  to fit in. Fidelity = mean |generated - layer| inside the first object; seam = mean gradient
  magnitude on the second's patch border.
* layer stacks (output "layers"): inside each object's opaque place, the mean RGB distance of the
  background layer to the object's colour (want large) and to the colour of the background around
  it (want small), and the share of pixels nearer the latter: no fill, a plain Telea inpaint, and
  the engine's fill pass. `--measures` picks a subset of the five.

    python -m benchmarks.eval_pieces --n 20            # the shipped demo model
    python -m benchmarks.eval_pieces --model FILE.safetensors   # a file from training/export.py
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as `python benchmarks/NAME.py`: set up as `python -m benchmarks.NAME` is
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import benchmarks  # noqa: F401  (benchmarks/__init__.py)

import argparse
import os
import tempfile
import time
from dataclasses import replace

import cv2
import numpy as np
import torch

from benchmarks.held_out import (
    HELD_OUT_SEED,
    SIZE,
    SPATIAL_EXTRA_SEEDS,
    Case,
    Gallery,
    colour_w1,
    composite_of,
    edge_recall,
    harmonization_scores,
    inside_distance,
    make_cases,
    placed,
    placed_alpha,
)
from core.collage import Collage
from core.generate import generate
from core.models import load_pipeline
from core.options import EngineOptions, build_hooks

Row = tuple[str, str, str, float, float]  # measure, setting, shown value, value, seconds per image


def run(model, collage: Collage, options: EngineOptions | None = None) -> tuple[np.ndarray, float]:
    hooks, warnings = build_hooks(model, collage, options or EngineOptions())
    if warnings:
        raise RuntimeError("; ".join(warnings))
    t0 = time.perf_counter()
    image = generate(model, collage, hooks=hooks).images[0].image
    return image, time.perf_counter() - t0


def configured(case: Case, **settings) -> Collage:
    layers = [replace(layer, **settings.get("layer", {})) for layer in case.collage.layers]
    fields = {k: v for k, v in settings.items() if k != "layer"}
    return replace(case.collage, layers=layers, **fields)


OFF = dict(regional_weight=0.0, self_attention_weight=0.0)
SPATIAL_SETTINGS: list[tuple[str, float, EngineOptions]] = [
    # (label, every layer's attention_weight, engine options): docs/attention.md has the table.
    ("baseline SDEdit", 0.0, EngineOptions(**OFF)),
    ("+ masked attention", 1.0, EngineOptions(**OFF)),
    ("+ masked attention w=2", 2.0, EngineOptions(**OFF)),
    ("+ self-attention sw=2 (default)", 1.0, EngineOptions(**OFF | {"self_attention_weight": 2.0})),
    ("+ self-attention sw=2, w=2", 2.0, EngineOptions(**OFF | {"self_attention_weight": 2.0})),
    ("+ regional", 1.0, EngineOptions(**OFF | {"regional_weight": 1.0})),
    ("+ regional + self-attention sw=2", 1.0, EngineOptions(regional_weight=1.0, self_attention_weight=2.0)),
    ("+ self-attention sw=4, w=4", 4.0, EngineOptions(**OFF | {"self_attention_weight": 4.0})),
]


def spatial_seeds(args) -> list[int]:
    """The held-out draws of the spatial measure: `--seed` first, then `--spatial-seeds`."""
    extra = [int(s) for s in str(args.spatial_seeds or "").split(",") if s.strip()]
    return [args.seed] + [s for s in extra if s != args.seed]


def eval_spatial(model, args, gallery: Gallery, common: dict) -> list[Row]:
    """§1: spatial accuracy at strength 1 per spatial mode: mean over several held-out draws ± spread.

    No single draw decides: each row's value is the mean over the seeds' accuracies, the spread
    their standard deviation, and each seed's accuracy is shown too.
    """
    rows: list[Row] = []
    seeds = spatial_seeds(args)
    draws = {seed: make_cases(args.n, seed, "layout") for seed in seeds}
    for k, case in enumerate(draws[seeds[0]]):
        gallery.add("spatial (strength 1)", "collage", k, composite_of(case))
    chosen = [s for s in SPATIAL_SETTINGS if not args.spatial_modes or s[0] in args.spatial_modes]
    for label, weight, options in chosen:
        per_seed, secs = [], []
        for seed, cases in draws.items():
            hits = []
            for k, case in enumerate(cases):
                c = configured(case, strength=1.0, layer={"attention_weight": weight}, **common)
                img, dt = run(model, c, options)
                secs.append(dt)
                if seed == seeds[0]:
                    gallery.add("spatial (strength 1)", label, k, img)
                hits += [placed(img, o, m) for o, m in zip(case.objects, case.visible, strict=True)]
            per_seed.append(float(np.mean(hits)))
        mean, spread = float(np.mean(per_seed)), float(np.std(per_seed))
        text = f"{mean:.2f} ± {spread:.2f} (" + " ".join(f"{a:.2f}" for a in per_seed) + ")"
        rows.append(("spatial acc. (s=1) ↑", label, text, mean, np.mean(secs)))
    return rows


def eval_structure(model, args, gallery: Gallery, common: dict) -> list[Row]:
    """§3: edge recall at the usual strength, ControlNet off and on for every layer."""
    rows: list[Row] = []
    # §3 structure: edges at the usual strength, ControlNet off vs on for every layer.
    cases = make_cases(args.n, args.seed, "layout")
    structure = f"structure (strength {args.strength:.1f})"
    for k, case in enumerate(cases):
        gallery.add(structure, "collage", k, composite_of(case))
    control = EngineOptions(controlnet=args.controlnet)
    for label, weight in (("baseline SDEdit", 0.0), ("+ ControlNet", 1.0)):
        edges, secs = [], []
        for k, case in enumerate(cases):
            c = configured(
                case,
                strength=args.strength,
                layer={"attention_weight": 0.0, "control_weight": weight},
                **common,
            )
            img, dt = run(model, c, control)
            secs.append(dt)
            gallery.add(structure, label, k, img)
            ref = composite_of(case)
            edges += [edge_recall(img, ref, m) for m in case.visible]
        rows.append(("edge recall ↑", label, f"{np.mean(edges):.2f}", np.mean(edges), np.mean(secs)))
    return rows


def appearance_settings(spec: str) -> list[tuple[str, str, float, dict]]:
    """(label, appearance, weight, EngineOptions fields) per comma-separated item of
    --appearance-modes: "sdedit", "inversion", "ip-adapter[:WEIGHT]" (needs --ip-adapter and
    --image-encoder), or "reference[:WEIGHT[:END]][:FIELD=VALUE...]" (END: fraction of the
    schedule; FIELD: an EngineOptions `reference_FIELD`, e.g. lowpass=3)."""
    out = []
    for item in spec.split(","):
        name, *rest = item.strip().split(":")
        if name == "sdedit":
            out.append(("baseline SDEdit", "off", 1.0, {}))
        elif name == "inversion":
            out.append(("+ inversion", "learned", 1.0, {}))
        elif name == "ip-adapter":
            weight = float(rest[0]) if rest else 1.0
            out.append((f"+ IP-Adapter w={weight:g}", "ip-adapter", weight, {}))
        elif name == "reference":
            # reference[:W[:END]][:FIELD=VALUE...]: FIELD an EngineOptions reference_FIELD
            pairs = [r for r in rest if "=" in r]
            rest = [r for r in rest if "=" not in r]
            weight, end = float(rest[0]) if rest else 1.0, float(rest[1]) if len(rest) > 1 else 1.0
            fields = {"reference_end": end}
            for pair in pairs:
                key, value = pair.split("=", 1)
                kind = type(getattr(EngineOptions(), f"reference_{key}", None))
                if kind not in (bool, int, float):
                    raise SystemExit(f"--appearance-modes: no option reference_{key}")
                fields[f"reference_{key}"] = value in ("1", "true") if kind is bool else kind(value)
            label = (
                f"+ reference w={weight:g}" + (f" end={end:g}" if end < 1 else "") + " ".join(["", *pairs])
            )
            out.append((label, "reference", weight, fields))
        else:
            raise SystemExit(
                f"--appearance-modes: unknown item {item!r}"
                " (sdedit, inversion, ip-adapter[:W], reference[:W[:END]][:FIELD=VALUE])"
            )
    return out


def ip_adapter_files(args):
    """The IP-Adapter and image encoder of --ip-adapter / --image-encoder (None without both)."""
    from core.ip_adapter_files import IPAdapterFiles

    if not (getattr(args, "ip_adapter", None) and getattr(args, "image_encoder", None)):
        return None
    return IPAdapterFiles(Path(args.ip_adapter), Path(args.image_encoder))


def inversion_fields(args) -> dict:
    """--inversion-set FIELD=VALUE items as InversionSettings fields (VALUE in JSON; lists → tuples)."""
    import json

    from core.inversion import InversionSettings

    names = set(InversionSettings.__dataclass_fields__)
    out = {}
    for item in args.inversion_set or []:
        name, sep, text = item.partition("=")
        try:
            if not sep or name not in names:
                raise ValueError(f"FIELD must be one of {', '.join(sorted(names))}")
            value = json.loads(text)
        except ValueError as e:
            raise SystemExit(f"--inversion-set {item!r}: {e}") from e
        out[name] = tuple(value) if isinstance(value, list) else value
    return out


def eval_appearance(model, args, gallery: Gallery, common: dict) -> list[Row]:
    """§2: the unnamed pattern's and colour's distances: SDEdit, inversion, reference attention."""
    rows: list[Row] = []
    # §2 appearance: inversion off vs on for the layer whose pattern nobody names.
    from core.inversion import recipe as inv  # the knobs are read from here at run time

    chosen = {"steps": args.inversion_steps, "learning_rate": args.inversion_lr} | inversion_fields(args)
    chosen = {k: v for k, v in chosen.items() if v is not None}
    inv.DEFAULT_SETTINGS = replace(inv.DEFAULT_SETTINGS, **chosen)
    if not args.caption_templates:
        # The demo model's inversions use its captions' grammar ("a red circle on grass");
        # this measures what SD's usual "a photo of a …" prompts, words it never saw, give.
        inv.MODEL_PROMPT_TEMPLATES = {}
    # Two kinds of look that no text names: a pattern (which a 64x64 demo image can hardly
    # carry) at the usual strength, and the object's colour at a high strength (where the prompt
    # alone would pick any colour).
    for kind, what, strength in (
        ("appearance", "unnamed pattern", args.strength),
        ("colour", "unnamed colour", 0.9),
    ):
        cases = make_cases(args.n_appearance, args.seed, kind)
        section = f"appearance ({what}, strength {strength:.1f})"
        for label, mode, weight, fields in appearance_settings(args.appearance_modes):
            dists, w1s, rests, secs = [], [], [], []
            options = EngineOptions(**fields, ip_adapter=ip_adapter_files(args))
            for k, case in enumerate(cases):
                gallery.add(section, "collage", k, composite_of(case))
                t = case.textured
                layers = [
                    replace(
                        layer,
                        attention_weight=args.appearance_attention,
                        appearance=mode if i == t else False,
                        appearance_weight=weight,
                    )
                    for i, layer in enumerate(case.collage.layers)
                ]
                c = replace(case.collage, layers=layers, strength=strength, **common)
                img, dt = run(model, c, options)
                secs.append(dt)
                gallery.add(section, label, k, img)
                layer_rgb = case.collage.layers[t].image[..., :3]
                dists.append(inside_distance(img, layer_rgb, case.visible[t]))
                w1s.append(colour_w1(img, layer_rgb, case.visible[t]))
                # Side effects: how far the rest of the image (no object there) moved.
                rest = case.alphas.max(0) < 0.05
                rests.append(float(np.abs(img.astype(np.float32) - composite_of(case))[rest].mean()))
            value = f"{np.mean(dists):.1f} / {np.mean(w1s):.1f} / {np.mean(rests):.1f}"
            rows.append((f"{what}: pixel / W1 / rest ↓", label, value, np.mean(dists), np.mean(secs)))
    return rows


def eval_harmonization(model, args, gallery: Gallery, common: dict) -> list[Row]:
    """§4: keep one layer, blend another: one strength vs per-layer strengths."""
    rows: list[Row] = []
    # §4 harmonization vs fidelity, per layer: two cut-outs, each carrying a patch of another
    # background (hard seams). The painter wants the first kept as it is and the second to fit in:
    # fidelity = distance to the layer inside the first object, seam = the second's patch border.
    # One strength for everything must trade one for the other; per-layer strength need not.
    cases = make_cases(args.n, args.seed, "seams")
    section, measure = "harmonization (keep the 1st, blend the 2nd)", "seam 2nd ↓ / dist. 1st ↓"

    start = np.array([harmonization_scores(composite_of(c), c) for c in cases]).mean(0)
    rows.append((measure, "composite (no generation)", f"{start[0]:.1f} / {start[1]:.1f}", start[0], 0.0))
    for label, bg, keep, blend in (
        ("baseline SDEdit s=0.2", 0.2, None, None),
        ("baseline SDEdit s=0.6", 0.6, None, None),
        ("baseline SDEdit s=0.9", 0.9, None, None),
        ("+ per-layer strength (0.2 / 0.9, bg 0.9)", 0.9, 0.2, 0.9),
        ("+ per-layer strength (0.2 / 0.9, bg 0.6)", 0.6, 0.2, 0.9),
    ):
        values, secs = [], []
        for k, case in enumerate(cases):
            gallery.add(section, "collage", k, composite_of(case))
            layers = [
                replace(layer, attention_weight=0.0, strength=s)
                for layer, s in zip(case.collage.layers, (keep, blend), strict=True)
            ]
            img, dt = run(model, replace(case.collage, layers=layers, strength=bg, **common))
            secs.append(dt)
            gallery.add(section, label, k, img)
            values.append(harmonization_scores(img, case))
        seam, dist = np.mean(values, axis=0)
        rows.append((measure, label, f"{seam:.1f} / {dist:.1f}", seam, np.mean(secs)))
    return rows


def fill_distances(fill: np.ndarray, result: np.ndarray, case: Case, opaque: np.ndarray) -> list[float]:
    """Per object: mean distance (RGB, 0..441) of the fill inside its opaque place to the object's
    colour (its mean in the result), and to the surrounding background's (the result's mean in a
    ring around the object, outside every object layer); the share of pixels nearer the latter."""
    out = []
    for visible in case.visible:
        inside = opaque & (visible > 0.5)
        ring = cv2.dilate((visible > 0).astype(np.uint8), np.ones((17, 17), np.uint8)).astype(bool) & ~opaque
        if not inside.any() or not ring.any():
            continue
        px = fill[inside].astype(float)
        d_obj = np.linalg.norm(px - result[inside].astype(float).mean(0), axis=1)
        d_bg = np.linalg.norm(px - result[ring].astype(float).mean(0), axis=1)
        out.append((d_obj.mean(), d_bg.mean(), (d_bg < d_obj).mean()))
    return out


def eval_layers(model, args, gallery: Gallery, common: dict) -> list[Row]:
    """Layer stacks: is the background filled under the objects far from them, near what surrounds them?"""
    from core.layer_stack import opaque_region, split_result, stack_results

    section, measure = "layer stack background", "to object ↑ / to bg ↓ / nearer bg ↑"
    values: dict[str, list] = {
        "no fill (result shows)": [],
        "Telea pre-fill only": [],
        "+ engine fill pass": [],
    }
    secs, gen_secs = [], []
    for k, case in enumerate(make_cases(args.n, args.seed, "layout")):
        collage = configured(case, strength=args.strength, **common)
        t0 = time.perf_counter()
        result = generate(model, collage)
        gen_secs.append(time.perf_counter() - t0)
        image = result.images[0].image
        t0 = time.perf_counter()
        stack = stack_results(model, collage, result, (SIZE, SIZE)).stacks[0]
        secs.append(time.perf_counter() - t0)
        objects = split_result(collage, image, None, 0).layers[1:-1]
        opaque = opaque_region([placed_alpha(o) for o in objects], (SIZE, SIZE))
        telea = cv2.inpaint(np.ascontiguousarray(image), opaque.astype(np.uint8), 5, cv2.INPAINT_TELEA)
        fills = {"no fill (result shows)": image, "Telea pre-fill only": telea}
        fills["+ engine fill pass"] = stack.layers[0].image[..., :3]
        gallery.add(section, "result", k, image)
        for label, fill in fills.items():
            values[label] += fill_distances(fill, image, case, opaque)
            gallery.add(section, label, k, fill)
    rows = []
    for label, vals in values.items():
        d_obj, d_bg, nearer = np.mean(vals, axis=0)
        # s/image: the generation's time on the first row, the fill pass's on the last
        cost = (
            np.mean(secs) if label.startswith("+") else np.mean(gen_secs) if label.startswith("no") else 0.0
        )
        rows.append((measure, label, f"{d_obj:.0f} / {d_bg:.0f} / {nearer:.2f}", d_bg, cost))
    return rows


MEASURES = {
    "spatial": eval_spatial,
    "structure": eval_structure,
    "appearance": eval_appearance,
    "harmonization": eval_harmonization,
    "layers": eval_layers,
}


def evaluate(model, args, gallery: Gallery | None = None) -> list[Row]:
    gallery = gallery or Gallery(0)
    common = {"steps": args.steps, "guidance_scale": args.guidance}
    rows: list[Row] = []
    for name in args.measures.split(","):
        rows += MEASURES[name.strip()](model, args, gallery, common)
    return rows


def _is_demo_file(path: str) -> bool:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return (f.metadata() or {}).get("format") == "collage-diffusion-demo"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default="demo",
        help="model reference (default: the demo model), or a file written by training/export.py",
    )
    p.add_argument(
        "--controlnet",
        help="edge ControlNet for the model (default: the one that comes with the demo model or file)",
    )
    p.add_argument("--n", type=int, default=20, help="held-out collages per measure")
    p.add_argument(
        "--measures", default=",".join(MEASURES), help="comma-separated subset of: " + ", ".join(MEASURES)
    )
    p.add_argument("--n-appearance", type=int, default=10, help="collages for the inversion rows")
    p.add_argument(
        "--appearance-modes",
        default="sdedit,inversion,reference",
        help="settings of the appearance rows: sdedit, inversion, ip-adapter[:WEIGHT],"
        " reference[:WEIGHT[:END]][:FIELD=VALUE...] (FIELD: an EngineOptions reference_FIELD), comma-separated",
    )
    p.add_argument(
        "--ip-adapter", metavar="FILE", help="the IP-Adapter of the ip-adapter rows (with --image-encoder)"
    )
    p.add_argument(
        "--image-encoder", metavar="PATH", help="its CLIP image encoder: a file or a transformers folder"
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--strength", type=float, default=0.7, help="SDEdit strength of the fidelity rows")
    p.add_argument("--inversion-steps", type=int, help="training steps of each inversion (default: core's)")
    p.add_argument("--inversion-lr", type=float, help="learning rate of each inversion (default: core's)")
    p.add_argument(
        "--inversion-set",
        action="append",
        metavar="FIELD=VALUE",
        help="any other InversionSettings field, VALUE in JSON (keep_size=false, timesteps=[0,1]); repeatable",
    )
    p.add_argument(
        "--appearance-attention",
        type=float,
        default=0.0,
        help="masked-attention weight of the layers in the appearance rows (default 0: inversion alone)",
    )
    p.add_argument(
        "--default-templates",
        dest="caption_templates",
        action="store_false",
        help="train inversions with core.inversion's own prompts, not the demo captions' grammar",
    )
    p.add_argument("--figure", metavar="PNG", help="also save the first collages of each measure as a figure")
    p.add_argument("--figure-rows", type=int, default=3, help="collages per measure in the figure")
    p.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    p.add_argument(
        "--spatial-seeds",
        default=",".join(map(str, SPATIAL_EXTRA_SEEDS)),
        help="more held-out draws for the spatial measure, comma-separated ('' for --seed alone)",
    )
    p.add_argument(
        "--spatial-mode",
        dest="spatial_modes",
        action="append",
        help="only this spatial setting (its label, e.g. '+ regional'); repeatable; default all",
    )
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    inversion_fields(args)  # a bad --inversion-set stops here, before the model loads
    modes = [mode for _, mode, _, _ in appearance_settings(args.appearance_modes)]
    if "ip-adapter" in modes and "appearance" in args.measures and ip_adapter_files(args) is None:
        p.error("the ip-adapter rows need --ip-adapter FILE and --image-encoder PATH")
    torch.set_num_threads(args.threads)
    # Inversions go to a throw-away cache: every run measures training, not a cache hit.
    os.environ.setdefault("COLLAGE_CACHE", tempfile.mkdtemp(prefix="eval-pieces-"))
    ref = args.model
    if ref.endswith(".safetensors") and _is_demo_file(ref):  # a file from training/export.py
        from training.export import unpack

        ref = str(unpack(ref, tempfile.mkdtemp(prefix="eval-model-")))
        if args.controlnet is None and (Path(ref) / "controlnet").is_dir():
            args.controlnet = str(Path(ref) / "controlnet")
    model = load_pipeline(ref, device="cpu", dtype="float32")
    gallery = Gallery(args.figure_rows if args.figure else 0)
    rows = evaluate(model, args, gallery)
    if args.figure:
        gallery.save(args.figure)
    print(f"model: {args.model}   held-out collages: {args.n} (appearance: {args.n_appearance})")
    if "spatial" in args.measures:
        print(f"spatial draws (collage seeds): {', '.join(map(str, spatial_seeds(args)))}")
    print(f"{'measure':34} {'setting':38} {'value':>30} {'s/image':>8}")
    for measure, label, text, _value, secs in rows:
        s = "" if np.isnan(secs) else f"{secs:.2f}"
        print(f"{measure:34} {label:38} {text:>30} {s:>8}")


if __name__ == "__main__":
    main()
