"""The sampler hook: runs the ControlNet at each step in the guidance range and multiplies every
residual by the weight map W at the residual's own resolution (`controlnet_hook`, `ControlNetHook`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from ..compositing import area_resize
from ..models import ModelLoadError
from .images import CannyDetector, ControlDetector, control_image, weight_map
from .loading import LoadedControlNet, compatibility_problem


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
            # The hook passes its own control image tensor at every step: the same object means
            # the same input, and checking identity needs no comparison (nor, on a GPU, a sync).
            if hit is not None and hit[0] is cond:
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
    from ..schedulers import make_scheduler

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
            dict(controlnet.controlnet.config),
            dict(setup.model.pipeline.unet.config),
            getattr(setup.model, "family", None),
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
