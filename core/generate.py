"""The generation entry point: a collage in, images out.

This is SDEdit of the composite on diffusers' img2img machinery (the model's own VAE, text
encoder, U-Net and a per-job scheduler), written as an explicit loop so that the Collage
Diffusion pieces (masked attention, per-layer strength, inversion tokens, masked ControlNet)
can hook into each step. Progress is reported per step and cancellation checked every step.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import numpy as np
import torch

from .collage import Collage, CollageError
from .compositing import CompositeResult, composite, place_layer
from .embeddings import EmbeddingFiles, embedding_tokens
from .families import SD1, ModelFamily, PromptConditioning
from .inversion import appearance_tokens
from .progress import CancelFlag, Progress, ProgressCallback, check_cancel
from .prompt_encoding import CHUNK_TOKENS, MAX_CHUNKS
from .schedulers import make_scheduler
from .strength import StrengthPlan, paste_back, plan_strength, region_mask, strength_map
from .tokens import TokenSpans, token_spans

log = logging.getLogger(__name__)


@dataclass
class GeneratedImage:
    image: np.ndarray  # (H, W, 3) uint8
    seed: int


@dataclass
class Regenerate:
    """Regenerate part of a previous result: one layer's region, or a pixel mask (a selection);
    only that region, grown by `dilation_px`, changes. Give `layer_index` or `mask`, not both."""

    base_image: np.ndarray  # (H, W, 3 or 4) uint8: the previous result
    layer_index: int | None = None  # index into `Collage.layers`
    dilation_px: int = 8  # how far around the layer's visible pixels (or the mask) may change
    mask: np.ndarray | None = None  # (H, W) uint8 (> 0 = selected) or bool: redo these pixels


@dataclass
class GenerationResult:
    images: list[GeneratedImage]
    composite: np.ndarray  # (H, W, 3) uint8: the starting image (the flattened collage, or for a
    # regenerate the base with the layer put over it); pixels of strength 0 are these exactly
    prompt: str  # the prompt as encoded (layer texts missing from it are appended)
    warnings: list[str] = field(default_factory=list)


@dataclass
class StepContext:
    """What a sampler hook sees at one denoising step."""

    index: int  # position in the steps actually run (0 = first)
    timestep: torch.Tensor
    sigma: float  # noise level sqrt((1 - alpha_bar_t) / alpha_bar_t) of this timestep


@dataclass
class StepResult:
    """What a hook's `after_step` sees: the latents a denoising step produced, and how to put a
    clean latent image at their noise level with each variant's own noise (as the per-layer
    strength hold does), the clean image itself after the last step."""

    index: int  # the step just run (position in the steps actually run)
    latents: torch.Tensor  # (n, C, h, w), in the scheduler's own parametrization
    noised: Callable[[torch.Tensor], torch.Tensor]  # (1, C, h, w) clean -> (n, C, h, w) at that level


@dataclass
class SamplingSetup:
    """What hooks are built from: the flattened collage, token spans and the loaded model."""

    collage: Collage
    flat: CompositeResult
    spans: TokenSpans
    model: object  # core.models.LoadedModel
    latent_size: tuple[int, int]


class SamplerHook(Protocol):
    """One Collage Diffusion piece that acts on the U-Net during sampling (e.g. masked attention).

    `installed` is a context manager that changes the shared model for one generation and
    restores it on exit, also on error or cancel; `on_step` runs before each U-Net call. A hook
    may also define `unet_kwargs(model_input, timestep, embeds, added_cond_kwargs) -> dict` to
    pass extra arguments to that U-Net call (ControlNet residuals, for instance);
    `added_cond_kwargs` is the family's extra conditioning (SDXL's) or None; and
    `after_step(result: StepResult) -> latents` to change the latents a step produced (before the
    per-layer strength hold, which wins: a region that has not started stays held).
    """

    def installed(self, unet): ...

    def on_step(self, step: StepContext) -> None: ...


def timestep_sigma(scheduler, timestep: torch.Tensor) -> float:
    """The noise level of a (discrete) timestep, from the scheduler's own alphas."""
    alpha_bar = scheduler.alphas_cumprod[int(round(float(timestep)))].item()
    return ((1.0 - alpha_bar) / alpha_bar) ** 0.5


