"""Time of `core.generate` with the masked ControlNet hook next to the same run without it.

    python benchmarks/bench_control.py [--model demo] [--controlnet REF] [--size 128] [--steps 20]
                                       [--strength 0.75] [--repeats 5]

The collage has 4 layers, 2 of them with a control weight. Without --controlnet, a ControlNet is
built from the model's own U-Net (`ControlNetModel.from_unet`, the shape of a real one for that
model). Both runs: one image, guidance on, same device; the median of alternating repeats after
one warm-up each. The ratio (with / without) is what counts: a ControlNet is about as costly as
the U-Net's encoder half plus mid block, run on both guidance halves.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as `python benchmarks/NAME.py`: set up as `python -m benchmarks.NAME` is
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import benchmarks  # noqa: F401  (benchmarks/__init__.py)

import argparse

import torch

from benchmarks.bench_generate import add_run_arguments, bench_collage, load_bench_model, timed_pair
from core.control import control_image, controlnet_hook, load_controlnet, wrap_controlnet
from core.generate import generate


def main() -> None:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    parser.add_argument(
        "--controlnet", default=None, help="hub id, folder or file (default: built from the U-Net)"
    )
    parser.add_argument("--controlnet-config", default=None)
    args = parser.parse_args()

    model = load_bench_model(args.model)
    if args.controlnet:
        controlnet = load_controlnet(args.controlnet, model=model, config=args.controlnet_config)
    else:
        from diffusers import ControlNetModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            controlnet = wrap_controlnet(ControlNetModel.from_unet(model.pipeline.unet), model, "from_unet")
    collage = bench_collage(args.size, args.steps, args.strength, controlled=2)
    edges = int((control_image(collage)[..., 0] > 0).sum())
    hook = controlnet_hook(controlnet)

    with_cn, without = timed_pair(
        lambda: generate(model, collage, hooks=[hook]), lambda: generate(model, collage), args.repeats
    )
    print(
        f"model {args.model} on {model.device} ({model.dtype}), controlnet {controlnet.ref}, {args.size}², "
        f"{args.steps} steps, strength {args.strength}, 4 layers (2 controlled, {edges} edge pixels)"
    )
    print(f"with ControlNet   : {with_cn * 1000:8.1f} ms")
    print(f"without ControlNet: {without * 1000:8.1f} ms")
    print(f"ratio (with / without): {with_cn / without:.3f}")


if __name__ == "__main__":
    main()
