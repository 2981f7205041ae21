"""Loading Stable Diffusion models: the demo model, hub ids, diffusers folders, single files.

One model is kept loaded at a time (they are gigabytes); `load_pipeline` reuses it when asked for
the same weights on the same device and dtype, and releases it before loading another.
"""

from __future__ import annotations

import gc
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from .demo_model import DEMO_VERSION, ensure_demo_model
from .families import SD1, ModelFamily, UnsupportedModelError, family_of_pipeline
from .model_sources import (  # noqa: F401  (re-exported: callers import these from core.models)
    MODEL_FILE_SUFFIXES,
    ModelLoadError,
    _resolve_source,
    _Source,
    check_checkpoint_file,
    checkpoint_file_family,
    folder_family,
    looks_like_path,
    peek_model,
    stat_key,
)
from .random_models import ensure_config_folder
from .verbosity import debug_requested

DEVICE_ENV = "COLLAGE_DEVICE"
DTYPE_ENV = "COLLAGE_DTYPE"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# diffusers renamed `torch_dtype` to `dtype` (and deprecated the old name) together with adding this
# helper; older releases, which pyproject still allows, only know `torch_dtype`.
try:
    from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401

    DTYPE_KWARG = "dtype"
except ImportError:
    DTYPE_KWARG = "torch_dtype"


@dataclass(frozen=True, eq=False)
class LoadedModel:
    pipeline: DiffusionPipeline  # StableDiffusionPipeline or StableDiffusionXLPipeline
    ref: str  # what the user asked for
    identity: str  # identifies the exact weights (for caches keyed on the model)
    device: torch.device
    dtype: torch.dtype
    family: ModelFamily = SD1  # what the pieces ask about the model (core/families.py)

    @property
    def native_size(self) -> int:
        """The side of the square this model was trained at: its U-Net's sample size in pixels
        (512 for SD 1.5, 1024 for SDXL, 64 for the demo model)."""
        pipe = self.pipeline
        return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The argument, else `$COLLAGE_DEVICE`, else CUDA (also ROCm), MPS or CPU, in that order."""
    choice = device if device is not None else os.environ.get(DEVICE_ENV) or None
    if choice is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(choice)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"unknown device '{choice}' (use cpu, cuda, cuda:1, mps...): {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device '{choice}' was asked for, but this PyTorch has no working CUDA/ROCm GPU"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device '{choice}' was asked for, but Apple MPS is not available here")
    return dev


def pick_dtype(device: torch.device, dtype: torch.dtype | str | None = None) -> torch.dtype:
    """The argument, else `$COLLAGE_DTYPE`, else float16 on GPUs and float32 on CPU."""
    choice = dtype if dtype is not None else os.environ.get(DTYPE_ENV) or None
    if isinstance(choice, torch.dtype):
        return choice
    if isinstance(choice, str):
        try:
            return _DTYPES[choice.lower().removeprefix("torch.")]
        except KeyError:
            raise ModelLoadError(f"unknown dtype '{choice}' (use float32, float16 or bfloat16)") from None
    # MPS: float16 like CUDA. It halves memory, which matters on 8-16 GB unified-memory Macs, and
    # is what diffusers' MPS guide uses; COLLAGE_DTYPE=float32 is the escape hatch should a
    # PyTorch/macOS combination produce black or NaN images.
    if device.type in ("cuda", "mps"):
        return torch.float16
    return torch.float32  # CPU half precision is slow and some ops lack kernels


def single_file_error(
    e: BaseException, location: str, config: str | None, *, loaded_as: str, family: str, config_hint: str
) -> ModelLoadError:
    """The error for a single checkpoint file diffusers could not load: a configuration it could
    not fetch (say which one to give), or a file it could not read as `loaded_as`."""
    if not is_hub_access_error(e):
        return ModelLoadError(f"{location} could not be loaded as {loaded_as}: {e}")
    if config is not None:
        what = f"its configuration '{config}' could not be fetched ({e})."
    else:
        what = (
            f"diffusers needs the configuration of its {family} family and could not fetch it ({e}). "
            f"Give a config ({config_hint}"
        )
    return ModelLoadError(f"could not load {location}: {what} {hub_help()}")


def is_hub_access_error(e: BaseException) -> bool:
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    if isinstance(e, (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError)):
        return True
    text = str(e).lower()
    return any(w in text for w in ("offline", "connect", "cached locally", "huggingface.co"))


def hub_help() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return (
        f"Files from the hub are kept in the Hugging Face cache ({HF_HUB_CACHE}); on a computer that "
        "is offline, they must have been downloaded there once while online."
    )


def quiet_loading() -> None:
    """Loading bars and notices from diffusers/transformers would drown our own progress output
    (the notices come through with COLLAGE_DEBUG=1: core/verbosity.py)."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for logs in (diffusers_logging, transformers_logging):
        logs.disable_progress_bar()
        if not debug_requested():
            logs.set_verbosity_error()


