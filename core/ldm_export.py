"""Export a diffusers SD 1.x, 2.x or SDXL pipeline (or ControlNet) as a single checkpoint with the
original key names.

This is the reverse of diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint` and `convert_open_clip_checkpoint` (as in diffusers'
scripts/convert_diffusers_to_original_stable_diffusion.py), but derived from the model configs
instead of hard-coding SD 1.5's four blocks, so it also works for small models such as the demo
model and the tiny random SDXL. The text encoders are written where each family's original code
kept them: SD 1.x's CLIP-L in the Hugging Face layout under `cond_stage_model.transformer.`;
SD 2.x's OpenCLIP-H in the OpenCLIP layout under `cond_stage_model.model.`; SDXL's CLIP-L under
`conditioner.embedders.0.transformer.` and its OpenCLIP-bigG under `conditioner.embedders.1.model.`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from .families import SD1, SD2, SDXL, ModelFamily, family_of_pipeline

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
CONTROLNET_PREFIX = "control_model."  # lllyasviel's and Stability's ControlNet files

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
# SDXL's pooled-text + time_ids embedding (`addition_embed_type="text_time"`).
_UNET_ADDED_EMBEDDING = {
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
}
# (diffusers, LDM) renames inside the VAE's mid-block attention.
_VAE_ATTN_RENAMES = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def _unet_prefix_map(unet) -> dict[str, str]:
    """diffusers module prefix -> LDM prefix, for every block of this U-Net's layout (or of a
    ControlNet's: the U-Net's encoder half and mid block, without up blocks)."""
    cfg = unet.config
    if cfg.class_embed_type is not None or cfg.addition_embed_type not in (None, "text_time"):
        raise ValueError(
            "only SD 1.x/2.x and SDXL U-Nets can be exported (this one has a class embedding or an "
            f"added embedding of type {cfg.addition_embed_type!r})"
        )
    layers = cfg.layers_per_block
    if not isinstance(layers, int):
        raise ValueError("U-Nets with a different number of layers per block cannot be exported")
    per_block = layers + 1  # LDM numbers resnet(+attention) layers, then the down/upsampler, in one list
    prefixes = dict(_UNET_TOP_LEVEL)
    if cfg.addition_embed_type == "text_time":
        prefixes.update(_UNET_ADDED_EMBEDDING)
    # A transformer stack keeps its inner names (`transformer_blocks.N...`, however deep), and
    # blocks without attention simply have no `.1` slot: diffusers' converter expects both.

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

    for i, block in enumerate(getattr(unet, "up_blocks", ())):
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


def _unet_blocks_to_ldm(module, prefixes: dict[str, str], what: str) -> dict[str, torch.Tensor]:
    out = {}
    for hf, ldm, rest, value in _rename(module.state_dict(), prefixes, what):
        if ".resnets." in hf:
            for a, b in _UNET_RESNET_RENAMES:
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
                    break
        out[ldm + rest] = value
    return out


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The U-Net's weights under LDM names (without the `model.diffusion_model.` prefix)."""
    return _unet_blocks_to_ldm(unet, _unet_prefix_map(unet), "U-Net")


def controlnet_to_ldm(controlnet) -> dict[str, torch.Tensor]:
    """A diffusers ControlNetModel's weights in the original ControlNet layout, `control_model.`
    keys included: the copied U-Net half under U-Net names, `input_hint_block` (the control
    image's embedding: convolutions at 0, 2, 4, ...), `zero_convs` and `middle_block_out` (the
    zero-initialised outputs). The reverse of diffusers' `convert_controlnet_checkpoint`."""
    embedding = controlnet.controlnet_cond_embedding
    n = len(embedding.blocks)
    prefixes = _unet_prefix_map(controlnet)
    prefixes["controlnet_cond_embedding.conv_in."] = "input_hint_block.0."
    prefixes.update(
        {f"controlnet_cond_embedding.blocks.{i}.": f"input_hint_block.{2 * i + 2}." for i in range(n)}
    )
    prefixes["controlnet_cond_embedding.conv_out."] = f"input_hint_block.{2 * n + 2}."
    for i in range(len(controlnet.controlnet_down_blocks)):
        prefixes[f"controlnet_down_blocks.{i}."] = f"zero_convs.{i}.0."
    prefixes["controlnet_mid_block."] = "middle_block_out.0."
    weights = _unet_blocks_to_ldm(controlnet, prefixes, "ControlNet")
    # clone: safetensors refuses tensors that share memory.
    return {CONTROLNET_PREFIX + k: v.detach().contiguous().clone() for k, v in weights.items()}


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


def _text_model_state(text_encoder: CLIPTextModel | CLIPTextModelWithProjection):
    """The encoder's weights under `text_model.` names whatever the transformers version
    (>= 5.6 flattened CLIPTextModel; CLIPTextModelWithProjection still wraps `text_model`)."""
    for key, value in text_encoder.state_dict().items():
        if key.endswith("embeddings.position_ids"):
            continue  # a buffer, not a weight; loaders rebuild it
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        yield key, value


