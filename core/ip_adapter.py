"""IP-Adapter with a mask per layer (``appearance: "ip-adapter"``): each layer's own image
conditions only its own region.

For every layer with ``appearance: "ip-adapter"`` and an `appearance_weight` w_i > 0, the layer's
RGBA image, cropped to its alpha's bounding box, put over neutral grey and padded to a square,
is encoded by the IP-Adapter's CLIP image encoder and projected by its image projection into a
few image tokens (done once per generation). In every cross-attention (``attn2``) layer, the
image tokens' decoupled attention (IP-Adapter's `to_k_ip` / `to_v_ip`) is added by the layer's
soft visible mask m_i at that resolution:

    out(p) = text(p) + sum_i w_i * m_i(p) * to_out(attn(q(p), K_ip(tokens_i), V_ip(tokens_i)))

`text` is the output of the processor installed before (masked cross-attention's, with its
per-layer bias, or regional conditioning's, or the stock one), so that part is unchanged; the IP
term goes through the output projection's linear part only (to_out is affine: to_out(a + b) =
to_out(a) + to_out(b) - to_out(0)), which is IP-Adapter's out = to_out(text_attn + scale * ip_attn)
exactly. Outside every IP layer's mask the output is the text part itself, byte for byte. The
guidance batch's unconditional rows get the tokens of an empty image, as diffusers does.

Why cropped, not the layer in place on the canvas: the image encoder sees 224×224 pixels; a small
layer in place would be a few of them among grey, and IP-Adapter was trained on images whose
object fills the frame. The grey (not black) keeps what is outside the layer's alpha neutral.

The U-Net is not modified: the IP weights live in the processors, which wrap the ``attn2``
processors for the generation and are taken off on exit (the previous processors come back, also
on error or cancel). The loaded IP-Adapter and image encoder are kept for the next job (one
pair, `release_ip_adapters` drops it): the model itself is the same before and after a job.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .collage import CollageError, appearance_mode
from .ip_adapter_files import (
    IPAdapterError,
    IPAdapterFiles,
    describe_image_encoder,
    describe_ip_adapter,
    load_image_encoder,
    read_ip_adapter,
)
from .regional import level_masks
from .weight_files import read_weight_names

IP_ADAPTER = "ip-adapter"
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_GREY = 0.5


@dataclass
class IPAdapterWeights:
    """An IP-Adapter loaded for one U-Net: its image encoder and projection, and the image keys'
    and values' projections of every cross-attention layer (by the layer's module name)."""

    encoder: torch.nn.Module  # CLIPVisionModelWithProjection
    projection: torch.nn.Module  # diffusers' ImageProjection / IPAdapterPlusImageProjection / ...
    to_k_ip: dict[str, torch.nn.Linear]
    to_v_ip: dict[str, torch.nn.Linear]
    hidden_states: bool  # the projection reads the encoder's penultimate hidden states

    @torch.no_grad()
    def image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 3, S, S) encoder inputs → (cond, uncond) image tokens, each (n, T, C). The
        unconditional tokens are the projection of zero image features (base adapters) or of an
        all-zero image's hidden states (plus), as diffusers' pipelines make them."""
        if self.hidden_states:
            feats = self.encoder(images, output_hidden_states=True).hidden_states[-2]
            empty = self.encoder(torch.zeros_like(images), output_hidden_states=True).hidden_states[-2]
        else:
            feats = self.encoder(images).image_embeds
            empty = torch.zeros_like(feats)
        return self.projection(feats), self.projection(empty)


def load_ip_adapter(files: IPAdapterFiles, unet, device, dtype) -> IPAdapterWeights:
    """Load the IP-Adapter and its image encoder for `unet` (which is not changed). Raises
    `IPAdapterError` saying why when the adapter does not fit this U-Net or the encoder."""
    info = describe_ip_adapter(read_weight_names(Path(files.adapter)))
    encoder_info = describe_image_encoder(Path(files.image_encoder))
    if not encoder_info.fits(info):
        reads = "image hidden states" if info.hidden_states else "image embeddings"
        raise IPAdapterError(
            f"the IP-Adapter reads {info.image_embed_dim}-wide {reads}, the image encoder "
            f"{Path(files.image_encoder).name} gives {encoder_info.width}-wide hidden states and "
            f"{encoder_info.projection_dim}-wide embeddings: pair it with the encoder it was trained with"
        )
    names = [
        name.removesuffix(".processor")
        for name in unet.attn_processors
        if name.endswith("attn2.processor") and "motion_modules" not in name
    ]
    if info.context_dim != unet.config.cross_attention_dim or info.layers != len(names):
        raise IPAdapterError(
            f"the IP-Adapter is for a U-Net with {info.layers} cross-attention layers reading "
            f"{info.context_dim}-wide text features; this model's has {len(names)} reading "
            f"{unet.config.cross_attention_dim} (an adapter of another model family?)"
        )
    state = read_ip_adapter(Path(files.adapter))
    # diffusers' own conversion of the projection (base, plus and full adapters).
    projection = unet._convert_ip_adapter_image_proj_to_diffusers(
        state["image_proj"], low_cpu_mem_usage=False
    )
    modules = dict(unet.named_modules())
    to_k, to_v = {}, {}
    # As diffusers' `_convert_ip_adapter_attn_to_diffusers`: the j-th cross-attention layer of
    # `attn_processors` has the keys numbered 2j + 1.
    for j, name in enumerate(names):
        inner = modules[name].to_k.out_features
        for out, which in ((to_k, "to_k_ip"), (to_v, "to_v_ip")):
            linear = torch.nn.Linear(info.context_dim, inner, bias=False)
            linear.weight.data.copy_(state["ip_adapter"][f"{2 * j + 1}.{which}.weight"])
            out[name] = linear.to(device=device, dtype=dtype).eval()
    encoder = load_image_encoder(Path(files.image_encoder), device, dtype)
    return IPAdapterWeights(
        encoder, projection.to(device=device, dtype=dtype).eval(), to_k, to_v, info.hidden_states
    )


