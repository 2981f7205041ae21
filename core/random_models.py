"""Pipelines of each family's shape with random weights, built offline from the shipped configs.

No weights can be downloaded where the tests run, yet every family's code path (loading a folder
or a single file, prompt encoding, the pieces) must run there. `tiny` models shrink every width
(as diffusers' own tests do) and build in a second; `real` models have the family's true shapes
(an SD 1.5 U-Net of 860 M parameters, SDXL's of 2.6 B) for benchmarks at real scale. Either is
saved once into the cache as an ordinary diffusers folder (`ensure_random_model`), so it is
loaded exactly like a user's model. Random weights draw noise, not pictures.

`ensure_random_controlnet` builds a ControlNet of a random model's shape (diffusers'
`ControlNetModel.from_unet`, as its own SDXL ControlNet tests do), with small random values in the
output convolutions that training starts at zero, so that its residuals carry signal.

`ensure_config_folder` also serves real users: it is the family's configuration (the shipped
JSON files plus the CLIP tokenizer built offline), which `from_single_file` needs to load a
checkpoint without fetching anything.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .demo_model import _ensure_folder, write_clip_tokenizer_files
from .families import FAMILIES, ModelFamily
from .paths import cache_dir as default_cache_dir

SCALES = ("tiny", "real")

# Changes to the shipped configs or these shapes need a new name: folders are built once.
_VERSION = "v2"

# Tiny shapes per component (merged over the family's real config). The VAE keeps four blocks so
# that it downsamples 8× like the real one; the text encoders keep the 49,408-token vocabulary.
_TINY_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 5,
    "projection_dim": 32,
}
_TINY_VAE = {"block_out_channels": [16, 32, 32, 64], "norm_num_groups": 1, "layers_per_block": 1}
_TINY_SD_UNET = {
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "norm_num_groups": 32,
    "sample_size": 32,
}
_TINY = {
    "sd1": {"unet": _TINY_SD_UNET, "vae": _TINY_VAE, "text_encoder": _TINY_TEXT},
    "sd2": {
        "unet": {**_TINY_SD_UNET, "attention_head_dim": [2, 4], "use_linear_projection": True},
        "vae": _TINY_VAE,
        "text_encoder": _TINY_TEXT,
    },
    "sdxl": {
        # Cross-attention at latent/2 only, with a deeper stack there, as in SDXL.
        "unet": {
            "block_out_channels": [32, 64],
            "layers_per_block": 2,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
            "attention_head_dim": [2, 4],
            "transformer_layers_per_block": [1, 2],
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 88,  # 40 (pooled, encoder 2) + 6 × 8
            "cross_attention_dim": 80,  # 32 + 48: both encoders' hidden states side by side
            "norm_num_groups": 1,
            "sample_size": 32,
        },
        "vae": _TINY_VAE,
        "text_encoder": _TINY_TEXT,
        # Wider than the first encoder, as bigG is wider than CLIP-L: diffusers' single-file
        # loader tells the two apart by width. A projection unlike the width catches transposes.
        "text_encoder_2": {**_TINY_TEXT, "hidden_size": 48, "projection_dim": 40},
    },
}


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def component_config(family: ModelFamily, component: str, scale: str = "real") -> dict:
    """A component's configuration (unet, vae, text_encoder, text_encoder_2) at a scale."""
    name = "scheduler/scheduler_config.json" if component == "scheduler" else f"{component}/config.json"
    config = _read(family.config_dir / name)
    if scale == "tiny":
        config.update(_TINY[family.id].get(component, {}))
    elif scale != "real":
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    return config


