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

import argparse
import statistics
import time

import numpy as np
import torch

from core.collage import Collage, Layer
from core.control import control_image, controlnet_hook, load_controlnet, wrap_controlnet
from core.generate import generate
from core.models import load_pipeline


def bench_collage(size: int, steps: int, strength: float, n_layers: int = 4, controlled: int = 2) -> Collage:
    rng = np.random.default_rng(0)
    layers = []
    for i in range(n_layers):
        w, h = (int(v) for v in rng.integers(size // 4, size // 2, size=2))
        img = np.zeros((h, w, 4), np.uint8)
        img[..., :3] = rng.integers(0, 256, size=3)
        img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4, :3] = rng.integers(0, 256, size=3)  # inner edges
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


def timed_pair(first, second, repeats: int) -> tuple[float, float]:
    """Median seconds of each, measured alternately so background load hits both alike."""
    first(), second()  # warm-up
    a, b = [], []
    for _ in range(repeats):
        for fn, times in ((first, a), (second, b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="demo")
    parser.add_argument(
        "--controlnet", default=None, help="hub id, folder or file (default: built from the U-Net)"
    )
    parser.add_argument("--controlnet-config", default=None)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strength", type=float, default=0.75)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    model = load_pipeline(args.model)
    if args.controlnet:
        controlnet = load_controlnet(args.controlnet, model=model, config=args.controlnet_config)
    else:
        from diffusers import ControlNetModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            controlnet = wrap_controlnet(ControlNetModel.from_unet(model.pipeline.unet), model, "from_unet")
    collage = bench_collage(args.size, args.steps, args.strength)
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
