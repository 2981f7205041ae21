"""Pack a trained demo pipeline into one small file, and unpack it again.

One safetensors file holds every component's weights in float16 (keys prefixed ``unet.``,
``vae.``, ``text_encoder.``) and, as metadata, each component's configuration; the tokenizer
is not stored (it is the real CLIP tokenizer, rebuilt from the bundled BPE merges).
`unpack` turns it back into a diffusers folder that `core.models.load_pipeline` loads.

    python -m training.export training/runs/demo-v2/pipeline training/weights/demo-v2.safetensors
    python -m training.export --unpack training/weights/demo-v2.safetensors /tmp/demo-v2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file


def _plain(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def export(pipeline_dir: str | Path, out: str | Path) -> Path:
    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_dir), safety_checker=None)
    tensors: dict[str, torch.Tensor] = {}
    for name in ("unet", "vae", "text_encoder"):
        for key, value in getattr(pipe, name).state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().to(torch.float16).contiguous()
    metadata = {
        "format": "collage-diffusion-demo",
        "unet": json.dumps(_plain(pipe.unet.config)),
        "vae": json.dumps(_plain(pipe.vae.config)),
        "text_encoder": json.dumps(
            {k: v for k, v in pipe.text_encoder.config.to_dict().items() if k != "_name_or_path"}
        ),
        "scheduler": json.dumps(_plain(pipe.scheduler.config)),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return out


def load(weights_file: str | Path) -> StableDiffusionPipeline:
    """The pipeline stored in a file written by `export` (float16 weights read back as float32)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    from core.demo_model import build_clip_tokenizer

    with safe_open(str(weights_file), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "collage-diffusion-demo":
            raise ValueError(f"{weights_file}: not a demo model weights file")
        tensors = {key: f.get_tensor(key).float() for key in f.keys()}  # noqa: SIM118
    with torch.random.fork_rng(devices=[]):  # module construction draws (discarded) random weights
        unet = UNet2DConditionModel.from_config(json.loads(meta["unet"]))
        vae = AutoencoderKL.from_config(json.loads(meta["vae"]))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(json.loads(meta["text_encoder"])))
    for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        prefix = name + "."
        module.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        module.eval()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler.from_config(json.loads(meta["scheduler"])),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unpack(weights_file: str | Path, folder: str | Path) -> Path:
    """Write the file's pipeline as a diffusers folder (what `core.models.load_pipeline` loads)."""
    from core.demo_model import write_clip_tokenizer_files

    folder = Path(folder)
    load(weights_file).save_pretrained(folder, safe_serialization=True)
    write_clip_tokenizer_files(folder / "tokenizer")
    return folder


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unpack", action="store_true", help="the other way: file -> diffusers folder")
    p.add_argument("source", help="pipeline folder (or, with --unpack, the .safetensors file)")
    p.add_argument("target", help="the .safetensors file (or, with --unpack, the folder)")
    a = p.parse_args(argv)
    if a.unpack:
        print(f"wrote {unpack(a.source, a.target)}")
    else:
        path = export(a.source, a.target)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
