"""Collage generation next to stock diffusers at real model shapes, side by side in one run.

    python benchmarks/bench_real_scale.py [--family sd1|sd2|sdxl] [--size N] [--steps 4]
                                          [--strength 0.5] [--repeats 3] [--threads N]
                                          [--cases stock,plain,...] [--smoke]

The model is a pipeline of the family's true shapes with random weights (`core.random_models`,
built offline into the cache on first use: about 4 GB for SD 1.5, 14 GB for SDXL). On the same
collage (4 layers), steps, strength and prompt, one image, guidance on:

  stock     the family's stock diffusers img2img pipeline on the same components
  plain     `generate` with no piece
  masked    `generate` with masked cross-attention on every layer
  spatial   `generate` with the engine's default spatial pieces (masked cross-attention and
            self-attention modulation, `core.options.EngineOptions()`)
  strength  `generate` with per-layer strengths (the background keeps the highest, so the same
            steps run as in stock)
  stock_cn  stock diffusers ControlNet img2img with the same (random, real-shape) ControlNet
  control   `generate` with the masked ControlNet on 2 of the 4 layers

After `--warmup` runs of each, the repeats are interleaved (with who goes first rotated) and the
medians compared: plain, masked and strength against stock, control against stock_cn. Times are
wall-clock and, on CPU, the process's CPU time too: on a machine shared with other work the CPU
time of a single-threaded run (`--threads 1`) is the steadier measure of the work done. Memory is
the peak resident set during each run (Linux: VmHWM, reset before each run) or, on CUDA, the
peak allocated. `--smoke` runs every case once on the tiny models at 64² (what CI runs).
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
from dataclasses import dataclass, field

import torch
from PIL import Image

from benchmarks.bench_generate import bench_collage
from core.attention import masked_attention_hook
from core.collage import Collage
from core.compositing import composite
from core.control import control_image, controlnet_hook
from core.generate import generate

CASES = ("stock", "plain", "masked", "spatial", "strength", "stock_cn", "control")
BASELINE = {
    "plain": "stock",
    "masked": "stock",
    "spatial": "stock",
    "strength": "stock",
    "control": "stock_cn",
}
# No goal for "spatial": self-attention modulation costs more by design (docs/attention.md).
GOALS = {"plain": 1.02, "masked": 1.05, "strength": 1.03, "control": 1.05}
MEMORY_GOAL = 1.1


# -- measuring ------------------------------------------------------------------------------------


def _rss_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux lets a process reset its own peak resident set (VmHWM) to the current one."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Sample:
    wall: float  # seconds
    cpu: float  # seconds of this process's CPU time (all threads)
    peak_mib: float | None  # peak resident set (CPU) or peak allocated (CUDA) during the run
    base_mib: float | None  # resident set or allocated memory before the run


class Meter:
    """Times one call and takes its peak memory, on the CPU or a CUDA device."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def __call__(self, fn: Callable[[], object]) -> Sample:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            rss = _rss_kib("VmRSS")
            base = rss / 1024 if rss is not None and _reset_peak_rss() else None
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            hwm = _rss_kib("VmHWM")
            peak = hwm / 1024 if base is not None and hwm is not None else None
        return Sample(wall, cpu, peak, base)


@dataclass
class CaseResult:
    samples: list[Sample] = field(default_factory=list)

    @property
    def wall(self) -> float:
        return statistics.median(s.wall for s in self.samples)

    @property
    def cpu(self) -> float:
        return statistics.median(s.cpu for s in self.samples)

    @property
    def peak_mib(self) -> float | None:
        peaks = [s.peak_mib for s in self.samples if s.peak_mib is not None]
        return max(peaks) if peaks else None

    @property
    def extra_mib(self) -> float | None:
        """Peak above what was held before the run: the run's own working memory."""
        extra = [
            s.peak_mib - s.base_mib for s in self.samples if s.peak_mib is not None and s.base_mib is not None
        ]
        return max(extra) if extra else None


def measure(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, meter: Meter
) -> dict[str, CaseResult]:
    """Every function `warmup` times, then `repeats` interleaved rounds (who goes first rotated)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    results = {name: CaseResult() for name in fns}
    names = list(fns)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            results[name].samples.append(meter(fns[name]))
    return results


# -- the cases ------------------------------------------------------------------------------------


def layered_strengths(collage: Collage) -> Collage:
    """The same collage with per-layer strengths below the collage's (the background's), so that
    the first step, and so the U-Net calls, are those of a uniform run at the collage's strength."""
    s = collage.strength
    for i, layer in enumerate(collage.layers):
        layer.strength = s * (1.0 - 0.2 * (i + 1))
    return collage


