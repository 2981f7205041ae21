"""Self-attention modulation inside the layers' masks (after DenseDiffusion, Kim et al. 2023).

Cross-attention decides which words a pixel reads; self-attention decides which pixels it
takes its features from, and a patch that reads mostly from its neighbours outside the mask
lets an object spread or dissolve. In every self-attention layer (``attn1``), on the
conditional rows of the CFG batch only, the scores S[b, h, p, q] get

    S[b, h, p, q] += w * g(sigma) * sum_k s_k(p) s_k(q)

with s_k the segments (the steered layers' visible masks and the rest of the image,
area-averaged to the level; they sum to 1) and g the masked-attention schedule. Pixel pairs in
the same segment are pulled together by up to w·g(σ); pairs in different segments lose that
much relative to them (softmax ignores a constant per row, so "+w same, -w across" is this bias
shifted by a constant). The (P, P) bias is built once per level and scaled once per step; the
unconditional rows run without it (a separate SDPA call, so they keep the kernels that take no
mask). Levels past `MAX_MODULATED_PIXELS` are left plain (memory).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .attention import Schedule, get_schedule, project_heads, project_out
from .regional import level_masks

# Levels with more pixels than this run without the bias: its (P, P) matrix grows with the
# square of the level (SD 1.5 at 1024², 16,384 pixels: 0.5 GB in fp16) and keeps SDPA off its
# mask-free kernels; 4,096 (a 64² level) covers every level of SD 1.5 at 512² and of SDXL at
# 1024², and a high-resolution level sees the objects' shapes from the levels below anyway.
MAX_MODULATED_PIXELS = 4096


class SelfAttentionModulation:
    """The sampler hook: segment affinities per level; replaces the ``attn1`` processors."""

    def __init__(
        self,
        masks: dict[int, np.ndarray],
        weight: float,
        *,
        layers: list[int],
        cfg: bool,
        schedule: str | Schedule = "ediffi",
        device: torch.device | str = "cpu",
    ):
        self.layers = list(layers)
        self.weight = float(weight)
        self.cfg = cfg
        self.schedule = get_schedule(schedule)
        self.device = torch.device(device)
        self._affinity = {}
        for p, m in masks.items():
            if p > MAX_MODULATED_PIXELS:
                continue
            seg = torch.as_tensor(m, dtype=torch.float32, device=self.device)  # (n, P)
            seg = torch.cat([seg, (1.0 - seg.sum(0, keepdim=True)).clamp_min(0.0)])  # + the rest
            self._affinity[p] = seg.t() @ seg  # (P, P): sum_k s_k(p) s_k(q), in [0, 1]
        self._g = 0.0
        self._serial = 0
        self._cache: dict[tuple, tuple[int, torch.Tensor]] = {}
        self.processor = SelfAttnModulationProcessor(self)

    @contextlib.contextmanager
    def installed(self, unet) -> Iterator[SelfAttentionModulation]:
        saved = [
            (module, module.processor)
            for name, module in unet.named_modules()
            if name.endswith("attn1") and hasattr(module, "set_processor")
        ]
        try:
            for module, _ in saved:
                module.set_processor(self.processor)
            yield self
        finally:
            for module, processor in saved:
                module.set_processor(processor)

    def on_step(self, step) -> None:
        self._g = float(self.schedule(float(step.sigma)))
        self._serial += 1

    def bias(self, seq_len: int, dtype: torch.dtype, device) -> torch.Tensor | None:
        """(1, 1, P, P): this step's bias for the conditional rows (None: not a known level).

        One (P, P) matrix broadcast over batch and heads: its memory does not grow with variants.
        """
        affinity = self._affinity.get(seq_len)
        if affinity is None:
            return None
        key = (seq_len, dtype, str(device))
        found = self._cache.get(key)
        if found is None or found[0] != self._serial:
            found = (self._serial, (affinity.to(device) * (self.weight * self._g)).to(dtype)[None, None])
            self._cache[key] = found
        return found[1]

    def conditional_start(self, batch: int) -> int:
        return batch // 2 if self.cfg and batch % 2 == 0 else 0  # generate puts uncond first


def self_attention_hook(
    setup, weight: float = 1.0, schedule: str | Schedule = "ediffi"
) -> SelfAttentionModulation | None:
    """Build the self-attention modulation hook for one generation (a `core.generate` hook builder).

    The segments are the visible layers with an `attention_weight` > 0 and the rest of the
    image. Returns None when `weight` is 0 or no layer takes part (the plain path, untouched).
    """
    if weight < 0:
        raise ValueError(f"self_attention_weight must be >= 0, got {weight}")
    pick = [i for i, layer in enumerate(setup.flat.layers) if float(layer.attention_weight) > 0]
    if not pick or weight == 0:
        return None
    return SelfAttentionModulation(
        level_masks(setup, pick),
        weight,
        layers=pick,
        cfg=setup.collage.guidance_scale > 1.0,
        schedule=schedule,
        device=setup.model.device,
    )


class SelfAttnModulationProcessor:
    """`AttnProcessor2_0` with the segment bias as `attn_mask` on self-attention calls."""

    def __init__(self, hook: SelfAttentionModulation):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.hook = hook
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
        plain = (encoder_hidden_states is not None, attention_mask is not None, hidden_states.ndim != 3)
        bias = None
        if not any(plain):
            bias = self.hook.bias(hidden_states.shape[1], hidden_states.dtype, hidden_states.device)
        if bias is None:
            return self._plain(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch = hidden_states.shape[0]
        query, key, value = project_heads(attn, hidden_states, hidden_states)
        # The unconditional rows without a mask (SDPA's fastest kernel), the conditional ones with it.
        start = self.hook.conditional_start(batch)
        out = F.scaled_dot_product_attention(query[start:], key[start:], value[start:], attn_mask=bias)
        if start:
            plain = F.scaled_dot_product_attention(query[:start], key[:start], value[:start])
            out = torch.cat([plain, out])
        out = project_out(attn, out, query.dtype)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
