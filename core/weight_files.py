"""What a weights file is, from its weight names and shapes alone: never its tensors.

A `.safetensors` file is read up to the end of its JSON header (a few hundred KB for a 7 GB
checkpoint); a pickle (`.ckpt`, `.pt`, `.pth`, `.bin`) is memory-mapped by torch, which reads
its small index and leaves the tensors on disk. From the names and shapes `kind_of` tells a full
model checkpoint, a LoRA, a textual-inversion embedding and a ControlNet apart, and `lora_family`
and `embedding_family` say which model family a LoRA or embedding was made for. The model
library (`core.model_library`) lists folders of such files with these.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .families import FAMILIES, SD1, SD2, SDXL, ModelFamily

CHECKPOINT, LORA, EMBEDDING, CONTROLNET = "checkpoint", "lora", "embedding", "controlnet"
IPADAPTER, CLIP_VISION = "ipadapter", "clip_vision"  # IP-Adapters and their image encoders
KINDS = (CHECKPOINT, LORA, EMBEDDING, CONTROLNET, IPADAPTER, CLIP_VISION)
VAE = "vae"  # recognised only to say what a misplaced file is; not a kind the library lists
#: Suffixes of weights files; anything else in a model folder (previews, .yaml, .json notes) is not one.
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
KIND_WORDS = {
    CHECKPOINT: "a full model checkpoint",
    LORA: "a LoRA",
    EMBEDDING: "a textual-inversion embedding",
    CONTROLNET: "a ControlNet",
    IPADAPTER: "an IP-Adapter",
    CLIP_VISION: "a CLIP image encoder",
    VAE: "a VAE",
}

_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
# A pickle that torch cannot memory-map (the pre-1.6 format) is read whole only when this small.
_MAX_UNMAPPED_PICKLE = 32 * 1024 * 1024


class WeightsUnreadable(ValueError):
    """The file's names and shapes could not be read (damaged, truncated, not a weights file)."""


@dataclass(frozen=True)
class WeightNames:
    """A weights file's tensor names and shapes, and its safetensors metadata (strings)."""

    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)

    def shape_of(self, key: str) -> tuple[int, ...]:
        return self.shapes[key]


def read_weight_names(path: Path) -> WeightNames:
    """Names and shapes of the tensors in a weights file, without reading the tensors."""
    if path.suffix.lower() == ".safetensors":
        return read_safetensors_header(path)
    return read_pickle_names(path)


def read_safetensors_header(path: Path) -> WeightNames:
    """The header of a .safetensors file: 8 bytes of length, then that much JSON. The tensors'
    extent is checked against the file's size, so a truncated download is caught here."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or length > _MAX_HEADER_BYTES or 8 + length > size:
            raise WeightsUnreadable(
                f"it is not a valid .safetensors file (header length {length} in a file of {size} bytes)"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise WeightsUnreadable(f"its .safetensors header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise WeightsUnreadable("its .safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {k: v for k, v in metadata.items() if isinstance(v, str)} if isinstance(metadata, dict) else {}
    shapes, end = {}, 0
    for name, entry in header.items():
        try:
            shapes[name] = tuple(int(d) for d in entry["shape"])
            end = max(end, int(entry["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise WeightsUnreadable(f"tensor {name!r} has a malformed entry in the header") from None
    if 8 + length + end > size:
        raise WeightsUnreadable(
            f"the file is {size} bytes but its header describes {8 + length + end}: an incomplete download?"
        )
    return WeightNames(shapes, metadata)


def read_pickle_names(path: Path) -> WeightNames:
    """Names and shapes of the tensors in a torch pickle, memory-mapped (tensors stay on disk).
    Nested dicts become dotted names; a checkpoint's "state_dict" wrapper is looked into."""
    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:
            # The pre-1.6 pickle format cannot be memory-mapped: read small files whole.
            if path.stat().st_size > _MAX_UNMAPPED_PICKLE:
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for files that are not its archives
        raise WeightsUnreadable(
            f"it could not be read as a torch file (damaged, or not weights?): {e}"
        ) from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    shapes: dict[str, tuple[int, ...]] = {}
    _flatten(state, "", shapes)
    return WeightNames(shapes)


def _flatten(value: object, prefix: str, out: dict[str, tuple[int, ...]]) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        out[prefix.rstrip(".")] = tuple(value.shape)
    elif isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, f"{prefix}{key}.", out)


# --- what a file is -------------------------------------------------------------------------------
_LORA_KEY = re.compile(r"lora|hada_w|lokr_w", re.IGNORECASE)
_EMBEDDING_KEYS = ("emb_params", "clip_l", "clip_g")


