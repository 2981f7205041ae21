"""Export a diffusers Stable Diffusion pipeline as a single checkpoint with the original LDM key names.

This is the reverse of diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint` and
`convert_ldm_clip_checkpoint` (as in diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py),
but derived from the model configs instead of hard-coding SD 1.5's four blocks, so it also works
for small models such as the demo model. The text encoder is written in the SD 1.x (Hugging Face
CLIP) layout, which diffusers, A1111 and ComfyUI read for SD 1.x models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

# (diffusers, LDM) renames inside a U-Net ResBlock.
_UNET_RESNET_RENAMES = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
)
_UNET_TOP_LEVEL = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
# (diffusers, LDM) renames inside the VAE's mid-block attention.
_VAE_ATTN_RENAMES = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def _unet_prefix_map(unet: UNet2DConditionModel) -> dict[str, str]:
    """diffusers module prefix -> LDM prefix, for every block of this U-Net's layout."""
    cfg = unet.config
    if cfg.class_embed_type is not None or cfg.addition_embed_type is not None:
        raise ValueError("only SD 1.x/2.x-style U-Nets (no class or added embeddings) can be exported")
    layers = cfg.layers_per_block
    if not isinstance(layers, int):
        raise ValueError("U-Nets with a different number of layers per block cannot be exported")
    per_block = layers + 1  # LDM numbers resnet(+attention) layers, then the down/upsampler, in one list
    prefixes = dict(_UNET_TOP_LEVEL)

    for i, block in enumerate(unet.down_blocks):
        for j in range(layers):
            ldm = f"input_blocks.{per_block * i + j + 1}"
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"{ldm}.0."
            if getattr(block, "attentions", None):
                prefixes[f"down_blocks.{i}.attentions.{j}."] = f"{ldm}.1."
        if block.downsamplers:
            prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{per_block * (i + 1)}.0.op."

    prefixes["mid_block.resnets.0."] = "middle_block.0."
    prefixes["mid_block.attentions.0."] = "middle_block.1."
    prefixes["mid_block.resnets.1."] = "middle_block.2."

    for i, block in enumerate(unet.up_blocks):
        has_attention = bool(getattr(block, "attentions", None))
        for j in range(per_block):
            ldm = f"output_blocks.{per_block * i + j}"
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"{ldm}.0."
            if has_attention:
                prefixes[f"up_blocks.{i}.attentions.{j}."] = f"{ldm}.1."
        if block.upsamplers:
            # The upsampler follows the last layer's resnet (and attention, if any).
            slot = 2 if has_attention else 1
            prefixes[f"up_blocks.{i}.upsamplers.0.conv."] = (
                f"output_blocks.{per_block * i + layers}.{slot}.conv."
            )
    return prefixes


def _rename(state_dict: dict[str, torch.Tensor], prefixes: dict[str, str], what: str):
    # Longest prefix first so "down_blocks.1.resnets.1." never matches a shorter sibling.
    ordered = sorted(prefixes.items(), key=lambda kv: len(kv[0]), reverse=True)
    for key, value in state_dict.items():
        for hf, ldm in ordered:
            if key.startswith(hf):
                yield hf, ldm, key[len(hf) :], value
                break
        else:
            raise ValueError(f"{what} weight '{key}' has no LDM equivalent; this layout cannot be exported")


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The U-Net's weights under LDM names (without the `model.diffusion_model.` prefix)."""
    out = {}
    for hf, ldm, rest, value in _rename(unet.state_dict(), _unet_prefix_map(unet), "U-Net"):
        if ".resnets." in hf:
            for a, b in _UNET_RESNET_RENAMES:
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
                    break
        out[ldm + rest] = value
    return out


def _vae_prefix_map(vae: AutoencoderKL) -> dict[str, str]:
    prefixes = {
        "quant_conv.": "quant_conv.",
        "post_quant_conv.": "post_quant_conv.",
    }
    for part in ("encoder", "decoder"):
        prefixes[f"{part}.conv_in."] = f"{part}.conv_in."
        prefixes[f"{part}.conv_out."] = f"{part}.conv_out."
        prefixes[f"{part}.conv_norm_out."] = f"{part}.norm_out."
        prefixes[f"{part}.mid_block.attentions.0."] = f"{part}.mid.attn_1."
        for j in range(2):
            prefixes[f"{part}.mid_block.resnets.{j}."] = f"{part}.mid.block_{j + 1}."

    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        if block.downsamplers:
            prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."

    # LDM numbers decoder blocks from the lowest resolution up; diffusers from the top down.
    n = len(vae.decoder.up_blocks)
    for i, block in enumerate(vae.decoder.up_blocks):
        for j in range(len(block.resnets)):
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{n - 1 - i}.block.{j}."
        if block.upsamplers:
            prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
    return prefixes


def vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """The VAE's weights under LDM names (without the `first_stage_model.` prefix)."""
    out = {}
    for hf, ldm, rest, value in _rename(vae.state_dict(), _vae_prefix_map(vae), "VAE"):
        if ".mid_block.attentions." in hf:
            for a, b in _VAE_ATTN_RENAMES.items():
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
                    break
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        elif "resnets." in hf and rest.startswith("conv_shortcut."):
            rest = "nin_shortcut." + rest[len("conv_shortcut.") :]
        out[ldm + rest] = value
    return out


def text_encoder_to_ldm(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """The CLIP text encoder's weights under SD 1.x names (without `cond_stage_model.transformer.`)."""
    out = {}
    for key, value in text_encoder.state_dict().items():
        if key == "text_model.embeddings.position_ids" or key == "embeddings.position_ids":
            continue  # a buffer, not a weight; loaders rebuild it
        # transformers >= 5.6 flattened CLIPTextModel (no `text_model.`); the file format keeps it.
        out[key if key.startswith("text_model.") else "text_model." + key] = value
    return out


def ldm_state_dict(
    pipeline: StableDiffusionPipeline, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The whole pipeline's weights as one LDM-keyed state dict (CPU, contiguous, unshared)."""
    parts = (
        (UNET_PREFIX, unet_to_ldm(pipeline.unet)),
        (VAE_PREFIX, vae_to_ldm(pipeline.vae)),
        (CLIP_PREFIX, text_encoder_to_ldm(pipeline.text_encoder)),
    )
    state = {}
    for prefix, weights in parts:
        for key, value in weights.items():
            value = value.detach().to("cpu", dtype=dtype or value.dtype)
            # clone: safetensors refuses tensors that share memory (views made above, tied weights).
            state[prefix + key] = value.contiguous().clone()
    return state


def save_as_ldm_checkpoint(
    pipeline: StableDiffusionPipeline, path: str | Path, *, dtype: torch.dtype | None = None
) -> Path:
    """Write the pipeline's U-Net, VAE and text encoder as one original-format SD checkpoint.

    `.safetensors` is written with safetensors; `.ckpt` as `torch.save({"state_dict": ...})` like
    the original training checkpoints. Scheduler and tokenizer are not stored (they never were).
    """
    path = Path(path)
    state = ldm_state_dict(pipeline, dtype)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"format": "pt"})
    elif suffix == ".ckpt":
        torch.save({"state_dict": state}, path)
    else:
        raise ValueError(f"unsupported checkpoint extension '{path.suffix}' (use .safetensors or .ckpt)")
    return path