def build_random_pipeline(family: ModelFamily, scale: str = "tiny", seed: int = 0, device: str = "cpu"):
    """A pipeline of `family`'s shape with random weights (float32), tokenizers included. The
    weights are made on `device` (a GPU check builds SDXL there in seconds; the scheduler's own
    tables stay on the CPU, where diffusers expects them)."""
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from .demo_model import build_clip_tokenizer

    index = _read(family.config_dir / "model_index.json")
    parts: dict[str, object] = {}
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        parts["unet"] = UNet2DConditionModel.from_config(component_config(family, "unet", scale))
        parts["vae"] = AutoencoderKL.from_config(component_config(family, "vae", scale))
        for slot in family.text_encoders:
            config = component_config(family, slot.encoder, scale)
            cls = getattr(transformers, index[slot.encoder][1])
            parts[slot.encoder] = cls(CLIPTextConfig.from_dict(config))
            tokenizer_config = _read(family.config_dir / slot.tokenizer / "tokenizer_config.json")
            tokenizer = build_clip_tokenizer()
            tokenizer.pad_token = tokenizer_config["pad_token"]
            parts[slot.tokenizer] = tokenizer
    scheduler_config = component_config(family, "scheduler")
    parts["scheduler"] = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    extra = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
    optional = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
    for module in parts.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return family.pipeline_class(**parts, **optional, **extra)


def random_model_dir(family_id: str, scale: str, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "models" / f"random-{family_id}-{scale}-{_VERSION}"


def ensure_random_model(family_id: str, scale: str = "tiny", cache_dir: Path | None = None) -> Path:
    """The diffusers folder of a random-weight model of this family and scale, built on first use."""
    family = FAMILIES[family_id]

    def write(folder: Path) -> None:
        pipe = build_random_pipeline(family, scale)
        pipe.save_pretrained(folder, safe_serialization=True)
        for slot in family.text_encoders:  # vocab/merges too, for the slow tokenizer's loader
            write_clip_tokenizer_files(folder / slot.tokenizer)

    return _ensure_folder(random_model_dir(family_id, scale, cache_dir), "model_index.json", write)


def build_random_controlnet(unet, seed: int = 0, zero_conv_scale: float = 0.05):
    """A ControlNet of `unet`'s shape (its encoder half copied, `ControlNetModel.from_unet`) whose
    zero-initialised convolutions (each residual's output, and the control image embedding's last
    layer) hold random values of standard deviation `zero_conv_scale`: a freshly made ControlNet's
    residuals are all exactly zero, which no test of what they do could see."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet)
    randomize_zero_convolutions(net, seed, zero_conv_scale)
    return net.eval()


def randomize_zero_convolutions(net, seed: int = 0, scale: float = 0.05) -> None:
    """Fill a ControlNet's zero-initialised convolutions with random values (fixed seed), in place."""
    gen = torch.Generator().manual_seed(seed)
    modules = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for module in modules:
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def random_controlnet_dir(family_id: str, scale: str, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "models" / f"random-{family_id}-{scale}-controlnet-{_VERSION}"


def ensure_random_controlnet(family_id: str, scale: str = "tiny", cache_dir: Path | None = None) -> Path:
    """The diffusers folder of a random ControlNet for `ensure_random_model(family_id, scale)`,
    built on first use (from that model's U-Net)."""
    from diffusers import UNet2DConditionModel

    model = ensure_random_model(family_id, scale, cache_dir)

    def write(folder: Path) -> None:
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", local_files_only=True)
        build_random_controlnet(unet).save_pretrained(folder, safe_serialization=True)

    return _ensure_folder(random_controlnet_dir(family_id, scale, cache_dir), "config.json", write)


def config_folder_dir(family: ModelFamily, cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "configs" / f"{family.config_name}-{_VERSION}"


def ensure_config_folder(family: ModelFamily, cache_dir: Path | None = None) -> Path:
    """A diffusers folder without weights: the family's shipped configs plus its tokenizers.
    `from_single_file(..., config=<this>, local_files_only=True)` loads a checkpoint offline."""

    def write(folder: Path) -> None:
        shutil.copytree(family.config_dir, folder)
        for slot in family.text_encoders:
            write_clip_tokenizer_files(folder / slot.tokenizer)

    return _ensure_folder(config_folder_dir(family, cache_dir), "model_index.json", write)
