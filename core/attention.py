"""Masked cross-attention per layer: eDiff-I's "paint with words" (algorithm.md §1).

In every cross-attention layer of the U-Net (diffusers' ``attn2``), for the conditional half of the
classifier-free-guidance batch only, layer i's tokens get an additive bias on their pre-softmax
scores S (batch, heads, pixels, tokens):

    S[b, h, p, t in tokens(i)] += g(sigma) * max_i[b, h] * (w_i * m_i(p) - nw * (1 - m_i(p)))

with w_i the layer's `attention_weight`, m_i its visible mask at that attention resolution, g a
noise schedule (large at high noise, small at low noise), max_i[b, h] the per-head maximum of
S[b, h, :, tokens(i)] and nw an optional negative weight outside the mask (0 by default).

The bias goes into PyTorch's `scaled_dot_product_attention` as its additive float `attn_mask`, so
no hand-written softmax is involved. The parts of the bias that do not depend on the attention
layer (masks × weights × token one-hots, per resolution) are built once per generation and scaled
by g(sigma) once per step, on first use at each resolution; per attention layer only the per-head
maxima are computed (over the few layer tokens) and contracted with them in one matrix product.
See docs/attention.md for the measurements behind the choices.

Use it as a sampler hook of `core.generate.generate`:

    generate(model, collage, hooks=[masked_attention_hook])

`masked_attention_hook` returns None when no layer has a weight > 0 and tokens, so the plain path
then runs untouched (outputs identical to no hook).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .compositing import mask_pyramid, unet_feature_sizes

log = logging.getLogger(__name__)

Schedule = Callable[[float], float]


def g_ediffi(sigma: float) -> float:
    """eDiff-I's paint-with-words schedule: log(1 + sigma)."""
    return math.log1p(sigma)


def g_collage(sigma: float) -> float:
    """The Collage Diffusion code's schedule: log(log(sigma + 1.01) + 1) (gentler than eDiff-I's).

    Increasing in sigma, about 0.01 at sigma = 0 and about 1.3 at SD's largest sigma (~14.6).
    """
    return math.log(math.log(sigma + 1.01) + 1.0)


SCHEDULES: dict[str, Schedule] = {"ediffi": g_ediffi, "collage": g_collage}
MAX_SCORE_MODES = ("exact", "bound")
_BIAS_ALIGN = 16  # token columns of the bias buffer are padded to a multiple of this


def get_schedule(schedule: str | Schedule) -> Schedule:
    """A schedule by name (see `SCHEDULES`) or the callable itself."""
    if callable(schedule):
        return schedule
    try:
        return SCHEDULES[schedule]
    except KeyError:
        raise ValueError(
            f"unknown attention schedule {schedule!r}; use one of {', '.join(SCHEDULES)}"
        ) from None


@dataclass
class _Factors:
    """What the bias needs at one resolution and call shape, apart from the queries and keys.

    `template_unit` does not change during a generation and is built once, on first use;
    `template` is it times this step's g(sigma), refreshed on the first call of each step. Per
    attention call only the per-head maxima are computed and contracted with `template`.
    Only the token columns [c0, c1) that hold some layer's tokens are ever non-zero, so the
    template and the per-call product cover that window only (a few of the 77 columns).
    """

    template_unit: torch.Tensor  # (n, P * w): scale * (w_i m_i(p) - nw (1 - m_i(p))) * [c0 + c in tokens(i)]
    window: tuple[int, int]  # (c0, c1): the token columns the layers' tokens fall in; w = c1 - c0
    cols: torch.Tensor  # (n * s,) long: layer i's tokens at [i * s, (i + 1) * s), padded by repeating
    start: int  # first batch row of the conditional half (0 without CFG)
    masks: torch.Tensor  # (n, P) float32: the masks themselves (recording only)
    onehot: torch.Tensor  # (n, L) float32: [t in tokens(i)] (recording only)
    bias: torch.Tensor  # (B, H, P, L): view of a zeroed (B, H, P, Lp) buffer, Lp = L rounded up to 16
    bias_window: torch.Tensor  # (B - start, H, P, w): the part of `bias` that each call rewrites
    template: torch.Tensor | None = None  # template_unit * g(sigma) of step `step`
    step: int = -1


@dataclass
class AttentionRecord:
    """One cross-attention call seen while recording (conditional half, averaged over batch and heads)."""

    step: int
    seq_len: int  # pixels at this resolution (h * w)
    inside: torch.Tensor  # (n,) share of layer i's token attention that falls inside m_i
    max_score: torch.Tensor  # (n,) the per-head max scores of layer i's tokens, averaged


