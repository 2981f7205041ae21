"""Pack a trained demo pipeline (and its ControlNet) into one small file, and unpack it again.

The file format is `core.demo_model`'s (float16 weights, configurations as metadata); the file
the project ships is `core/assets/demo-v2.safetensors`. `--unpack` turns a file back into a
diffusers folder that `core.models.load_pipeline` loads.

    python -m training.export training/runs/demo-v3/pipeline core/assets/demo-v2.safetensors \\
        --controlnet training/runs/controlnet-v1/controlnet
    python -m training.export --unpack core/assets/demo-v2.safetensors /tmp/demo-v2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusers import ControlNetModel, StableDiffusionPipeline

from core.demo_model import (
    build_demo_controlnet,
    build_demo_pipeline,
    pack_demo_weights,
    write_clip_tokenizer_files,
)


def export(pipeline_dir: str | Path, out: str | Path, controlnet_dir: str | Path | None = None) -> Path:
    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_dir), safety_checker=None)
    net = ControlNetModel.from_pretrained(str(controlnet_dir)) if controlnet_dir else None
    return pack_demo_weights(pipe, out, controlnet=net)


def unpack(weights_file: str | Path, folder: str | Path) -> Path:
    """Write the file's pipeline as a diffusers folder, and its ControlNet (if any) in controlnet/."""
    folder = Path(folder)
    build_demo_pipeline(weights_file).save_pretrained(folder, safe_serialization=True)
    write_clip_tokenizer_files(folder / "tokenizer")
    net = build_demo_controlnet(weights_file)
    if net is not None:
        net.save_pretrained(folder / "controlnet", safe_serialization=True)
    return folder


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unpack", action="store_true", help="the other way: file -> diffusers folder")
    p.add_argument("--controlnet", metavar="DIR", help="a ControlNet folder to pack with the pipeline")
    p.add_argument("source", help="pipeline folder (or, with --unpack, the .safetensors file)")
    p.add_argument("target", help="the .safetensors file (or, with --unpack, the folder)")
    a = p.parse_args(argv)
    if a.unpack:
        print(f"wrote {unpack(a.source, a.target)}")
    else:
        path = export(a.source, a.target, a.controlnet)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
