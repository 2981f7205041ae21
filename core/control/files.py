"""Single-file ControlNets: what a file is (from its weight names and widths, never its name), the
configuration it loads with (the family's shipped one, so that nothing is fetched), and the
original `control_model.*` layout of SDXL ControlNets, whose added embedding diffusers' converter
leaves out."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..families import ModelFamily, families_of_unet_config
from ..models import DTYPE_KWARG, ModelLoadError, hub_help, is_hub_access_error, single_file_error

ORIGINAL_PREFIX = "control_model."  # the original layout's prefix (some files have none)
# Keys that only ControlNet checkpoints have (diffusers names, then the original ones).
_CONTROLNET_KEYS = (
    "controlnet_cond_embedding.",
    "controlnet_down_blocks.",
    "input_hint_block.",
    "zero_convs.",
)
# SDXL's added embedding (pooled text + time_ids), diffusers name -> original name.
_ADDED_EMBEDDING = {
    "add_embedding.linear_1.weight": "label_emb.0.0.weight",
    "add_embedding.linear_1.bias": "label_emb.0.0.bias",
    "add_embedding.linear_2.weight": "label_emb.0.2.weight",
    "add_embedding.linear_2.bias": "label_emb.0.2.bias",
}
# Attention at the second level: full-size ControlNets have it, SDXL's "-mid"/"-small" ones
# (diffusers/controlnet-canny-sdxl-1.0-small...) do not. diffusers tells them apart by the first
# key; the second is the same weight in the original layout.
_SECOND_LEVEL_ATTENTION = (
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k.weight",
    "input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight",
)
_CROSS_ATTENTION_KEY = re.compile(r"attn2\.to_k\.weight$")


def checkpoint_problem(keys: list[str]) -> str | None:
    """Why these weight names are not a ControlNet's (None: they are)."""
    # Original ControlNet files prefix their keys with "control_model." (or not, e.g. v1.1 .pth).
    if any(k.removeprefix(ORIGINAL_PREFIX).startswith(_CONTROLNET_KEYS) for k in keys):
        return None
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "it is a Stable Diffusion model checkpoint, not a ControlNet (load it as the model instead)"
    if any("lora" in k.lower() for k in keys):
        return "it is a LoRA, not a ControlNet"
    if any(k.startswith("adapter.") for k in keys):
        return "it is a T2I-Adapter, not a ControlNet"
    return "it has no ControlNet weights (no control hint / zero-convolution keys)"


@dataclass(frozen=True)
class ControlNetFile:
    """What a ControlNet file's weight names and widths say about it."""

    original_layout: bool  # `input_hint_block`/`zero_convs` names rather than diffusers'
    added_embedding: bool  # SDXL's text_time embedding (`add_embedding`/`label_emb`)
    context_dim: int | None  # width of the text features it attends to (None: no cross-attention)
    full_size: bool  # attention at its second level, like each family's full-size ControlNet
    families: tuple[ModelFamily, ...]  # the families it can be for (one, unless it is a test model)

    @property
    def family(self) -> ModelFamily | None:
        return self.families[0] if len(self.families) == 1 else None

    @property
    def config(self) -> dict:
        """What its configuration must say, as far as the weights tell (for early checks)."""
        added = "text_time" if self.added_embedding else None
        return {"addition_embed_type": added, "cross_attention_dim": self.context_dim}


def read_controlnet_file(path: Path) -> ControlNetFile:
    """Inspect a ControlNet file without reading its weights (a .safetensors header; other files
    are memory-mapped)."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return describe_controlnet_weights(list(f.keys()), lambda k: f.get_slice(k).get_shape())
        state = _torch_state(path)
        return describe_controlnet_weights(list(state), lambda k: state[k].shape)
    except Exception as e:  # each format raises its own error types for damaged files
        raise ModelLoadError(f"{path} could not be read (damaged or incomplete download?): {e}") from e


def describe_controlnet_weights(keys: list[str], shape_of: Callable[[str], Sequence[int]]) -> ControlNetFile:
    """What a ControlNet's weight names (and the width of its cross-attention) say about it."""
    names = {k.removeprefix(ORIGINAL_PREFIX): k for k in keys}
    added = any(k in names for pair in _ADDED_EMBEDDING.items() for k in pair)
    widths = [shape_of(k)[1] for k in keys if _CROSS_ATTENTION_KEY.search(k)]
    context_dim = int(widths[0]) if widths else None
    config = {"addition_embed_type": "text_time" if added else None, "cross_attention_dim": context_dim}
    return ControlNetFile(
        original_layout="input_hint_block.0.weight" in names,
        added_embedding=added,
        context_dim=context_dim,
        full_size=any(k in names for k in _SECOND_LEVEL_ATTENTION),
        families=tuple(families_of_unet_config(config)),
    )


