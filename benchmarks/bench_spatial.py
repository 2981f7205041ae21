"""Cost of the spatial modes: collage sampling with each next to stock diffusers img2img, one run.

    python benchmarks/bench_spatial.py [--model demo] [--size 128] [--steps 20] [--strength 0.75]
                                       [--repeats 5] [--threads N]

Same model, size, steps, strength and prompt, one image, guidance on, a 4-layer collage: stock
`StableDiffusionImg2ImgPipeline` (or SDXL's), `generate` with masked attention (the default
pieces without the spatial modes), with regional conditioning added, with self-attention modulation added, and with both.
Repeats interleaved (benchmarks/bench_generate.py `interleaved`), medians compared as ratios to
stock in the same run (the masked-attention goal is <= 1.05; docs/attention.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as `python benchmarks/NAME.py`: set up as `python -m benchmarks.NAME` is
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import benchmarks  # noqa: F401  (benchmarks/__init__.py)

import argparse

import torch

from benchmarks.bench_generate import (
    add_run_arguments,
    bench_collage,
    interleaved,
    load_bench_model,
    stock_img2img,
)
from core.generate import generate
from core.options import EngineOptions, build_hooks

MODES = {
    "masked": EngineOptions(regional_weight=0.0, self_attention_weight=0.0),
    "+ regional": EngineOptions(regional_weight=1.0, self_attention_weight=0.0),
    "+ self-attention sw=2": EngineOptions(regional_weight=0.0, self_attention_weight=2.0),
    "+ regional + self-attention": EngineOptions(regional_weight=1.0, self_attention_weight=2.0),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser, repeats=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_bench_model(args.model)
    collage = bench_collage(args.size, args.steps, args.strength, n_layers=4)
    prompt = generate(model, collage).prompt  # the prompt as ours encodes it (layer texts appended)

    def run(options: EngineOptions):
        hooks, _ = build_hooks(model, collage, options)
        return lambda: generate(model, collage, hooks=hooks)

    runs = {"stock": stock_img2img(model, collage, prompt)} | {name: run(o) for name, o in MODES.items()}
    medians = interleaved(runs, args.repeats)
    stock = medians["stock"]
    print(
        f"model {args.model} on {model.device} ({model.dtype}), {args.size}², {args.steps} steps,"
        f" strength {args.strength}, {len(collage.layers)} layers, {torch.get_num_threads()} threads,"
        f" median of {args.repeats}"
    )
    for name, seconds in medians.items():
        print(f"{name:28} {seconds * 1e3:9.1f} ms   / stock {seconds / stock:.3f}")


if __name__ == "__main__":
    main()
