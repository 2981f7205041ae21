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
  kept        the LoRA again, its PEFT layers kept loaded between jobs (`--loaded-loras` design)
Then the parts of a LoRA's per-job cost: reading the file, converting kohya names, injecting the
PEFT layers (`load_lora_weights` from the cached dict) and removing them (`unload_lora_weights`).

Then what one job's LoRA handling costs (`applied_loras` around an empty block: the generation
itself is the same either way), today's path (`KEEP_NONE`: inject and remove every job, the file
cached) against adapters kept (`KeepLoras(4)`), in the same run: a first job with LoRA A, a second
one with A, a job without LoRA after one with A, and jobs alternating A and B (both kept). Each
as wall time and as this process's CPU time (`--threads 1` makes the CPU time the steadiest
measure of the work on a shared machine). Last, with torch.equal on the text encoder's and the
U-Net's outputs for a fixed prompt and latent: kept adapters switched off give the model's own
outputs, and a job with A among kept adapters gives what a fresh load of A alone gives.
`--parts-only` skips the jobs (on a CPU the full-size jobs take minutes each).

Measured before keeping (full-size SD 1.5 random weights, CPU float32, 2 cores shared with other
work, so the job times are noisy): 128², 2 steps, medians of 2: job 131.5 s without LoRA, 224.4 s
first use, 184.9 s cached (ratios 1.71 and 1.41); read 74 ms, inject + remove 3.8 s (remove
0.25 s). A `--parts-only` run: read 106 ms, kohya conversion 1.8 ms, inject + remove 9.2 s. The
kept design's figures: docs/performance.md ("LoRAs").
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
from core.kept_loras import KEEP_NONE, KeepLoras, release
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


def kohya_lora_file(model, rank: int, path: Path, seed: int = 0) -> Path:
    """A kohya-named LoRA of every Linear in the U-Net's transformer blocks and the text
    encoders' layers (`lora_unet_*`, `lora_te_*`, or `lora_te1_*`/`lora_te2_*` for two)."""
    from safetensors.torch import save_file

    pipe = model.pipeline
    gen = torch.Generator().manual_seed(seed)
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
    return median_times(fn, repeats)[0]


def median_times(fn, repeats: int, before=None) -> tuple[float, float]:
    """Medians of (wall seconds, this process's CPU seconds) of `fn()`; `before()` runs untimed."""
    walls, cpus = [], []
    for _ in range(repeats):
        if before is not None:
            before()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def probe(model) -> list[torch.Tensor]:
    """The text encoders' conditioning and the U-Net's output for a fixed prompt and latent."""
    size = (model.native_size, model.native_size)
    with torch.no_grad():
        cond = model.family.encode_prompt(
            model.pipeline, "a red fox in the snow", None, model.device, False, size
        )
        gen = torch.Generator().manual_seed(0)
        latent = torch.randn(1, 4, 16, 16, generator=gen).to(model.device, model.dtype)
        out = model.pipeline.unet(
            latent, 500, encoder_hidden_states=cond.cond, added_cond_kwargs=cond.added
        ).sample
    return [cond.cond, *cond.added.values(), out]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def kept_versus_today(model, a: list[LoraSpec], b: list[LoraSpec], cache: LoraCache, repeats: int) -> dict:
    """One job's LoRA handling, today's path against kept adapters: (wall, CPU) medians by case."""
    pipe = model.pipeline
    keep = KeepLoras(4)

    def handle(loras, how):
        with applied_loras(model, loras, cache, how):
            pass

    def alternate(how):
        handle(a, how)
        handle(b, how)

    times = {
        "today: job with A": median_times(lambda: handle(a, KEEP_NONE), repeats),
        "today: job without LoRA": median_times(lambda: handle([], KEEP_NONE), repeats),
        "today: A, B alternating (per job)": median_times(lambda: alternate(KEEP_NONE), repeats),
        "kept: first job with A": median_times(
            lambda: handle(a, keep), repeats, before=lambda: release(pipe)
        ),
    }
    handle(a, keep)
    times["kept: A again"] = median_times(lambda: handle(a, keep), repeats)
    times["kept: no LoRA after A"] = median_times(
        lambda: handle([], keep), repeats, before=lambda: handle(a, keep)
    )
    handle(b, keep)
    times["kept: A, B alternating (per job)"] = median_times(lambda: alternate(keep), repeats)
    for name in [n for n in times if "alternating" in n]:
        times[name] = (times[name][0] / 2, times[name][1] / 2)
    release(pipe)
    return times


