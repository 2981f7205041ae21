"""The collage data model: a full-image prompt plus an ordered stack of layers.

Images are numpy ``uint8`` arrays, RGBA with straight (not premultiplied) alpha,
shape ``(height, width, 4)``. Layers are ordered bottom to top. Offsets place a
layer's top-left pixel on the canvas and may be negative or reach past the edge.

Validation is explicit (`Collage.validate`) rather than in ``__post_init__`` so that
readers can build a collage step by step and report every problem at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

RGB = tuple[int, int, int]

#: Names accepted for `Collage.scheduler`; "default" keeps the model's own scheduler.
SCHEDULERS = ("default", "ddim", "euler", "dpm++2m")
MAX_CLIP_SKIP = 12  # CLIP-L's layers; a model with fewer is checked when it is loaded


class CollageError(ValueError):
    """A collage that cannot be generated. ``problems`` lists every reason, one per field."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


APPEARANCE_MODES = ("off", "learned", "reference", "ip-adapter")
APPEARANCE_HELP = 'must be "off", "learned", "reference", "ip-adapter", true (= "learned") or false (= "off")'


def appearance_mode(value: object) -> str | None:
    """A layer's `appearance` as one of APPEARANCE_MODES (True is "learned", False "off", as
    documents before the choice had it); None for anything else."""
    if value is True:
        return "learned"
    if value is False:
        return "off"
    return value if isinstance(value, str) and value in APPEARANCE_MODES else None


@dataclass
class Layer:
    """One object of the collage: an RGBA image placed on the canvas, paired with a text."""

    text: str
    image: np.ndarray
    offset: tuple[int, int] = (0, 0)  # (x, y) of the image's top-left pixel on the canvas
    name: str = ""  # the layer's name in the source document; `text` is what is generated
    visible: bool = True
    opacity: float = 1.0
    strength: float | None = None  # SDEdit noise strength; None = the collage's strength
    attention_weight: float = 1.0  # masked cross-attention bias weight (0 = off)
    control_weight: float = 0.0  # ControlNet residual weight inside this layer (0 = off)
    # False/"off", True/"learned" (a textual-inversion token from its pixels), or "reference"
    # (masked reference attention, core/reference.py) or "ip-adapter" (its image through an
    # IP-Adapter, inside its mask: core/ip_adapter.py); see `appearance_mode`
    appearance: bool | str = False
    appearance_weight: float = 1.0  # weight of the reference or IP-Adapter (0 = off)

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


@dataclass
class LayerGroup:
    """A group of layers as documents have them; `flatten_layers` turns a tree into a stack."""

    children: list[Layer | LayerGroup]
    name: str = ""
    visible: bool = True
    opacity: float = 1.0


def flatten_layers(nodes: list[Layer | LayerGroup]) -> list[Layer]:
    """Flatten a bottom-to-top tree into the visible layers in stack order.

    A hidden group hides everything inside it; a group's opacity multiplies its children's.
    (This treats groups as pass-through, which is what a collage of objects needs.)
    """
    out: list[Layer] = []
    for node in nodes:
        if not node.visible:
            continue
        if isinstance(node, LayerGroup):
            for child in flatten_layers(node.children):
                child.opacity *= node.opacity
                out.append(child)
        else:
            out.append(
                Layer(**{**node.__dict__})  # shallow copy: the caller's tree stays as it was
            )
    return out


