"""Time of `core.generate` next to stock diffusers img2img on the same model, size, steps, strength.

    python benchmarks/bench_generate.py [--model demo] [--size 128] [--steps 20] [--strength 0.75] [--repeats 3]

Both start from the same composite, with one image, guidance on, on the same device; the
ratio (ours / stock, median of the repeats after one warm-up each) is what counts.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as `python benchmarks/NAME.py`: set up as `python -m benchmarks.NAME` is
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import benchmarks  # noqa: F401  (benchmarks/__init__.py)

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from core.collage import Collage, Layer
from core.compositing import composite
from core.generate import generate
from core.models import load_pipeline


def bench_collage(size: int, steps: int, strength: float, n_layers: int = 4, controlled: int = 0) -> Collage:
    """Random rectangles with an inner block (so they have inner edges); the first `controlled`
    layers get a ControlNet weight of 1."""
    rng = np.random.default_rng(0)
    layers = []
    for i in range(n_layers):
        w, h = (int(v) for v in rng.integers(size // 4, size // 2, size=2))
        img = np.zeros((h, w, 4), np.uint8)
        img[..., :3] = rng.integers(0, 256, size=3)
        img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4, :3] = rng.integers(0, 256, size=3)
        img[..., 3] = 255
        offset = tuple(int(v) for v in rng.integers(0, size - size // 2, size=2))
        layers.append(Layer(f"object {i}", img, offset=offset, control_weight=1.0 if i < controlled else 0.0))
    return Collage(
        prompt="a photo of " + ", ".join(layer.text for layer in layers),
        layers=layers,
        width=size,
        height=size,
        steps=steps,
        strength=strength,
    )


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, after one warm-up each, with the repeats interleaved
    (and who goes first rotated) so background load hits all alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        names = list(fns)
        names = names[r % len(names) :] + names[: r % len(names)]
        for name in names:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def timed_pair(first, second, repeats: int) -> tuple[float, float]:
    """Median seconds of each of two functions, measured alternately."""
    medians = interleaved({"first": first, "second": second}, repeats)
    return medians["first"], medians["second"]


def stock_img2img(model, collage: Collage, prompt: str) -> Callable[[], object]:
    """Stock diffusers img2img of the model's family (SD or SDXL) on the same components, start
    image, strength, steps and guidance."""
    import diffusers

    stock = getattr(diffusers, model.family.img2img_class_name)(**model.pipeline.components)
    stock.set_progress_bar_config(disable=True)
    init = Image.fromarray(composite(collage).image)

    def run():
        return stock(
            prompt,
            image=init,
            strength=collage.strength,
            num_inference_steps=collage.steps,
            guidance_scale=collage.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(0),
        )

    return run


def load_bench_model(ref: str):
    """`core.models.load_pipeline`, plus "random:FAMILY:SCALE" (e.g. random:sdxl:tiny,
    random:sd1:real): a random-weight model of that family's shape, built offline once."""
    if ref.startswith("random:"):
        from core.random_models import ensure_random_model

        _, family, scale = ref.split(":")
        ref = str(ensure_random_model(family, scale))
    return load_pipeline(ref)


def add_run_arguments(parser: argparse.ArgumentParser, repeats: int = 5) -> None:
    """The arguments every generation benchmark takes: model, size, steps, strength, repeats."""
    parser.add_argument(
        "--model",
        default="demo",
        help="demo, a model file/folder/hub id, or random:FAMILY:SCALE (random:sdxl:tiny)",
    )
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strength", type=float, default=0.75)
    parser.add_argument("--repeats", type=int, default=repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    args = parser.parse_args()

    model = load_bench_model(args.model)
    collage = bench_collage(args.size, args.steps, args.strength)
    prompt = generate(model, collage).prompt  # the prompt as ours encodes it
    run_stock = stock_img2img(model, collage, prompt)

    ours, theirs = timed_pair(lambda: generate(model, collage), run_stock, args.repeats)
    print(
        f"model {args.model} ({model.family.label}) on {model.device}, {args.size}², {args.steps} steps,"
        f" strength {args.strength}"
    )
    print(f"collage generate : {ours * 1000:8.1f} ms")
    print(f"diffusers {model.family.img2img_class_name}: {theirs * 1000:8.1f} ms")
    print(f"ratio (ours / stock): {ours / theirs:.3f}")


if __name__ == "__main__":
    main()