def text_encoder_to_ldm(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """A CLIP-L text encoder's weights in the Hugging Face layout (`text_model.*`), as SD 1.x keeps
    it under `cond_stage_model.transformer.` and SDXL under `conditioner.embedders.0.transformer.`."""
    return dict(_text_model_state(text_encoder))


# Hugging Face CLIP -> OpenCLIP names inside one transformer layer (q/k/v are handled apart).
_OPEN_CLIP_LAYER_RENAMES = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}
_OPEN_CLIP_TOP_LEVEL = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_LAYER_PREFIX = "text_model.encoder.layers."
_QKV = re.compile(r"self_attn\.(?P<proj>[qkv])_proj\.(?P<kind>weight|bias)")


def open_clip_text_to_ldm(
    text_encoder: CLIPTextModel | CLIPTextModelWithProjection,
) -> dict[str, torch.Tensor]:
    """An OpenCLIP text encoder's weights in the OpenCLIP layout (without SD 2.x's
    `cond_stage_model.model.` or SDXL's `conditioner.embedders.1.model.` prefix).

    Every layer the encoder has is written; diffusers reads as many as its config asks for (SD 2.x
    models in diffusers drop OpenCLIP's last layer, whose output SD 2.x never used). OpenCLIP keeps
    q, k and v as one `in_proj` matrix, and `text_projection` as a (width, projection) matrix: the
    transpose of the Hugging Face Linear's weight.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}  # (layer, weight|bias) -> q/k/v
    for key, value in _text_model_state(text_encoder):
        if key in _OPEN_CLIP_TOP_LEVEL:
            out[_OPEN_CLIP_TOP_LEVEL[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T
        elif key.startswith(_LAYER_PREFIX):
            layer, rest = key[len(_LAYER_PREFIX) :].split(".", 1)
            ldm = f"transformer.resblocks.{layer}."
            split = _QKV.fullmatch(rest)
            if split:  # OpenCLIP's one in_proj matrix, gathered below
                qkv.setdefault((ldm, split["kind"]), {})[split["proj"]] = value
                continue
            for a, b in _OPEN_CLIP_LAYER_RENAMES.items():
                if rest.startswith(a):
                    out[ldm + b + rest[len(a) :]] = value
                    break
            else:
                raise ValueError(f"text encoder weight '{key}' has no OpenCLIP equivalent")
        else:
            raise ValueError(f"text encoder weight '{key}' has no OpenCLIP equivalent")
    for (ldm, kind), parts in qkv.items():
        out[f"{ldm}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _text_parts(pipeline: DiffusionPipeline, family: ModelFamily):
    if family is SDXL:
        return (
            (SDXL_CLIP_PREFIX, text_encoder_to_ldm(pipeline.text_encoder)),
            (SDXL_OPEN_CLIP_PREFIX, open_clip_text_to_ldm(pipeline.text_encoder_2)),
        )
    if family is SD2:
        return ((SD2_OPEN_CLIP_PREFIX, open_clip_text_to_ldm(pipeline.text_encoder)),)
    if family is SD1:
        return ((CLIP_PREFIX, text_encoder_to_ldm(pipeline.text_encoder)),)
    raise ValueError(f"{family.label} models cannot be exported as a single checkpoint")


def ldm_state_dict(
    pipeline: DiffusionPipeline, dtype: torch.dtype | None = None, family: ModelFamily | None = None
) -> dict[str, torch.Tensor]:
    """The whole pipeline's weights as one LDM-keyed state dict (CPU, contiguous, unshared).

    `family` decides where the text encoders go; by default the pipeline's own (an SD 2.x model is
    told from SD 1.x by its encoder's width, so small SD 2.x-shaped models must say `family=SD2`).
    """
    family = family or family_of_pipeline(pipeline)
    parts = (
        (UNET_PREFIX, unet_to_ldm(pipeline.unet)),
        (VAE_PREFIX, vae_to_ldm(pipeline.vae)),
        *_text_parts(pipeline, family),
    )
    state = {}
    for prefix, weights in parts:
        for key, value in weights.items():
            value = value.detach().to("cpu", dtype=dtype or value.dtype)
            # clone: safetensors refuses tensors that share memory (views made above, tied weights).
            state[prefix + key] = value.contiguous().clone()
    return state


def save_as_ldm_checkpoint(
    pipeline: DiffusionPipeline,
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    family: ModelFamily | None = None,
) -> Path:
    """Write the pipeline's U-Net, VAE and text encoder(s) as one original-format checkpoint.

    `.safetensors` is written with safetensors; `.ckpt` as `torch.save({"state_dict": ...})` like
    the original training checkpoints. Scheduler and tokenizers are not stored (they never were).
    """
    path = Path(path)
    state = ldm_state_dict(pipeline, dtype, family)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={"format": "pt"})
    elif suffix == ".ckpt":
        torch.save({"state_dict": state}, path)
    else:
        raise ValueError(f"unsupported checkpoint extension '{path.suffix}' (use .safetensors or .ckpt)")
    return path