@dataclass
class Collage:
    """Everything one generation needs besides the model."""

    prompt: str
    layers: list[Layer]
    width: int = 512
    height: int = 512
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 30
    guidance_scale: float = 7.5
    strength: float = 0.75  # SDEdit strength for the background and layers that set none
    model: str | None = None  # model reference; None = whatever the runner was started with
    scheduler: str = "default"
    feather_px: int = 4  # blend width inside the border of regenerated regions (paste-back)
    # Text encoder layer read (A1111's count: 1 = last, 2 = penultimate); None = the family's default.
    clip_skip: int | None = None
    # The canvas under the layers: an RGB colour, or an RGB/RGBA image of the canvas size.
    background: RGB | np.ndarray = (255, 255, 255)

    def visible_layers(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.visible and layer.opacity > 0]

    def layer_strength(self, layer: Layer) -> float:
        return self.strength if layer.strength is None else layer.strength

    def validate(self) -> None:
        """Raise `CollageError` naming every field that makes this collage ungeneratable."""
        problems: list[str] = []
        if not isinstance(self.prompt, str):
            problems.append("prompt: must be text")
        for name in ("width", "height"):
            value = getattr(self, name)
            if not _is_int(value) or value < 64 or value > 8192:
                problems.append(f"{name}: must be a whole number of pixels in 64..8192, got {value!r}")
            elif value % 8:
                problems.append(
                    f"{name}: must be a multiple of 8 (the VAE works on 8×8 blocks), got {value};"
                    f" try {value // 8 * 8} or {value // 8 * 8 + 8}"
                )
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            problems.append(f"seed: must be a whole number in 0..2^63-1, got {self.seed!r}")
        if not _is_int(self.steps) or not 1 <= self.steps <= 1000:
            problems.append(f"steps: must be a whole number in 1..1000, got {self.steps!r}")
        _check_number(problems, "guidance_scale", self.guidance_scale, 0.0, 100.0)
        _check_number(problems, "strength", self.strength, 0.0, 1.0)
        if not _is_int(self.feather_px) or not 0 <= self.feather_px <= 64:
            problems.append(f"feather_px: must be a whole number in 0..64, got {self.feather_px!r}")
        if self.scheduler not in SCHEDULERS:
            problems.append(f"scheduler: must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.clip_skip is not None and (
            not _is_int(self.clip_skip) or not 1 <= self.clip_skip <= MAX_CLIP_SKIP
        ):
            problems.append(
                f"clip_skip: must be a whole number in 1..{MAX_CLIP_SKIP} or null (the model's default),"
                f" got {self.clip_skip!r}"
            )
        if _is_int(self.width) and _is_int(self.height):
            problems += _background_problems(self.background, self.width, self.height)

        visible = self.visible_layers()
        if not self.layers:
            problems.append("layers: a collage needs at least one layer")
        elif not visible:
            problems.append("layers: every layer is hidden or fully transparent")
        # Placement on the canvas is only checked against a canvas size that is itself valid.
        canvas = (self.width, self.height) if _is_int(self.width) and _is_int(self.height) else None
        for index, layer in enumerate(self.layers):
            problems += _layer_problems(layer, f"layers[{index}]", canvas)
        if problems:
            raise CollageError(problems)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_number(problems: list[str], name: str, value: object, low: float, high: float) -> None:
    if not isinstance(value, (int, float, np.number)) or isinstance(value, bool):
        problems.append(f"{name}: must be a number in {low:g}..{high:g}, got {value!r}")
    elif math.isnan(value) or not low <= value <= high:
        problems.append(f"{name}: must be in {low:g}..{high:g}, got {value!r}")


def _background_problems(background: object, width: int, height: int) -> list[str]:
    if isinstance(background, np.ndarray):
        shape_ok = background.ndim == 3 and background.shape[2] in (3, 4)
        if background.dtype != np.uint8 or not shape_ok:
            return [
                f"background: must be an 8-bit RGB or RGBA image, got {background.dtype} {background.shape}"
            ]
        if background.shape[:2] != (height, width):
            return [
                f"background: image is {background.shape[1]}×{background.shape[0]},"
                f" the canvas is {width}×{height}"
            ]
        return []
    if (
        isinstance(background, (tuple, list))
        and len(background) == 3
        and all(_is_int(c) and 0 <= c <= 255 for c in background)
    ):
        return []
    return [f"background: must be an RGB colour (three values 0..255) or an image, got {background!r}"]


def _layer_problems(layer: Layer, where: str, canvas: tuple[int, int] | None) -> list[str]:
    problems: list[str] = []
    label = f"{where} ({layer.name or layer.text!r})" if (layer.name or layer.text) else where
    if not isinstance(layer.text, str) or not layer.text.strip():
        problems.append(f"{label}.text: must not be empty (it says what the layer shows)")
    image = layer.image
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 4:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        problems.append(f"{label}.image: must be an 8-bit RGBA image (height, width, 4), got {desc}")
        image = None
    elif image.shape[0] == 0 or image.shape[1] == 0:
        problems.append(f"{label}.image: is empty (0 pixels)")
        image = None
    if (
        not isinstance(layer.offset, (tuple, list))
        or len(layer.offset) != 2
        or not all(_is_int(v) for v in layer.offset)
    ):
        problems.append(f"{label}.offset: must be two whole numbers (x, y), got {layer.offset!r}")
    elif image is not None and layer.visible and canvas is not None:
        width, height = canvas
        x, y = layer.offset
        h, w = image.shape[:2]
        if x >= width or y >= height or x + w <= 0 or y + h <= 0:
            problems.append(
                f"{label}.offset: the layer ({w}×{h} at {x},{y}) lies entirely outside the"
                f" {width}×{height} canvas"
            )
        elif not image[max(0, -y) : height - y, max(0, -x) : width - x, 3].any():
            problems.append(f"{label}.image: has no visible pixels on the canvas (alpha is 0 everywhere)")
    _check_number(problems, f"{label}.opacity", layer.opacity, 0.0, 1.0)
    if layer.strength is not None:
        _check_number(problems, f"{label}.strength", layer.strength, 0.0, 1.0)
    _check_number(problems, f"{label}.attention_weight", layer.attention_weight, 0.0, 10.0)
    _check_number(problems, f"{label}.control_weight", layer.control_weight, 0.0, 2.0)
    if appearance_mode(layer.appearance) is None:
        problems.append(f"{label}.appearance: {APPEARANCE_HELP}, got {layer.appearance!r}")
    _check_number(problems, f"{label}.appearance_weight", layer.appearance_weight, 0.0, 10.0)
    return problems
