"""Appearance fidelity: single-image textual inversion per layer, cached on disk (algorithm.md §2).

For each visible layer with ``appearance`` on, one new token embedding v* is learned so that the
frozen model reconstructs that layer's object:

    loss = sum( m · (ε − ε_θ(noisy(z), t, "a photo of <token> salmon sushi"))² ) / (C · sum(m))

where ``m`` is the layer's alpha after augmentation, area-averaged to latent size (pixels outside
the object do not count), ``z`` the VAE latents of the augmented object on a random background
colour, and ``C`` the number of latent channels (so the value reads like the usual mean squared
error). Only v* is trained: it is a separate fp32 parameter spliced into the text encoder's input
embeddings; the model's weights are never touched and never get gradients.

`appearance_tokens` is what `generate()` uses: it gets each embedding (from the cache, or by
training with progress and cancel per step), adds the placeholder tokens to the tokenizer and the
text encoder for the duration of a ``with`` block, and removes them again on exit, also on error
or cancel, so the shared model never accumulates tokens.

The cache stores one ``<key>.safetensors`` per embedding, in the single-tensor format that
diffusers' ``load_textual_inversion`` (and A1111 / ComfyUI) read. See docs/inversion.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .demo_model import DEMO_VERSION
from .paths import cache_dir
from .progress import CancelFlag, Progress, ProgressCallback, check_cancel

if TYPE_CHECKING:
    from .collage import Collage
    from .compositing import CompositeResult

log = logging.getLogger(__name__)

#: Bump when training changes in a way that makes old embeddings wrong: it is part of every key.
RECIPE_VERSION = 1
#: Placeholder tokens look like ``<collage-1a2b3c4d>``: never a word, unique per layer content.
TOKEN_PREFIX = "collage-"
#: Default size limit of the embedding cache. One SD1.5 embedding is about 4 KB, so this holds
#: thousands; least-recently-used files go first.
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024

# Object prompts in the style of the textual-inversion paper / diffusers example script
# ("imagenet_templates_small"); "{}" becomes "<token> <layer text>".
PROMPT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a rendition of the {}",
    "a photo of the small {}",
    "a photo of the large {}",
    "a photo of a nice {}",
)
#: Models that know another grammar: the demo model was trained only on captions like "a red
#: circle on grass" and reads "a photo of ..." as words it never saw (docs/demo_model.md).
MODEL_PROMPT_TEMPLATES: dict[str, tuple[str, ...]] = {
    DEMO_VERSION: ("a {}", "a {} on white", "a {} on grass", "a {} in the sky"),
}


@dataclass(frozen=True)
class InversionSettings:
    """Hyper-parameters of one single-image inversion. All fields are part of the cache key.

    Defaults (sources in docs/inversion.md):

    * ``learning_rate=2e-3``, constant, AdamW with ``weight_decay=1e-2``: the diffusers
      textual-inversion example for SD1.5 (``--learning_rate=5e-4 --scale_lr`` with batch 1 and
      4 accumulation steps, i.e. an effective 2e-3; its AdamW weight decay default is 1e-2).
    * ``steps=400`` (batch 1): the example trains 3000 steps (x4 accumulated) over 3-5 images, the
      paper 5000 steps; with one image and masked loss there is one view to fit, and longer runs
      mostly memorise that view's pose and lighting. At 2e-3, Adam can move every coordinate by
      up to ~0.8 in 400 steps, far more than the ~0.015 RMS of a CLIP token embedding's entries.
    * ``resolution=None``: the model's native size (U-Net sample size x VAE factor: 512 for SD1.5,
      768 for SD2-v), the size the example trains at. Must be a multiple of the VAE factor (8).
    * augmentation: horizontal flip, scale 0.8-1.0 of "fit to the square", a random position in
      the space left, a random background colour per sample.
    """

    steps: int = 400
    learning_rate: float = 2e-3
    batch_size: int = 1
    seed: int = 0
    resolution: int | None = None
    weight_decay: float = 1e-2
    scale: tuple[float, float] = (0.8, 1.0)
    flip: bool = True
    # False repeats the first batch (augmentation, noise, timestep) every step instead of drawing
    # a new one: the loss must then fall steadily. A sanity check of the optimisation (tests).
    resample: bool = True

    def check(self) -> None:
        problems = []
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 100_000:
            problems.append(f"steps must be in 1..100000, got {self.steps!r}")
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < 1):
            problems.append(f"learning_rate must be in (0, 1), got {self.learning_rate!r}")
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= 64:
            problems.append(f"batch_size must be in 1..64, got {self.batch_size!r}")
        if self.resolution is not None and (
            not isinstance(self.resolution, int) or not 64 <= self.resolution <= 2048 or self.resolution % 8
        ):
            problems.append(f"resolution must be a multiple of 8 in 64..2048, got {self.resolution!r}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            problems.append(f"scale must satisfy 0 < low <= high <= 1, got {self.scale!r}")
        if problems:
            raise ValueError("InversionSettings: " + "; ".join(problems))


#: What `appearance_tokens` uses when it is given no settings (tests may monkeypatch this).
DEFAULT_SETTINGS = InversionSettings()


@dataclass
class InversionResult:
    """One trained embedding: the token it was trained under, its vector and the loss per step."""

    token: str
    embedding: torch.Tensor  # (D,) float32 on the CPU
    losses: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Cache keys and placeholder tokens


def resolved_resolution(pipe, settings: InversionSettings) -> int:
    """The square training size: the setting, or the model's native size."""
    if settings.resolution is not None:
        return settings.resolution
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def canonical_image(image: np.ndarray) -> np.ndarray:
    """The RGBA pixels with the colour of fully transparent pixels zeroed: what training sees.

    Invisible pixels cannot change the embedding, so they do not change the cache key either.
    """
    canon = np.array(image, dtype=np.uint8, copy=True)
    canon[canon[..., 3] == 0, :3] = 0
    return canon


