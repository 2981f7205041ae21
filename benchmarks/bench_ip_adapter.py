"""Time of `core.generate` with masked IP-Adapter layers next to the same run without them.

    python benchmarks/bench_ip_adapter.py [--model demo] [--ip-adapter FILE --image-encoder PATH]
                                          [--ip-layers 2] [--size 128] [--steps 20] [--repeats 5]

Without --ip-adapter, a tiny random image encoder and IP-Adapter for the model's U-Net are built
(core/random_ip_adapter.py): the attention cost is a real adapter's (the same `to_k_ip`/`to_v_ip`
shapes per layer), the image encoder's is not (a real ViT-H runs once per job). Both runs: the
engine's hooks (masked attention, self-attention modulation), one image, guidance on; the median of
alternating repeats after one warm-up each. The ratio (with / without) is what counts.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

if not __package__:  # run as `python benchmarks/NAME.py`: set up as `python -m benchmarks.NAME` is
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import benchmarks  # noqa: F401  (benchmarks/__init__.py)

import argparse

from benchmarks.bench_generate import add_run_arguments, bench_collage, load_bench_model, timed_pair
from core.generate import generate
from core.ip_adapter_files import IPAdapterFiles
from core.options import EngineOptions, build_hooks


def main() -> None:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    parser.add_argument(
        "--ip-adapter", type=Path, default=None, help="an IP-Adapter file (default: a tiny random one)"
    )
    parser.add_argument("--image-encoder", type=Path, default=None, help="its CLIP image encoder")
    parser.add_argument("--ip-layers", type=int, default=2, help="layers with appearance 'ip-adapter'")
    args = parser.parse_args()

    model = load_bench_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        files = _files(args, model, Path(tmp))
        plain = bench_collage(args.size, args.steps, args.strength)
        with_ip = bench_collage(args.size, args.steps, args.strength)
        for layer in with_ip.layers[: args.ip_layers]:
            layer.appearance = "ip-adapter"
        options = EngineOptions(ip_adapter=files)

        def run(collage):
            hooks, _ = build_hooks(model, collage, options)
            return generate(model, collage, hooks=hooks)

        with_time, without = timed_pair(lambda: run(with_ip), lambda: run(plain), args.repeats)
    print(
        f"model {args.model} on {model.device} ({model.dtype}), {args.size}², {args.steps} steps, "
        f"strength {args.strength}, 4 layers ({args.ip_layers} with IP-Adapter {files.adapter.name})"
    )
    print(f"with IP-Adapter   : {with_time * 1000:8.1f} ms")
    print(f"without IP-Adapter: {without * 1000:8.1f} ms")
    print(f"ratio (with / without): {with_time / without:.3f}")


def _files(args, model, folder: Path) -> IPAdapterFiles:
    if args.ip_adapter is not None:
        return IPAdapterFiles(args.ip_adapter, args.image_encoder)
    from core.random_ip_adapter import (
        TINY_ENCODER,
        build_random_image_encoder,
        random_ip_adapter_state,
        save_image_encoder,
        save_ip_adapter,
    )

    encoder = save_image_encoder(build_random_image_encoder(), folder / "encoder.safetensors")
    state = random_ip_adapter_state(model.pipeline.unet, TINY_ENCODER["projection_dim"])
    return IPAdapterFiles(save_ip_adapter(state, folder / "ip-adapter.safetensors"), encoder)


if __name__ == "__main__":
    main()
