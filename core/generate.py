"""The generation entry point: a collage in, images out.

This is SDEdit of the composite on diffusers' img2img machinery (the model's own VAE, text
encoder, U-Net and a per-job scheduler), written as an explicit loop so that the Collage
Diffusion pieces (masked attention, per-layer strength, inversion tokens, masked ControlNet)
can hook into each step. Progress is reported per step and cancellation checked every step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from .collage import Collage
from .compositing import composite
from .schedulers import make_scheduler
from .tokens import token_spans

log = logging.getLogger(__name__)


class CancelFlag(Protocol):
    """Anything with ``is_set()``: a `threading.Event` is the usual one."""

    def is_set(self) -> bool: ...


class GenerationCancelled(Exception):
    """Raised from inside `generate` when the cancel flag was set; nothing is returned."""


@dataclass
class Progress:
    """One progress report. `preview()` renders a small RGB guess of the current image on demand."""

    phase: str  # "encoding", "sampling", "decoding"
    step: int
    total: int
    variant_batch: tuple[int, int] = (0, 1)  # (index of the batch of variants, number of batches)
    preview: Callable[[], np.ndarray] | None = None


ProgressCallback = Callable[[Progress], None]


@dataclass
class GeneratedImage:
    image: np.ndarray  # (H, W, 3) uint8
    seed: int


@dataclass
class GenerationResult:
    images: list[GeneratedImage]
    composite: np.ndarray  # (H, W, 3) uint8: the collage flattened, the SDEdit starting point
    prompt: str  # the prompt as encoded (layer texts missing from it are appended)
    warnings: list[str] = field(default_factory=list)


# Approximate linear map from SD1.x/2.x latents to RGB, for cheap previews without the VAE.
_LATENT_RGB = torch.tensor(
    [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]
)


def latent_preview(latents: torch.Tensor) -> np.ndarray:
    """A latent-size RGB preview of the first latent in a batch (uint8, (h, w, 3))."""
    rgb = torch.einsum("chw,cr->hwr", latents[0].float().cpu(), _LATENT_RGB)
    return ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()


def image_to_tensor(image: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (H, W, 3) → (1, 3, H, W) in [-1, 1], as the VAE expects."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    return t.to(device=device, dtype=dtype)


def tensor_to_images(decoded: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) in [-1, 1] → list of uint8 (H, W, 3)."""
    x = ((decoded.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return [img.permute(1, 2, 0).cpu().numpy() for img in x]


def seed_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One noise tensor per seed, drawn on the CPU so a seed gives the same noise on every device."""
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])


def _check_cancel(cancel: CancelFlag | None) -> None:
    if cancel is not None and cancel.is_set():
        raise GenerationCancelled("generation cancelled")


@torch.no_grad()
def generate(
    model,
    collage: Collage,
    *,
    variants: int = 1,
    seeds: list[int] | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    max_batch: int = 4,
) -> GenerationResult:
    """Generate `variants` images from the collage with `model` (a `core.models.LoadedModel`).

    Variant k uses seed ``collage.seed + k`` unless `seeds` gives them. Raises `CollageError` for a
    collage that cannot be generated and `GenerationCancelled` when `cancel` is set.
    """
    collage.validate()
    if seeds is None:
        seeds = [collage.seed + k for k in range(variants)]
    if not seeds:
        raise ValueError("variants: at least one image must be asked for")
    report = progress or (lambda p: None)
    pipe, device, dtype = model.pipeline, model.device, model.dtype

    flat = composite(collage)
    spans = token_spans(pipe.tokenizer, collage.prompt, [layer.text for layer in flat.layers])
    warnings = [
        f"the words of layer '{flat.layers[i].text}' fall past the text encoder's"
        f" {pipe.tokenizer.model_max_length}-token limit and are ignored; shorten the prompt"
        for i in spans.truncated
    ]

    report(Progress("encoding", 0, 1))
    _check_cancel(cancel)
    do_cfg = collage.guidance_scale > 1.0
    cond, uncond = pipe.encode_prompt(
        spans.prompt, device, 1, do_cfg, negative_prompt=collage.negative_prompt or None
    )
    scaling = pipe.vae.config.scaling_factor
    z0 = pipe.vae.encode(image_to_tensor(flat.image, device, dtype)).latent_dist.mode() * scaling

    # SDEdit: start partway down the schedule, at the step that matches the strength.
    scheduler = make_scheduler(collage.scheduler, pipe.scheduler)
    scheduler.set_timesteps(collage.steps, device=device)
    n_start = min(int(collage.steps * collage.strength), collage.steps)  # as diffusers img2img
    first = (collage.steps - n_start) * scheduler.order
    timesteps = scheduler.timesteps[first:]

    images: list[GeneratedImage] = []
    batches = [seeds[i : i + max_batch] for i in range(0, len(seeds), max_batch)]
    for b, batch_seeds in enumerate(batches):
        if len(timesteps) == 0:  # strength 0: nothing is regenerated
            images += [GeneratedImage(flat.image.copy(), s) for s in batch_seeds]
            continue
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_timesteps(collage.steps, device=device)  # reset multistep state per batch
            scheduler.set_begin_index(first)
        n = len(batch_seeds)
        noise = seed_noise(batch_seeds, tuple(z0.shape[1:])).to(device=device, dtype=dtype)
        latents = scheduler.add_noise(z0.expand(n, -1, -1, -1), noise, timesteps[:1].repeat(n))
        embeds = (
            torch.cat([uncond.expand(n, -1, -1), cond.expand(n, -1, -1)])
            if do_cfg
            else cond.expand(n, -1, -1)
        )

        for i, t in enumerate(timesteps):
            _check_cancel(cancel)
            model_input = torch.cat([latents] * 2) if do_cfg else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise_pred = pipe.unet(model_input, t, encoder_hidden_states=embeds).sample
            if do_cfg:
                pred_uncond, pred_cond = noise_pred.chunk(2)
                noise_pred = pred_uncond + collage.guidance_scale * (pred_cond - pred_uncond)
            latents = scheduler.step(noise_pred, t, latents).prev_sample
            current = latents
            report(
                Progress(
                    "sampling",
                    i + 1,
                    len(timesteps),
                    (b, len(batches)),
                    preview=lambda current=current: latent_preview(current / scaling),
                )
            )

        _check_cancel(cancel)
        report(Progress("decoding", 0, 1, (b, len(batches))))
        decoded = pipe.vae.decode(latents / scaling).sample
        images += [GeneratedImage(img, s) for img, s in zip(tensor_to_images(decoded), batch_seeds, strict=True)]

    for w in warnings:
        log.warning(w)
    return GenerationResult(images=images, composite=flat.image, prompt=spans.prompt, warnings=warnings)
