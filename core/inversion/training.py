"""Training one embedding v* on one layer image: augmentation, the masked loss, fp32 training
with loss scaling for fp16 models, progress and cancel per step (`train_embedding`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..families import SD1, ModelFamily
from ..progress import CancelFlag, Progress, ProgressCallback, check_cancel
from . import recipe
from .recipe import (
    InversionResult,
    InversionSettings,
    cache_key,
    embedding_parts,
    placeholder_tokens,
    resolved_resolution,
)
from .splice import _Spliced, added_tokens


def _object_tensor(image: np.ndarray) -> torch.Tensor | None:
    """(4, h, w) float32: premultiplied RGB and alpha, cropped to the object's bounding box."""
    alpha = image[..., 3]
    ys, xs = np.nonzero(alpha)
    if len(ys) == 0:
        return None
    crop = image[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32) / 255.0
    a = crop[..., 3:4]
    premultiplied = np.concatenate([crop[..., :3] * a, a], axis=-1)  # invisible colour → exactly 0
    return torch.from_numpy(np.ascontiguousarray(premultiplied)).permute(2, 0, 1).contiguous()


def augment(
    obj: torch.Tensor, size: int, gen: torch.Generator, settings: InversionSettings, canvas_side: int = 0
):
    """One augmented sample: the object scaled into a size×size square at a random place, maybe
    flipped, over a random colour. Its size: `settings.scale` times "fits the square", or with
    ``keep_size`` times its size on its canvas (longer side `canvas_side`) mapped onto the square.
    Returns RGB (3, size, size) in [-1, 1] and alpha (1, size, size).

    Resampling works on premultiplied colour, so pixels with alpha 0 contribute nothing.
    """
    _, h, w = obj.shape
    lo, hi = settings.scale
    s = lo + (hi - lo) * float(torch.rand((), generator=gen))
    fit = size / (canvas_side if settings.keep_size and canvas_side else max(h, w))
    nh, nw = max(1, min(size, round(h * fit * s))), max(1, min(size, round(w * fit * s)))
    resized = F.interpolate(obj[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    y = int(torch.randint(0, size - nh + 1, (), generator=gen))
    x = int(torch.randint(0, size - nw + 1, (), generator=gen))
    canvas = torch.zeros(4, size, size)
    canvas[:, y : y + nh, x : x + nw] = resized
    flip = float(torch.rand((), generator=gen)) < 0.5
    if settings.flip and flip:
        canvas = canvas.flip(-1)
    background = torch.rand(3, generator=gen)
    alpha = canvas[3:].clamp(0, 1)
    rgb = (canvas[:3] + (1 - alpha) * background[:, None, None]).clamp(0, 1)
    return rgb * 2 - 1, alpha


class _LossScale:
    """Dynamic loss scaling for fp16 models (what torch's GradScaler does, for one fp32 tensor and
    without touching the model's parameters): overflowing steps are skipped and the scale halved."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.scale = 2.0**16 if enabled else 1.0
        self._good = 0

    def grad(self, loss: torch.Tensor, param: torch.Tensor) -> torch.Tensor | None:
        (grad,) = torch.autograd.grad(loss * self.scale, [param])
        grad = grad.float() / self.scale
        if not torch.isfinite(grad).all():
            if self.enabled:
                self.scale = max(self.scale / 2, 1.0)
                self._good = 0
            return None
        if self.enabled:
            self._good += 1
            if self._good >= 200:
                self.scale, self._good = min(self.scale * 2, 2.0**24), 0
        return grad


def initial_embedding(pipe, text: str, family: ModelFamily = SD1) -> torch.Tensor:
    """v* starts as the mean input embedding of the layer text's tokens (fp32, CPU), in each of
    the family's text encoders (their parts side by side)."""
    parts = []
    for slot in family.text_encoders:
        tokenizer = getattr(pipe, slot.tokenizer)
        ids = tokenizer(text, add_special_tokens=False).input_ids or [tokenizer.eos_token_id]
        weight = getattr(pipe, slot.encoder).get_input_embeddings().weight
        parts.append(weight[torch.tensor(ids, device=weight.device)].detach().float().mean(0).cpu())
    return torch.cat(parts)


def word_norm(pipe, text: str, family: ModelFamily = SD1) -> float:
    """The mean input-embedding norm of the layer text's tokens (each encoder's part side by side,
    as v* is): what ``max_norm`` is a multiple of."""
    squares = []
    for slot in family.text_encoders:
        tokenizer = getattr(pipe, slot.tokenizer)
        ids = tokenizer(text, add_special_tokens=False).input_ids or [tokenizer.eos_token_id]
        weight = getattr(pipe, slot.encoder).get_input_embeddings().weight
        norms = weight[torch.tensor(ids, device=weight.device)].detach().float().norm(dim=-1)
        squares.append(norms.mean().cpu() ** 2)
    return float(torch.stack(squares).sum().sqrt())


def _train(*args, **kwargs) -> InversionResult:
    # Gradients for v* even inside generate()'s no_grad (or a caller's inference_mode).
    with torch.inference_mode(False), torch.enable_grad():
        return _train_steps(*args, **kwargs)


def _train_steps(
    model,
    token: str,
    token_id: int,
    image: np.ndarray,
    text: str,
    init: torch.Tensor,
    settings: InversionSettings,
    report: ProgressCallback,
    cancel: CancelFlag | None,
    canvas_side: int = 0,
) -> InversionResult:
    """Train v* for `token` (already in the tokenizer with id `token_id`) on one layer image
    (`canvas_side`: the longer side of the canvas it is placed on, for ``keep_size``)."""
    from diffusers import DDPMScheduler

    pipe, device, dtype, family = model.pipeline, model.device, model.dtype, model.family
    obj = _object_tensor(image)
    if obj is None:
        raise ValueError(f"layer '{text}' has no visible pixels to learn from")
    size = resolved_resolution(pipe, settings)
    factor = int(pipe.vae_scale_factor)
    scaling = pipe.vae.config.scaling_factor
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = noise_scheduler.config.prediction_type
    n_train = noise_scheduler.config.num_train_timesteps
    unet = pipe.unet
    phrase = f"{token} {' '.join(text.split())}"
    templates = recipe.MODEL_PROMPT_TEMPLATES.get(model.identity, recipe.PROMPT_TEMPLATES)
    prompts = [t.format(phrase) for t in templates]
    template_ids = []  # per text encoder: (templates, 77)
    for slot in family.text_encoders:
        tokenizer = getattr(pipe, slot.tokenizer)
        template_ids.append(
            tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
        )

    gen = torch.Generator("cpu").manual_seed(settings.seed)
    param = init.detach().clone().float().to(device).requires_grad_(True)  # fp32 master weight
    optimizer = torch.optim.AdamW([param], lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scaler = _LossScale(dtype == torch.float16)
    phase = f"learning appearance of '{text}'"

    def draw():
        """One batch: augmented samples, their latents, noise, timesteps, masks and prompts."""
        samples = [augment(obj, size, gen, settings, canvas_side) for _ in range(settings.batch_size)]
        pixels = torch.stack([s[0] for s in samples]).to(device=device, dtype=dtype)
        alpha = torch.stack([s[1] for s in samples])
        mask = F.avg_pool2d(alpha, factor).to(device)  # exact area average to latent size
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.mode() * scaling
        noise = torch.randn(latents.shape, generator=gen).to(device=device, dtype=dtype)
        t_lo, t_hi = settings.timesteps
        lo_t, hi_t = int(round(t_lo * (n_train - 1))), int(round(t_hi * (n_train - 1)))
        timesteps = torch.randint(lo_t, hi_t + 1, (settings.batch_size,), generator=gen).to(device)
        which = torch.randint(0, len(templates), (settings.batch_size,), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if prediction == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return noisy, timesteps, target, mask, [ids[which.to(device)] for ids in template_ids]

    limit = None if settings.max_norm is None else settings.max_norm * word_norm(pipe, text, family)
    losses: list[float] = []
    encoders = [getattr(pipe, slot.encoder) for slot in family.text_encoders]
    bases = [encoder.get_input_embeddings() for encoder in encoders]
    start = 0
    for encoder, base in zip(encoders, bases, strict=True):  # each reads its part of v*
        width = base.weight.shape[1]
        encoder.set_input_embeddings(_Spliced(base, token_id, param, start, start + width))
        start += width
    try:
        batch = None
        for step in range(settings.steps):
            check_cancel(cancel)
            if batch is None or settings.resample:
                batch = draw()
            noisy, timesteps, target, mask, ids = batch
            hidden, added = family.encode_ids(pipe, ids, (size, size))
            pred = unet(noisy, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
            err = (pred.float() - target.float()) ** 2
            loss = (err * mask).sum() / (mask.sum() * err.shape[1]).clamp_min(1e-8)
            grad = scaler.grad(loss, param)
            if grad is not None:
                param.grad = grad
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if limit is not None:  # projected back onto the ball: Adam's state is kept
                    with torch.no_grad():
                        param.mul_((limit / param.norm().clamp_min(1e-12)).clamp(max=1.0))
            losses.append(float(loss.detach()))
            report(Progress(phase, step + 1, settings.steps))
    finally:
        for encoder, base in zip(encoders, bases, strict=True):
            encoder.set_input_embeddings(base)
    parts = embedding_parts(family, [b.weight.shape[1] for b in bases])
    return InversionResult(token=token, embedding=param.detach().float().cpu(), losses=losses, parts=parts)


def train_embedding(
    model,
    image: np.ndarray,
    text: str,
    *,
    settings: InversionSettings | None = None,
    report: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    canvas_side: int | None = None,
) -> InversionResult:
    """Learn one embedding for an RGBA layer image and its text (no cache); the shared model is
    left exactly as it was. For tests, benchmarks and tools; `appearance_tokens` is the normal way.
    `canvas_side`: the longer side of the canvas the layer sits on (default: the image's)."""
    settings = settings or recipe.DEFAULT_SETTINGS
    settings.check()
    pipe, family = model.pipeline, model.family
    size = resolved_resolution(pipe, settings)
    side = int(canvas_side or max(image.shape[:2]))
    key = cache_key(model.identity, image, text, settings, size, family.id, side)
    token = placeholder_tokens([key], pipe.tokenizer.get_vocab())[key]
    init = initial_embedding(pipe, text, family)
    with added_tokens(pipe, [token], init[None], family) as (ids, _embeddings):
        return _train(
            model, token, ids[0], image, text, init, settings, report or (lambda p: None), cancel, side
        )
