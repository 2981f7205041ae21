"""Per-layer noise strength (algorithm.md §4) and exact paste-back.

The strength map s(p) = sum_i strength_i * m_i(p) + strength_bg * m_bg(p) says, per pixel, how far
down the noise schedule that pixel starts. Sampling starts at the step for max(s); a latent pixel
whose own start step has not come yet is held at the composite noised to the current step with
the same noise draw (as blended-latent inpainting does), so every region enters the denoising at
its own timestep and regions of strength 0 never do.

After decoding, pixels of strength 0 are pasted back from the input exactly (the VAE is not an
identity), blended over a short feather on the *inside* of the changed region so that the pixels
outside it stay byte-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .collage import Collage
from .compositing import CompositeResult, area_resize


def strength_map(collage: Collage, flat: CompositeResult) -> np.ndarray:
    """s(p) at pixel size, float32 (H, W): each layer's strength over its visible mask."""
    s = flat.masks.background * np.float32(collage.strength)
    for mask, layer in zip(flat.masks.layers, flat.layers, strict=True):
        s += mask * np.float32(collage.layer_strength(layer))
    return s


def steps_to_run(steps: int, strength: float) -> int:
    """How many of `steps` a region of this strength is denoised for (as diffusers img2img)."""
    return min(int(steps * strength), steps)


def start_indices(strength_latent: np.ndarray, steps: int) -> np.ndarray:
    """Per latent pixel, the index in the full schedule of the first step that denoises it.

    An index of `steps` means never: the pixel stays the composite.
    """
    s = np.clip(strength_latent.astype(np.float64), 0.0, 1.0)
    # A tiny epsilon keeps area-averaged values like 0.6999999 on the step that 0.7 gets.
    return steps - np.minimum(np.floor(steps * s + 1e-6), steps).astype(np.int64)


def region_mask(mask: np.ndarray, dilation_px: int) -> np.ndarray:
    """Where a (soft) mask is > 0, grown by `dilation_px` pixels (boolean)."""
    region = mask > 0
    if dilation_px <= 0 or not region.any():
        return region
    outside = (~region).astype(np.uint8)
    return cv2.distanceTransform(outside, cv2.DIST_L2, 5) <= dilation_px


def feather_weights(changed: np.ndarray, feather_px: int) -> np.ndarray:
    """Blend weight of the generated image: 0 outside the changed region, ramping to 1 inside it
    over `feather_px` pixels, so the unchanged side of the border is never touched."""
    changed = changed.astype(bool)
    if feather_px <= 0 or changed.all():
        return changed.astype(np.float32)
    inside_distance = cv2.distanceTransform(changed.astype(np.uint8), cv2.DIST_L2, 5)
    return np.clip(inside_distance / float(feather_px + 1), 0.0, 1.0).astype(np.float32) * changed


def paste_back(generated: np.ndarray, original: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """generated where weights is 1, the original pixels exactly where weights is 0, a blend between."""
    if weights.min() >= 1.0:  # every pixel changes (a uniform strength > 0): nothing to blend
        return generated
    w = weights[..., None]
    blended = np.rint(generated.astype(np.float32) * w + original.astype(np.float32) * (1.0 - w))
    out = blended.clip(0, 255).astype(np.uint8)
    keep = weights <= 0
    out[keep] = original[keep]
    return out


@dataclass
class StrengthPlan:
    """Everything the sampler needs to start each region at its own step and paste back after."""

    pixel_strength: np.ndarray  # s(p), (H, W)
    start_index: np.ndarray  # (h, w) latent grid: first step index (full schedule) per latent pixel
    first: int  # the first step index run: the start of the highest strength
    paste_weights: np.ndarray  # (H, W) blend weight of the generated pixels

    @property
    def is_uniform(self) -> bool:
        """Every latent pixel starts at the first step: plain SDEdit, no holding needed."""
        return bool((self.start_index == self.first).all())


def plan_strength(
    pixel_strength: np.ndarray, latent_size: tuple[int, int], steps: int, feather_px: int
) -> StrengthPlan:
    start = start_indices(area_resize(pixel_strength, *latent_size), steps)
    first = int(start.min())
    return StrengthPlan(
        pixel_strength=pixel_strength,
        start_index=start,
        first=first,
        paste_weights=feather_weights(pixel_strength > 0, feather_px),
    )
