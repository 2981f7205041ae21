"""Training-free appearance: masked reference attention per layer (``appearance: "reference"``
with `EngineOptions.reference_attention`; the mode's default mechanism is core/anchor.py).

The "reference-only" idea, restricted to a layer's region. The reference image is the flattened
collage (inside a layer's visible mask its pixels are the layer's own, exactly aligned), VAE-encoded
once. At each step it is put on the SDEdit path of each variant's own noise, sqrt(a) z + sqrt(1 - a)
eps (the variance-preserving form every scheduler feeds the U-Net), and run through the same U-Net
in one extra pass with the main call's rows and conditioning. That pass stores, in every
self-attention (``attn1``) layer, the keys and values at each reference layer's pixels (visible
mask > 0.5 at that resolution); one pass serves every reference layer.

In the main pass, the self-attention queries inside layer i's visible mask m_i attend to
[the image's own keys ; layer i's reference keys], the reference logits shifted by log(w_i)
(w_i = `appearance_weight`: 1 treats the reference pixels like more pixels of the image, 2 as
if each counted twice). The result is blended in by the soft mask:

    out(p) = plain(p) + m_i(p) * (with_reference_i(p) - plain(p))

and at every query outside all masks the output is the stock `AttnProcessor2_0`'s, computed by
the same operations (byte-identical at attention level). Both halves of the guidance batch get
it. A layer of weight 0 takes no part; with none, the hook is None and the plain path runs.

See docs/appearance.md for the measurements behind the defaults.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .attention import project_heads, project_out
from .collage import appearance_mode
from .compositing import mask_pyramid, unet_feature_sizes


class ReferenceAttention:
    """The sampler hook: reference latents, masks per resolution, and the key/value bank.

    `query_masks[P]` is (n, P) float (the layers' visible masks at the resolution with P pixels);
    `key_masks[P]` is (n, P) bool (where the visible mask is > 0.5). `z_ref` is the (1, C, h, w)
    reference latents. `end` is the fraction of the
    schedule (by timestep, from pure noise) during which references act; later steps run plain.
    """

    def __init__(
        self,
        z_ref: torch.Tensor,
        query_masks: dict[int, torch.Tensor],
        key_masks: dict[int, torch.Tensor],
        weights: list[float],
        *,
        layers: list[int],
        end: float = 1.0,
        conditional_only: bool = False,
        train_timesteps: int = 1000,
    ):
        if len(weights) != len(layers) or z_ref.shape[0] != 1:
            raise ValueError("weights and layers need one entry per layer, and there is one reference image")
        if not 0.0 <= end <= 1.0:
            raise ValueError(f"reference end must be in 0..1, got {end}")
        self.z_ref = z_ref
        self._eps: torch.Tensor | None = None
        self.layers = list(layers)
        self.weights = [float(w) for w in weights]
        self.log_weights = [math.log(w) for w in self.weights]
        self.query_masks = query_masks
        self.key_masks = key_masks
        # Query positions (inside a mask) per resolution and layer, and their mask values.
        self._inside = {p: [(m > 0).nonzero().flatten() for m in masks] for p, masks in query_masks.items()}
        self.end = end
        # Only the guidance batch's conditional half reads the reference, so guidance amplifies it.
        self.conditional_only = conditional_only
        self.cfg = True  # whether the main batch has an unconditional half (set by the builder)
        self.train_timesteps = train_timesteps
        self.mode = "off"  # "write" during the reference pass, "read" during the main pass
        self.bank: dict[int, list[tuple[torch.Tensor, torch.Tensor] | None]] = {}
        self._sigma = 0.0
        self._active = False
        # Self-attention modulation (core/self_attention.py) for the same generation, if on: both
        # need the attn1 processors, so this processor applies its bias too.
        self.modulation = None
        self.processor = ReferenceSelfAttnProcessor(self)

    # --- the SamplerHook protocol ---

    @contextlib.contextmanager
    def installed(self, unet) -> Iterator[ReferenceAttention]:
        """Put the reference processor on every self-attention (``attn1``) layer for the duration;
        the previous processors come back on exit (also on error or cancel)."""
        saved = [
            (module, module.processor)
            for name, module in unet.named_modules()
            if name.endswith("attn1") and hasattr(module, "set_processor")
        ]
        self._unet = unet
        try:
            for module, _ in saved:
                module.set_processor(self.processor)
            yield self
        finally:
            for module, processor in saved:
                module.set_processor(processor)
            self.bank.clear()
            self.mode = "off"

    def on_step(self, step) -> None:
        if self.modulation is not None:
            self.modulation.on_step(step)
        self._sigma = float(step.sigma)
        self._active = float(step.timestep) >= (1.0 - self.end) * self.train_timesteps - 1e-6
        if step.index == 0:
            self._eps = None  # a new batch of variants: its noise is read from its first input
        self.mode = "off"

    def unet_kwargs(self, model_input, timestep, embeds, added_cond_kwargs) -> dict:
        """Run the reference pass (filling the bank); the main call then reads it. Adds no argument.

        The reference input is the flattened collage on the SDEdit path of each variant's own
        noise: sqrt(a) z_ref + sqrt(1 - a) eps, eps read off the first step's input (which is
        exactly that). With another noise the references' features at a small layer are
        dominated by noise that is not the image's (measured: far worse, docs/appearance.md).
        """
        self.bank.clear()
        if not self._active:
            self.mode = "off"
            return {}
        alpha_bar = 1.0 / (1.0 + self._sigma**2)
        z_ref = self.z_ref.to(model_input)
        if self._eps is None:
            self._eps = (model_input - z_ref * alpha_bar**0.5) / (1 - alpha_bar) ** 0.5
        z = z_ref * alpha_bar**0.5 + self._eps * (1 - alpha_bar) ** 0.5
        self.mode = "write"
        try:
            self._unet(z, timestep, encoder_hidden_states=embeds, added_cond_kwargs=added_cond_kwargs)
        finally:
            self.mode = "read"
        return {}


def reference_layers(flat) -> list[int]:
    """Indices (in `flat.layers`) of the layers with ``appearance: "reference"`` and a weight > 0."""
    return [
        i
        for i, layer in enumerate(flat.layers)
        if appearance_mode(layer.appearance) == "reference" and float(layer.appearance_weight) > 0
    ]


def reference_attention_hook(
    setup,
    *,
    end: float = 1.0,
    conditional_only: bool = False,
    self_attention_weight: float = 0.0,
    schedule: str = "ediffi",
) -> ReferenceAttention | None:
    """Build the hook for one generation (a `core.generate` hook builder); None when no layer has
    ``appearance: "reference"`` with an `appearance_weight` > 0. With `self_attention_weight` > 0
    it also applies self-attention modulation (`core.self_attention`) on the main pass."""
    from .generate import VaeCodec, image_to_tensor  # generate does not import us

    flat, model = setup.flat, setup.model
    pick = reference_layers(flat)
    if not pick:
        return None
    pipe, device, dtype = model.pipeline, model.device, model.dtype
    # One reference image for all layers: the flattened collage, whose pixels in a layer's visible
    # mask are the layer's own (exactly aligned, and one row of extra batch whatever their number).
    vae = VaeCodec(pipe.vae, model.family.vae_needs_upcast(pipe.vae, dtype), dtype)
    z_ref = vae.encode(image_to_tensor(flat.image, device, dtype))
    unet = pipe.unet
    lh, lw = setup.latent_size
    sizes = unet_feature_sizes(lh, lw, len(unet.config.block_out_channels))
    pyramid = mask_pyramid(flat.masks, sizes)
    query_masks, key_masks = {}, {}
    for sh, sw in sizes:
        masks = torch.as_tensor(
            pyramid[(sh, sw)].layers[pick].reshape(len(pick), sh * sw), dtype=torch.float32, device=device
        )
        query_masks[sh * sw] = masks
        key_masks[sh * sw] = masks > 0.5
    hook = ReferenceAttention(
        z_ref,
        query_masks,
        key_masks,
        [float(flat.layers[i].appearance_weight) for i in pick],
        layers=pick,
        end=end,
        conditional_only=conditional_only,
        train_timesteps=int(getattr(pipe.scheduler.config, "num_train_timesteps", 1000)),
    )
    hook.cfg = setup.collage.guidance_scale > 1.0
    if self_attention_weight:
        from .self_attention import self_attention_hook

        hook.modulation = self_attention_hook(setup, weight=self_attention_weight, schedule=schedule)
    return hook


class ReferenceSelfAttnProcessor:
    """`AttnProcessor2_0` for self-attention that writes or reads the reference bank.

    Cross-attention calls, calls with an attention mask and resolutions without masks run the
    stock computation unchanged.
    """

    def __init__(self, hook: ReferenceAttention):
        self.hook = hook

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
        hook = self.hook
        special = encoder_hidden_states is not None or attention_mask is not None
        if special or hook.mode == "off":
            if hook.modulation is not None:
                return hook.modulation.processor(
                    attn, hidden_states, encoder_hidden_states, attention_mask, temb
                )
            from diffusers.models.attention_processor import AttnProcessor2_0

            return AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, seq_len, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, key, value = project_heads(attn, hidden_states, hidden_states)

        # The main pass takes the modulation's bias on its conditional rows (the reference pass
        # reads the reference image as it is).
        modulation = hook.modulation if hook.mode == "read" else None
        bias = modulation.bias(seq_len, query.dtype, query.device) if modulation is not None else None
        start = modulation.conditional_start(batch_size) if bias is not None else 0
        out = F.scaled_dot_product_attention(query[start:], key[start:], value[start:], attn_mask=bias)
        if start:
            out = torch.cat([F.scaled_dot_product_attention(query[:start], key[:start], value[:start]), out])
        if hook.mode == "write":
            self._store(attn, key, value, seq_len)
        else:
            out = self._read(attn, query, key, value, out, seq_len, bias, start)

        out = project_out(attn, out, query.dtype)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _store(self, attn, key: torch.Tensor, value: torch.Tensor, seq_len: int) -> None:
        """Keep the reference rows' keys and values at layer j's pixels: (B, H, n_j, d) each, or None."""
        masks = self.hook.key_masks.get(seq_len)
        if masks is None:
            return
        entries: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for mask in masks:
            idx = mask.nonzero().flatten()
            entries.append((key[:, :, idx], value[:, :, idx]) if len(idx) else None)
        self.hook.bank[id(attn)] = entries

    def _read(
        self, attn, query, key, value, out: torch.Tensor, seq_len: int, own_bias=None, start: int = 0
    ) -> torch.Tensor:
        """Inside each layer's mask: attention over [own keys ; its reference keys], blended in by
        the soft mask. Every other query's row of `out` is left as it is."""
        hook = self.hook
        entries = hook.bank.get(id(attn))
        inside = hook._inside.get(seq_len)
        if entries is None or inside is None:
            return out
        masks = hook.query_masks[seq_len]
        out = out.clone()
        for j, entry in enumerate(entries):
            idx = inside[j]
            if entry is None or not len(idx):
                continue
            k_ref, v_ref = entry
            n_ref = k_ref.shape[2]
            keys = torch.cat([key, k_ref.to(key.dtype)], dim=2)  # the reference pass has the same rows
            values = torch.cat([value, v_ref.to(value.dtype)], dim=2)
            if own_bias is None:
                bias = torch.zeros(1, 1, 1, seq_len + n_ref, dtype=query.dtype, device=query.device)
            else:  # the modulation's (P, P) bias on the own keys of the conditional rows
                bias = torch.zeros(
                    query.shape[0], 1, len(idx), seq_len + n_ref, dtype=query.dtype, device=query.device
                )
                bias[start:, :, :, :seq_len] = own_bias[:, :, idx]
            bias[..., seq_len:] = hook.log_weights[j]
            q = query.index_select(2, idx)
            with_ref = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias)
            plain = out.index_select(2, idx)
            m = masks[j, idx].to(out.dtype)[None, None, :, None]
            mixed = plain + m * (with_ref - plain)
            if hook.conditional_only and hook.cfg and query.shape[0] % 2 == 0:
                mixed[: query.shape[0] // 2] = plain[: query.shape[0] // 2]  # generate puts uncond first
            out.index_copy_(2, idx, mixed)
        return out