def kind_of(names: WeightNames) -> str | None:
    """Which kind of file these weights are (one of `KINDS`, or `VAE`), or None if none of them."""
    from .control.files import checkpoint_problem as controlnet_problem
    from .model_sources import model_checkpoint_problem

    keys = list(names.shapes)
    if not keys:
        return None
    # ControlNet first: the early ControlNet files also carry a whole model beside their own weights.
    if controlnet_problem(keys) is None:
        return CONTROLNET
    if model_checkpoint_problem(keys) is None:
        return CHECKPOINT
    # Before LoRAs: FaceID IP-Adapters carry LoRA weights beside their own.
    if any(k.startswith("image_proj.") for k in keys) and any(k.startswith("ip_adapter.") for k in keys):
        return IPADAPTER
    if (
        "vision_model.embeddings.class_embedding" in names.shapes
        and "visual_projection.weight" in names.shapes
    ):
        return CLIP_VISION
    if any(_LORA_KEY.search(k) for k in keys):
        return LORA
    if any(k in _EMBEDDING_KEYS or k.startswith("string_to_param.") for k in keys):
        return EMBEDDING
    if _learned_embeds_width(names) is not None:
        return EMBEDDING
    if any(k.startswith(("encoder.", "decoder.", "first_stage_model.")) for k in keys):
        return VAE
    return None


def _learned_embeds_width(names: WeightNames) -> int | None:
    """diffusers' textual-inversion file ({"<token>": vector}): its vector's width, else None."""
    if len(names.shapes) != 1:
        return None
    ((key, shape),) = names.shapes.items()
    return shape[-1] if 1 <= len(shape) <= 2 and "." not in key else None


def embedding_family(names: WeightNames) -> ModelFamily | None:
    """The family a textual-inversion file is for: SDXL's have one vector per text encoder
    (`clip_l`, `clip_g`); SD 1.x's and 2.x's one, 768 or 1024 wide. None when it cannot be told
    (a width no family has, as in the tests' tiny models)."""
    shapes = names.shapes
    if "clip_l" in shapes and "clip_g" in shapes:
        return SDXL
    widths = [s[-1] for k, s in shapes.items() if k == "emb_params" or k.startswith("string_to_param.")]
    width = widths[0] if widths else _learned_embeds_width(names)
    return {SD1.context_dim: SD1, SD2.context_dim: SD2}.get(width) if width else None


# A LoRA's down (A) matrix of the cross-attention key projection: (rank, text-feature width).
# LyCORIS's LoHa names its factors without ".weight".
_CROSS_ATTENTION_DOWN = re.compile(
    r"attn2[._](processor\.)?to_k(_lora)?[._](lora_down|lora_A|lora\.down|down|hada_w1_b)(\.weight)?$"
)
_TEXT_ENCODER_DOWN = re.compile(r"q_proj[._](lora_down|lora_A|lora\.down|hada_w1_b)(\.weight)?$")
_SECOND_TEXT_ENCODER = ("lora_te2_", "text_encoder_2.", "te2.")
_FIRST_TEXT_ENCODER = ("lora_te_", "lora_te1_", "text_encoder.", "te1.", "te.")
# kohya names SDXL's U-Net with the original (LDM) module names, SD 1.x/2.x's with diffusers'.
_LDM_UNET = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
_METADATA_FAMILIES = (  # (metadata key, value prefix, family): kohya's and the model spec's
    ("ss_base_model_version", "sdxl", SDXL),
    ("ss_base_model_version", "sd_v2", SD2),
    ("ss_base_model_version", "sd_v1", SD1),
    ("modelspec.architecture", "stable-diffusion-xl", SDXL),
    ("modelspec.architecture", "stable-diffusion-v2", SD2),
    ("modelspec.architecture", "stable-diffusion-v1", SD1),
)


def lora_family(names: WeightNames) -> tuple[ModelFamily | None, int | None]:
    """(family, text-feature width) of a LoRA, in kohya/A1111, diffusers or PEFT names.

    The width its cross-attention keys read (768 SD 1.x, 1024 SD 2.x, 2048 SDXL) decides; without
    U-Net cross-attention weights, a second text encoder says SDXL and the first one's width says
    SD 1.x or 2.x; then kohya's SDXL module names; then the training tool's metadata. The width
    is returned as well (None: no cross-attention weights), so a LoRA of a small test model can be
    matched against its model's width.
    """
    shapes = names.shapes
    widths = [s[1] for k, s in shapes.items() if len(s) >= 2 and _CROSS_ATTENTION_DOWN.search(k)]
    width = widths[0] if widths else None
    by_width = {f.context_dim: f for f in FAMILIES.values()}
    if width in by_width:
        return by_width[width], width
    if any(k.startswith(_SECOND_TEXT_ENCODER) for k in shapes):
        return SDXL, width
    encoder = [
        s[1]
        for k, s in shapes.items()
        if k.startswith(_FIRST_TEXT_ENCODER) and len(s) >= 2 and _TEXT_ENCODER_DOWN.search(k)
    ]
    if encoder and encoder[0] in (SD1.context_dim, SD2.context_dim):
        return (SD1 if encoder[0] == SD1.context_dim else SD2), width
    if any(k.startswith(_LDM_UNET) for k in shapes):
        return SDXL, width
    for key, prefix, family in _METADATA_FAMILIES:
        if names.metadata.get(key, "").lower().startswith(prefix):
            return family, width
    return None, width