class MaskedCrossAttention:
    """The sampler hook: holds the layer masks per resolution and installs the processor.

    Build it with `masked_attention_hook`. `layers` are the indices (into ``flat.layers``) of the
    layers that take part, in the order of the masks and weights here.
    """

    def __init__(
        self,
        masks: dict[int, np.ndarray],
        spans: list[list[int]],
        weights: list[float],
        *,
        layers: list[int],
        cfg: bool,
        schedule: str | Schedule = "ediffi",
        negative_weight: float = 0.0,
        max_score: str = "exact",
        record: bool = False,
        apply_bias: bool = True,
        device: torch.device | str = "cpu",
    ):
        if max_score not in MAX_SCORE_MODES:
            raise ValueError(f"max_score must be one of {MAX_SCORE_MODES}, got {max_score!r}")
        if negative_weight < 0:
            raise ValueError(f"negative_weight must be >= 0, got {negative_weight}")
        if not (len(spans) == len(weights) == len(layers)):
            raise ValueError("spans, weights and layers must have one entry per layer")
        self.layers = list(layers)
        self.spans = [list(s) for s in spans]
        self.weights = torch.tensor(weights, dtype=torch.float32, device=device)
        self.cfg = cfg
        self.schedule = get_schedule(schedule)
        self.negative_weight = float(negative_weight)
        self.max_score = max_score
        self.record = record
        self.apply_bias = apply_bias
        self.records: list[AttentionRecord] = []
        self.device = torch.device(device)
        # Masks (n, P) per sequence length P = h * w of each attention resolution.
        self._masks = {
            p: torch.as_tensor(m, dtype=torch.float32, device=self.device) for p, m in masks.items()
        }
        self._g = 0.0
        self._step = -1  # index of the step within its batch (for the records)
        self._step_serial = 0  # counts every step of the generation, across batches of variants
        self._cache: dict[tuple, _Factors] = {}
        self._warned: set[int] = set()
        self.processor = MaskedCrossAttnProcessor(self)

    # --- the SamplerHook protocol ---

    @contextlib.contextmanager
    def installed(self, unet) -> Iterator[MaskedCrossAttention]:
        """Put the masked processor on every cross-attention (``attn2``) layer for the duration.

        Their previous processors are put back on exit, also when the generation fails or is
        cancelled: the model object is shared by jobs. Self-attention (``attn1``) is not touched.
        """
        saved = [
            (module, module.processor)
            for name, module in unet.named_modules()
            if name.endswith("attn2") and hasattr(module, "set_processor")
        ]
        try:
            for module, _ in saved:
                module.set_processor(self.processor)
            yield self
        finally:
            for module, processor in saved:
                module.set_processor(processor)

    def on_step(self, step) -> None:
        """Take the step's noise level; each resolution's template is rescaled on first use."""
        self._g = float(self.schedule(float(step.sigma))) if self.apply_bias else 0.0
        self._step = step.index
        self._step_serial += 1

    # --- used by the processor ---

    def factors(
        self, seq_len: int, n_tokens: int, batch: int, heads: int, scale: float, dtype: torch.dtype, device
    ) -> _Factors | None:
        """The bias factors at the resolution with `seq_len` pixels (None: not a known one).

        Built on first use per shape, scaled by the step's g(sigma) on the first call of each step;
        every attention layer of that shape then reuses them.
        """
        key = (seq_len, n_tokens, batch, heads, scale, dtype)
        found = self._cache.get(key)
        if found is None:
            found = self._build(key, device)
            if found is None:
                return None
        if found.step != self._step_serial:
            found.template = found.template_unit * self._g
            found.step = self._step_serial
        return found

    def _build(self, key: tuple, device) -> _Factors | None:
        seq_len, n_tokens, batch, heads, scale, dtype = key
        masks = self._masks.get(seq_len)
        if masks is None:
            if seq_len not in self._warned:
                self._warned.add(seq_len)
                log.warning("masked attention: no masks for %d pixels; that layer runs unbiased", seq_len)
            return None
        masks = masks.to(device)
        weights = self.weights.to(device)[:, None]
        profile = weights * masks
        if self.negative_weight:
            profile = profile - (weights > 0) * self.negative_weight * (1.0 - masks)
        n = len(self.spans)
        groups = [[t for t in span if t < n_tokens] for span in self.spans]
        tokens = sorted({t for group in groups for t in group})
        if not tokens:
            return None
        c0, c1 = tokens[0], tokens[-1] + 1
        onehot = torch.zeros(n, n_tokens, device=device)
        for i, group in enumerate(groups):
            onehot[i, group] = 1.0
        # Equal-size token groups (a layer's tokens repeated; a max does not mind), so that the
        # per-layer max is one reduction over a (n, s * P) view.
        size = max(len(group) for group in groups)
        cols = [group[j % len(group)] if group else c0 for group in groups for j in range(size)]
        template = profile[:, :, None] * onehot[:, None, c0:c1] * scale
        start = batch // 2 if self.cfg and batch % 2 == 0 else 0  # generate puts uncond first
        # Token columns padded to a multiple of 16: a bias sliced from such a buffer has the memory
        # alignment CUDA's memory-efficient SDPA kernel needs; else SDPA pads (copies) every call.
        padded = -(-n_tokens // _BIAS_ALIGN) * _BIAS_ALIGN
        buffer = torch.zeros(batch, heads, seq_len, padded, device=device, dtype=dtype)
        found = _Factors(
            template_unit=template.reshape(n, -1).to(dtype),
            window=(c0, c1),
            cols=torch.tensor(cols, dtype=torch.long, device=device),
            start=start,
            masks=masks,
            onehot=onehot,
            bias=buffer[..., :n_tokens],
            bias_window=buffer[start:, :, :, c0:c1],
        )
        self._cache[key] = found
        return found

    def mass_inside(self) -> np.ndarray:
        """Recorded share of each layer's token attention inside its mask, averaged over calls (n,)."""
        if not self.records:
            raise RuntimeError("nothing recorded: build the hook with record=True and run a generation")
        return torch.stack([r.inside for r in self.records]).mean(0).numpy()


def masked_attention_hook(
    setup,
    schedule: str | Schedule = "ediffi",
    negative_weight: float = 0.0,
    *,
    max_score: str = "exact",
    record: bool = False,
    record_only: bool = False,
) -> MaskedCrossAttention | None:
    """Build the masked cross-attention hook for one generation (a `core.generate` hook builder).

    Returns None when no layer has both tokens and an `attention_weight` > 0, so that the plain
    path runs untouched. `record=True` keeps, per cross-attention call, the share of each layer's
    token attention inside its mask (an explicit softmax, computed only when recording);
    `record_only=True` records the same numbers without adding any bias (every layer with tokens
    takes part, whatever its weight), which is the "without" side of a comparison.
    """
    flat, spans = setup.flat, setup.spans.spans
    pick = [
        i
        for i, layer in enumerate(flat.layers)
        if spans[i] and (record_only or float(layer.attention_weight) > 0)
    ]
    if not pick:
        return None
    unet = setup.model.pipeline.unet
    h, w = setup.latent_size
    sizes = unet_feature_sizes(h, w, len(unet.config.block_out_channels))
    pyramid = mask_pyramid(flat.masks, sizes)
    masks = {sh * sw: pyramid[(sh, sw)].layers[pick].reshape(len(pick), sh * sw) for sh, sw in sizes}
    return MaskedCrossAttention(
        masks,
        [spans[i] for i in pick],
        [float(flat.layers[i].attention_weight) for i in pick],
        layers=pick,
        cfg=setup.collage.guidance_scale > 1.0,
        schedule=schedule,
        negative_weight=negative_weight,
        max_score=max_score,
        record=record or record_only,
        apply_bias=not record_only,
        device=setup.model.device,
    )


def project_heads(attn, hidden_states: torch.Tensor, context: torch.Tensor):
    """Query from `hidden_states`, key and value from `context` (the same tensor for
    self-attention), each (B, heads, N, head_dim), with `attn`'s query/key norms: the projection
    every processor here shares with diffusers' `AttnProcessor2_0`."""
    batch = hidden_states.shape[0]
    query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def project_out(attn, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, heads, N, head_dim) attention output → `attn`'s output projection, (B, N, C)."""
    batch, heads, _, head_dim = out.shape
    out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(dtype)
    return attn.to_out[1](attn.to_out[0](out))


def layer_max_scores(
    query: torch.Tensor, key: torch.Tensor, factors: _Factors, mode: str = "exact"
) -> torch.Tensor:
    """Per (batch, head, layer) max over all pixels of the layer's tokens' raw scores q·k: (B, H, n).

    Not multiplied by the attention scale (the template carries it). "exact" computes
    K[tokens] @ Q^T over the layer tokens only (a few of the 77), "bound" uses
    max_p ||q_p|| * max_t ||k_t||, an upper bound that needs no product. A negative max would turn
    the bias around (pushing the tokens out of their mask), so the result is at least 0.
    """
    batch, heads = query.shape[:2]
    n = factors.onehot.shape[0]
    k_sel = key.index_select(2, factors.cols)  # (B, H, n * s, d)
    if mode == "exact":
        # (B, H, n * s, P): reduced over each layer's s * P contiguous entries at once.
        per_layer = torch.matmul(k_sel, query.transpose(-1, -2)).view(batch, heads, n, -1).amax(-1)
    else:
        k_norm = torch.linalg.vector_norm(k_sel, dim=-1).view(batch, heads, n, -1).amax(-1)
        per_layer = k_norm * torch.linalg.vector_norm(query, dim=-1).amax(dim=-1, keepdim=True)
    return per_layer.clamp_min(0.0)


def layer_bias(max_scores: torch.Tensor, factors: _Factors) -> torch.Tensor:
    """The bias's token window (B, H, P, w) from the per-head maxima (B, H, n) and this step's template.

    bias[b, h, p, c0 + c] = sum_i max[b, h, i] * template[i, p, c]: one matrix product
    (B * H, n) @ (n, P * w); every column outside the window is 0.
    """
    batch, heads, n = max_scores.shape
    window = torch.mm(max_scores.view(batch * heads, n), factors.template)
    return window.view(batch, heads, -1, factors.window[1] - factors.window[0])


class MaskedCrossAttnProcessor:
    """`AttnProcessor2_0` with the layer bias as `attn_mask` on cross-attention calls.

    Self-attention calls (no encoder states) go to a stock `AttnProcessor2_0`, although the hook
    only installs this on ``attn2`` layers.
    """

    def __init__(self, hook: MaskedCrossAttention):
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
        if encoder_hidden_states is None:
            return self._plain(attn, hidden_states, None, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, seq_len, _ = hidden_states.shape
        n_tokens = encoder_hidden_states.shape[1]

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, n_tokens, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query, key, value = project_heads(attn, hidden_states, encoder_hidden_states)

        hidden_states = self._attend(attn, query, key, value, attention_mask, seq_len, n_tokens)
        hidden_states = project_out(attn, hidden_states, query.dtype)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _attend(self, attn, query, key, value, attention_mask, seq_len: int, n_tokens: int) -> torch.Tensor:
        hook = self.hook
        # SDPA's default scale, as `AttnProcessor2_0` uses (it does not pass attn.scale either).
        batch, heads, _, head_dim = query.shape
        scale = head_dim**-0.5
        factors = hook.factors(seq_len, n_tokens, batch, heads, scale, query.dtype, query.device)
        if factors is None:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        start = factors.start  # only the conditional half gets a bias
        q_c, k_c = query[start:], key[start:]
        max_scores = layer_max_scores(q_c, k_c, factors, hook.max_score)
        bias = None
        if hook.apply_bias:
            window = layer_bias(max_scores, factors)
            if torch.is_grad_enabled():  # (a shared buffer must not be saved for a backward pass)
                c0, c1 = factors.window
                bias = F.pad(window, (c0, n_tokens - c1, 0, 0, 0, 0, start, 0))
            else:  # into the conditional rows of a zeroed buffer, whose other columns stay 0
                factors.bias_window.copy_(window)
                bias = factors.bias
        if hook.record:
            self._record(q_c, k_c, None if bias is None else bias[start:], max_scores, factors, scale)
        if attention_mask is not None:
            bias = attention_mask if bias is None else bias + attention_mask
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias)

    def _record(self, q_c, k_c, bias_c, max_scores, factors, scale) -> None:
        """Explicit softmax of the conditional half (recording only, never the fast path)."""
        scores = torch.matmul(q_c.float(), k_c.float().transpose(-1, -2)) * scale
        if bias_c is not None:
            scores = scores + bias_c.float()
        probs = scores.softmax(-1)  # (B, H, P, L)
        per_layer = torch.matmul(probs, factors.onehot.t())  # (B, H, P, n): each layer's tokens
        total = per_layer.sum(2)  # (B, H, n)
        inside = (per_layer * factors.masks.t()).sum(2)
        share = (inside / total.clamp_min(1e-30)).mean((0, 1))
        self.hook.records.append(
            AttentionRecord(
                self.hook._step, probs.shape[2], share.cpu(), (max_scores.float() * scale).mean((0, 1)).cpu()
            )
        )
