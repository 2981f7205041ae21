"""The GPU check: real-shape SD 1.5 and SDXL in float16 on CUDA, side by side with stock diffusers.

    python benchmarks/gpu_check.py [--families sd1,sdxl] [--repeats 3] [--steps 30]
    python benchmarks/gpu_check.py --cpu-smoke      # the same code on tiny models on the CPU (CI)

Nothing is downloaded: each family's pipeline is built with random weights from the shipped
configs directly on the GPU (`core.random_models.build_random_pipeline(..., device=)`), cast to
float16, with a ControlNet of its U-Net's shape. At the family's native size (SD 1.5 512²,
SDXL 1024²), 30 steps, 4 layers, strength 0.75, one image, guidance on, the cases of
`bench_real_scale` run interleaved after a warm-up: stock img2img, plain, masked attention,
per-layer strength, stock ControlNet img2img, masked ControlNet. Printed per family: seconds per
image and peak VRAM of each case, each ratio against its stock baseline with the goal, and a
float16 numerics check: every output of the text encoders, U-Net, ControlNet and VAE, and the
masked-attention bias, must be finite (no inf/NaN from the bias or the SDXL VAE). Exit status 1
when a numerics check fails; ratios over their goal are reported, not fatal. About 3 minutes on
an H200 (goal: under 8).
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as `python benchmarks/NAME.py`: set up as `python -m benchmarks.NAME` is
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import benchmarks  # noqa: F401  (benchmarks/__init__.py)

import argparse
import contextlib
import time

import torch

from benchmarks.bench_generate import bench_collage
from benchmarks.bench_real_scale import Meter, build_cases, measure, report
from core.attention import masked_attention_hook
from core.control import controlnet_hook, wrap_controlnet
from core.families import FAMILIES
from core.generate import generate
from core.models import LoadedModel
from core.random_models import build_random_pipeline, randomize_zero_convolutions

NATIVE = {"sd1": 512, "sd2": 768, "sdxl": 1024}


def build(family_id: str, scale: str, device: torch.device, dtype: torch.dtype):
    """A random pipeline and ControlNet of the family's shape, made on `device`, in `dtype`."""
    from diffusers import ControlNetModel

    family = FAMILIES[family_id]
    pipe = build_random_pipeline(family, scale, device=str(device)).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    model = LoadedModel(
        pipe, f"random:{family_id}:{scale}", f"random-{family_id}-{scale}", device, dtype, family
    )
    with torch.device(device):
        net = ControlNetModel.from_unet(pipe.unet)
    randomize_zero_convolutions(net)
    return model, wrap_controlnet(net, model, f"random:{family_id}:{scale}:controlnet")


@contextlib.contextmanager
def finite_watch(modules: dict[str, torch.nn.Module]):
    """Records the names of the modules that returned a non-finite value while inside."""
    bad: set[str] = set()

    def tensors(output):
        if isinstance(output, torch.Tensor):
            yield output
        elif isinstance(output, dict):  # diffusers' and transformers' output classes are dicts
            for value in output.values():
                yield from tensors(value)
        elif isinstance(output, (tuple, list)):
            for value in output:
                yield from tensors(value)

    def check(name):
        def hook(_module, _inputs, output):
            for x in tensors(output):
                if x.is_floating_point() and not torch.isfinite(x).all():
                    bad.add(name)

        return hook

    handles = [m.register_forward_hook(check(name)) for name, m in modules.items() if m is not None]
    try:
        yield bad
    finally:
        for h in handles:
            h.remove()


def numerics(model, controlnet, size: int, steps: int) -> list[str]:
    """One masked-attention run and one ControlNet run, watching every big module's outputs and
    the attention bias for inf/NaN. Returns the problems found."""
    pipe = model.pipeline
    modules = {
        "text_encoder": pipe.text_encoder,
        "text_encoder_2": getattr(pipe, "text_encoder_2", None),
        "unet": pipe.unet,
        "vae.encoder": pipe.vae.encoder,
        "vae.decoder": pipe.vae.decoder,
        "controlnet": controlnet.controlnet,
    }
    hooks = []

    def masked(setup):
        hooks.append(masked_attention_hook(setup))
        return hooks[-1]

    problems = []
    with finite_watch(modules) as bad:
        generate(model, bench_collage(size, steps, 0.75), hooks=[masked])
        generate(model, bench_collage(size, steps, 0.75, controlled=2), hooks=[controlnet_hook(controlnet)])
    problems += [f"{name}: a non-finite output" for name in sorted(bad)]
    built = [h for h in hooks if h is not None]
    if not built:
        problems.append("masked attention: the hook was not built")
    for hook in built:
        for factors in hook._cache.values():  # the bias buffers of every resolution
            if not torch.isfinite(factors.bias).all():
                problems.append(f"masked attention: non-finite bias at {factors.bias.shape[2]} pixels")
    return problems


def check_family(family_id: str, args, device: torch.device, dtype: torch.dtype) -> list[str]:
    t0 = time.perf_counter()
    model, controlnet = build(family_id, args.scale, device, dtype)
    built_s = time.perf_counter() - t0
    size = args.size or NATIVE[family_id]
    problems = numerics(model, controlnet, size, args.steps)
    fns = build_cases(model, controlnet, size, args.steps, args.strength, list(args.cases))
    results = measure(fns, args.repeats, args.warmup, Meter(device))
    print(
        f"\n== {model.family.label}, random weights ({args.scale} shapes, built in {built_s:.1f} s) on"
        f" {device} ({dtype}): {size}², {args.steps} steps, strength {args.strength}, 4 layers,"
        f" median of {args.repeats}"
    )
    over = report(results, show_cpu=device.type == "cpu")
    for name in ("plain", "masked", "control"):
        if name in results:
            print(f"  {name}: {results[name].wall:.2f} s/image")
    print("  over goal: " + (", ".join(over) if over else "none"))
    print("  float16 numerics: " + ("; ".join(problems) if problems else "all finite"))
    del model, controlnet, fns, results
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [f"{family_id} {p}" for p in problems]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", default="sd1,sdxl", help="comma-separated: sd1, sd2, sdxl")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--strength", type=float, default=0.75)
    parser.add_argument("--size", type=int, default=0, help="canvas side (default: each family's native)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU, once each (CI)")
    args = parser.parse_args()
    args.scale = "real"
    args.cases = ("stock", "plain", "masked", "strength", "stock_cn", "control")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in NATIVE]
    if unknown:
        parser.error(f"--families: unknown {', '.join(unknown)}; use {', '.join(NATIVE)}")
    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32
        args.scale, args.size, args.steps, args.repeats, args.warmup = "tiny", 64, 4, 1, 0
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --cpu-smoke to check the code on the CPU", file=sys.stderr)
        return 2
    else:
        device, dtype = torch.device("cuda"), torch.float16
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    start = time.perf_counter()
    problems = []
    for family_id in families:
        problems += check_family(family_id, args, device, dtype)
    print(
        f"\ntotal {time.perf_counter() - start:.0f} s; numerics "
        + ("FAILED: " + "; ".join(problems) if problems else "ok")
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