def kept_checks(model, a: list[LoraSpec], b: list[LoraSpec], cache: LoraCache) -> dict[str, bool]:
    """torch.equal checks of the kept design on this model (see the module's docstring)."""
    pipe = model.pipeline
    release(pipe)
    plain = probe(model)
    with applied_loras(model, a, cache, KEEP_NONE):
        fresh_a = probe(model)
    keep = KeepLoras(4)
    with applied_loras(model, b, cache, keep):
        pass
    with applied_loras(model, a, cache, keep):
        kept_a = probe(model)
    off_outside = probe(model)
    with applied_loras(model, [], cache, keep):
        off_job = probe(model)
    release(pipe)
    return {
        "A among kept adapters = a fresh load of A": same(kept_a, fresh_a),
        "kept adapters off (outside a job) = no LoRA": same(off_outside, plain),
        "a job without LoRA among kept adapters = no LoRA": same(off_job, plain),
        "after releasing = no LoRA": same(probe(model), plain),
        "A changes the outputs": not same(fresh_a, plain),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="random:sd1:real", help="demo, a model, or random:FAMILY:SCALE")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--parts-only", action="store_true", help="only the parts of a LoRA's cost, no jobs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model = build_model(args.model)
    print(f"model {args.model} on {model.device} ({model.dtype}), built in {time.perf_counter() - t0:.1f} s")
    pipe = model.pipeline
    collage = bench_collage(args.size, args.steps, args.strength)
    with tempfile.TemporaryDirectory() as tmp:
        path = kohya_lora_file(model, args.rank, Path(tmp) / "lora.safetensors")
        spec = [LoraSpec(path, 0.8)]
        spec_b = [LoraSpec(kohya_lora_file(model, args.rank, Path(tmp) / "b.safetensors", seed=1), 0.6)]
        print(f"LoRAs: kohya, rank {args.rank}, {path.stat().st_size / 2**20:.1f} MiB each (float16)")

        def job(loras, cache, keep=None):
            with applied_loras(model, loras, cache, keep):
                return generate(model, collage).images[0].image

        cache = LoraCache()
        if not args.parts_only:
            plain_image = job([], None)  # warm-up
            job(spec, LoraCache())
            plain = median_time(lambda: job([], None), args.repeats)
            first = median_time(lambda: job(spec, LoraCache()), args.repeats)
            job(spec, cache)
            cached = median_time(lambda: job(spec, cache), args.repeats)
            assert cache.hits >= args.repeats
            keep = KeepLoras(4)
            kept_image = job(spec, cache, keep)
            kept = median_time(lambda: job(spec, cache, keep), args.repeats)
            plain_after_kept = job([], cache, keep)
            release(pipe)
            job_checks = {
                "job without LoRA among kept adapters: the plain job's bytes": np.array_equal(
                    plain_after_kept, plain_image
                ),
                "job with kept A: the cached job's bytes": np.array_equal(kept_image, job(spec, cache)),
            }

        read = median_time(lambda: _read_state_dict(path), args.repeats)
        state = cache.state_dict(path)
        convert = median_time(lambda: pipe.lora_state_dict(dict(state)), args.repeats)
        inject = median_time(
            lambda: (pipe.load_lora_weights(dict(state), adapter_name="b"), pipe.unload_lora_weights()),
            args.repeats,
        )
        pipe.load_lora_weights(dict(state), adapter_name="b")
        remove = median_time(lambda: pipe.unload_lora_weights(), 1)
        cache.state_dict(spec_b[0].path)
        per_job = kept_versus_today(model, spec, spec_b, cache, args.repeats)
        checks = kept_checks(model, spec, spec_b, cache)
        if not args.parts_only:
            checks.update(job_checks)

    ms = lambda s: f"{s * 1000:9.1f} ms"  # noqa: E731
    print(
        f"{args.size}², {args.steps} steps, strength {args.strength}, one image, medians of {args.repeats},"
        f" {torch.get_num_threads()} threads"
    )
    if not args.parts_only:
        print(f"job, no LoRA          : {ms(plain)}")
        print(f"job, LoRA first use   : {ms(first)}   ratio to no LoRA {first / plain:.3f}")
        print(f"job, LoRA cached      : {ms(cached)}   ratio to no LoRA {cached / plain:.3f}")
        print(f"job, LoRA kept loaded : {ms(kept)}   ratio to no LoRA {kept / plain:.3f}")
        print(f"cached / first use    : {cached / first:.3f}   kept / cached {kept / cached:.3f}")
    print(f"read the file         : {ms(read)}")
    print(f"convert kohya names   : {ms(convert)}   (part of the next line)")
    print(f"inject + remove layers: {ms(inject)}   (remove alone {ms(remove).strip()})")
    print("one job's LoRA handling (applied_loras around nothing), wall and CPU time:")
    today = per_job["today: job with A"]
    for name, (wall, cpu) in per_job.items():
        print(f"  {name:36}: {ms(wall)} {ms(cpu)} CPU   CPU ratio to today's job with A {cpu / today[1]:.3f}")
    for name, ok in checks.items():
        print(f"{name}: {ok}")


if __name__ == "__main__":
    main()