def _torch_state(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else {}


def default_config(info: ControlNetFile) -> Path | None:
    """The shipped configuration for a file of this kind: its family's full-size ControlNet's, or
    None (diffusers then looks up one by the file's keys on the hub, e.g. SDXL's small ones)."""
    family = info.family
    if family is None or not info.full_size:
        return None
    return family.controlnet_config_dir


def load_controlnet_file(
    path: Path,
    *,
    config: str | None,
    subfolder: str | None,
    dtype: torch.dtype,
    info: ControlNetFile | None = None,
):
    """Load a single-file ControlNet on the CPU in `dtype`.

    `config` (a diffusers ControlNet folder or hub id) gives its configuration; without it, the
    shipped one of the file's family when it is a full-size ControlNet (nothing is fetched), else
    the one diffusers picks from the file's keys (on the hub). Every weight of the configuration
    must be in the file with its shape: diffusers itself would leave missing ones at random (or
    empty) values. `info` is `read_controlnet_file(path)` when the caller has it already.
    """
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import fetch_diffusers_config, load_single_file_checkpoint

    info = info or read_controlnet_file(path)
    given = config is not None
    checkpoint = None
    if config is None:
        shipped = default_config(info)
        if shipped is not None:
            config, subfolder = str(shipped), None
        else:
            checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
            config = fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
    local = Path(config).is_dir()
    try:
        model_config = dict(
            ControlNetModel.load_config(config, subfolder=subfolder or None, local_files_only=local)
        )
    except Exception as e:
        if not given and not local and (isinstance(e, OSError) or is_hub_access_error(e)):
            raise ModelLoadError(
                f"could not load ControlNet file {path}: it is not a full-size ControlNet of a family whose "
                f"configuration is shipped, and the one diffusers picks for it ('{config}') could not be "
                f"fetched from the Hugging Face Hub ({e}). Give its diffusers configuration with "
                "--controlnet-config (config=): a folder or hub id, e.g. a local copy of "
                f"'{config}'. {hub_help()}"
            ) from e
        raise single_file_error(
            e,
            str(path),
            config,
            loaded_as="a ControlNet",
            family="ControlNet",
            config_hint="--controlnet-config, or config=): a diffusers ControlNet folder or hub id.",
        ) from e
    if checkpoint is None:
        checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    weights = diffusers_weights(checkpoint, model_config, info)
    whose = f"the configuration {config}" if given else f"the configuration {config} (chosen for it)"
    weights = fitting_weights(path, weights, model_config, whose)
    try:
        net = ControlNetModel.from_single_file(
            weights,
            config=config,
            subfolder=subfolder or None,
            local_files_only=local,
            **{DTYPE_KWARG: dtype},
        )
    except Exception as e:
        raise ModelLoadError(f"{path} could not be loaded as a ControlNet: {e}") from e
    return net


def diffusers_weights(checkpoint: dict, config: dict, info: ControlNetFile) -> dict[str, torch.Tensor]:
    """The file's weights under diffusers' names."""
    if not info.original_layout:
        return checkpoint
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    weights = convert_controlnet_checkpoint(checkpoint, config)
    # diffusers' converter maps the U-Net half of an original file but not SDXL's `label_emb`.
    for hf, ldm in _ADDED_EMBEDDING.items():
        for key in (ldm, ORIGINAL_PREFIX + ldm):
            if key in checkpoint:
                weights[hf] = checkpoint[key]
    return {k: v for k, v in weights.items() if v is not None}


def fitting_weights(path: Path, weights: dict, config: dict, whose: str) -> dict[str, torch.Tensor]:
    """The weights the configuration's ControlNet has, each checked to be there with its shape."""
    from diffusers import ControlNetModel

    with torch.device("meta"):
        expected = ControlNetModel.from_config(config).state_dict()
    for key, tensor in expected.items():
        if key in weights and tuple(weights[key].shape) != tuple(tensor.shape):
            raise ModelLoadError(
                f"ControlNet file {path} does not fit {whose}: '{key}' has shape {tuple(weights[key].shape)}, "
                f"the configuration's {tuple(tensor.shape)} (a ControlNet of another size: give its "
                "diffusers configuration with --controlnet-config, or config=)"
            )
    missing = [k for k in expected if k not in weights]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelLoadError(
            f"ControlNet file {path} does not fit {whose}: it lacks {', '.join(missing[:3])}{more} "
            "(a partial file, or a ControlNet of another size: give its diffusers configuration with "
            "--controlnet-config, or config=, e.g. 'diffusers/controlnet-canny-sdxl-1.0-small')"
        )
    return {k: weights[k] for k in expected}
