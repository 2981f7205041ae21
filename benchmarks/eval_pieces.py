"""Does each Collage Diffusion piece improve its own fidelity measure? A table on held-out collages.

The collages are built from the synthetic vocabulary the demo model was trained on
(`training.data`), from a seed the training never used, so every object has a known colour,
shape, texture and mask. For each measure the plain composite + SDEdit baseline is compared with
the piece that targets it switched on:

* spatial accuracy (masked cross-attention, §1): generate at strength 1 (only the prompt and the
  attention bias know the layout); a layer counts as placed when its colour covers at least 30 %
  of its mask and at least half of that colour's pixels in the image lie inside the mask.
* appearance (textual inversion, §2): each collage has one striped/dotted object whose text and
  prompt do not name the pattern; mean |generated - layer| (0..255) inside the object, and the
  Wasserstein-1 distance of the colour distributions there (blind to the stripes' phase).
* structure (ControlNet, §3): share of the layers' Canny edges found again (±1 px) in the
  result. No ControlNet is trained for the demo model, so the "with" row is n/a.
* harmonization (per-layer strength, §4): each object comes as a cut-out with a patch of a
  different background around it (a visible seam); seam = mean gradient magnitude on the
  patch border, fidelity = mean |generated - layer| inside the object.

    python -m benchmarks.eval_pieces --model training/runs/demo-v2/pipeline --n 20
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass, replace

import cv2
import numpy as np
import torch

from core.collage import Collage, Layer
from core.generate import generate
from core.models import load_pipeline
from core.options import EngineOptions, build_hooks
from training.data import (
    BACKGROUNDS,
    COLOURS,
    ObjectSpec,
    background_rgb,
    caption_for,
    random_object,
    render_object,
    shape_alpha,
)

SIZE = 64
CAPTION_TEMPLATES = ("a {}", "a {} on white", "a {} on grass", "a {} in the sky")
HELD_OUT_SEED = 987654321  # training uses its own seed (20240521); these collages are never seen


@dataclass
class Case:
    collage: Collage
    objects: list[ObjectSpec]
    alphas: np.ndarray  # (n, H, W) each object's own coverage (not the layer's patch)
    visible: np.ndarray  # (n, H, W) visible object coverage after occlusion
    patches: np.ndarray | None = None  # (n, H, W) bool: the layer's whole patch (harmonization)
    textured: int | None = None  # index of the layer whose pattern no text names


def _plain_text(o: ObjectSpec) -> ObjectSpec:
    return replace(o, texture="plain")


def _objects(rng, n: int, background: str, texture: bool) -> list[ObjectSpec]:
    objs: list[ObjectSpec] = []
    while len(objs) < n:
        o = random_object(rng, SIZE, SIZE, texture_p=0.0)
        # Colour detection needs the object's colour to differ from the background's.
        if (o.colour == "green" and background == "grass") or (o.colour == "blue" and background == "sky"):
            continue
        if any(p.colour == o.colour for p in objs):
            continue
        if any(np.hypot(p.cx - o.cx, p.cy - o.cy) < (p.size + o.size) * 0.45 for p in objs):
            continue  # keep objects mostly apart: each needs a visible region to be found in
        objs.append(o)
    if texture:
        objs[0] = replace(
            objs[0], texture=("striped", "dotted")[int(rng.integers(2))], size=max(objs[0].size, 26)
        )
    return objs


def make_cases(n: int, seed: int, kind: str) -> list[Case]:
    """`n` held-out collages; `kind` is "layout", "appearance" or "seams"."""
    cases = []
    for k in range(n):
        rng = np.random.default_rng([seed, {"layout": 0, "appearance": 1, "seams": 2}[kind], k])
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
        bg = np.clip(np.rint(background_rgb(background, rng, SIZE, SIZE)), 0, 255).astype(np.uint8)
        objs = _objects(rng, 1 if kind == "seams" else 2, background, texture=kind == "appearance")
        layers, alphas, patches = [], [], []
        for o in objs:
            rgba = render_object(o, SIZE, SIZE)
            alpha = shape_alpha(o.shape, o.cx, o.cy, o.size, SIZE, SIZE)
            if kind == "seams":
                # A cut-out with its own, different background around the object: a hard seam.
                other = [b for b in BACKGROUNDS if b != background][int(rng.integers(2))]
                patch_bg = background_rgb(other, rng, SIZE, SIZE)
                half = o.size * 0.75
                y0, y1 = int(max(0, o.cy - half)), int(min(SIZE, o.cy + half))
                x0, x1 = int(max(0, o.cx - half)), int(min(SIZE, o.cx + half))
                patch = np.zeros((SIZE, SIZE), bool)
                patch[y0:y1, x0:x1] = True
                rgb = patch_bg * (1 - alpha[..., None]) + rgba[..., :3] * alpha[..., None]
                rgba = np.concatenate([rgb, patch[..., None] * 255.0], -1)
                rgba = np.clip(np.rint(rgba), 0, 255).astype(np.uint8)
                patches.append(patch)
            layers.append(Layer(text=_plain_text(o).text, image=rgba))
            alphas.append(alpha)
        alphas = np.stack(alphas)
        visible = alphas.copy()
        for i in range(len(objs)):
            for j in range(i + 1, len(objs)):
                cover = patches[j] if patches else alphas[j]
                visible[i] *= 1 - cover
        prompt = caption_for([_plain_text(o) for o in objs], background)
        collage = Collage(prompt=prompt, layers=layers, width=SIZE, height=SIZE, background=bg, seed=k)
        cases.append(
            Case(
                collage,
                objs,
                alphas,
                visible,
                np.stack(patches) if patches else None,
                0 if kind == "appearance" else None,
            )
        )
    return cases


# ---------------------------------------------------------------------------------------------
# Measures


def colour_pixels(image: np.ndarray, colour: str, threshold: float = 80.0) -> np.ndarray:
    """Pixels whose nearest palette colour is `colour`, within `threshold` (RGB distance)."""
    img = image.astype(np.float32)
    palette = np.array(list(COLOURS.values()), np.float32)
    d = np.linalg.norm(img[:, :, None, :] - palette[None, None], axis=-1)
    idx = list(COLOURS).index(colour)
    return (d.argmin(-1) == idx) & (d[..., idx] < threshold)


def placed(image: np.ndarray, obj: ObjectSpec, mask: np.ndarray) -> bool:
    hits = colour_pixels(image, obj.colour)
    m = mask > 0.5
    if m.sum() == 0:
        return True
    inside = (hits & m).sum()
    return inside >= 0.3 * m.sum() and inside >= 0.5 * max(1, hits.sum())


def inside_distance(image: np.ndarray, layer_rgb: np.ndarray, mask: np.ndarray) -> float:
    m = cv2.erode((mask > 0.99).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    if not m.any():
        m = mask > 0.5
    diff = np.abs(image.astype(np.float32) - layer_rgb.astype(np.float32)).mean(-1)
    return float(diff[m].mean())


def colour_w1(image: np.ndarray, layer_rgb: np.ndarray, mask: np.ndarray) -> float:
    """Wasserstein-1 distance of the colour distributions inside the object (per channel, 0..255).

    Unlike the pixel distance it does not care where the stripes are, only whether the object
    has them (a plain red circle and a red-and-white striped one differ; two stripe phases do not).
    """
    m = cv2.erode((mask > 0.99).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    if not m.any():
        m = mask > 0.5
    a = np.sort(image[m].astype(np.float32), axis=0)
    b = np.sort(layer_rgb[m].astype(np.float32), axis=0)
    return float(np.abs(a - b).mean())


def edge_recall(image: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """Share of the reference's edges inside the mask found again in the image (±1 px)."""
    ref = cv2.Canny(cv2.cvtColor(reference, cv2.COLOR_RGB2GRAY), 100, 200) > 0
    got = cv2.Canny(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 100, 200)
    got = cv2.dilate(got, np.ones((3, 3), np.uint8)) > 0
    m = cv2.dilate((mask > 0.5).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    ref &= m
    return float((ref & got).sum() / max(1, ref.sum()))


def seam_energy(image: np.ndarray, patch: np.ndarray, alpha: np.ndarray) -> float:
    """Mean gradient magnitude on the patch border, away from the object itself."""
    gray = image.astype(np.float32).mean(-1)
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    mag = np.hypot(gx, gy)
    p = patch.astype(np.uint8)
    ring = (cv2.dilate(p, np.ones((3, 3), np.uint8)) - cv2.erode(p, np.ones((3, 3), np.uint8))) > 0
    ring &= cv2.dilate((alpha > 0.05).astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
    # The canvas border is not a seam.
    ring[:1], ring[-1:], ring[:, :1], ring[:, -1:] = False, False, False, False
    return float(mag[ring].mean()) if ring.any() else 0.0


# ---------------------------------------------------------------------------------------------


def run(model, collage: Collage) -> tuple[np.ndarray, float]:
    hooks, _ = build_hooks(model, collage, EngineOptions())
    t0 = time.perf_counter()
    image = generate(model, collage, hooks=hooks).images[0].image
    return image, time.perf_counter() - t0


def configured(case: Case, **settings) -> Collage:
    layers = [replace(layer, **settings.get("layer", {})) for layer in case.collage.layers]
    fields = {k: v for k, v in settings.items() if k != "layer"}
    return replace(case.collage, layers=layers, **fields)


def evaluate(model, args) -> list[tuple[str, str, str, float, float]]:
    rows = []
    common = {"steps": args.steps, "guidance_scale": args.guidance}

    # §1 spatial accuracy: strength 1, attention off vs on.
    cases = make_cases(args.n, args.seed, "layout")
    for label, weight in (
        ("baseline SDEdit", 0.0),
        ("+ masked attention", 1.0),
        ("+ masked attention w=2", 2.0),
    ):
        hits, secs = [], []
        for case in cases:
            c = configured(case, strength=1.0, layer={"attention_weight": weight}, **common)
            img, dt = run(model, c)
            secs.append(dt)
            hits += [placed(img, o, m) for o, m in zip(case.objects, case.visible, strict=True)]
        rows.append(("spatial acc. (s=1) ↑", label, f"{np.mean(hits):.2f}", np.mean(hits), np.mean(secs)))

    # §3 structure: edges at the usual strength; no ControlNet exists for the demo model.
    edges, secs = [], []
    for case in cases:
        c = configured(case, strength=args.strength, layer={"attention_weight": 0.0}, **common)
        img, dt = run(model, c)
        secs.append(dt)
        ref = _composite(case)
        edges += [edge_recall(img, ref, m) for m in case.visible]
    rows.append(("edge recall ↑", "baseline SDEdit", f"{np.mean(edges):.2f}", np.mean(edges), np.mean(secs)))
    rows.append(("edge recall ↑", "+ ControlNet", "n/a (none trained)", float("nan"), float("nan")))

    # §2 appearance: inversion off vs on for the layer whose pattern nobody names.
    if args.inversion_steps > 0:
        import core.inversion as inv

        inv.DEFAULT_SETTINGS = inv.InversionSettings(steps=args.inversion_steps)
        if args.caption_templates:
            # The demo model only knows its captions' grammar ("a red circle on grass"); the
            # default templates ("a photo of a …") are words it never saw.
            inv.PROMPT_TEMPLATES = CAPTION_TEMPLATES
        cases = make_cases(args.n_appearance, args.seed, "appearance")
        for label, on in (("baseline SDEdit", False), ("+ inversion", True)):
            dists, w1s, secs = [], [], []
            for case in cases:
                t = case.textured
                layers = [
                    replace(layer, attention_weight=0.0, appearance=on and i == t)
                    for i, layer in enumerate(case.collage.layers)
                ]
                c = replace(case.collage, layers=layers, strength=args.strength, **common)
                img, dt = run(model, c)
                secs.append(dt)
                layer_rgb = case.collage.layers[t].image[..., :3]
                dists.append(inside_distance(img, layer_rgb, case.visible[t]))
                w1s.append(colour_w1(img, layer_rgb, case.visible[t]))
            value = f"{np.mean(dists):.1f} / {np.mean(w1s):.1f}"
            rows.append(("appearance pixel / colour W1 ↓", label, value, np.mean(dists), np.mean(secs)))

    # §4 harmonization: seams of cut-outs; uniform strength vs per-layer strength.
    cases = make_cases(args.n, args.seed, "seams")
    seam0 = np.mean([seam_energy(_composite(c), c.patches[0], c.alphas[0]) for c in cases])
    fid0 = np.mean(
        [inside_distance(_composite(c), c.collage.layers[0].image[..., :3], c.visible[0]) for c in cases]
    )
    rows.append(
        (
            "seam grad. ↓ / object dist. ↓",
            "composite (no generation)",
            f"{seam0:.1f} / {fid0:.1f}",
            seam0,
            0.0,
        )
    )
    for label, bg, layer in (
        ("baseline SDEdit s=0.5", 0.5, None),
        ("baseline SDEdit s=0.8", 0.8, None),
        ("+ per-layer strength (0.3 / bg 0.8)", 0.8, 0.3),
        ("+ per-layer strength (0.5 / bg 1.0)", 1.0, 0.5),
    ):
        seams, fids, secs = [], [], []
        for case in cases:
            c = configured(case, strength=bg, layer={"attention_weight": 0.0, "strength": layer}, **common)
            img, dt = run(model, c)
            secs.append(dt)
            seams.append(seam_energy(img, case.patches[0], case.alphas[0]))
            fids.append(inside_distance(img, case.collage.layers[0].image[..., :3], case.visible[0]))
        rows.append(
            (
                "seam grad. ↓ / object dist. ↓",
                label,
                f"{np.mean(seams):.1f} / {np.mean(fids):.1f}",
                np.mean(seams),
                np.mean(secs),
            )
        )
    return rows


def _composite(case: Case) -> np.ndarray:
    from core.compositing import composite

    return composite(case.collage).image


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
    p.add_argument("--n", type=int, default=20, help="held-out collages per measure")
    p.add_argument("--n-appearance", type=int, default=10, help="collages for the inversion rows")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--strength", type=float, default=0.7, help="SDEdit strength of the fidelity rows")
    p.add_argument("--inversion-steps", type=int, default=400, help="0 skips the inversion rows")
    p.add_argument(
        "--default-templates",
        dest="caption_templates",
        action="store_false",
        help="train inversions with core.inversion's own prompts, not the demo captions' grammar",
    )
    p.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # Inversions go to a throw-away cache: every run measures training, not a cache hit.
    os.environ.setdefault("COLLAGE_CACHE", tempfile.mkdtemp(prefix="eval-pieces-"))
    ref = args.model
    if ref.endswith(".safetensors") and _is_demo_file(ref):  # a file from training/export.py
        from training.export import unpack

        ref = str(unpack(ref, tempfile.mkdtemp(prefix="eval-model-")))
    model = load_pipeline(ref, device="cpu", dtype="float32")
    rows = evaluate(model, args)
    print(f"model: {args.model}   held-out collages: {args.n} (appearance: {args.n_appearance})")
    print(f"{'measure':34} {'setting':38} {'value':>20} {'s/image':>8}")
    for measure, label, text, _value, secs in rows:
        s = "" if np.isnan(secs) else f"{secs:.2f}"
        print(f"{measure:34} {label:38} {text:>20} {s:>8}")


if __name__ == "__main__":
    main()
