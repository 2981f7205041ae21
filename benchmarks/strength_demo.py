"""Generate one collage under two per-layer strength settings; print how much each layer changed.

    python benchmarks/strength_demo.py [--input examples/bento] [--model demo] [--out docs/images/strength.png]

Writes a strip: the composite, then the result of each setting. The printed table is the mean
absolute pixel change (0..255) inside each layer's visible mask and in the background.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as `python benchmarks/NAME.py`: set up as `python -m benchmarks.NAME` is
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import benchmarks  # noqa: F401  (benchmarks/__init__.py)

import argparse
import copy

import numpy as np
from PIL import Image

from core.compositing import composite
from core.formats import load_collage
from core.generate import generate
from core.models import load_pipeline

SETTINGS = {
    # name: (background strength, {layer index: strength}); other layers use the background's
    "keep the first two layers": (0.8, {0: 0.0, 1: 0.0}),
    "harmonize everything": (0.8, {}),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--input", default="examples/bento")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("docs/images/strength.png"))
    args = parser.parse_args()

    model = load_pipeline(args.model)
    base = load_collage(args.input).collage
    base.steps = args.steps
    flat = composite(base)
    strip = [flat.image]
    names = [layer.text for layer in flat.layers] + ["background"]
    print(f"{'setting':28s}" + "".join(f"{n[:14]:>16s}" for n in names))
    for title, (background, per_layer) in SETTINGS.items():
        collage = copy.deepcopy(base)
        collage.strength = background
        for layer in collage.layers:
            layer.strength = None
        visible = collage.visible_layers()
        for index, strength in per_layer.items():
            visible[index].strength = strength
        image = generate(model, collage).images[0].image
        change = np.abs(image.astype(np.float32) - flat.image).mean(axis=2)
        masks = list(flat.masks.layers) + [flat.masks.background]
        row = [float((change * m).sum() / max(m.sum(), 1e-6)) for m in masks]
        print(f"{title:28s}" + "".join(f"{v:16.1f}" for v in row))
        strip.append(image)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(strip, axis=1)).save(args.out)
    print(f"wrote {args.out}: composite, then {', '.join(SETTINGS)}")


if __name__ == "__main__":
    main()