def _load(source: _Source, dtype: torch.dtype) -> tuple[DiffusionPipeline, str]:
    """Load on CPU in `dtype`; returns the pipeline and the identity of its weights."""
    quiet_loading()
    if source.kind == "demo":
        try:
            folder = ensure_demo_model()
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"the demo model is not available: {e}") from e
        return _from_folder(folder, SD1, dtype), DEMO_VERSION

    if source.kind == "folder":
        try:
            pipe = _from_folder(Path(source.location), source.family, dtype)
        except Exception as e:
            raise ModelLoadError(f"could not load the diffusers model in {source.location}: {e}") from e
        return pipe, source.key

    if source.kind == "hub":
        try:
            # download() returns the cached snapshot folder, whose name is the commit hash.
            folder = Path(DiffusionPipeline.download(source.location))
        except Exception as e:
            local = Path(source.location).resolve()
            raise ModelLoadError(
                f"could not get model '{source.location}' from the Hugging Face Hub: {e}\n{hub_help()} "
                "Or use a local .safetensors/.ckpt file or diffusers folder instead "
                f"(if you meant a local folder: {local} does not exist)."
            ) from e
        family = folder_family(folder, what=f"hub model '{source.location}' ({folder})")
        try:
            pipe = _from_folder(folder, family, dtype)
        except Exception as e:
            raise ModelLoadError(f"could not load hub model '{source.location}' from {folder}: {e}") from e
        revision = folder.name if folder.parent.name == "snapshots" else None
        return pipe, f"hub:{source.location}" + (f"@{revision}" if revision else "")

    # A single checkpoint file with the original (LDM) key names; diffusers converts it, with the
    # configuration the project ships for its family (nothing is fetched) unless one is given.
    family = source.family
    config = source.config or str(ensure_config_folder(family))
    try:
        pipe = family.pipeline_class.from_single_file(
            source.location,
            config=config,
            local_files_only=os.path.isdir(config),
            **{DTYPE_KWARG: dtype},
            **family.load_kwargs(),
        )
    except Exception as e:
        difference = _shape_difference(str(e))
        if difference:
            raise ModelLoadError(
                f"{source.location} is a {family.label} checkpoint whose weights do not have the "
                f"standard {family.label} shapes{' of ' + source.config if source.config else ''} "
                "(a pruned or unusual variant?); give its diffusers configuration with --model-config "
                f"(a folder or hub id). First difference: {difference}"
            ) from e
        raise single_file_error(
            e,
            source.location,
            source.config,
            loaded_as=f"a {family.label} checkpoint (damaged file, or a variant this tool does not support)",
            family=family.label,
            config_hint="--model-config, or config=): a diffusers folder or hub id of the same family.",
        ) from e
    return pipe, source.key


def _shape_difference(message: str) -> str | None:
    """The first shape difference in diffusers' error for weights that do not fit the
    configuration, or None for any other error."""
    if "size mismatch" in message:
        # diffusers lists every mismatched tensor: thousands of lines for a whole model.
        line = next(ln for ln in message.splitlines() if "size mismatch" in ln)
        return line.strip()[:300]
    # With accelerate installed (peft brings it) diffusers loads on the meta device and says so:
    mismatch = re.search(r"because (\S+) expected shape (.+?), but got (.+?)\.", message)
    if mismatch:
        return f"{mismatch[1]}: {mismatch[2]} in the configuration, {mismatch[3]} in the file"
    if "does not seem to contain a valid CLIP model" in message:
        # diffusers picks each text encoder's weights by their width; none had the configured one.
        return "a text encoder's width is not the configured one"
    return None


def _from_folder(folder: Path, family: ModelFamily, dtype: torch.dtype) -> DiffusionPipeline:
    return family.pipeline_class.from_pretrained(
        folder, local_files_only=True, **{DTYPE_KWARG: dtype}, **family.load_kwargs()
    )


class OneSlotCache:
    """Keeps one loaded object (a model, a ControlNet) and hands it out again for the same key.

    A different key releases the old object before the new one loads: two Stable Diffusion
    models may not fit in GPU memory together. Thread-safe: one load at a time.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value = None
        self._key = None

    def get(self, key, load, on_hit=None):
        """The cached object for `key`, or `load()`'s after releasing the old one.
        `on_hit(value)` may check a cached object before it is returned (and raise)."""
        with self._lock:
            if self._value is not None and self._key == key:
                if on_hit is not None:
                    on_hit(self._value)
                return self._value
            self._release()
            self._value, self._key = load(), key
            return self._value

    def clear(self) -> None:
        """Forget the cached object, freeing its memory (unless someone still holds it)."""
        with self._lock:
            self._release()

    def _release(self) -> None:
        if self._value is None:
            return
        device = self._value.device
        self._value = self._key = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        elif device.type == "mps":
            torch.mps.empty_cache()


_models = OneSlotCache()


def unload_pipeline() -> None:
    """Forget the cached model, freeing its memory (unless someone still holds it)."""
    _models.clear()


def load_pipeline(
    ref: str | os.PathLike[str],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    config: str | os.PathLike[str] | None = None,
) -> LoadedModel:
    """Load (or reuse) a Stable Diffusion 1.x/2.x or SDXL pipeline.

    `ref` is "demo", a hub id ("runwayml/stable-diffusion-v1-5"), a diffusers folder, or a
    .safetensors/.ckpt file. A single file's family is read from its weight names and loaded with
    the configuration the project ships for that family (offline); `config` (a diffusers folder or
    hub id of the same family) overrides it, e.g. for an SD 2.x model that is not v-prediction. Raises `ModelLoadError` with an actionable message.
    The same weights on the same device and dtype return the same `LoadedModel` object.
    """
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    source = _resolve_source(ref, config)

    def load() -> LoadedModel:
        pipe, identity = _load(source, dt)
        try:
            family = family_of_pipeline(pipe)
        except UnsupportedModelError as e:
            raise ModelLoadError(f"{ref}: {e}.") from e
        pipe = pipe.to(dev)
        pipe.set_progress_bar_config(disable=True)
        return LoadedModel(pipe, str(ref), identity, dev, dt, family)

    return _models.get((source.key, str(dev), dt), load)