def stock_pipeline(model, class_name: str, **extra):
    import diffusers

    pipe = getattr(diffusers, class_name)(**model.pipeline.components, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_cases(model, controlnet, size: int, steps: int, strength: float, cases: list[str]) -> dict:
    """name -> a function running that case once (an image in the family's native pipeline)."""
    plain = bench_collage(size, steps, strength)
    layered = layered_strengths(bench_collage(size, steps, strength))
    controlled = bench_collage(size, steps, strength, controlled=2)
    prompt = generate(model, plain).prompt  # the prompt as ours encodes it (layer texts appended)
    init = Image.fromarray(composite(plain).image)
    common = {
        "prompt": prompt,
        "image": init,
        "strength": strength,
        "num_inference_steps": steps,
        "guidance_scale": plain.guidance_scale,
    }
    family = model.family
    fns: dict[str, Callable[[], object]] = {}
    if "stock" in cases:
        stock = stock_pipeline(model, family.img2img_class_name)
        fns["stock"] = lambda: stock(**common, generator=torch.Generator("cpu").manual_seed(0))
    if "plain" in cases:
        fns["plain"] = lambda: generate(model, plain)
    if "masked" in cases:
        fns["masked"] = lambda: generate(model, plain, hooks=[masked_attention_hook])
    if "spatial" in cases:
        from core.options import EngineOptions, build_hooks

        spatial_hooks, _ = build_hooks(model, plain, EngineOptions(controlnet=None))
        fns["spatial"] = lambda: generate(model, plain, hooks=spatial_hooks)
    if "strength" in cases:
        fns["strength"] = lambda: generate(model, layered)
    if controlnet is not None and "stock_cn" in cases:
        name = family.img2img_class_name.replace("Img2Img", "ControlNetImg2Img")
        stock_cn = stock_pipeline(model, name, controlnet=controlnet.controlnet)
        edges = Image.fromarray(control_image(controlled))
        fns["stock_cn"] = lambda: stock_cn(
            **common,
            control_image=edges,
            controlnet_conditioning_scale=1.0,
            generator=torch.Generator("cpu").manual_seed(0),
        )
    if controlnet is not None and "control" in cases:
        hook = controlnet_hook(controlnet)
        fns["control"] = lambda: generate(model, controlled, hooks=[hook])
    return fns


def report(results: dict[str, CaseResult], show_cpu: bool) -> list[str]:
    """The table: time per case, ratio to its baseline (with the goal), peak memory and its ratio.
    Returns the cases over their goal."""
    over = []
    unit = "MiB peak alloc" if not show_cpu else "MiB peak RSS"
    print(
        f"{'case':9s} {'wall s':>9s} {'cpu s':>9s}  {'ratio':>14s}  {unit:>14s} {'(run)':>8s} {'mem ratio':>9s}"
    )
    for name, res in results.items():
        base = results.get(BASELINE.get(name, ""))
        ratio = mem = ""
        if base is not None:
            r = res.wall / base.wall
            rc = res.cpu / base.cpu if show_cpu and base.cpu > 0 else None
            shown = rc if rc is not None else r
            goal = GOALS.get(name)
            ratio = f"{r:.3f}" + (f" cpu {rc:.3f}" if rc is not None else "")
            ratio += f" (<= {goal})" if goal is not None else " (no goal)"
            if goal is not None and shown > goal:
                over.append(name)
            if res.peak_mib and base.peak_mib:
                m = res.peak_mib / base.peak_mib
                mem = f"{m:.3f}"
                if m > MEMORY_GOAL:
                    over.append(f"{name} memory")
        peak = f"{res.peak_mib:.0f}" if res.peak_mib is not None else "-"
        extra = f"{res.extra_mib:+.0f}" if res.extra_mib is not None else ""
        cpu = f"{res.cpu:9.2f}" if show_cpu else f"{'-':>9s}"
        print(f"{name:9s} {res.wall:9.2f} {cpu}  {ratio:>14s}  {peak:>14s} {extra:>8s} {mem:>9s}")
    return over


# -- models ---------------------------------------------------------------------------------------


def bench_models(family_id: str, scale: str, device: str | None = None, dtype=None):
    """The random model of this family and scale and a ControlNet of its shape, loaded as users'
    models are (from the cache folders, built once)."""
    from core.control import load_controlnet
    from core.models import load_pipeline
    from core.random_models import ensure_random_controlnet, ensure_random_model

    model = load_pipeline(str(ensure_random_model(family_id, scale)), device=device, dtype=dtype)
    controlnet = load_controlnet(str(ensure_random_controlnet(family_id, scale)), model=model)
    return model, controlnet


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="sd1", choices=("sd1", "sd2", "sdxl"))
    parser.add_argument("--scale", default="real", choices=("tiny", "real"))
    parser.add_argument("--size", type=int, default=0, help="canvas side (default: the family's native size)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--strength", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--smoke", action="store_true", help="tiny models, 64², once each (CI)")
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)}; use {', '.join(CASES)}")
    if args.smoke:
        args.scale, args.size, args.steps, args.repeats, args.warmup = "tiny", 64, 4, 1, 0
    if args.threads:
        torch.set_num_threads(args.threads)

    model, controlnet = bench_models(args.family, args.scale)
    size = args.size or model.native_size
    fns = build_cases(model, controlnet, size, args.steps, args.strength, cases)
    results = measure(fns, args.repeats, args.warmup, Meter(model.device))
    print(
        f"random {args.family} ({args.scale}) on {model.device} ({model.dtype}), {size}², {args.steps} steps,"
        f" strength {args.strength}, 4 layers, {torch.get_num_threads()} threads,"
        f" median of {args.repeats} after {args.warmup} warm-up"
    )
    over = report(results, show_cpu=model.device.type == "cpu")
    print("over goal: " + (", ".join(over) if over else "none"))


if __name__ == "__main__":
    main()