def latent_preview(latents: torch.Tensor, family: ModelFamily = SD1) -> np.ndarray:
    """A latent-size RGB preview of the first latent in a batch (uint8, (h, w, 3)), through the
    family's approximate linear map from latents to RGB (no VAE)."""
    factors, bias = family.preview_rgb()
    rgb = torch.einsum("chw,cr->hwr", latents[0].float().cpu(), factors) + bias
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


@torch.no_grad()
def generate(
    model,
    collage: Collage,
    *,
    variants: int = 1,
    seeds: list[int] | None = None,
    regenerate: Regenerate | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    max_batch: int | None = None,
    hooks: list[Callable[[SamplingSetup], SamplerHook | None]] | None = None,
    embeddings: EmbeddingFiles | None = None,
) -> GenerationResult:
    """Generate `variants` images from the collage with `model` (a `core.models.LoadedModel`).

    Variant k uses seed ``collage.seed + k`` unless `seeds` gives them. Each region starts
    denoising at its own layer's strength; strength-0 pixels come back byte-identical. With
    `regenerate`, only that layer's (or mask's) region of the base image changes. Raises `CollageError` for
    a collage that cannot be generated and `GenerationCancelled` when `cancel` is set. `hooks`
    are builders of extra sampler hooks (each may return None when it has nothing to do).
    `embeddings` are the textual-inversion files the texts may name (`embedding:NAME` or a bare
    file name; none by default).
    """
    collage.validate()
    if seeds is None:
        seeds = [collage.seed + k for k in range(variants)]
    if not seeds:
        raise ValueError("variants: at least one image must be asked for")
    report = progress or (lambda p: None)
    pipe, device, dtype = model.pipeline, model.device, model.dtype

    flat = composite(collage)
    start_image, pixel_strength = start_and_strength(collage, flat, regenerate)
    _check_clip_skip(model, collage)
    # The user's embeddings (core/embeddings.py) are placeholder tokens in the model only while
    # the texts are tokenized and encoded.
    fields = [("prompt", collage.prompt), ("negative_prompt", collage.negative_prompt or "")]
    fields += [(f"layers[{_index_of(collage, layer)}].text", layer.text) for layer in flat.layers]
    with embedding_tokens(model, fields, embeddings) as words:
        prompt, negative_prompt, *texts = words.texts
        spans = token_spans(pipe.tokenizer, prompt, texts)
        warnings = _truncation_warnings(flat, spans)
        factor = pipe.vae_scale_factor
        latent_size = (collage.height // factor, collage.width // factor)
        plan = plan_strength(pixel_strength, latent_size, collage.steps, collage.feather_px)
        if plan.first >= collage.steps:  # every strength is 0: nothing to regenerate
            images = [GeneratedImage(start_image.copy(), s) for s in seeds]
            return GenerationResult(images, start_image, words.original(spans.prompt), warnings)

        do_cfg = collage.guidance_scale > 1.0
        # Learned appearance tokens (algorithm.md §2) are in the model only while the prompt is encoded.
        with appearance_tokens(model, collage, flat, report=report, cancel=cancel) as prefixes:
            if any(prefixes):
                spans = token_spans(pipe.tokenizer, prompt, texts, prefixes)
                warnings = _truncation_warnings(flat, spans)
            report(Progress("encoding", 0, 1))
            check_cancel(cancel)
            conditioning = model.family.encode_prompt(
                pipe,
                spans.chunks,
                negative_prompt or None,
                device,
                do_cfg,
                (collage.height, collage.width),
                collage.clip_skip,
            )
    vae = VaeCodec(pipe.vae, model.family.vae_needs_upcast(pipe.vae, dtype), dtype)
    z0 = vae.encode(image_to_tensor(start_image, device, dtype))

    scheduler = make_scheduler(collage.scheduler, pipe.scheduler)
    setup = SamplingSetup(collage, flat, spans, model, latent_size)
    active = [hook for build in (hooks or []) if (hook := build(setup)) is not None]
    run = _SamplingRun(
        pipe.unet, vae, model.family, collage, scheduler, plan, z0, conditioning, active, report, cancel
    )
    batch_size = max_batch or auto_batch_size(
        len(seeds), latent_size, device, do_cfg, model.family.bytes_per_latent_pixel
    )
    images: list[GeneratedImage] = []
    with contextlib.ExitStack() as stack:
        for hook in active:
            stack.enter_context(hook.installed(pipe.unet))
        pending = list(seeds)
        while pending:
            batch_seeds = pending[:batch_size]
            try:
                decoded = run.sample(batch_seeds, (len(images), len(seeds)))
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                batch_size = max(1, batch_size // 2)  # the estimate was too hopeful: halve, retry
                log.warning("out of GPU memory; generating %d variant(s) at a time", batch_size)
                _free_device_memory(device)
                continue
            pending = pending[len(batch_seeds) :]
            images += [
                GeneratedImage(paste_back(img, start_image, plan.paste_weights), s)
                for img, s in zip(decoded, batch_seeds, strict=True)
            ]
    for w in warnings:
        log.warning(w)
    return GenerationResult(
        images=images, composite=start_image, prompt=words.original(spans.prompt), warnings=warnings
    )


def _index_of(collage: Collage, layer) -> int:
    return next(i for i, candidate in enumerate(collage.layers) if candidate is layer)


def _truncation_warnings(flat: CompositeResult, spans: TokenSpans) -> list[str]:
    return [
        f"the words of layer '{flat.layers[i].text}' fall past the prompt limit of {MAX_CHUNKS}"
        f" chunks of {CHUNK_TOKENS} tokens and are ignored; shorten the prompt"
        for i in spans.truncated
    ]


def _check_clip_skip(model, collage: Collage) -> None:
    """clip_skip within the loaded text encoders' layers (the wire allows up to 12)."""
    most = model.family.max_clip_skip(model.pipeline)
    if collage.clip_skip is not None and collage.clip_skip > most:
        raise CollageError(
            [
                f"clip_skip: this model's text encoder has {most} layers; use 1..{most}, got {collage.clip_skip}"
            ]
        )


def start_and_strength(
    collage: Collage, flat: CompositeResult, regenerate: Regenerate | None
) -> tuple[np.ndarray, np.ndarray]:
    """The start image and the per-pixel strength map s(p): the flattened collage and each
    layer's strength over its visible mask, or those of a regenerate."""
    if regenerate is None:
        return flat.image, strength_map(collage, flat)
    return _regenerate_start(collage, flat, regenerate)


def _regenerate_start(
    collage: Collage, flat: CompositeResult, regen: Regenerate
) -> tuple[np.ndarray, np.ndarray]:
    """The start image and strength map of a regenerate. A layer: the layer put over the base,
    its strength on its dilated visible region. A mask: the base itself, the layers' strength map
    on the dilated mask (the selection is redone with the layers' settings); 0 elsewhere."""
    base = regen.base_image
    problems = []
    if (
        not isinstance(base, np.ndarray)
        or base.dtype != np.uint8
        or base.ndim != 3
        or base.shape[2] not in (3, 4)
    ):
        problems.append("regenerate.base_image: must be an 8-bit RGB or RGBA image")
    elif base.shape[:2] != (collage.height, collage.width):
        problems.append(
            f"regenerate.base_image: is {base.shape[1]}×{base.shape[0]}, the canvas is {collage.width}×{collage.height}"
        )
    k, mask = regen.layer_index, regen.mask
    if (k is None) == (mask is None):
        problems.append("regenerate.layer_index, mask: give one of them (a layer or a pixel mask), not both")
    elif mask is not None:
        if not isinstance(mask, np.ndarray) or mask.dtype not in (np.uint8, np.bool_) or mask.ndim != 2:
            problems.append("regenerate.mask: must be an (H, W) 8-bit or boolean image")
        elif mask.shape != (collage.height, collage.width):
            problems.append(
                f"regenerate.mask: is {mask.shape[1]}×{mask.shape[0]}, the canvas is {collage.width}×{collage.height}"
            )
        elif not mask.any():
            problems.append("regenerate.mask: selects no pixel")
    elif not isinstance(k, int) or not 0 <= k < len(collage.layers):
        problems.append(f"regenerate.layer_index: must be in 0..{len(collage.layers) - 1}, got {k!r}")
    elif not any(layer is collage.layers[k] for layer in flat.layers):
        problems.append(f"regenerate.layer_index: layer {k} ('{collage.layers[k].text}') is hidden")
    if not isinstance(regen.dilation_px, int) or not 0 <= regen.dilation_px <= 256:
        problems.append(
            f"regenerate.dilation_px: must be a whole number in 0..256, got {regen.dilation_px!r}"
        )
    if problems:
        raise CollageError(problems)
    if mask is not None:
        region = region_mask(mask.astype(np.float32), regen.dilation_px)
        return base[..., :3].copy(), strength_map(collage, flat) * region.astype(np.float32)
    index = next(i for i, layer in enumerate(flat.layers) if layer is collage.layers[k])
    layer, mask = flat.layers[index], flat.masks.layers[index]
    placed = place_layer(layer, collage.width, collage.height)
    start = base[..., :3].astype(np.float32) * (1.0 - mask[..., None]) + placed.rgb * 255.0 * mask[..., None]
    start = np.clip(np.rint(start), 0, 255).astype(np.uint8)
    region = region_mask(mask, regen.dilation_px)
    return start, region.astype(np.float32) * np.float32(collage.layer_strength(layer))


def auto_batch_size(
    n: int,
    latent_size: tuple[int, int],
    device: torch.device,
    cfg: bool,
    bytes_per_latent_pixel: int = 150_000,
) -> int:
    """How many variants to denoise at once: what fits in free GPU memory (estimated from the
    family's `bytes_per_latent_pixel`; an out-of-memory error halves it), and a few at a time on
    CPU where batching gains little."""
    if device.type != "cuda":
        return min(n, 4)
    free, _total = torch.cuda.mem_get_info(device)
    per_image = latent_size[0] * latent_size[1] * bytes_per_latent_pixel * (2 if cfg else 1)
    return max(1, min(n, int(free * 0.8) // per_image))


def _free_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class VaeCodec:
    """The model's VAE between images and scaled latents; in float32 where the family's VAE
    overflows in half precision (SDXL), as diffusers' pipelines do."""

    vae: object
    upcast: bool
    dtype: torch.dtype  # the dtype of the latents the U-Net works in

    @property
    def scaling(self) -> float:
        return self.vae.config.scaling_factor

    def _run(self, fn, x: torch.Tensor) -> torch.Tensor:
        if not self.upcast:
            return fn(x)
        self.vae.to(torch.float32)
        try:
            return fn(x.float()).to(self.dtype)
        finally:
            self.vae.to(self.dtype)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self._run(lambda x: self.vae.encode(x).latent_dist.mode() * self.scaling, image)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._run(lambda z: self.vae.decode(z / self.scaling).sample, latents)


@dataclass
class _SamplingRun:
    """The denoising loop of one generation, run once per batch of variant seeds."""

    unet: object
    vae: VaeCodec
    family: ModelFamily
    collage: Collage
    scheduler: object
    plan: StrengthPlan
    z0: torch.Tensor  # the start image's latents (1, C, h, w)
    conditioning: PromptConditioning  # uncond None when guidance is off
    hooks: list[SamplerHook]
    report: ProgressCallback
    cancel: CancelFlag | None

    def sample(self, seeds: list[int], done: tuple[int, int]) -> list[np.ndarray]:
        """Denoise one batch; returns the decoded images (before paste-back)."""
        scheduler, z0, plan = self.scheduler, self.z0, self.plan
        guided = self.conditioning.uncond is not None
        scheduler.set_timesteps(self.collage.steps, device=z0.device)  # fresh multistep state
        order = scheduler.order
        timesteps = scheduler.timesteps[plan.first * order :]
        # The noise levels on the host, read once: reading a device timestep each step would make
        # the host wait for the GPU every step instead of queueing the next U-Net call.
        sigmas = [timestep_sigma(scheduler, t) for t in timesteps.cpu()]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(plan.first * order)
        n = len(seeds)
        noise = seed_noise(seeds, tuple(z0.shape[1:])).to(device=z0.device, dtype=z0.dtype)
        start = z0.expand(n, -1, -1, -1)
        latents = scheduler.add_noise(start, noise, timesteps[:1].repeat(n))
        # Per latent pixel, the first step index that denoises it (algorithm.md §4).
        start_index = (
            None if plan.is_uniform else torch.from_numpy(plan.start_index).to(z0.device)[None, None]
        )
        embeds, added = self.conditioning.batch(n)
        after_step = [hook for hook in self.hooks if hasattr(hook, "after_step")]

        for i, t in enumerate(timesteps):
            check_cancel(self.cancel)
            if start_index is not None and i > 0:
                # Regions that have not started yet, or start at this step, enter it as the
                # composite noised to this step (for the latter that is exactly SDEdit's start).
                waiting = start_index >= plan.first + i // order
                latents = torch.where(waiting, scheduler.add_noise(start, noise, t.repeat(n)), latents)
            step = StepContext(i, t, sigmas[i])
            for hook in self.hooks:
                hook.on_step(step)
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            extra = {}
            for hook in self.hooks:
                if hasattr(hook, "unet_kwargs"):
                    extra.update(hook.unet_kwargs(model_input, t, embeds, added))
            noise_pred = self.unet(
                model_input, t, encoder_hidden_states=embeds, added_cond_kwargs=added, **extra
            ).sample
            if guided:
                pred_uncond, pred_cond = noise_pred.chunk(2)
                noise_pred = pred_uncond + self.collage.guidance_scale * (pred_cond - pred_uncond)
            latents = scheduler.step(noise_pred, t, latents).prev_sample
            if after_step:
                # The latents are now at the next timestep's level (the offered schedulers are
                # all first order), or clean after the last step.
                level = timesteps[i + 1 : i + 2].repeat(n) if i + 1 < len(timesteps) else None
                result = StepResult(i, latents, partial(_noised, scheduler, noise, level))
                for hook in after_step:
                    result.latents = hook.after_step(result)
                latents = result.latents
            self.report(
                Progress(
                    "sampling",
                    i + 1,
                    len(timesteps),
                    done,
                    preview=lambda current=latents: latent_preview(current / self.vae.scaling, self.family),
                )
            )
        if start_index is not None:
            latents = torch.where(start_index >= self.collage.steps, start, latents)  # never started

        check_cancel(self.cancel)
        self.report(Progress("decoding", 0, 1, done))
        return tensor_to_images(self.vae.decode(latents))


def _noised(
    scheduler, noise: torch.Tensor, timesteps: torch.Tensor | None, clean: torch.Tensor
) -> torch.Tensor:
    """`clean` (1, C, h, w) at the level of `timesteps` (one per variant) with the variants' noise.

    (Sigma schedulers with a begin index, Euler and DPM++, read the level off their step index,
    which after a step is the next one: the same level.)"""
    clean = clean.to(noise).expand(noise.shape[0], -1, -1, -1)
    return clean if timesteps is None else scheduler.add_noise(clean, noise, timesteps)
