"""IP-Adapter weights and CLIP image encoders on disk: what a file is (from its tensor shapes) and
loading it for one model, without touching the model (core/ip_adapter.py uses them).

An IP-Adapter file (`ip-adapter_sd15.safetensors`, `ip-adapter-plus_sdxl_vit-h.bin`, ...) has
`image_proj.*` (the image projection: CLIP image features → a few image tokens as wide as the
U-Net's text features) and `ip_adapter.<k>.to_k_ip.weight` / `to_v_ip.weight` for every
cross-attention layer (k = 1, 3, 5, ... in diffusers' `attn_processors` order, the odd numbers
because the self-attention layers between them have none). Its family is the width of the image
tokens (`to_k_ip`'s input: the family's `context_dim`, 768 SD 1.x, 2048 SDXL); the image encoder
it needs is told by the width of what the projection reads (1024: CLIP ViT-H/14, 1280: ViT-bigG/14
for the base adapters; the plus adapters read the encoder's penultimate hidden states, 1280 / 1664).

An image encoder is a transformers `CLIPVisionModelWithProjection`: a folder (`config.json` +
weights) or one `.safetensors` file in its key layout (`vision_model.*`, `visual_projection.*`,
as ComfyUI's `models/clip_vision/` holds them), whose configuration is then read off the shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .families import FAMILIES, ModelFamily
from .weight_files import WeightNames, read_weight_names

IP_ADAPTER_KEY = "ip_adapter."
IMAGE_PROJ_KEY = "image_proj."
_TO_K = re.compile(r"^ip_adapter\.(\d+)\.to_k_ip\.weight$")
# CLIP ViT attention heads by width (not in the weights): ViT-B 768/12, ViT-L 1024/16,
# ViT-H 1280/16, ViT-bigG 1664/16; other widths (small test models): 64-wide heads.
_CLIP_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}


class IPAdapterError(ValueError):
    """An IP-Adapter or image encoder that cannot be used; the message says why."""


@dataclass(frozen=True)
class IPAdapterInfo:
    """What an IP-Adapter file's shapes say."""

    context_dim: int  # width of its image tokens = the U-Net's cross_attention_dim it fits
    image_embed_dim: int  # width of the image features its projection reads
    hidden_states: bool  # reads the encoder's penultimate hidden states (plus/full), not image_embeds
    layers: int  # cross-attention layers it has keys and values for
    kind: str  # "base", "plus", "full"

    @property
    def family(self) -> ModelFamily | None:
        """The family whose text features are this wide (None: a width no family has)."""
        return next((f for f in FAMILIES.values() if f.context_dim == self.context_dim), None)


@dataclass(frozen=True)
class ImageEncoderInfo:
    """What a CLIP image encoder's shapes (or config) say."""

    width: int  # hidden size: what a plus adapter's projection reads
    projection_dim: int  # image_embeds width: what a base adapter's projection reads

    def fits(self, adapter: IPAdapterInfo) -> bool:
        return adapter.image_embed_dim == (self.width if adapter.hidden_states else self.projection_dim)


@dataclass(frozen=True)
class IPAdapterFiles:
    """An IP-Adapter and the image encoder it is used with."""

    adapter: Path
    image_encoder: Path


