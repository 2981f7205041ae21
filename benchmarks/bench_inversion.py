"""Seconds per inversion (appearance-learning) step next to seconds per sampling step.

    python benchmarks/bench_inversion.py [--model demo] [--sizes 64 128] [--steps 20] [--repeats 3]

Same model, device and dtype, same image size for both. A step time is the median gap between
consecutive progress reports, so start-up work (tokenizer copy, VAE of the start image, the
first call's warm-up) is left out. An inversion step is one augmented sample through the VAE
encoder, the text encoder and the U-Net, forwards and backwards; a sampling step is one U-Net
forward over the conditional and unconditional batch (guidance on), as `generate()` runs it.
The last column is what a default inversion (`InversionSettings().steps` steps) costs in
sampling steps.
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

import numpy as np

from benchmarks.bench_generate import load_bench_model
from core.collage import Collage, Layer
from core.generate import generate
from core.inversion import InversionSettings, train_embedding


def layer_image(size: int) -> np.ndarray:
    """A round object with some texture, on transparent pixels."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.4) ** 2
    img = np.zeros((size, size, 4), np.uint8)
    img[..., :3] = rng.integers(0, 256, (size, size, 3))
    img[..., 3] = np.where(inside, 255, 0)
    return img


def step_seconds(run, phase_prefix: str) -> float:
    """Median seconds between consecutive progress reports of the phase."""
    stamps: list[float] = []

    def on_progress(p):
        if p.phase.startswith(phase_prefix):
            stamps.append(time.perf_counter())

    run(on_progress)
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--steps", type=int, default=20, help="steps timed of each kind")
    parser.add_argument("--batch-size", type=int, default=1, help="inversion batch size")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, alternated")
    args = parser.parse_args()

    model = load_bench_model(args.model)
    default_steps = InversionSettings().steps
    print(
        f"model {args.model} on {model.device} ({model.dtype}); median step of {args.steps},"
        f" median of {args.repeats} runs"
    )
    print(
        f"{'size':>6} {'inversion s/step':>17} {'sampling s/step':>16} {'ratio':>6} "
        f"{f'{default_steps} inv. steps = sampling steps':>34}"
    )
    for size in args.sizes:
        image = layer_image(size // 2)
        settings = InversionSettings(steps=args.steps + 1, resolution=size, batch_size=args.batch_size)

        def invert(report, image=image, settings=settings):
            train_embedding(model, image, "a textured ball", settings=settings, report=report)

        collage = Collage(
            prompt="a textured ball on a table",
            layers=[Layer("a textured ball", image, offset=(size // 4, size // 4))],
            width=size,
            height=size,
            steps=args.steps + 1,
            strength=1.0,
        )

        def sample(report, collage=collage):
            generate(model, collage, progress=report)

        invert(lambda p: None)  # warm-up of both
        sample(lambda p: None)
        # Alternate the two so background load hits both alike; the median run counts.
        runs = [
            (step_seconds(invert, "learning"), step_seconds(sample, "sampling")) for _ in range(args.repeats)
        ]
        inv = statistics.median(r[0] for r in runs)
        smp = statistics.median(r[1] for r in runs)
        print(f"{size:>5}² {inv:>17.4f} {smp:>16.4f} {inv / smp:>6.2f} {default_steps * inv / smp:>34.0f}")


if __name__ == "__main__":
    main()
