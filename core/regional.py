"""Regional conditioning ("attention couple"): each layer's pixels attend to the layer's own text.

Paint with words (core/attention.py) only moves attention between the words of one prompt. Here
every steered layer i also gets its own context c_i: its text encoded on its own, followed by the
whole-image prompt ("red circle, a red circle and a blue square on grass"), so its pixels read
mainly about its object. In every cross-attention layer (``attn2``), on the conditional rows of
the CFG batch only (the negative prompt stays global):

    out(p) = base(p) + sum_i r_i * m_i(p) * (attn(q(p), c_i) - base(p))

with `base` the output of whatever processor was installed before (the masked-attention one when
that is on, else stock), m_i the layer's visible mask at that level (area-averaged: the visible
masks and the background's sum to 1) and r_i = regional weight × min(1, the layer's
`attention_weight`). Where no layer's mask reaches, the output is `base` exactly.

attn(q, c_i) carries the paint-with-words bias too, on the layer's own words at the start of c_i
inside m_i (same weight and schedule as core/attention.py): without it the pixels inside a mask
lose the push towards their words that `base` had, and on the demo model accuracy fell below
paint with words alone (docs/attention.md). With `own_bias=False` all layers' contexts go
through one batched, unbiased attention call (a region-major batch); with it, one call per layer.
The output projection is affine, so mixing after it equals mixing the attention outputs before it.
See docs/attention.md for the measurements.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from .attention import MaskedCrossAttention, Schedule
from .compositing import mask_pyramid, unet_feature_sizes
from .tokens import token_spans


def level_masks(setup, pick: list[int]) -> dict[int, np.ndarray]:
    """Visible masks (len(pick), P) of the picked layers at each U-Net level, keyed by P = h * w."""
    unet = setup.model.pipeline.unet
    h, w = setup.latent_size
    sizes = unet_feature_sizes(h, w, len(unet.config.block_out_channels))
    pyramid = mask_pyramid(setup.flat.masks, sizes)
    return {sh * sw: pyramid[(sh, sw)].layers[pick].reshape(len(pick), sh * sw) for sh, sw in sizes}


def region_prompt(text: str, prompt: str) -> str:
    """A layer's own prompt: its words first, then the whole-image prompt for context."""
    text, prompt = " ".join(text.split()), prompt.strip()
    return f"{text}, {prompt}" if prompt else text


class RegionalConditioning:
    """The sampler hook: the layers' contexts and masks; wraps the ``attn2`` processors."""

    def __init__(
        self,
        contexts: list[torch.Tensor],
        masks: dict[int, np.ndarray],
        weights: list[float],
        *,
        layers: list[int],
        cfg: bool,
        own_bias: list[MaskedCrossAttention] | None = None,
        device: torch.device | str = "cpu",
    ):
        if not (len(contexts) == len(weights) == len(layers)) or not contexts:
            raise ValueError("contexts, weights and layers must have one entry per layer (at least one)")
        self.layers = list(layers)
        self.cfg = cfg
        self.device = torch.device(device)
        self.contexts = [c.to(self.device) for c in contexts]  # each (1, L_i, D)
        w = torch.tensor(weights, dtype=torch.float32, device=self.device)[:, None]
        # r_i * m_i(p) per level: (n, P, 1), ready to broadcast over the channels.
        self._masks = {
            p: (torch.as_tensor(m, dtype=torch.float32, device=self.device) * w)[..., None]
            for p, m in masks.items()
        }
        self._same_length = len({c.shape[1] for c in self.contexts}) == 1
        self._stacked = torch.cat(self.contexts) if self._same_length else None
        self.own_bias = own_bias  # per layer: the masked bias on its own words in its own context

    @contextlib.contextmanager
    def installed(self, unet) -> Iterator[RegionalConditioning]:
        """Wrap every ``attn2`` processor (the one installed now, e.g. masked attention's) for
        the generation; the previous ones are put back on exit, also on error or cancel."""
        saved = [
            (module, module.processor)
            for name, module in unet.named_modules()
            if name.endswith("attn2") and hasattr(module, "set_processor")
        ]
        try:
            for module, processor in saved:
                module.set_processor(RegionalAttnProcessor(self, processor))
            yield self
        finally:
            for module, processor in saved:
                module.set_processor(processor)

    def on_step(self, step) -> None:
        for hook in self.own_bias or ():
            hook.on_step(step)

    def masks_for(self, seq_len: int, dtype: torch.dtype) -> torch.Tensor | None:
        found = self._masks.get(seq_len)
        return None if found is None else found.to(dtype)