def describe_ip_adapter(names: WeightNames) -> IPAdapterInfo:
    """An IP-Adapter file's facts from its names and shapes; `IPAdapterError` saying why not one."""
    shapes = names.shapes
    proj = {k[len(IMAGE_PROJ_KEY) :]: s for k, s in shapes.items() if k.startswith(IMAGE_PROJ_KEY)}
    ks = sorted(int(m.group(1)) for k in shapes if (m := _TO_K.match(k)))
    if not proj or not ks:
        raise IPAdapterError("it is not an IP-Adapter (no 'image_proj.*' and 'ip_adapter.*.to_k_ip' weights)")
    context_dim = shapes[f"ip_adapter.{ks[0]}.to_k_ip.weight"][1]
    if "perceiver_resampler.proj_in.weight" in proj or ("norm.weight" in proj and "proj.weight" not in proj):
        raise IPAdapterError(
            "it is an IP-Adapter FaceID model, which needs face embeddings (insightface); "
            "use a base or plus IP-Adapter"
        )
    if "proj.weight" in proj:  # base: image_embeds → 4 tokens
        return IPAdapterInfo(context_dim, proj["proj.weight"][1], False, len(ks), "base")
    if "proj.3.weight" in proj:  # full: a feed-forward on every hidden state
        return IPAdapterInfo(context_dim, proj["proj.0.weight"][1], True, len(ks), "full")
    if "latents" in proj and "proj_in.weight" in proj:  # plus: a Resampler over the hidden states
        return IPAdapterInfo(context_dim, proj["proj_in.weight"][1], True, len(ks), "plus")
    raise IPAdapterError("its image projection ('image_proj.*') is of a kind this engine does not know")


def describe_image_encoder(path: Path) -> ImageEncoderInfo:
    """A CLIP image encoder's widths; `IPAdapterError` when `path` is not one."""
    if path.is_dir():
        import json

        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise IPAdapterError(f"it is not a CLIP image encoder folder: {e}") from e
        config = config.get("vision_config", config)
        if "hidden_size" not in config or "projection_dim" not in config:
            raise IPAdapterError("its config.json is not a CLIP vision model's")
        return ImageEncoderInfo(int(config["hidden_size"]), int(config["projection_dim"]))
    shapes = read_weight_names(path).shapes
    emb, proj = shapes.get("vision_model.embeddings.class_embedding"), shapes.get("visual_projection.weight")
    if emb is None or proj is None:
        raise IPAdapterError(
            "it is not a CLIP image encoder in transformers' layout ('vision_model.*', 'visual_projection.*')"
        )
    return ImageEncoderInfo(emb[0], proj[0])


def read_ip_adapter(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors as {"image_proj": {...}, "ip_adapter": {...}} (the `.bin` layout)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        flat = load_file(str(path))
    else:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(loaded, dict):
            raise IPAdapterError("it is not a dictionary of tensors")
        flat = {
            f"{part}.{k}": v for part in ("image_proj", "ip_adapter") for k, v in loaded.get(part, {}).items()
        } or loaded
    nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in flat.items():
        part, _, rest = key.partition(".")
        if part in nested:
            nested[part][rest] = value
    return nested


def load_image_encoder(path: Path, device, dtype):
    """A `CLIPVisionModelWithProjection` from a folder or a single `.safetensors` file."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if path.is_dir():
        model = CLIPVisionModelWithProjection.from_pretrained(path)
    else:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        model = CLIPVisionModelWithProjection(_vision_config(CLIPVisionConfig, tensors))
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or [k for k in unexpected if not k.endswith("position_ids")]:
            raise IPAdapterError(
                f"its weights do not make a CLIP image encoder (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    return model.to(device=device, dtype=dtype).eval()


def _vision_config(config_class, tensors: dict[str, torch.Tensor]):
    """A CLIP vision configuration read off the weights' shapes (heads and activation by width:
    they are not in the weights; the OpenAI ViT-L/14 is the one with quick_gelu)."""
    width = tensors["vision_model.embeddings.class_embedding"].shape[0]
    patch = tensors["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    positions = tensors["vision_model.embeddings.position_embedding.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[3]) for k in tensors if k.startswith("vision_model.encoder.layers."))
    side = int(round((positions - 1) ** 0.5)) * patch
    return config_class(
        hidden_size=width,
        intermediate_size=tensors["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=_CLIP_HEADS.get(width, max(1, width // 64)),
        image_size=side,
        patch_size=patch,
        projection_dim=tensors["visual_projection.weight"].shape[0],
        hidden_act="quick_gelu" if (width, layers) == (1024, 24) else "gelu",
        layer_norm_eps=1e-5,
    )
