"""The recipe of one inversion: its hyper-parameters (`InversionSettings`), its prompt templates, and
what follows from them and the layer: the cache key (model, pixels, text, settings) and the
placeholder token. `DEFAULT_SETTINGS` and the templates are read from here at call time (benchmarks
and tests replace them here)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import torch

from ..demo_model import DEMO_VERSION

#: Bump when training changes in a way that makes old embeddings wrong: it is part of every key.
RECIPE_VERSION = 1
#: Placeholder tokens look like ``<collage-1a2b3c4d>``: never a word, unique per layer content.
TOKEN_PREFIX = "collage-"

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
    * augmentation: horizontal flip, scale 0.8-1.0 of the object's size on its canvas mapped onto
      the square (``keep_size``; of "fit to the square" without it), a random position in the
      space left, a random background colour per sample. Trained filling the square, a token
      learnt "this look over the whole picture" (on the demo model it changed the rest of the
      image ~1.4x more, and kept the object's colour less).
    * ``timesteps=(0, 1)`` (all of them, as the example) and ``max_norm=None``: measured on the
      demo model, a higher learning rate with only high-noise timesteps kept the colour better but
      sometimes let the token repaint the whole image; a norm cap at 1x stopped some of those.
    """

    steps: int = 400
    learning_rate: float = 2e-3
    batch_size: int = 1
    seed: int = 0
    resolution: int | None = None
    weight_decay: float = 1e-2
    scale: tuple[float, float] = (0.8, 1.0)
    flip: bool = True
    # The object keeps its share of the canvas it is placed on (scaled by `scale`), instead of
    # filling the square: the token is learnt at the size it is generated at.
    keep_size: bool = True
    # Timesteps are drawn from this part of the training schedule (0 = clean, 1 = pure noise).
    timesteps: tuple[float, float] = (0.0, 1.0)
    # After each step v* is scaled back to at most this multiple of the mean norm of the layer
    # words' embeddings (None: free). A token far longer than a word outweighs the whole caption.
    max_norm: float | None = None
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
        if self.max_norm is not None and not (isinstance(self.max_norm, (int, float)) and self.max_norm > 0):
            problems.append(f"max_norm must be None or > 0, got {self.max_norm!r}")
        lo, hi = self.timesteps
        if not 0 <= lo <= hi <= 1:
            problems.append(f"timesteps must satisfy 0 <= low <= high <= 1, got {self.timesteps!r}")
        if problems:
            raise ValueError("InversionSettings: " + "; ".join(problems))


#: What `appearance_tokens` uses when it is given no settings (tests may monkeypatch this).
DEFAULT_SETTINGS = InversionSettings()


@dataclass
class InversionResult:
    """One trained embedding: the token it was trained under, its vector and the loss per step."""

    token: str
    embedding: torch.Tensor  # (D,) float32 on the CPU: each text encoder's part side by side
    losses: list[float] = field(default_factory=list)
    # (file key, width) of each text encoder's part when the model has several (SDXL: clip_l,
    # clip_g); empty for one encoder, whose file holds a single tensor named by the token.
    parts: tuple[tuple[str, int], ...] = ()


def embedding_parts(family, dims: list[int]) -> tuple[tuple[str, int], ...]:
    """The file layout of an embedding for a family whose encoders have these widths."""
    if len(dims) == 1:
        return ()
    return tuple((slot.embedding_key, d) for slot, d in zip(family.text_encoders, dims, strict=True))


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
    identity: str,
    image: np.ndarray,
    text: str,
    settings: InversionSettings,
    resolution: int,
    family: str = "sd1",
    canvas_side: int | None = None,
) -> str:
    """sha256 of everything that determines the embedding: model (and its family), pixels, text,
    hyper-parameters, and with ``keep_size`` the canvas's longer side (default: the image's)."""
    canon = canonical_image(image)
    params = dataclasses.asdict(settings)
    params["resolution"] = resolution
    if settings.keep_size:  # the object's share of the canvas is what training sees
        params["canvas"] = int(canvas_side or max(image.shape[:2]))
    h = hashlib.sha256()
    for part in (
        f"collage-inversion/{RECIPE_VERSION}",
        family,
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