# One loaded pair kept across jobs: the image encoder is the costly part (ViT-H: ~1.3 GB in half
# precision). Keyed by the files' paths and modification times and the device/dtype, for the U-Net
# it was checked against (held weakly: a released model is not kept alive by this).
_cache: dict[tuple, tuple[weakref.ref, IPAdapterWeights]] = {}
_cache_lock = threading.Lock()


def cached_ip_adapter(files: IPAdapterFiles, unet, device, dtype) -> IPAdapterWeights:
    stamps = tuple(_stamp(Path(p)) for p in (files.adapter, files.image_encoder))
    key = (str(files.adapter), str(files.image_encoder), stamps, str(device), dtype)
    with _cache_lock:
        found = _cache.get(key)
        if found is None or found[0]() is not unet:
            _cache.clear()
            found = (weakref.ref(unet), load_ip_adapter(files, unet, device, dtype))
            _cache[key] = found
        return found[1]


def release_ip_adapters() -> None:
    """Drop the kept IP-Adapter and image encoder (their memory is freed)."""
    with _cache_lock:
        _cache.clear()


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return (st.st_size, st.st_mtime_ns)


def encoder_input(image: np.ndarray, size: int) -> torch.Tensor:
    """A layer's RGBA (uint8) → the encoder's (3, size, size) input: cropped to its alpha's
    bounding box, over neutral grey, padded to a square with grey, resized, CLIP-normalised."""
    rgba = image.astype(np.float32) / 255.0
    if rgba.shape[2] == 3:
        rgba = np.concatenate([rgba, np.ones_like(rgba[..., :1])], axis=2)
    ys, xs = np.nonzero(rgba[..., 3] > 0)
    if len(ys):
        rgba = rgba[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    alpha = rgba[..., 3:]
    rgb = rgba[..., :3] * alpha + _GREY * (1.0 - alpha)
    h, w = rgb.shape[:2]
    side = max(h, w)
    square = np.full((side, side, 3), _GREY, np.float32)
    top, left = (side - h) // 2, (side - w) // 2
    square[top : top + h, left : left + w] = rgb
    x = torch.from_numpy(square).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    mean, std = torch.tensor(_CLIP_MEAN)[:, None, None], torch.tensor(_CLIP_STD)[:, None, None]
    return (x[0] - mean) / std


class MaskedIPAdapter:
    """The sampler hook: the IP layers' image tokens and masks; wraps the ``attn2`` processors."""

    def __init__(
        self,
        weights: IPAdapterWeights,
        tokens: torch.Tensor,
        uncond_tokens: torch.Tensor,
        masks: dict[int, np.ndarray],
        scales: list[float],
        *,
        layers: list[int],
        cfg: bool,
    ):
        if not (tokens.shape[0] == len(scales) == len(layers)) or not layers:
            raise ValueError("tokens, scales and layers need one entry per IP layer (at least one)")
        self.weights = weights
        self.layers = list(layers)
        self.cfg = cfg
        self.tokens, self.uncond_tokens = tokens, uncond_tokens  # (n, T, C) each
        s = torch.tensor(scales, dtype=torch.float32)[:, None]
        # w_i * m_i(p) per level: (n, P).
        self._masks = {p: torch.as_tensor(m, dtype=torch.float32) * s for p, m in masks.items()}
        self._on_device: dict[tuple, torch.Tensor | None] = {}
        self._kv: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @contextlib.contextmanager
    def installed(self, unet) -> Iterator[MaskedIPAdapter]:
        """Wrap every ``attn2`` processor (the one installed now: masked attention's, regional
        conditioning's or the stock one); the previous ones come back on exit."""
        saved = [
            (name, module, module.processor)
            for name, module in unet.named_modules()
            if name in self.weights.to_k_ip and hasattr(module, "set_processor")
        ]
        try:
            for name, module, processor in saved:
                module.set_processor(MaskedIPAdapterProcessor(self, processor, name))
            yield self
        finally:
            for _, module, processor in saved:
                module.set_processor(processor)
            self._kv.clear()

    def on_step(self, step) -> None:
        pass

    def masks_for(self, seq_len: int, dtype, device) -> torch.Tensor | None:
        """w_i * m_i(p) at the resolution with `seq_len` pixels, (n, P); None: no such level."""
        key = (seq_len, dtype, str(device))
        if key not in self._on_device:
            masks = self._masks.get(seq_len)
            self._on_device[key] = None if masks is None else masks.to(device=device, dtype=dtype)
        return self._on_device[key]

    def keys_values(
        self, name: str, batch: int, heads: int, dtype, device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `name`'s image keys and values for a batch of `batch` rows: (n, B, heads, T, d)
        each. The tokens do not change during a generation, so each is computed once."""
        key = (name, batch, heads, dtype)
        found = self._kv.get(key)
        if found is None:
            half = self.cfg and batch % 2 == 0
            rows = self.tokens[:, None].expand(-1, batch // 2 if half else batch, -1, -1)
            if half:  # generate puts the unconditional rows first
                rows = torch.cat([self.uncond_tokens[:, None].expand_as(rows), rows], dim=1)
            rows = rows.to(device=device, dtype=dtype)
            n, b, t, _ = rows.shape
            k, v = self.weights.to_k_ip[name](rows), self.weights.to_v_ip[name](rows)
            found = tuple(x.view(n, b, t, heads, -1).transpose(2, 3) for x in (k, v))
            self._kv[key] = found
        return found


class MaskedIPAdapterProcessor:
    """The wrapped processor's output plus each IP layer's image attention inside its mask."""

    def __init__(self, hook: MaskedIPAdapter, inner, name: str):
        self.hook, self.inner, self.name = hook, inner, name

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
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if encoder_hidden_states is None:
            return out
        x = hidden_states
        if attn.spatial_norm is not None:
            x = attn.spatial_norm(x, temb)
        four_d = x.ndim == 4
        if four_d:
            b, c, h, w = x.shape
            x = x.view(b, c, h * w).transpose(1, 2)
        batch, seq_len, _ = x.shape
        masks = self.hook.masks_for(seq_len, x.dtype, x.device)
        if masks is None:
            return out
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(x)
        heads = attn.heads
        query = query.view(batch, -1, heads, query.shape[-1] // heads).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        keys, values = self.hook.keys_values(self.name, batch, heads, query.dtype, query.device)
        mixed = torch.zeros_like(query)
        for i in range(masks.shape[0]):
            image = F.scaled_dot_product_attention(query, keys[i], values[i])
            mixed = mixed + masks[i][None, None, :, None] * image
        mixed = mixed.transpose(1, 2).reshape(batch, seq_len, -1)
        linear = attn.to_out[0]
        delta = linear(mixed) - linear(torch.zeros_like(mixed[:1, :1]))  # the affine map's linear part
        delta = delta / attn.rescale_output_factor
        if four_d:
            delta = delta.transpose(-1, -2).reshape(b, c, h, w)
        return out + delta


def ip_adapter_hook(setup, files: IPAdapterFiles | None) -> MaskedIPAdapter | None:
    """Build the masked IP-Adapter hook for one generation (a `core.generate` hook builder); None
    when no layer asks for it. Raises `CollageError` naming ``layers[i].appearance`` when one does
    and there is no IP-Adapter for this model (`files` None) or it cannot be used with it."""
    flat, collage, model = setup.flat, setup.collage, setup.model
    pick = [
        i
        for i, layer in enumerate(flat.layers)
        if appearance_mode(layer.appearance) == IP_ADAPTER and float(layer.appearance_weight) > 0
    ]
    if not pick:
        return None
    where = [f"layers[{_index_in(collage, flat.layers[i])}].appearance" for i in pick]
    if files is None:
        family = getattr(model, "family", None)
        label = family.label if family is not None else "this model"
        hint = f" (e.g. {family.ip_adapter_files})" if family is not None and family.ip_adapter_files else ""
        raise CollageError(
            [
                f'{w}: "ip-adapter" needs an IP-Adapter for {label} and its CLIP image encoder{hint}, '
                "and there is none (put them in models/ipadapter and models/clip_vision of the models dir)"
                for w in where
            ]
        )
    unet = model.pipeline.unet
    try:
        weights = cached_ip_adapter(files, unet, model.device, model.dtype)
    except (IPAdapterError, OSError, KeyError, RuntimeError) as e:
        raise CollageError([f'{w}: "ip-adapter" cannot be used with this model: {e}' for w in where]) from e
    size = int(weights.encoder.config.image_size)
    images = torch.stack([encoder_input(flat.layers[i].image, size) for i in pick])
    tokens, uncond = weights.image_tokens(images.to(device=model.device, dtype=model.dtype))
    return MaskedIPAdapter(
        weights,
        tokens,
        uncond,
        level_masks(setup, pick),
        [float(flat.layers[i].appearance_weight) for i in pick],
        layers=pick,
        cfg=collage.guidance_scale > 1.0,
    )


def _index_in(collage, layer) -> int:
    return next((i for i, c in enumerate(collage.layers) if c is layer), 0)
