"""Cost of masked cross-attention: collage sampling next to stock diffusers img2img, in one run.

    python benchmarks/bench_attention.py [--model demo] [--size 128] [--steps 20] [--strength 0.75]
                                         [--repeats 7] [--max-score exact|bound] [--threads N]

Three things run on the same model, size, steps, strength and prompt, one image, guidance on:
stock `StableDiffusionImg2ImgPipeline`, `generate` with no hook (plain) and `generate` with the
masked-attention hook on a 4-layer collage. After one warm-up each, the repeats are interleaved
(stock, plain, masked, stock, ...) so that other processes slowing the machine down for a while
hit all three alike; the medians are compared. The goal is masked / stock <= 1.05.

`--micro` also times one cross-attention call (stock `AttnProcessor2_0` against the masked
processor with each max-score mode) at the shapes of the model's attention layers.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as `python benchmarks/NAME.py`: set up as `python -m benchmarks.NAME` is
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import benchmarks  # noqa: F401  (benchmarks/__init__.py)

import argparse

import numpy as np
import torch

from benchmarks.bench_generate import (
    add_run_arguments,
    bench_collage,
    interleaved,
    load_bench_model,
    stock_img2img,
)
from core.attention import MaskedCrossAttention, masked_attention_hook
from core.compositing import unet_feature_sizes
from core.generate import StepContext, generate


def micro(model, size: int, repeats: int = 50) -> None:
    """One cross-attention call per U-Net attention resolution: stock processor vs masked ones."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = model.pipeline.unet
    device, dtype = model.device, model.dtype
    modules = {}
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            modules.setdefault(module.to_q.in_features, module)
    latent = size // 8
    sizes = unet_feature_sizes(latent, latent, len(unet.config.block_out_channels))
    channels = list(unet.config.block_out_channels)
    rng = np.random.default_rng(0)
    spans = [[2, 3], [5], [7, 8], [10]]
    for (h, w), ch in zip(sizes, channels, strict=True):
        attn = modules.get(ch)
        if attn is None:
            continue
        p = h * w
        masks = {p: (rng.random((4, p)) > 0.7).astype(np.float32)}
        x = torch.randn(2, p, ch, device=device, dtype=dtype)
        enc = torch.randn(2, 77, attn.to_k.in_features, device=device, dtype=dtype)
        row = {"stock": AttnProcessor2_0()}
        for mode in ("exact", "bound"):
            hook = MaskedCrossAttention(
                masks, spans, [1.0] * 4, layers=[0, 1, 2, 3], cfg=True, max_score=mode, device=device
            )
            hook.on_step(StepContext(0, torch.tensor(500), 2.0))
            row[mode] = hook.processor

        def call(proc, attn=attn, x=x, enc=enc):
            proc(attn, x, enc)
            if device.type == "cuda":
                torch.cuda.synchronize()

        with torch.no_grad():
            t = interleaved({k: (lambda proc=proc: call(proc)) for k, proc in row.items()}, repeats)
        print(
            f"  attn2 at {h}x{w} ({ch} ch): stock {t['stock'] * 1e3:.3f} ms,"
            f" masked exact {t['exact'] * 1e3:.3f} ms ({t['exact'] / t['stock']:.2f}x),"
            f" bound {t['bound'] * 1e3:.3f} ms ({t['bound'] / t['stock']:.2f}x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser, repeats=7)
    parser.add_argument("--max-score", default="exact", choices=("exact", "bound"))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--micro", action="store_true", help="also time single cross-attention calls")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_bench_model(args.model)
    collage = bench_collage(args.size, args.steps, args.strength, n_layers=4)
    prompt = generate(model, collage).prompt  # the prompt as ours encodes it (layer texts appended)
    run_stock = stock_img2img(model, collage, prompt)
    built: list[MaskedCrossAttention] = []

    def hook(setup):
        built.append(masked_attention_hook(setup, max_score=args.max_score))
        return built[-1]

    medians = interleaved(
        {
            "stock": run_stock,
            "plain": lambda: generate(model, collage),
            "masked": lambda: generate(model, collage, hooks=[hook]),
        },
        args.repeats,
    )
    assert built and built[-1] is not None, "the masked-attention hook was not built"
    stock_s = medians["stock"]
    print(
        f"model {args.model} on {model.device} ({model.dtype}), {args.size}², {args.steps} steps,"
        f" strength {args.strength}, {len(collage.layers)} layers, max score {args.max_score},"
        f" {torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"diffusers img2img       : {stock_s * 1e3:9.1f} ms")
    print(f"collage generate, plain : {medians['plain'] * 1e3:9.1f} ms")
    print(f"collage generate, masked: {medians['masked'] * 1e3:9.1f} ms")
    print(f"ratio plain  / stock: {medians['plain'] / stock_s:.3f}")
    print(f"ratio masked / stock: {medians['masked'] / stock_s:.3f}  (goal <= 1.05)")
    if args.micro:
        micro(model, args.size)


if __name__ == "__main__":
    main()