def cache_key(
    identity: str, image: np.ndarray, text: str, settings: InversionSettings, resolution: int
) -> str:
    """sha256 of everything that determines the embedding: model, pixels, text, hyper-parameters."""
    canon = canonical_image(image)
    params = dataclasses.asdict(settings)
    params["resolution"] = resolution
    h = hashlib.sha256()
    for part in (
        f"collage-inversion/{RECIPE_VERSION}",
        identity,
        json.dumps(params, sort_keys=True),
        " ".join(text.split()),
        f"{canon.shape}",
    ):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    h.update(canon.tobytes())
    return h.hexdigest()


def placeholder_tokens(keys: list[str], vocabulary: dict[str, int] | set[str]) -> dict[str, str]:
    """A placeholder token per distinct key: ``<collage-xxxxxxxx>``, lengthened until it is in no
    vocabulary and distinct from the other keys' tokens (equal keys share one token)."""
    distinct = list(dict.fromkeys(keys))
    for length in (8, 12, 16, 24, 32, 64):
        tokens = {k: f"<{TOKEN_PREFIX}{k[:length]}>" for k in distinct}
        if len(set(tokens.values())) == len(distinct) and not any(t in vocabulary for t in tokens.values()):
            return tokens
    raise RuntimeError("could not find free placeholder tokens")  # a full sha256 clash: never


# --------------------------------------------------------------------------------------------
# Disk cache


class CorruptEmbedding(ValueError):
    pass


class InversionCache:
    """Embeddings on disk, ``<folder>/<key>.safetensors``, least-recently-used out past `max_bytes`.

    Each file holds one tensor ``{token: float32 (1, D)}`` (what diffusers'
    ``load_textual_inversion`` reads) and metadata: token, text, model, settings, a checksum of
    the tensor. A file that cannot be read or does not match is reported, deleted and retrained.
    Files are written to a temporary name and renamed, so readers never see half a file. Use
    (a hit) refreshes a file's modification time, which is what eviction orders by.
    """

    def __init__(self, folder: str | os.PathLike[str] | None = None, max_bytes: int = DEFAULT_CACHE_BYTES):
        self.folder = Path(folder) if folder is not None else cache_dir() / "embeddings"
        self.max_bytes = int(max_bytes)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str, dim: int | None = None) -> InversionResult | None:
        """The cached embedding, or None (missing, or damaged: then it is deleted with a warning)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            result = read_embedding(path, dim)
        except CorruptEmbedding as e:
            log.warning("appearance cache: %s is damaged (%s); deleting it and training again", path, e)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # mark as recently used
        return result

    def put(self, key: str, result: InversionResult, metadata: dict[str, str] | None = None) -> Path:
        """Write atomically, then evict least-recently-used files past the size limit."""
        from safetensors.torch import save

        self.folder.mkdir(parents=True, exist_ok=True)
        vector = result.embedding.detach().float().cpu().reshape(1, -1).contiguous()
        meta = {
            **(metadata or {}),
            "token": result.token,
            "checksum": _checksum(vector),
            "recipe": str(RECIPE_VERSION),
        }
        data = save({result.token: vector}, metadata=meta)
        path = self.path(key)
        tmp = self.folder / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self.evict(keep=path)
        return path

    def entries(self) -> list[tuple[Path, int, float]]:
        """(path, size, last use) of every cached embedding."""
        out = []
        for p in self.folder.glob("*.safetensors"):
            with contextlib.suppress(OSError):
                st = p.stat()
                out.append((p, st.st_size, st.st_mtime))
        return out

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Delete least-recently-used files until the cache fits `max_bytes`; returns them."""
        now = time.time()
        for tmp in self.folder.glob(".*.tmp"):  # left behind by a crash mid-write
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime > 3600:
                    tmp.unlink()
        entries = sorted(self.entries(), key=lambda e: e[2])
        total = sum(size for _p, size, _t in entries)
        removed = []
        for path, size, _t in entries:
            if total <= self.max_bytes:
                break
            if keep is not None and path == keep:
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size
                removed.append(path)
        return removed


