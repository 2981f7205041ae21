"""Training-free appearance: a masked low-frequency anchor, the default mechanism of
``appearance: "reference"`` (reference attention, core/reference.py, is the optional other).

ILVR (Choi et al. 2021, "Iterative Latent Variable Refinement") restricted to a layer's visible
mask m. After each denoising step in the anchor's schedule, inside the mask the low-pass part of
the latents is replaced by the low-pass part of the reference latents (the flattened collage,
whose pixels there are the layer's own) put at the same noise level with each variant's own
noise; the higher frequencies the model generated stay:

    x <- x + a * m * (LP_m(ref_t) - LP_m(x))

LP_m is a mask-weighted low-pass (a box of `kernel` latent pixels, normalized by the mask inside
it, so the pixels around the layer do not bleed in; kernel 0 = the mean over the whole mask, per
channel). `a` is the layer's anchor weight. Outside the mask (m = 0) the latents are not touched:
byte-identical. On a model whose colour is decided by the text and the convolutions (the demo
model's 8x8 latents), this keeps a layer's colours and coarse shading where reference attention
cannot (docs/appearance.md).

It differs from per-layer strength (core/strength.py): a lower strength holds *all* frequencies
of the region at the noised composite for the first steps, then lets everything go; the anchor
lets the model redo the region from the start and holds only the low frequencies, in its window
(by default the last steps, where the demo model re-decides colours). The strength hold runs
after this and wins: a region that has not started stays held.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def masked_lowpass(x: torch.Tensor, mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """Per channel, the mean of `x` (n, C, h, w) weighted by `mask` (h, w) over a `kernel`-wide
    box around each pixel (odd), or over the whole mask for kernel 0. Where the box holds no mask
    the value is 0 (it is never used there)."""
    m = mask.to(x)[None, None]
    if kernel == 0:
        total = m.sum()
        mean = (x * m).sum((-2, -1), keepdim=True) / total.clamp_min(1e-12)
        return mean.expand_as(x)
    if kernel < 0 or kernel % 2 == 0:
        raise ValueError(f"low-pass kernel must be 0 (the mask's mean) or odd, got {kernel}")
    pad = kernel // 2
    num = F.avg_pool2d(x * m, kernel, stride=1, padding=pad, count_include_pad=True)
    den = F.avg_pool2d(m, kernel, stride=1, padding=pad, count_include_pad=True)
    return torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))


def anchor_low_frequencies(
    x: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, weight: float, kernel: int
) -> torch.Tensor:
    """x + weight * m * (LP_m(ref) - LP_m(x)) where m > 0; `x` itself (the same values) elsewhere."""
    m = mask.to(x)[None, None]
    moved = x + weight * m * (masked_lowpass(ref, mask, kernel) - masked_lowpass(x, mask, kernel))
    return torch.where(m > 0, moved, x)


class LowFrequencyAnchor:
    """The sampler hook (`after_step`): each layer's mask at latent size (n, h, w), its weight,
    the reference latents (1, C, h, w), and the window [start, end] of the schedule (fractions by
    timestep, from pure noise) whose steps it acts after."""

    def __init__(
        self,
        z_ref: torch.Tensor,
        masks: torch.Tensor,
        weights: list[float],
        *,
        layers: list[int],
        kernel: int = 0,
        start: float = 0.0,
        end: float = 1.0,
        train_timesteps: int = 1000,
    ):
        if masks.shape[0] != len(weights) or len(weights) != len(layers) or z_ref.shape[0] != 1:
            raise ValueError("masks, weights and layers need one entry per layer, and there is one reference")
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"anchor start and end must be 0 <= start <= end <= 1, got {start}, {end}")
        masked_lowpass(z_ref, masks[0], kernel)  # checks the kernel
        self.z_ref, self.masks, self.weights = z_ref, masks, [float(w) for w in weights]
        self.layers, self.kernel, self.start, self.end = list(layers), kernel, start, end
        self.train_timesteps = train_timesteps
        self._active = False

    def installed(self, unet):
        return contextlib.nullcontext(self)  # it changes the latents, not the model

    def on_step(self, step) -> None:
        t, total = float(step.timestep), self.train_timesteps
        self._active = (1.0 - self.end) * total - 1e-6 <= t <= (1.0 - self.start) * total + 1e-6

    def after_step(self, result) -> torch.Tensor:
        x = result.latents
        if not self._active:
            return x
        ref = result.noised(self.z_ref)
        for mask, weight in zip(self.masks, self.weights, strict=True):
            if weight > 0:
                x = anchor_low_frequencies(x, ref, mask.to(x.device), weight, self.kernel)
        return x


def low_frequency_anchor_hook(
    setup, *, weight: float = 1.0, kernel: int = 0, start: float = 0.0, end: float = 1.0
) -> LowFrequencyAnchor | None:
    """Build the hook for one generation (a `core.generate` hook builder); None when no layer has
    ``appearance: "reference"`` with an `appearance_weight` > 0, or `weight` is 0. A layer's
    anchor weight is min(1, weight * appearance_weight)."""
    from .compositing import area_resize
    from .generate import VaeCodec, image_to_tensor  # generate does not import us
    from .reference import reference_layers

    pick = reference_layers(setup.flat)
    if not pick or weight <= 0:
        return None
    flat, model = setup.flat, setup.model
    pipe, device, dtype = model.pipeline, model.device, model.dtype
    vae = VaeCodec(pipe.vae, model.family.vae_needs_upcast(pipe.vae, dtype), dtype)
    z_ref = vae.encode(image_to_tensor(flat.image, device, dtype))
    lh, lw = setup.latent_size
    masks = torch.stack([torch.from_numpy(area_resize(flat.masks.layers[i], lh, lw).copy()) for i in pick])
    # Only latent pixels the layer covers at least half of: a partly covered one would take the
    # layer's colour over its background part too (measured: more change around the layer).
    masks = (masks >= 0.5).to(device=device, dtype=torch.float32)
    return LowFrequencyAnchor(
        z_ref,
        masks,
        [min(1.0, weight * float(flat.layers[i].appearance_weight)) for i in pick],
        layers=pick,
        kernel=kernel,
        start=start,
        end=end,
        train_timesteps=int(getattr(pipe.scheduler.config, "num_train_timesteps", 1000)),
    )
