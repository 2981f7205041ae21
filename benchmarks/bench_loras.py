"""What a LoRA costs a job, and what the LoRA cache saves (core/loras.py).

    python benchmarks/bench_loras.py [--model random:sd1:real] [--rank 32] [--size 256] [--steps 4]
                                     [--repeats 3]

The LoRA is a kohya/A1111 file (float16, as they are shared) of rank `--rank` on every linear
layer of the U-Net's transformer blocks and of the text encoder's attention and MLP: the layout of
a usual SD 1.5 LoRA. Its weights are random (only the shapes matter for time). By default the
model is SD 1.5's full-size U-Net and text encoder with random weights, built in memory
(`core.random_models.build_random_pipeline`, nothing written to disk).

Jobs, each `generate` inside `applied_loras` (one image, guidance on), medians of `--repeats`:
  plain       no LoRA
  first use   the LoRA with an empty cache: the file is read, then injected and removed
  cached      the LoRA again: its state dict comes from the cache
Then the parts of a LoRA's per-job cost: reading the file, injecting the PEFT layers
(`load_lora_weights` from the cached dict), removing them (`unload_lora_weights`), and for the
other design, switching adapters kept loaded on and off (`enable_lora`/`disable_lora`), with
whether a job run with the adapters kept but disabled is byte-identical to the plain job.
`--parts-only` skips the jobs (on a CPU the full-size jobs take minutes each).

Measured here (full-size SD 1.5 random weights, CPU float32, 2 cores shared with other work, so
the job times are noisy): 128², 2 steps, medians of 2: job 131.5 s without LoRA, 224.4 s first use,
184.9 s cached (ratios 1.71 and 1.41); read 74 ms, inject + remove 3.8 s (remove 0.25 s), enable +
disable kept adapters 0.15 s; kept-but-disabled adapters gave the plain job's bytes. A
`--parts-only` run: read 106 ms, kohya conversion 1.8 ms, inject + remove 9.2 s, toggle 0.11 s.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as `python benchmarks/NAME.py`: set up as `python -m benchmarks.NAME` is
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import benchmarks  # noqa: F401  (benchmarks/__init__.py)

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from benchmarks.bench_generate import bench_collage, load_bench_model
from core.generate import generate
from core.loras import LoraCache, LoraSpec, _read_state_dict, applied_loras


def build_model(ref: str):
    """`load_bench_model`, except random:FAMILY:SCALE is built in memory, not written to disk."""
    if not ref.startswith("random:"):
        return load_bench_model(ref)
    from core.families import FAMILIES
    from core.models import LoadedModel, pick_device, pick_dtype
    from core.random_models import build_random_pipeline

    _, family_id, scale = ref.split(":")
    family = FAMILIES[family_id]
    device = pick_device(None)
    dtype = pick_dtype(device)
    pipe = build_random_pipeline(family, scale).to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe, ref, f"bench:{ref}", device, dtype, family)


def kohya_lora_file(model, rank: int, path: Path) -> Path:
    """A kohya-named LoRA of every Linear in the U-Net's transformer blocks and the text
    encoders' layers (`lora_unet_*`, `lora_te_*`, or `lora_te1_*`/`lora_te2_*` for two)."""
    from safetensors.torch import save_file

    pipe = model.pipeline
    gen = torch.Generator().manual_seed(0)
    parts = [("lora_unet", pipe.unet, "transformer_blocks")]
    encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    for i, encoder in enumerate(encoders):
        prefix = "lora_te" if len(encoders) == 1 else f"lora_te{i + 1}"
        parts.append((prefix, encoder, "encoder.layers"))
    out = {}
    for prefix, module, inside in parts:
        for name, layer in module.named_modules():
            if inside not in name or not isinstance(layer, torch.nn.Linear):
                continue
            base = f"{prefix}_{name.replace('.', '_')}"
            down = torch.randn(rank, layer.in_features, generator=gen) * 0.01
            up = torch.randn(layer.out_features, rank, generator=gen) * 0.01
            out[f"{base}.lora_down.weight"] = down.half()
            out[f"{base}.lora_up.weight"] = up.half()
            out[f"{base}.alpha"] = torch.tensor(float(rank)).half()
    save_file(out, str(path))
    return path


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="random:sd1:real", help="demo, a model, or random:FAMILY:SCALE")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts-only", action="store_true", help="only the parts of a LoRA's cost, no jobs")
    args = parser.parse_args()

    t0 = time.perf_counter()
    model = build_model(args.model)
    print(f"model {args.model} on {model.device} ({model.dtype}), built in {time.perf_counter() - t0:.1f} s")
    pipe = model.pipeline
    collage = bench_collage(args.size, args.steps, args.strength)
    with tempfile.TemporaryDirectory() as tmp:
        path = kohya_lora_file(model, args.rank, Path(tmp) / "lora.safetensors")
        spec = [LoraSpec(path, 0.8)]
        print(f"LoRA: kohya, rank {args.rank}, {path.stat().st_size / 2**20:.1f} MiB (float16)")

        def job(loras, cache):
            with applied_loras(model, loras, cache):
                return generate(model, collage).images[0].image

        plain_image = job([], None)  # warm-up
        if not args.parts_only:
            job(spec, LoraCache())
            plain = median_time(lambda: job([], None), args.repeats)
            first = median_time(lambda: job(spec, LoraCache()), args.repeats)
            cache = LoraCache()
            job(spec, cache)
            cached = median_time(lambda: job(spec, cache), args.repeats)
            assert cache.hits >= args.repeats
        else:
            cache = LoraCache()

        read = median_time(lambda: _read_state_dict(path), args.repeats)
        state = cache.state_dict(path)
        convert = median_time(lambda: pipe.lora_state_dict(dict(state)), args.repeats)
        inject = median_time(
            lambda: (pipe.load_lora_weights(dict(state), adapter_name="b"), pipe.unload_lora_weights()),
            args.repeats,
        )
        pipe.load_lora_weights(dict(state), adapter_name="b")
        remove = median_time(lambda: pipe.unload_lora_weights(), 1)
        # The other design: adapters kept loaded, switched off between jobs.
        pipe.load_lora_weights(dict(state), adapter_name="b")
        toggle = median_time(lambda: (pipe.enable_lora(), pipe.disable_lora()), args.repeats)
        kept_disabled = generate(model, collage).images[0].image
        pipe.unload_lora_weights()
        identical = np.array_equal(kept_disabled, plain_image)
        after = np.array_equal(job([], None), plain_image)

    ms = lambda s: f"{s * 1000:9.1f} ms"  # noqa: E731
    print(f"{args.size}², {args.steps} steps, strength {args.strength}, one image, medians of {args.repeats}")
    if not args.parts_only:
        print(f"job, no LoRA          : {ms(plain)}")
        print(f"job, LoRA first use   : {ms(first)}   ratio to no LoRA {first / plain:.3f}")
        print(f"job, LoRA cached      : {ms(cached)}   ratio to no LoRA {cached / plain:.3f}")
        print(f"cached / first use    : {cached / first:.3f}")
    print(f"read the file         : {ms(read)}")
    print(f"convert kohya names   : {ms(convert)}   (part of the next line)")
    print(f"inject + remove layers: {ms(inject)}   (remove alone {ms(remove).strip()})")
    print(f"enable + disable kept : {ms(toggle)}")
    print(f"kept-but-disabled adapters give the plain job's bytes: {identical}")
    print(f"plain job after all this gives the plain job's bytes : {after}")


if __name__ == "__main__":
    main()