def regional_hook(
    setup, weight: float = 1.0, schedule: str | Schedule = "ediffi", own_bias: bool = True
) -> RegionalConditioning | None:
    """Build the regional-conditioning hook for one generation (a `core.generate` hook builder).

    Every visible layer with words and an `attention_weight` > 0 takes part. Returns None when
    none does or `weight` is 0, so the plain path runs untouched.
    """
    if weight < 0:
        raise ValueError(f"regional_weight must be >= 0, got {weight}")
    flat, model = setup.flat, setup.model
    pick = [
        i for i, layer in enumerate(flat.layers) if layer.text.strip() and float(layer.attention_weight) > 0
    ]
    if not pick or weight == 0:
        return None
    pipe, collage = model.pipeline, setup.collage
    size = (collage.height, collage.width)
    prompts = [region_prompt(flat.layers[i].text, collage.prompt) for i in pick]
    contexts = [model.family.encode_prompt(pipe, p, None, model.device, False, size).cond for p in prompts]
    weights = [weight * min(1.0, float(flat.layers[i].attention_weight)) for i in pick]
    masks = level_masks(setup, pick)
    biases = None
    if own_bias:
        biases = []
        for k, (i, p) in enumerate(zip(pick, prompts, strict=True)):
            span = token_spans(pipe.tokenizer, p, [flat.layers[i].text]).spans[0]  # its words, first
            biases.append(
                MaskedCrossAttention(
                    {size_: m[k : k + 1] for size_, m in masks.items()},
                    [span],
                    [float(flat.layers[i].attention_weight)],
                    layers=[i],
                    cfg=False,  # it only ever sees the conditional rows
                    schedule=schedule,
                    device=model.device,
                )
            )
    return RegionalConditioning(
        contexts,
        masks,
        weights,
        layers=pick,
        cfg=collage.guidance_scale > 1.0,
        own_bias=biases,
        device=model.device,
    )


class RegionalAttnProcessor:
    """Runs the wrapped processor, then mixes in each layer's own-context attention by its mask."""

    def __init__(self, hook: RegionalConditioning, inner):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.hook = hook
        self.inner = inner
        self._plain = AttnProcessor2_0()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        base = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if encoder_hidden_states is None or hidden_states.ndim != 3:
            return base
        hook = self.hook
        batch, seq_len, _ = hidden_states.shape
        masks = hook.masks_for(seq_len, base.dtype)
        if masks is None:
            return base
        start = batch // 2 if hook.cfg and batch % 2 == 0 else 0  # generate puts uncond first
        rows = hidden_states[start:]
        n, b = len(hook.contexts), rows.shape[0]
        dtype = encoder_hidden_states.dtype
        if hook.own_bias is not None:  # each layer's own words biased inside its mask
            own = torch.stack(
                [
                    bias.processor(attn, rows, c.to(dtype).expand(b, -1, -1), None, temb)
                    for bias, c in zip(hook.own_bias, hook.contexts, strict=True)
                ]
            )
        elif hook._stacked is not None:  # one attention call, region-major batch (n * b)
            context = hook._stacked.to(dtype).repeat_interleave(b, 0)
            own = self._plain(attn, rows.repeat(n, 1, 1), context, None, temb).view(n, b, seq_len, -1)
        else:  # contexts of different lengths (long prompts): one call per layer
            own = torch.stack(
                [self._plain(attn, rows, c.to(dtype).expand(b, -1, -1), None, temb) for c in hook.contexts]
            )
        cond = base[start:]
        mixed = cond + (masks[:, None] * (own - cond)).sum(0)
        return torch.cat([base[:start], mixed]) if start else mixed