def _checksum(vector: torch.Tensor) -> str:
    return hashlib.sha256(vector.float().contiguous().numpy().tobytes()).hexdigest()


def read_embedding(path: str | os.PathLike[str], dim: int | None = None) -> InversionResult:
    """Read and verify one embedding file; raises `CorruptEmbedding` if anything is off."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            meta = f.metadata() or {}
            if len(keys) != 1:
                raise CorruptEmbedding(f"expected one tensor, found {len(keys)}")
            token = keys[0]
            tensor = f.get_tensor(token).clone()  # not a view of the (memory-mapped) file
    except CorruptEmbedding:
        raise
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CorruptEmbedding(f"unreadable: {e}") from e
    vector = tensor.float().reshape(-1) if tensor.dim() == 2 and tensor.shape[0] == 1 else None
    if tensor.dim() == 1:
        vector = tensor.float()
    if vector is None:
        raise CorruptEmbedding(f"unexpected tensor shape {tuple(tensor.shape)}")
    if dim is not None and vector.numel() != dim:
        raise CorruptEmbedding(f"embedding size {vector.numel()}, the text encoder's is {dim}")
    if not torch.isfinite(vector).all():
        raise CorruptEmbedding("non-finite values")
    if meta.get("token", token) != token:
        raise CorruptEmbedding("token in metadata does not match the tensor's name")
    if "checksum" in meta and meta["checksum"] != _checksum(vector.reshape(1, -1)):
        raise CorruptEmbedding("checksum mismatch")
    return InversionResult(token=token, embedding=vector.contiguous(), losses=[])


# --------------------------------------------------------------------------------------------
# Adding tokens to the shared model for one block, and taking them out again


def _extend_tokenizer(tokenizer, tokens: list[str]) -> Callable[[], None]:
    """Add `tokens` to the tokenizer; returns a function that restores it exactly.

    Fast (tokenizers-backed) tokenizers, which transformers 5's CLIPTokenizer is, cannot remove
    added tokens, so the tokens go into a copy of the Rust backend and the original backend object
    is put back afterwards (the copy costs ~0.1-0.3 s for CLIP's vocabulary). Slow (Python)
    tokenizers keep added tokens in two dicts, which are snapshotted and restored.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        from tokenizers import Tokenizer

        tokenizer._tokenizer = Tokenizer.from_str(backend.to_str())

        def restore() -> None:
            tokenizer._tokenizer = backend

    else:
        decoder = dict(tokenizer._added_tokens_decoder)
        encoder = dict(tokenizer._added_tokens_encoder)

        def restore() -> None:
            tokenizer._added_tokens_decoder = decoder
            tokenizer._added_tokens_encoder = encoder
            for refresh in ("_update_trie", "_update_total_vocab_size"):
                if hasattr(tokenizer, refresh):
                    getattr(tokenizer, refresh)()

    try:
        tokenizer.add_tokens(list(tokens))
    except BaseException:
        restore()
        raise
    return restore


@contextlib.contextmanager
def added_tokens(pipe, tokens: list[str], rows: torch.Tensor) -> Iterator[tuple[list[int], nn.Embedding]]:
    """Tokens in the tokenizer and their rows (k, D) in the text encoder for one block.

    The text encoder gets a new input-embedding module (the old matrix plus the rows); on exit the
    original module and tokenizer backend are put back, so sizes and objects are as before.
    Yields the tokens' ids and the new embedding module.
    """
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    original = text_encoder.get_input_embeddings()
    restore_tokenizer = _extend_tokenizer(tokenizer, tokens)
    try:
        ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
        for t in tokens:
            if tokenizer.tokenize(t) != [t]:
                raise RuntimeError(f"placeholder {t} does not tokenize as one token")
        weight = original.weight.detach()
        need = max(max(ids) + 1, weight.shape[0])
        extra = weight.new_zeros((need - weight.shape[0], weight.shape[1]))
        new_weight = torch.cat([weight, extra])  # a copy: the original matrix is never written
        new_weight[ids] = rows.to(device=new_weight.device, dtype=new_weight.dtype)
        embedding = nn.Embedding.from_pretrained(new_weight, freeze=True, padding_idx=original.padding_idx)
        text_encoder.set_input_embeddings(embedding)
        yield ids, embedding
    finally:
        text_encoder.set_input_embeddings(original)
        restore_tokenizer()


class _Spliced(nn.Module):
    """Input embeddings where one token id reads a separate (trainable, fp32) vector."""

    def __init__(self, base: nn.Embedding, token_id: int, vector: torch.Tensor):
        super().__init__()
        self.base = base
        self.token_id = token_id
        self._vector = [vector]  # a list: not registered as a parameter of the text encoder

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        hit = (input_ids == self.token_id).unsqueeze(-1)
        return torch.where(hit, self._vector[0].to(out.dtype), out)


# --------------------------------------------------------------------------------------------
# Training


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


def augment(obj: torch.Tensor, size: int, gen: torch.Generator, settings: InversionSettings):
    """One augmented sample: the object scaled into a size×size square at a random place, maybe
    flipped, over a random colour. Returns RGB (3, size, size) in [-1, 1] and alpha (1, size, size).

    Resampling works on premultiplied colour, so pixels with alpha 0 contribute nothing.
    """
    _, h, w = obj.shape
    lo, hi = settings.scale
    s = lo + (hi - lo) * float(torch.rand((), generator=gen))
    fit = size / max(h, w)
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


def initial_embedding(pipe, text: str) -> torch.Tensor:
    """v* starts as the mean input embedding of the layer text's tokens (fp32, CPU)."""
    ids = pipe.tokenizer(text, add_special_tokens=False).input_ids or [pipe.tokenizer.eos_token_id]
    weight = pipe.text_encoder.get_input_embeddings().weight
    return weight[torch.tensor(ids, device=weight.device)].detach().float().mean(0).cpu()


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
) -> InversionResult:
    """Train v* for `token` (already in the tokenizer with id `token_id`) on one layer image."""
    from diffusers import DDPMScheduler

    pipe, device, dtype = model.pipeline, model.device, model.dtype
    obj = _object_tensor(image)
    if obj is None:
        raise ValueError(f"layer '{text}' has no visible pixels to learn from")
    size = resolved_resolution(pipe, settings)
    factor = int(pipe.vae_scale_factor)
    scaling = pipe.vae.config.scaling_factor
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = noise_scheduler.config.prediction_type
    n_train = noise_scheduler.config.num_train_timesteps
    tokenizer, text_encoder, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    phrase = f"{token} {' '.join(text.split())}"
    templates = MODEL_PROMPT_TEMPLATES.get(model.identity, PROMPT_TEMPLATES)
    template_ids = tokenizer(
        [t.format(phrase) for t in templates],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)

    gen = torch.Generator("cpu").manual_seed(settings.seed)
    param = init.detach().clone().float().to(device).requires_grad_(True)  # fp32 master weight
    optimizer = torch.optim.AdamW([param], lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scaler = _LossScale(dtype == torch.float16)
    phase = f"learning appearance of '{text}'"

    def draw():
        """One batch: augmented samples, their latents, noise, timesteps, masks and prompts."""
        samples = [augment(obj, size, gen, settings) for _ in range(settings.batch_size)]
        pixels = torch.stack([s[0] for s in samples]).to(device=device, dtype=dtype)
        alpha = torch.stack([s[1] for s in samples])
        mask = F.avg_pool2d(alpha, factor).to(device)  # exact area average to latent size
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.mode() * scaling
        noise = torch.randn(latents.shape, generator=gen).to(device=device, dtype=dtype)
        timesteps = torch.randint(0, n_train, (settings.batch_size,), generator=gen).to(device)
        which = torch.randint(0, len(templates), (settings.batch_size,), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if prediction == "v_prediction":
            target = noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return noisy, timesteps, target, mask, template_ids[which.to(device)]

    losses: list[float] = []
    base = text_encoder.get_input_embeddings()
    text_encoder.set_input_embeddings(_Spliced(base, token_id, param))
    try:
        batch = None
        for step in range(settings.steps):
            check_cancel(cancel)
            if batch is None or settings.resample:
                batch = draw()
            noisy, timesteps, target, mask, ids = batch
            attention = (ids != tokenizer.pad_token_id).long() if use_mask else None
            hidden = text_encoder(ids, attention_mask=attention)[0]
            pred = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
            err = (pred.float() - target.float()) ** 2
            loss = (err * mask).sum() / (mask.sum() * err.shape[1]).clamp_min(1e-8)
            grad = scaler.grad(loss, param)
            if grad is not None:
                param.grad = grad
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            report(Progress(phase, step + 1, settings.steps))
    finally:
        text_encoder.set_input_embeddings(base)
    return InversionResult(token=token, embedding=param.detach().float().cpu(), losses=losses)


def train_embedding(
    model,
    image: np.ndarray,
    text: str,
    *,
    settings: InversionSettings | None = None,
    report: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
) -> InversionResult:
    """Learn one embedding for an RGBA layer image and its text (no cache); the shared model is
    left exactly as it was. For tests, benchmarks and tools; `appearance_tokens` is the normal way."""
    settings = settings or DEFAULT_SETTINGS
    settings.check()
    pipe = model.pipeline
    key = cache_key(model.identity, image, text, settings, resolved_resolution(pipe, settings))
    token = placeholder_tokens([key], pipe.tokenizer.get_vocab())[key]
    init = initial_embedding(pipe, text)
    with added_tokens(pipe, [token], init[None]) as (ids, _embedding):
        return _train(model, token, ids[0], image, text, init, settings, report or (lambda p: None), cancel)


# --------------------------------------------------------------------------------------------
# The entry point used by generate()


@contextlib.contextmanager
def appearance_tokens(
    model,
    collage: Collage,
    flat: CompositeResult,
    *,
    report: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    settings: InversionSettings | None = None,
    cache: InversionCache | None = None,
) -> Iterator[list[str | None]]:
    """Placeholder tokens of the appearance layers, loaded into the model for one ``with`` block.

    For each of ``flat.layers`` with ``appearance`` on: the cached embedding, or one trained now
    (progress ``"learning appearance of '<text>'"`` per step, cancel checked every step, the
    result cached). Yields one prefix per layer: its placeholder token, or None. On exit (also on
    error or cancel) the tokenizer and the text encoder's embedding matrix are restored.
    """
    layers = flat.layers
    if not any(layer.appearance for layer in layers):
        yield [None] * len(layers)
        return
    settings = settings or DEFAULT_SETTINGS
    settings.check()
    cache = cache if cache is not None else InversionCache()
    report = report or (lambda p: None)
    pipe = model.pipeline
    size = resolved_resolution(pipe, settings)
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]

    keys: list[str | None] = [None] * len(layers)
    for i, layer in enumerate(layers):
        if not layer.appearance:
            continue
        if not layer.image[..., 3].any():
            log.warning("layer '%s' is fully transparent: no appearance to learn", layer.text)
            continue
        keys[i] = cache_key(model.identity, layer.image, layer.text, settings, size)
    distinct = list(dict.fromkeys(k for k in keys if k is not None))
    if not distinct:
        yield [None] * len(layers)
        return
    tokens = placeholder_tokens(distinct, pipe.tokenizer.get_vocab())
    first_layer = {k: layers[keys.index(k)] for k in distinct}

    known: dict[str, torch.Tensor] = {}
    for k in distinct:
        hit = cache.get(k, dim)
        if hit is not None:
            known[k] = hit.embedding
    inits = {
        k: known.get(k) if k in known else initial_embedding(pipe, first_layer[k].text) for k in distinct
    }
    rows = torch.stack([inits[k] for k in distinct])
    with added_tokens(pipe, [tokens[k] for k in distinct], rows) as (ids, embedding):
        id_of = dict(zip(distinct, ids, strict=True))
        for k in distinct:
            if k in known:
                continue
            layer = first_layer[k]
            result = _train(
                model, tokens[k], id_of[k], layer.image, layer.text, inits[k], settings, report, cancel
            )
            metadata = {
                "text": layer.text,
                "model": model.identity,
                "settings": json.dumps(dataclasses.asdict(settings) | {"resolution": size}),
                "final_loss": f"{result.losses[-1]:.6g}" if result.losses else "",
            }
            try:
                cache.put(k, result, metadata)
            except OSError as e:  # a full or read-only disk must not fail the generation
                log.warning("appearance cache: could not store the embedding of '%s': %s", layer.text, e)
            with torch.no_grad():
                embedding.weight[id_of[k]] = result.embedding.to(embedding.weight)
        yield [tokens[k] if k is not None else None for k in keys]
