"""ControlNet loading, mirroring `core.models.load_pipeline`: a hub id, a diffusers ControlNet
folder or a single checkpoint file; one ControlNet kept loaded; one made for another model family
refused with a message that says so."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..demo_model import DEMO_MODEL_ID, DEMO_VERSION, ensure_demo_controlnet
from ..families import SD1, ModelFamily, families_of_unet_config
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
    stat_key,
)
from .files import checkpoint_problem, load_controlnet_file, read_controlnet_file

CONTROLNET_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")
_EXPECTED = (
    "Expected 'demo' (the demo model's own), a Hugging Face hub id such as "
    "'lllyasviel/control_v11p_sd15_canny' (SD 1.5) or 'diffusers/controlnet-canny-sdxl-1.0' (SDXL), "
    "a diffusers ControlNet folder (with config.json), or a ControlNet checkpoint file "
    f"({', '.join(CONTROLNET_FILE_SUFFIXES)})."
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


def _width(dim) -> str:
    return f"{dim}-dim text features"


def _width_note(dim) -> str:
    return f" ({_width(dim)})" if dim is not None else ""


def _made_for(families: list[ModelFamily], config) -> str:
    if not families:
        return f"models with a '{config.get('addition_embed_type')}' added embedding"
    return " or ".join(f.label for f in families)


def compatibility_problem(controlnet_config, unet_config, family: ModelFamily | None = None) -> str | None:
    """Why a ControlNet with this config cannot steer a U-Net with that config (of a model of
    `family`, by default the one the U-Net's config says), or None.

    The ControlNet's family is read from its config (`families_of_unet_config`: SDXL's have the
    text_time added embedding, SD 1.x and 2.x differ in text-feature width); one made for another
    family is refused naming both. Then its residuals must fit the U-Net: the same text-feature
    width, latent channels, channels and layers per level, and an RGB control image. Only what
    `controlnet_config` gives is compared (a single file's weight names tell its family early).
    """
    if family is None:
        candidates = families_of_unet_config(unet_config)
        family = candidates[0] if len(candidates) == 1 else None
    cn_dim, unet_dim = controlnet_config.get("cross_attention_dim"), unet_config.get("cross_attention_dim")
    advice = ""
    if family is not None:
        hint = f" (for Canny edges e.g. '{family.canny_controlnet}')" if family.canny_controlnet else ""
        advice = f" Use a ControlNet made for {family.label}{hint}."
        made_for = families_of_unet_config(controlnet_config)
        if family not in made_for:
            return (
                f"this ControlNet was made for {_made_for(made_for, controlnet_config)}"
                f"{_width_note(cn_dim)}; the loaded model is {family.label}.{advice}"
            )
    if cn_dim is not None and cn_dim != unet_dim:
        label = f" ({family.label})" if family is not None else ""
        return f"this ControlNet is for a model with {_width(cn_dim)}; the loaded model has {unet_dim}{label}.{advice}"
    if "in_channels" in controlnet_config and controlnet_config["in_channels"] != unet_config.get(
        "in_channels"
    ):
        return (
            f"this ControlNet works on {controlnet_config.get('in_channels')}-channel latents; the loaded "
            f"model's U-Net takes {unet_config.get('in_channels')} (an inpainting model?)."
        )
    # What the residuals' shapes depend on (not which levels have attention, nor how deep:
    # SDXL's small ControlNets have less of it than the U-Net).
    cn_shape, unet_shape = _levels(controlnet_config), _levels(unet_config)
    if "block_out_channels" in controlnet_config and cn_shape != unet_shape:
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


def _levels(config) -> tuple:
    return (
        _plain(config.get("block_out_channels")),
        _plain(config.get("layers_per_block")),
        len(config.get("down_block_types") or ()),
    )


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
    check_checkpoint_file(path, checkpoint_problem, "a ControlNet")
    config_ref, config_sub = _resolve_config(config)
    key = f"controlnet-file:{path}|{stat_key(path)}"
    if config_ref is not None:
        key += f"|config={config_ref}"
    return _ControlSource("file", str(path), key, config=config_ref, config_subfolder=config_sub)


def _load(source: _ControlSource, dtype: torch.dtype, check: Callable[[dict], None]):
    """Load on CPU in `dtype`; returns the ControlNetModel and the identity of its weights.
    `check(config)` refuses a ControlNet that does not fit before its weights are read, from a
    folder's config.json or what a file's weight names and widths say (`compatibility_problem`
    compares what a config gives)."""
    from diffusers import ControlNetModel

    quiet_loading()
    common = {DTYPE_KWARG: dtype}
    if source.kind == "folder":
        root = Path(source.location) / source.subfolder if source.subfolder else Path(source.location)
        check(_read_config(root / "config.json"))
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

    path = Path(source.location)
    info = read_controlnet_file(path)
    check(info.config)  # the family its weights say, before they are read
    net = load_controlnet_file(
        path, config=source.config, subfolder=source.config_subfolder, dtype=dtype, info=info
    )
    return net, source.key


_controlnets = OneSlotCache()


def unload_controlnet() -> None:
    """Forget the cached ControlNet, freeing its memory (unless someone still holds it)."""
    _controlnets.clear()


def _refuse_if_incompatible(config, model: LoadedModel, what: str) -> None:
    problem = compatibility_problem(dict(config), dict(model.pipeline.unet.config), model.family)
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
    For a single file, `config` (a ControlNet folder or hub id of the same kind) supplies the
    configuration; without it, a full-size ControlNet of SD 1.x, 2.x or SDXL loads with the
    configuration shipped for its family (offline; the family read from the file's weights), and
    other files with the one diffusers picks on the hub. Raises `ModelLoadError` with an
    actionable message, also when the ControlNet was made for another model family than
    `model`'s (naming both). The same weights on the same device and dtype return the same
    `LoadedControlNet` object.
    """
    source = _resolve_source(ref, config)

    def refuse(config) -> None:
        _refuse_if_incompatible(config, model, f"'{ref}'")

    def load() -> LoadedControlNet:
        net, identity = _load(source, model.dtype, refuse)
        refuse(net.config)
        net = net.to(device=model.device, dtype=model.dtype).eval()
        net.requires_grad_(False)
        return LoadedControlNet(net, str(ref), identity, model.device, model.dtype)

    def check(cached: LoadedControlNet) -> None:
        refuse(cached.controlnet.config)

    return _controlnets.get((source.key, str(model.device), model.dtype), load, on_hit=check)


def wrap_controlnet(controlnet, model: LoadedModel, ref: str = "(in memory)") -> LoadedControlNet:
    """A `LoadedControlNet` for a ControlNetModel built in memory (tests, benchmarks); not cached.
    Refused like `load_controlnet` when it does not fit `model`."""
    _refuse_if_incompatible(controlnet.config, model, f"'{ref}'")
    net = controlnet.to(device=model.device, dtype=model.dtype).eval()
    net.requires_grad_(False)
    return LoadedControlNet(net, ref, f"memory:{id(controlnet)}", model.device, model.dtype)


def missing_controlnet_warning(collage, family: ModelFamily | None = None) -> str | None:
    """The warning for a run without a ControlNet when visible layers ask for one, else None;
    it suggests a ControlNet of `family` (the model's)."""
    asking = [
        layer.text or layer.name for layer in collage.visible_layers() if float(layer.control_weight) > 0
    ]
    if not asking:
        return None
    names = ", ".join(f"'{t}'" for t in asking)
    suggestion = (family or SD1).canny_controlnet
    return (
        f"layer(s) {names} have a control weight but no ControlNet is loaded, so their structure is not "
        f"enforced; start the engine with a ControlNet (--controlnet, e.g. {suggestion})"
    )
