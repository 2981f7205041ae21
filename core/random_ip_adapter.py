"""A tiny CLIP image encoder and IP-Adapter with random weights, in the real files' layouts, for a
given U-Net: what the tests (and a try of the path without the real weights) load through the
same code as `ip-adapter_sd15.safetensors` and ComfyUI's `models/clip_vision/` files.
Random weights condition on noise, not on the image's look."""

from __future__ import annotations

from pathlib import Path

import torch

# A CLIP ViT of width 64 (one 64-wide head, as core/ip_adapter_files.py assumes for widths it
# does not know), 32×32 input in 8×8 patches; the projection unlike the width catches transposes.
TINY_ENCODER = {
    "hidden_size": 64,
    "intermediate_size": 37,
    "num_attention_heads": 1,
    "num_hidden_layers": 2,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 24,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}


def build_random_image_encoder(seed: int = 0):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_ENCODER)).eval()


def save_image_encoder(encoder, path: Path) -> Path:
    """A folder (transformers' `save_pretrained`) or, for a `.safetensors` path, one file in its
    key layout as ComfyUI keeps image encoders."""
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in encoder.state_dict().items() if not k.endswith("position_ids")}
        save_file(state, str(path))
    else:
        encoder.save_pretrained(path)
    return path


def random_ip_adapter_state(
    unet, image_embed_dim: int, tokens: int = 4, seed: int = 0, scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """A base IP-Adapter's tensors for `unet` as `ip-adapter_sd15.safetensors` names them:
    `image_proj.proj.*` (image_embeds → `tokens` tokens), `image_proj.norm.*` and
    `ip_adapter.<2j+1>.to_k_ip/to_v_ip.weight` for the j-th cross-attention layer. `scale`
    multiplies the value projections (how strongly the image acts)."""
    generator = torch.Generator().manual_seed(seed)
    width = unet.config.cross_attention_dim

    def rand(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    state = {
        "image_proj.proj.weight": rand(tokens * width, image_embed_dim, std=image_embed_dim**-0.5),
        "image_proj.proj.bias": rand(tokens * width, std=0.1),
        "image_proj.norm.weight": 1.0 + rand(width, std=0.1),
        "image_proj.norm.bias": rand(width, std=0.1),
    }
    names = [n.removesuffix(".processor") for n in unet.attn_processors if n.endswith("attn2.processor")]
    modules = dict(unet.named_modules())
    for j, name in enumerate(names):
        inner = modules[name].to_k.out_features
        state[f"ip_adapter.{2 * j + 1}.to_k_ip.weight"] = rand(inner, width, std=width**-0.5)
        state[f"ip_adapter.{2 * j + 1}.to_v_ip.weight"] = rand(inner, width, std=scale * width**-0.5)
    return state


def random_plus_ip_adapter_state(
    unet, hidden_width: int, tokens: int = 16, seed: int = 0, scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """A plus IP-Adapter's tensors (`ip-adapter-plus_sd15.safetensors`' names): a Resampler of 4
    blocks with 64-wide queries (one 64-wide head) over the encoder's `hidden_width`-wide hidden
    states, `tokens` learned queries; the cross-attention keys and values as the base adapter's."""
    generator = torch.Generator().manual_seed(seed + 1)
    width, dim = unet.config.cross_attention_dim, 64

    def rand(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    state = {
        "image_proj.latents": rand(1, tokens, dim, std=dim**-0.5),
        "image_proj.proj_in.weight": rand(dim, hidden_width, std=hidden_width**-0.5),
        "image_proj.proj_in.bias": rand(dim, std=0.1),
        "image_proj.proj_out.weight": rand(width, dim, std=dim**-0.5),
        "image_proj.proj_out.bias": rand(width, std=0.1),
        "image_proj.norm_out.weight": 1.0 + rand(width, std=0.1),
        "image_proj.norm_out.bias": rand(width, std=0.1),
    }
    for i in range(4):
        block = f"image_proj.layers.{i}"
        for norm in (f"{block}.0.norm1", f"{block}.0.norm2", f"{block}.1.0"):
            state[f"{norm}.weight"], state[f"{norm}.bias"] = 1.0 + rand(dim, std=0.1), rand(dim, std=0.1)
        state[f"{block}.0.to_q.weight"] = rand(dim, dim, std=dim**-0.5)
        state[f"{block}.0.to_kv.weight"] = rand(2 * dim, dim, std=dim**-0.5)
        state[f"{block}.0.to_out.weight"] = rand(dim, dim, std=dim**-0.5)
        state[f"{block}.1.1.weight"] = rand(4 * dim, dim, std=dim**-0.5)
        state[f"{block}.1.3.weight"] = rand(dim, 4 * dim, std=(4 * dim) ** -0.5)
    base = random_ip_adapter_state(unet, 1, seed=seed, scale=scale)
    return state | {k: v for k, v in base.items() if k.startswith("ip_adapter.")}


def save_ip_adapter(state: dict[str, torch.Tensor], path: Path) -> Path:
    """`.safetensors` with flat names, or `.bin` as {"image_proj": {...}, "ip_adapter": {...}}."""
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        for key, value in state.items():
            part, _, rest = key.partition(".")
            nested[part][rest] = value
        torch.save(nested, path)
    return path
