"""Control images: a layer's own pixels → an edge map (`ControlDetector`, `CannyDetector`), the
maps combined over the canvas with occlusion (`control_image`), and the weight map
W(p) = Σ control_weight_i · m_i(p) (`weight_map`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from ..compositing import CompositeResult, composite, place_layer


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
