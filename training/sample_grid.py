"""Draw a grid of text-to-image samples (with their captions) from a trained demo model.

    python -m training.sample_grid --out docs/images/demo_grid.png          # the shipped demo model
    python -m training.sample_grid --model training/runs/demo-v3/pipeline --out /tmp/grid.png

Captions are held-out samples of `training.data` (a seed the training never used); the grid shows,
per caption, the training-style reference image and two generated seeds.
"""

from __future__ import annotations

import argparse
import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw

from core.models import load_pipeline
from training.data import make_sample

HELD_OUT_SEED = 424242


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="demo", help="the shipped demo model, or a trained pipeline folder")
    p.add_argument("--out", default="docs/images/demo_grid.png")
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--scale", type=int, default=2, help="pixel zoom of the 64x64 images")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pipe = load_pipeline(args.model, device="cpu", dtype="float32").pipeline
    samples = [make_sample(HELD_OUT_SEED, i) for i in range(args.n)]
    prompts = [s.caption for s in samples]
    cols = []
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        out = pipe(
            prompts,
            height=64,
            width=64,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=g,
            output_type="np",
        ).images
        cols.append((out * 255).round().astype(np.uint8))
    z = args.scale
    tile, text_h = 64 * z, 34
    per_row = 4
    cell_w = tile * 3 + 8
    rows = (args.n + per_row - 1) // per_row
    grid = Image.new("RGB", (per_row * cell_w, rows * (tile + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, s in enumerate(samples):
        x0, y0 = (i % per_row) * cell_w, (i // per_row) * (tile + text_h)
        for j, img in enumerate([s.image, cols[0][i], cols[1][i]]):
            grid.paste(
                Image.fromarray(img).resize((tile, tile), Image.Resampling.NEAREST), (x0 + j * tile, y0)
            )
        draw.text((x0 + 2, y0 + tile + 1), "\n".join(textwrap.wrap(s.caption, 60)[:2]), fill="black")
    grid.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
