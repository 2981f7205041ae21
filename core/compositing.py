"""Compositing and per-layer masks with occlusion (algorithm.md, "Masks with occlusion").

Layer i's alpha on the canvas is a_i; its *visible* mask is m_i = a_i * prod_{j above i} (1 - a_j),
and the background gets 1 - sum_i m_i. The masks therefore partition every pixel, and since they
are downsampled by exact area averaging (a linear map that keeps constants), they still partition
every pixel at latent size and at every attention resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .collage import Collage, Layer


@dataclass
class PlacedLayer:
    """A layer resampled onto the canvas grid: colour and alpha (opacity applied), float32 0..1."""

    rgb: np.ndarray  # (H, W, 3)
    alpha: np.ndarray  # (H, W)


@dataclass
class LayerMasks:
    """Visible masks of the collage's visible layers (bottom to top) and of the background."""

    layers: np.ndarray  # (n, H, W) float32
    background: np.ndarray  # (H, W) float32

    @property
    def stacked(self) -> np.ndarray:
        """(n + 1, H, W): the layers' masks, then the background's; they sum to 1 everywhere."""
        return np.concatenate([self.layers, self.background[None]], axis=0)

    def resized(self, height: int, width: int) -> LayerMasks:
        """Area-averaged to (height, width): the share of each new pixel that each mask covers."""
        return LayerMasks(
            layers=np.stack([area_resize(m, height, width) for m in self.layers])
            if len(self.layers)
            else np.zeros((0, height, width), np.float32),
            background=area_resize(self.background, height, width),
        )


def place_layer(layer: Layer, width: int, height: int) -> PlacedLayer:
    """Put the layer's pixels at its offset on a width×height canvas, cropping what falls outside."""
    rgb = np.zeros((height, width, 3), np.float32)
    alpha = np.zeros((height, width), np.float32)
    x, y = layer.offset
    h, w = layer.image.shape[:2]
    # The part of the layer that overlaps the canvas, in canvas and in layer coordinates.
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    if x0 < x1 and y0 < y1:
        src = layer.image[y0 - y : y1 - y, x0 - x : x1 - x].astype(np.float32) / 255.0
        rgb[y0:y1, x0:x1] = src[..., :3]
        alpha[y0:y1, x0:x1] = src[..., 3] * float(layer.opacity)
    return PlacedLayer(rgb=rgb, alpha=alpha)


def visible_masks(alphas: list[np.ndarray], height: int, width: int) -> LayerMasks:
    """m_i = a_i * prod_{j > i} (1 - a_j) for alphas ordered bottom to top."""
    layers = np.zeros((len(alphas), height, width), np.float32)
    uncovered = np.ones((height, width), np.float32)  # prod over the layers above, built top-down
    for i in range(len(alphas) - 1, -1, -1):
        layers[i] = alphas[i] * uncovered
        uncovered *= 1.0 - alphas[i]
    return LayerMasks(layers=layers, background=uncovered)


def background_rgb(collage: Collage) -> np.ndarray:
    """The canvas under the layers as float32 RGB (H, W, 3); an RGBA background is put over white."""
    bg = collage.background
    if isinstance(bg, np.ndarray):
        rgb = bg[..., :3].astype(np.float32) / 255.0
        if bg.shape[2] == 4:
            a = bg[..., 3:4].astype(np.float32) / 255.0
            rgb = rgb * a + (1.0 - a)
        return rgb
    return np.broadcast_to(np.asarray(bg, np.float32) / 255.0, (collage.height, collage.width, 3)).copy()


@dataclass
class CompositeResult:
    """The flattened collage (uint8 RGB) and the visible masks of the layers that made it."""

    image: np.ndarray  # (H, W, 3) uint8
    masks: LayerMasks
    layers: list[Layer]  # the visible layers, bottom to top, in the order of `masks.layers`


def composite(collage: Collage) -> CompositeResult:
    """The ordinary "over" stack of the visible layers on the background."""
    h, w = collage.height, collage.width
    layers = collage.visible_layers()
    placed = [place_layer(layer, w, h) for layer in layers]
    masks = visible_masks([p.alpha for p in placed], h, w)
    # With visible masks the over-stack is a plain weighted sum: sum_i m_i * c_i + m_bg * c_bg.
    out = masks.background[..., None] * background_rgb(collage)
    for mask, p in zip(masks.layers, placed, strict=True):
        out += mask[..., None] * p.rgb
    image = np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
    return CompositeResult(image=image, masks=masks, layers=layers)


def area_resize(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Exact area-average resampling of a float mask (Pillow's BOX filter on 32-bit float)."""
    if mask.shape == (height, width):
        return mask.astype(np.float32, copy=True)
    image = Image.fromarray(np.ascontiguousarray(mask, dtype=np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.Resampling.BOX), dtype=np.float32)


def unet_feature_sizes(latent_height: int, latent_width: int, levels: int) -> list[tuple[int, int]]:
    """The spatial sizes of a U-Net's levels: each down block halves, rounding up (stride-2 conv)."""
    sizes = [(latent_height, latent_width)]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def mask_pyramid(masks: LayerMasks, sizes: list[tuple[int, int]]) -> dict[tuple[int, int], LayerMasks]:
    """Masks at each of the given (height, width) sizes, e.g. latent size and every attention level."""
    return {size: masks.resized(*size) for size in sizes}
