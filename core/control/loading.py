"""ControlNet loading, mirroring `core.models.load_pipeline`: a hub id, a diffusers ControlNet
folder or a single checkpoint file; one ControlNet kept loaded; one made for another model family
refused with a message that says so."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..demo_model import DEMO_MODEL_ID, DEMO_VERSION, ensure_demo_controlnet
from ..models import (
    DTYPE_KWARG,
    LoadedModel,
    ModelLoadError,
    OneSlotCache,
    check_checkpoint_file,
    hub_help,
    is_hub_access_error,
    looks_like_path,
    quiet_loading,
    single_file_error,
    stat_key,
)

CONTROLNET_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")
_EXPECTED = (
    "Expected 'demo' (the demo model's own), a Hugging Face hub id such as "
    "'lllyasviel/control_v11p_sd15_canny', a diffusers "
    "ControlNet folder (with config.json), or a ControlNet checkpoint file "
    f"({', '.join(CONTROLNET_FILE_SUFFIXES)})."
)
# Families by the width of their text features (the U-Net's cross_attention_dim).
_FAMILIES = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 2048: "SDXL"}
_CANNY_FOR = {
    768: "lllyasviel/control_v11p_sd15_canny",
    1024: "thibaud/controlnet-sd21-canny-diffusers",
}
# Keys that only ControlNet checkpoints have (diffusers names, then the original ones).
_CONTROLNET_KEYS = (
    "controlnet_cond_embedding.",
    "controlnet_down_blocks.",
    "input_hint_block.",
    "zero_convs.",
)


@dataclass(frozen=True, eq=False)
class LoadedControlNet:
    controlnet: object  # diffusers.ControlNetModel, on `device` in `dtype`, eval mode
    ref: str  # what the user asked for
    identity: str  # identifies the exact weights
    device: torch.device
    dtype: torch.dtype


@dataclass(frozen=True)
class _ControlSource:
    kind: str  # "hub" | "folder" | "file"
    location: str  # hub id or resolved path
    key: str  # cache key
    subfolder: str | None = None  # folders: "controlnet" for a pipeline folder holding one
    config: str | None = None  # single files: folder or hub id with the ControlNet config.json
    config_subfolder: str | None = None


def _family(dim) -> str:
    name = _FAMILIES.get(dim) if isinstance(dim, int) else None
    return f"{dim}-dim text features ({name})" if name else f"{dim}-dim text features"


def _family_short(dim) -> str:
    name = _FAMILIES.get(dim) if isinstance(dim, int) else None
    return f"{dim} ({name})" if name else f"{dim}"


def compatibility_problem(controlnet_config, unet_config) -> str | None:
    """Why a ControlNet with this config cannot steer a U-Net with that config, or None."""
    cn_dim, unet_dim = controlnet_config.get("cross_attention_dim"), unet_config.get("cross_attention_dim")
    if cn_dim != unet_dim:
        hint = _CANNY_FOR.get(unet_dim)
        advice = (
            f" Use a ControlNet made for that family (for Canny edges e.g. '{hint}')."
            if hint
            else (" Use a ControlNet made for the loaded model's family.")
        )
        return (
            f"this ControlNet is for a model with {_family(cn_dim)}; the loaded model has "
            f"{_family_short(unet_dim)}.{advice}"
        )
    if controlnet_config.get("in_channels") != unet_config.get("in_channels"):
        return (
            f"this ControlNet works on {controlnet_config.get('in_channels')}-channel latents; the loaded "
            f"model's U-Net takes {unet_config.get('in_channels')} (an inpainting model?)."
        )
    shape = ("block_out_channels", "layers_per_block", "down_block_types")
    cn_shape = [_plain(controlnet_config.get(k)) for k in shape]
    unet_shape = [_plain(unet_config.get(k)) for k in shape]
    if cn_shape != unet_shape:
        return (
            f"this ControlNet's U-Net levels (channels {cn_shape[0]}, {cn_shape[1]} per block) do not "
            f"match the loaded model's (channels {unet_shape[0]}, {unet_shape[1]} per block): it was "
            "made for a different model."
        )
    channels = controlnet_config.get("conditioning_channels", 3)
    if channels != 3:
        return (
            f"this ControlNet takes a {channels}-channel control image; this tool makes RGB (3-channel) ones."
        )
    return None


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def _controlnet_folder(folder: Path, what: str = "ControlNet folder") -> str | None:
    """The subfolder (None or "controlnet") holding the ControlNet of `folder`; raises if none."""
    for sub in (None, "controlnet"):
        config_file = folder / sub / "config.json" if sub else folder / "config.json"
        if config_file.is_file():
            cls = _read_config(config_file).get("_class_name", "ControlNetModel")
            if "ControlNet" not in str(cls):
                raise ModelLoadError(f"{what} {folder} holds a {cls}, not a ControlNet. " + _EXPECTED)
            return sub
    if (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"{folder} is a diffusers pipeline folder without a ControlNet (no controlnet/ subfolder). "
            "Give the ControlNet itself: " + _EXPECTED
        )
    raise ModelLoadError(
        f"{what} {folder} is not a diffusers ControlNet: it has no config.json. " + _EXPECTED
    )


def _folder_identity(folder: Path, sub: str | None) -> str:
    root = folder / sub if sub else folder
    parts = [f"controlnet-folder:{root}", f"config={stat_key(root / 'config.json')}"]
    for weights in sorted(root.glob("diffusion_pytorch_model*")):
        parts.append(f"{weights.name}={stat_key(weights)}")
    return "|".join(parts)


def _checkpoint_problem(keys: list[str]) -> str | None:
    # Original ControlNet files prefix their keys with "control_model." (or not, e.g. v1.1 .pth).
    if any(k.removeprefix("control_model.").startswith(_CONTROLNET_KEYS) for k in keys):
        return None
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "it is a Stable Diffusion model checkpoint, not a ControlNet (load it as the model instead)"
    if any("lora" in k.lower() for k in keys):
        return "it is a LoRA, not a ControlNet"
    if any(k.startswith("adapter.") for k in keys):
        return "it is a T2I-Adapter, not a ControlNet"
    return "it has no ControlNet weights (no control hint / zero-convolution keys)"


def _resolve_config(config: str | os.PathLike[str] | None) -> tuple[str | None, str | None]:
    if config is None:
        return None, None
    config = str(config).strip()
    if not looks_like_path(config):
        return config, None  # hub id
    folder = Path(config).expanduser().resolve()
    if not folder.is_dir():
        raise ModelLoadError(
            f"ControlNet config folder not found: {folder} (it should be a diffusers ControlNet folder "
            "with config.json)"
        )
    return str(folder), _controlnet_folder(folder, what="ControlNet config folder")


def _resolve_source(ref: str | os.PathLike[str], config) -> _ControlSource:
    """Classify `ref` and check what can be checked cheaply (no weights are read)."""
    ref = str(ref).strip()
    if not ref:
        raise ModelLoadError("no ControlNet given. " + _EXPECTED)
    if ref == DEMO_MODEL_ID:  # the demo model's own edge ControlNet, shipped with it
        try:
            folder = ensure_demo_controlnet()
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"the demo ControlNet is not available: {e}") from e
        return _ControlSource("folder", str(folder), f"demo-controlnet:{DEMO_VERSION}")
    if not looks_like_path(ref):
        return _ControlSource("hub", ref, f"hub:{ref}")
    path = Path(ref).expanduser().resolve()
    if not path.exists():
        raise ModelLoadError(f"ControlNet file or folder not found: {path}")
    if path.is_dir():
        sub = _controlnet_folder(path)
        return _ControlSource("folder", str(path), _folder_identity(path, sub), subfolder=sub)
    if path.suffix.lower() not in CONTROLNET_FILE_SUFFIXES:
        raise ModelLoadError(
            f"unsupported ControlNet file type '{path.suffix or '(none)'}': {path}. " + _EXPECTED
        )
    check_checkpoint_file(path, _checkpoint_problem, "a ControlNet")
    config_ref, config_sub = _resolve_config(config)
    key = f"controlnet-file:{path}|{stat_key(path)}"
    if config_ref is not None:
        key += f"|config={config_ref}"
    return _ControlSource("file", str(path), key, config=config_ref, config_subfolder=config_sub)


def _load(source: _ControlSource, dtype: torch.dtype):
    """Load on CPU in `dtype`; returns the ControlNetModel and the identity of its weights."""
    from diffusers import ControlNetModel

    quiet_loading()
    common = {DTYPE_KWARG: dtype}
    if source.kind == "folder":
        try:
            net = ControlNetModel.from_pretrained(
                source.location, subfolder=source.subfolder, local_files_only=True, **common
            )
        except Exception as e:
            raise ModelLoadError(f"could not load the ControlNet in {source.location}: {e}") from e
        return net, source.key

    if source.kind == "hub":
        try:
            net = ControlNetModel.from_pretrained(source.location, **common)
        except Exception as e:
            # diffusers raises OSError for "not on the hub", "not cached while offline", "no network".
            if isinstance(e, OSError) or is_hub_access_error(e):
                local = Path(source.location).resolve()
                raise ModelLoadError(
                    f"could not get ControlNet '{source.location}' from the Hugging Face Hub: {e}\n"
                    f"{hub_help()} Or use a local ControlNet folder or file instead "
                    f"(if you meant a local folder: {local} does not exist)."
                ) from e
            raise ModelLoadError(f"could not load hub ControlNet '{source.location}': {e}") from e
        return net, source.key

    kwargs: dict[str, object] = {}
    if source.config is not None:
        kwargs["config"] = source.config
        kwargs["local_files_only"] = os.path.isdir(source.config)
        if source.config_subfolder:
            kwargs["subfolder"] = source.config_subfolder
    try:
        net = ControlNetModel.from_single_file(source.location, **common, **kwargs)
    except Exception as e:
        raise single_file_error(
            e,
            source.location,
            source.config,
            loaded_as="a ControlNet (damaged file, or a kind of ControlNet this tool does not support)",
            family="ControlNet",
            config_hint="--controlnet-config, or config=): a diffusers ControlNet folder or hub id of the "
            "same family, e.g. a local copy of lllyasviel/control_v11p_sd15_canny for SD 1.x.",
        ) from e
    return net, source.key


_controlnets = OneSlotCache()


def unload_controlnet() -> None:
    """Forget the cached ControlNet, freeing its memory (unless someone still holds it)."""
    _controlnets.clear()


def _refuse_if_incompatible(net, model: LoadedModel, what: str) -> None:
    problem = compatibility_problem(dict(net.config), dict(model.pipeline.unet.config))
    if problem:
        raise ModelLoadError(f"ControlNet {what} cannot be used with model '{model.ref}': {problem}")


def load_controlnet(
    ref: str | os.PathLike[str],
    *,
    model: LoadedModel,
    config: str | os.PathLike[str] | None = None,
) -> LoadedControlNet:
    """Load (or reuse) a ControlNet for `model`, on the model's device and dtype.

    `ref` is "demo" (the demo model's edge ControlNet, shipped with the project), a hub id
    ("lllyasviel/control_v11p_sd15_canny"), a diffusers ControlNet folder (with
    config.json, or a pipeline folder with a controlnet/ subfolder), or a single checkpoint file.
    For a single file, `config` (a ControlNet folder or hub id of the same family) supplies the
    configuration; without it diffusers fetches the SD 1.5 Canny ControlNet's. Raises
    `ModelLoadError` with an actionable message, also when the ControlNet was made for another
    model family than `model`'s. The same weights on the same device and dtype return the same
    `LoadedControlNet` object.
    """
    source = _resolve_source(ref, config)

    def load() -> LoadedControlNet:
        net, identity = _load(source, model.dtype)
        _refuse_if_incompatible(net, model, f"'{ref}'")
        net = net.to(device=model.device, dtype=model.dtype).eval()
        net.requires_grad_(False)
        return LoadedControlNet(net, str(ref), identity, model.device, model.dtype)

    def check(cached: LoadedControlNet) -> None:
        _refuse_if_incompatible(cached.controlnet, model, f"'{ref}'")

    return _controlnets.get((source.key, str(model.device), model.dtype), load, on_hit=check)


def wrap_controlnet(controlnet, model: LoadedModel, ref: str = "(in memory)") -> LoadedControlNet:
    """A `LoadedControlNet` for a ControlNetModel built in memory (tests, benchmarks); not cached.
    Refused like `load_controlnet` when it does not fit `model`."""
    _refuse_if_incompatible(controlnet, model, f"'{ref}'")
    net = controlnet.to(device=model.device, dtype=model.dtype).eval()
    net.requires_grad_(False)
    return LoadedControlNet(net, ref, f"memory:{id(controlnet)}", model.device, model.dtype)


def missing_controlnet_warning(collage) -> str | None:
    """The warning for a run without a ControlNet when visible layers ask for one, else None."""
    asking = [
        layer.text or layer.name for layer in collage.visible_layers() if float(layer.control_weight) > 0
    ]
    if not asking:
        return None
    names = ", ".join(f"'{t}'" for t in asking)
    return (
        f"layer(s) {names} have a control weight but no ControlNet is loaded, so their structure is not "
        "enforced; start the engine with a ControlNet (--controlnet, e.g. lllyasviel/control_v11p_sd15_canny)"
    )
