"""Structural fidelity: a ControlNet per layer, masked and weighted (algorithm.md §3).

Three parts:

* **Control images.** A `ControlDetector` turns one layer's own RGBA pixels into an edge map
  (`CannyDetector`: Canny edges of the object's outline and of its inside). Each layer with
  ``control_weight > 0`` gets its map, placed on the canvas at the layer's offset; where an upper
  layer covers it (whatever that layer's own weight) its edges are hidden, like its pixels are.
  The maps are combined (maximum) into one white-on-black RGB image, what diffusers' Canny
  ControlNets expect. Other detectors (depth, pose...) fit behind the same protocol.
* **Loading.** `load_controlnet` mirrors `core.models.load_pipeline`: a hub id, a diffusers
  ControlNet folder, or a single checkpoint file; one ControlNet is kept loaded and reused; a
  ControlNet made for another model family is refused with a message that says so.
* **The sampler hook.** `controlnet_hook(...)` builds a `core.generate` hook. At each step in the
  guidance range it runs the ControlNet on the step's U-Net input (both classifier-free-guidance
  halves, as diffusers does) and multiplies every residual — each down-block residual and the
  mid-block residual, at its own resolution — by the weight map

      W(p) = sum_i control_weight_i * m_i(p)

  (m_i the visible masks, area-averaged to that resolution; the background has weight 0) before
  it is passed to the U-Net as ``down_block_additional_residuals`` /
  ``mid_block_additional_residual``. Outside the layers with a weight > 0 the residuals are
  exactly zero, and they scale linearly with the weights.

    controlnet = load_controlnet("lllyasviel/control_v11p_sd15_canny", model=model)
    generate(model, collage, hooks=[controlnet_hook(controlnet)])

The builder returns None when no visible layer has a control weight > 0, so that run is exactly
the run without a ControlNet. See docs/control.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .compositing import CompositeResult, area_resize, composite, place_layer
from .demo_model import DEMO_MODEL_ID, DEMO_VERSION, ensure_demo_controlnet
from .models import (
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

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Control images


@runtime_checkable
class ControlDetector(Protocol):
    """Turns one layer's own pixels into a control map.

    `__call__` gets the layer image as straight-alpha RGBA uint8 (h, w, 4), with a few pixels of
    transparent padding around it so that an object touching its image's border still has an
    outline, and returns an (h, w) map: uint8 0..255 or float 0..1, high where the control
    signal is (white edges on black for Canny).
    """

    name: str

    def __call__(self, rgba: np.ndarray) -> np.ndarray: ...


#: Neutral grey that transparent pixels are put over before edge detection (hides their colour).
NEUTRAL_GREY = 128


@dataclass(frozen=True)
class CannyDetector:
    """Canny edges (OpenCV) of a layer: its outline and the edges inside it.

    Two edge maps are combined: Canny of the alpha channel (the object's outline, even when the
    object's colour is close to the grey it is put over) and Canny of the colours put over
    neutral grey (the edges inside the object; the colour of fully transparent pixels, often
    junk, never shows). `low` / `high` are Canny's hysteresis thresholds on the Sobel gradient
    magnitude (diffusers' and lllyasviel's Canny examples use 100 / 200; lower values keep
    fainter edges).
    """

    low: float = 100.0
    high: float = 200.0
    aperture: int = 3  # Sobel kernel size: 3, 5 or 7
    l2_gradient: bool = False
    name: str = "canny"

    def __post_init__(self) -> None:
        if not (0 <= self.low <= self.high):
            raise ValueError(f"Canny thresholds must satisfy 0 <= low <= high, got {self.low}, {self.high}")
        if self.aperture not in (3, 5, 7):
            raise ValueError(f"Canny aperture must be 3, 5 or 7, got {self.aperture}")

    def __call__(self, rgba: np.ndarray) -> np.ndarray:
        import cv2

        alpha = rgba[..., 3]
        a = alpha[..., None].astype(np.float32) / 255.0
        over_grey = rgba[..., :3].astype(np.float32) * a + NEUTRAL_GREY * (1.0 - a)
        over_grey = np.ascontiguousarray(np.clip(np.rint(over_grey), 0, 255).astype(np.uint8))
        args = (self.low, self.high)
        kwargs = {"apertureSize": self.aperture, "L2gradient": self.l2_gradient}
        inside = cv2.Canny(over_grey, *args, **kwargs)
        outline = cv2.Canny(np.ascontiguousarray(alpha), *args, **kwargs)
        return np.maximum(inside, outline)


#: Detectors by name (the `detector` of requests / the CLI); each entry builds one from keyword
#: parameters. Depth, pose... go here behind the same `ControlDetector` protocol.
DETECTORS: dict[str, Callable[..., ControlDetector]] = {"canny": CannyDetector}


def get_detector(name: str, **params) -> ControlDetector:
    """A detector by name, e.g. ``get_detector("canny", low=50, high=150)``."""
    try:
        make = DETECTORS[name]
    except KeyError:
        raise ValueError(f"unknown control detector {name!r}; use one of {', '.join(DETECTORS)}") from None
    return make(**params)


#: Transparent border added around a layer image before detection (its outline must not touch
#: the image border, where edge detectors see no change).
DETECT_PAD = 4


def _as_unit(edges: np.ndarray) -> np.ndarray:
    edges = np.asarray(edges)
    if edges.dtype == np.uint8:
        return edges.astype(np.float32) / 255.0
    return np.clip(edges.astype(np.float32), 0.0, 1.0)


def layer_control_map(layer, detector: ControlDetector) -> np.ndarray:
    """The detector's map of the layer's own pixels (opacity applied), with `DETECT_PAD` pixels of
    padding on each side: float32 (h + 2 pad, w + 2 pad) in 0..1."""
    rgba = layer.image
    if float(layer.opacity) < 1.0:
        rgba = rgba.copy()
        rgba[..., 3] = np.rint(rgba[..., 3].astype(np.float32) * float(layer.opacity)).astype(np.uint8)
    pad = DETECT_PAD
    padded = np.pad(np.ascontiguousarray(rgba), ((pad, pad), (pad, pad), (0, 0)))
    edges = _as_unit(detector(padded))
    if edges.shape != padded.shape[:2]:
        raise ValueError(
            f"control detector {detector.name!r} returned a {edges.shape} map for a {padded.shape[:2]} image"
        )
    return edges


def _place_map(edges: np.ndarray, offset: tuple[int, int], width: int, height: int) -> np.ndarray:
    """Put a padded layer map on the canvas (its top-left at offset - pad), cropping what falls out."""
    out = np.zeros((height, width), np.float32)
    x, y = offset[0] - DETECT_PAD, offset[1] - DETECT_PAD
    h, w = edges.shape
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    if x0 < x1 and y0 < y1:
        out[y0:y1, x0:x1] = edges[y0 - y : y1 - y, x0 - x : x1 - x]
    return out


def control_image(
    collage, flat: CompositeResult | None = None, detector: ControlDetector | None = None
) -> np.ndarray:
    """The combined control image of the collage: (H, W, 3) uint8, white control on black.

    Only visible layers with ``control_weight > 0`` contribute; every visible layer above one hides
    its map where it covers it (by its alpha: half-transparent layers half hide it).
    """
    flat = flat if flat is not None else composite(collage)
    detector = detector if detector is not None else CannyDetector()
    w, h = collage.width, collage.height
    out = np.zeros((h, w), np.float32)
    uncovered = np.ones((h, w), np.float32)  # prod of (1 - alpha) of the layers above, top-down
    for layer in reversed(flat.layers):
        if float(layer.control_weight) > 0:
            placed = _place_map(layer_control_map(layer, detector), layer.offset, w, h)
            np.maximum(out, placed * uncovered, out=out)
        uncovered *= 1.0 - place_layer(layer, w, h).alpha
    gray = np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)


def weight_map(flat: CompositeResult) -> np.ndarray:
    """W(p) = sum_i control_weight_i * m_i(p) at canvas size (float32 (H, W); background 0)."""
    weights = np.array([float(layer.control_weight) for layer in flat.layers], np.float32)
    if not len(weights):
        return np.zeros(flat.masks.background.shape, np.float32)
    return np.tensordot(weights, flat.masks.layers, axes=1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Loading


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


# --------------------------------------------------------------------------------------------
# The sampler hook


def step_in_range(index: int, total: int, start: float, end: float) -> bool:
    """Whether step `index` of `total` gets the ControlNet: diffusers' rule
    ``not (i / N < start or (i + 1) / N > end)``."""
    return not (index / total < start or (index + 1) / total > end)


class ControlNetHook:
    """The sampler hook (built by `controlnet_hook`): runs the ControlNet and masks its residuals."""

    def __init__(
        self,
        controlnet: LoadedControlNet,
        image: np.ndarray,
        weights: np.ndarray,
        *,
        conditioning_scale: float,
        guidance_start: float,
        guidance_end: float,
        schedule: Callable[[torch.Tensor], int] | None = None,
    ):
        self.controlnet = controlnet
        self.control_image = image  # (H, W, 3) uint8
        self.weights = weights  # (H, W) float32: W(p) at canvas size
        self.conditioning_scale = float(conditioning_scale)
        self.guidance_start = float(guidance_start)
        self.guidance_end = float(guidance_end)
        net = controlnet.controlnet
        # Preprocessed like diffusers' ControlNet pipelines: RGB in [0, 1], (1, 3, H, W).
        self._image = (
            torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div(255.0)
        ).to(device=controlnet.device, dtype=controlnet.dtype)
        self._embedded: tuple[torch.Tensor, torch.Tensor] | None = None  # (cond in, embedding out)
        self._maps: dict[tuple[int, int], torch.Tensor] = {}
        self._schedule = schedule  # timestep -> number of steps run from it (when the step does not say)
        self._net = net
        self._index = 0
        self._total: int | None = None
        self.calls = 0  # ControlNet runs (for tests and benchmarks)

    @contextlib.contextmanager
    def installed(self, unet) -> Iterator[ControlNetHook]:
        """Nothing in the U-Net changes (the residuals go in through the U-Net call's kwargs). The
        ControlNet's conditioning embedding, though, is memoised for the generation: its input, the
        control image, is the same at every step, and at full image resolution it is the costly
        part of a small ControlNet. Restored on exit."""
        embedding = self._net.controlnet_cond_embedding
        own = "forward" in embedding.__dict__  # e.g. accelerate's offload hooks set one
        saved = embedding.__dict__.get("forward")
        original = embedding.forward

        def memoised(cond: torch.Tensor) -> torch.Tensor:
            hit = self._embedded
            if hit is not None and hit[0].shape == cond.shape and torch.equal(hit[0], cond):
                return hit[1]
            out = original(cond)
            self._embedded = (cond, out)
            return out

        embedding.forward = memoised
        try:
            yield self
        finally:
            if own:
                embedding.forward = saved
            else:
                del embedding.forward
            self._embedded = None

    def on_step(self, step) -> None:
        self._index = int(step.index)
        total = getattr(step, "total", None)  # if StepContext says how many steps run, use it
        if total:
            self._total = int(total)
        elif step.index == 0 or self._total is None:
            self._total = self._schedule(step.timestep) if self._schedule else None

    def active(self) -> bool:
        """Whether the current step is inside [guidance_start, guidance_end]."""
        if self._total is None:
            return True
        return step_in_range(self._index, self._total, self.guidance_start, self.guidance_end)

    def weight_map(self, height: int, width: int) -> torch.Tensor:
        """W area-averaged to (height, width), as a (1, 1, height, width) tensor; cached."""
        key = (height, width)
        if key not in self._maps:
            resized = area_resize(self.weights, height, width)
            self._maps[key] = torch.from_numpy(np.array(resized))[None, None].to(
                device=self.controlnet.device, dtype=self.controlnet.dtype
            )
        return self._maps[key]

    def unet_kwargs(
        self, model_input: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor, added_cond_kwargs=None
    ) -> dict:
        if not self.active():
            return {}
        self.calls += 1
        down, mid = self._net(
            model_input.to(self.controlnet.dtype),
            timestep,
            encoder_hidden_states=embeds.to(self.controlnet.dtype),
            added_cond_kwargs=added_cond_kwargs,  # SDXL ControlNets take the U-Net's extra conditioning
            # One control image for the whole batch (both guidance halves): the ControlNet adds its
            # embedding to the latents' features, which broadcasts over the batch.
            controlnet_cond=self._image,
            conditioning_scale=self.conditioning_scale,
            return_dict=False,
        )
        down = [r * self.weight_map(*r.shape[-2:]) for r in down]
        mid = mid * self.weight_map(*mid.shape[-2:])
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def _steps_run(setup) -> Callable[[torch.Tensor], int]:
    """timestep -> how many U-Net steps run from it to the end of this collage's schedule.

    `generate` runs the tail of the scheduler's timesteps from the first step that any region
    needs (the largest strength); like diffusers' img2img ControlNet pipeline, the guidance range
    is a fraction of those steps. The count is found by rebuilding the job's schedule (a scheduler
    of the same kind and step count) and locating the first step's timestep in it.
    """
    from .schedulers import make_scheduler

    cache: dict[float, int] = {}

    def total(t: torch.Tensor) -> int:
        key = float(t)
        if key not in cache:
            scheduler = make_scheduler(setup.collage.scheduler, setup.model.pipeline.scheduler)
            scheduler.set_timesteps(setup.collage.steps)
            timesteps = scheduler.timesteps.float().cpu()
            hits = torch.nonzero(timesteps == key).flatten()
            cache[key] = len(timesteps) - int(hits[0]) if len(hits) else len(timesteps)
        return cache[key]

    return total


def controlnet_hook(
    controlnet: LoadedControlNet,
    *,
    conditioning_scale: float = 1.0,
    guidance_start: float = 0.0,
    guidance_end: float = 1.0,
    detector: ControlDetector | None = None,
) -> Callable[[object], ControlNetHook | None]:
    """A `core.generate` hook builder for masked ControlNet guidance.

    `conditioning_scale` multiplies every residual (diffusers' ``controlnet_conditioning_scale``);
    the ControlNet acts on steps i (of the N steps run) with ``start <= i / N`` and
    ``(i + 1) / N <= end`` (diffusers' ``control_guidance_start`` / ``_end``). The builder returns
    None when no visible layer has a control weight > 0 (or those layers are fully covered), or
    the scale is 0: that run is exactly the run without a ControlNet.
    """
    if not (math.isfinite(conditioning_scale) and conditioning_scale >= 0):
        raise ValueError(f"conditioning_scale must be a number >= 0, got {conditioning_scale!r}")
    if not (0.0 <= guidance_start < guidance_end <= 1.0):
        raise ValueError(
            "the ControlNet guidance range must satisfy 0 <= start < end <= 1, "
            f"got start {guidance_start!r}, end {guidance_end!r}"
        )
    detector = detector if detector is not None else CannyDetector()

    def build(setup) -> ControlNetHook | None:
        flat = setup.flat
        if conditioning_scale == 0 or not any(float(layer.control_weight) > 0 for layer in flat.layers):
            return None
        weights = weight_map(flat)
        if not weights.any():  # the weighted layers are entirely covered
            return None
        problem = compatibility_problem(
            dict(controlnet.controlnet.config), dict(setup.model.pipeline.unet.config)
        )
        if problem:
            raise ModelLoadError(f"ControlNet '{controlnet.ref}' cannot be used with this model: {problem}")
        image = control_image(setup.collage, flat, detector)
        return ControlNetHook(
            controlnet,
            image,
            weights,
            conditioning_scale=conditioning_scale,
            guidance_start=guidance_start,
            guidance_end=guidance_end,
            schedule=_steps_run(setup),
        )

    return build
