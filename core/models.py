"""Loading Stable Diffusion models: the demo model, hub ids, diffusers folders, single files.

One model is kept loaded at a time (they are gigabytes); `load_pipeline` reuses it when asked for
the same weights on the same device and dtype, and releases it before loading another.
"""

from __future__ import annotations

import gc
import json
import os
import re
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from .demo_model import DEMO_MODEL_ID, DEMO_VERSION, ensure_demo_model

DEVICE_ENV = "COLLAGE_DEVICE"
DTYPE_ENV = "COLLAGE_DTYPE"
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt")
# Suffixes that mark a reference as a file name even when the file does not exist, so a typo in
# "models/sd15.safetensors" is reported as "not found" rather than as a failed hub download.
_FILE_LIKE_SUFFIXES = {
    *MODEL_FILE_SUFFIXES,
    ".pt",
    ".pth",
    ".bin",
    ".sft",
    ".gguf",
    ".onnx",
    ".json",
    ".yaml",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Components the engine needs; a folder without them is some other kind of diffusers model.
_REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
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
_EXPECTED = (
    "Expected the demo model ('demo'), a Hugging Face hub id such as 'runwayml/stable-diffusion-v1-5', "
    "a diffusers model folder (with model_index.json), or a Stable Diffusion checkpoint file "
    "(.safetensors or .ckpt)."
)


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says why in terms a painter can act on."""


@dataclass(frozen=True, eq=False)
class LoadedModel:
    pipeline: StableDiffusionPipeline
    ref: str  # what the user asked for
    identity: str  # identifies the exact weights (for caches keyed on the model)
    device: torch.device
    dtype: torch.dtype


@dataclass(frozen=True)
class _Source:
    kind: str  # "demo" | "hub" | "folder" | "file"
    location: str  # hub id or resolved path
    key: str  # cache key; equals the identity except for hub ids (resolved on download)
    config: str | None = None  # single files: diffusers folder or hub id with the pipeline config


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


def looks_like_path(ref: str) -> bool:
    if os.path.exists(os.path.expanduser(ref)):
        return True
    if ref.startswith((".", "~")) or os.path.isabs(ref) or "\\" in ref:
        return True
    if Path(ref).suffix.lower() in _FILE_LIKE_SUFFIXES:
        return True
    # "owner/name" that does not exist locally is a hub id; anything else (a bare name,
    # "a/b/c") can only be a path.
    return not _HUB_ID.match(ref)


def stat_key(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _folder_identity(folder: Path) -> str:
    parts = [f"folder:{folder}", f"index={stat_key(folder / 'model_index.json')}"]
    unet = folder / "unet"
    for weights in sorted(unet.glob("diffusion_pytorch_model*")) if unet.is_dir() else []:
        parts.append(f"{weights.name}={stat_key(weights)}")
    return "|".join(parts)


def _check_diffusers_folder(folder: Path, what: str = "model folder") -> None:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(
            f"{what} {folder} is not a diffusers model: it has no model_index.json. Expected a folder "
            "saved with diffusers (model_index.json plus unet/, vae/, text_encoder/, tokenizer/ and "
            "scheduler/ subfolders), or pick the checkpoint file (.safetensors/.ckpt) itself."
        )
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {index_file}: {e}") from e
    if "text_encoder_2" in index:
        raise ModelLoadError(
            f"{folder} is a {index.get('_class_name', 'two-text-encoder')} model (e.g. SDXL); "
            "only Stable Diffusion 1.x/2.x models are supported."
        )
    missing = [c for c in _REQUIRED_COMPONENTS if not (index.get(c) or [None])[0]]
    if missing:
        raise ModelLoadError(
            f"{folder} holds a {index.get('_class_name', 'diffusers')} model, not a Stable Diffusion "
            f"pipeline: it lacks {', '.join(missing)}."
        )


def _resolve_source(ref: str | os.PathLike[str], config: str | os.PathLike[str] | None) -> _Source:
    """Classify `ref` and check what can be checked cheaply (no weights are read)."""
    ref = str(ref).strip()
    if not ref:
        raise ModelLoadError("no model given. " + _EXPECTED)
    if ref == DEMO_MODEL_ID:
        return _Source("demo", DEMO_MODEL_ID, DEMO_VERSION)
    if not looks_like_path(ref):
        return _Source("hub", ref, f"hub:{ref}")

    path = Path(ref).expanduser().resolve()
    if not path.exists():
        raise ModelLoadError(f"model file or folder not found: {path}")
    if path.is_dir():
        _check_diffusers_folder(path)
        return _Source("folder", str(path), _folder_identity(path))

    if path.suffix.lower() not in MODEL_FILE_SUFFIXES:
        raise ModelLoadError(f"unsupported model file type '{path.suffix or '(none)'}': {path}. " + _EXPECTED)
    check_checkpoint_file(path)
    config_ref = _resolve_config(config)
    identity = f"file:{path}|{stat_key(path)}"
    if config_ref is not None:
        identity += f"|config={config_ref}"
    return _Source("file", str(path), identity, config_ref)


def _resolve_config(config: str | os.PathLike[str] | None) -> str | None:
    if config is None:
        return None
    config = str(config)
    if not looks_like_path(config):
        return config  # hub id
    folder = Path(config).expanduser().resolve()
    if not folder.is_dir():
        raise ModelLoadError(f"config folder not found: {folder} (it should be a diffusers model folder)")
    _check_diffusers_folder(folder, what="config folder")
    return str(folder)


def _checkpoint_problem(keys: list[str]) -> str | None:
    """Why these state-dict keys are not a full SD 1.x/2.x checkpoint, or None if they look like one."""
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "it is an SDXL checkpoint; only Stable Diffusion 1.x/2.x models are supported"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return None
    if any("lora" in k.lower() for k in keys):
        return "it is a LoRA, not a full model; load a base model and apply the LoRA to it"
    if any(k.startswith(("encoder.", "decoder.", "first_stage_model.")) for k in keys):
        return "it holds only a VAE, not a full model"
    if any(k in ("string_to_param", "emb_params", "clip_l") for k in keys):
        return "it is a textual-inversion embedding, not a full model"
    return "it has no Stable Diffusion U-Net weights (no 'model.diffusion_model.*' keys)"


def check_checkpoint_file(path: Path, problem_of=None, what: str = "a model") -> None:
    """Reject files that cannot be `what`, cheaply: safetensors headers are read, not weights.
    `problem_of(keys)` says why a set of weight names is not `what` (None: it is)."""
    problem_of = problem_of or _checkpoint_problem
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ModelLoadError(
                f"{path} is not a valid .safetensors checkpoint (damaged or incomplete download?): {e}"
            ) from e
        problem = problem_of(keys)
        if problem:
            raise ModelLoadError(f"{path} cannot be used as {what}: {problem}.")
        return
    # .ckpt: a torch.save file is a zip archive (or, for very old files, a pickle starting 0x80).
    with open(path, "rb") as f:
        first = f.read(1)
    if not (zipfile.is_zipfile(path) or first == b"\x80"):
        raise ModelLoadError(
            f"{path} is not a valid {path.suffix.lower()} checkpoint (damaged or incomplete download?)"
        )


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


_SD_KWARGS = {
    # The engine never runs the NSFW checker: skipping it saves ~1.2 GB and a download.
    "safety_checker": None,
    "feature_extractor": None,
    "requires_safety_checker": False,
}


def quiet_loading() -> None:
    """Loading bars and notices from diffusers/transformers would drown our own progress output."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for logs in (diffusers_logging, transformers_logging):
        logs.disable_progress_bar()
        logs.set_verbosity_error()


def _load(source: _Source, dtype: torch.dtype) -> tuple[StableDiffusionPipeline, str]:
    """Load on CPU in `dtype`; returns the pipeline and the identity of its weights."""
    quiet_loading()
    common = {DTYPE_KWARG: dtype, **_SD_KWARGS}
    if source.kind == "demo":
        try:
            folder = ensure_demo_model()
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"the demo model is not available: {e}") from e
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, **common)
        return pipe, DEMO_VERSION

    if source.kind == "folder":
        try:
            pipe = StableDiffusionPipeline.from_pretrained(source.location, local_files_only=True, **common)
        except Exception as e:
            raise ModelLoadError(f"could not load the diffusers model in {source.location}: {e}") from e
        return pipe, source.key

    if source.kind == "hub":
        try:
            # download() returns the cached snapshot folder, whose name is the commit hash.
            folder = Path(StableDiffusionPipeline.download(source.location))
        except Exception as e:
            local = Path(source.location).resolve()
            raise ModelLoadError(
                f"could not get model '{source.location}' from the Hugging Face Hub: {e}\n{hub_help()} "
                "Or use a local .safetensors/.ckpt file or diffusers folder instead "
                f"(if you meant a local folder: {local} does not exist)."
            ) from e
        try:
            pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, **common)
        except Exception as e:
            raise ModelLoadError(f"could not load hub model '{source.location}' from {folder}: {e}") from e
        revision = folder.name if folder.parent.name == "snapshots" else None
        return pipe, f"hub:{source.location}" + (f"@{revision}" if revision else "")

    # A single checkpoint file with the original (LDM) key names; diffusers converts it.
    kwargs: dict[str, object] = {}
    if source.config is not None:
        kwargs["config"] = source.config
        kwargs["local_files_only"] = os.path.isdir(source.config)
    try:
        pipe = StableDiffusionPipeline.from_single_file(source.location, **common, **kwargs)
    except Exception as e:
        raise single_file_error(
            e,
            source.location,
            source.config,
            loaded_as="a Stable Diffusion checkpoint (damaged file, or a model type this tool does not support)",
            family="model",
            config_hint="--model-config, or config=): a diffusers folder or hub id of the same family, e.g. "
            "a local copy of runwayml/stable-diffusion-v1-5 for SD 1.x files.",
        ) from e
    return pipe, source.key


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
    """Load (or reuse) a Stable Diffusion pipeline.

    `ref` is "demo", a hub id ("runwayml/stable-diffusion-v1-5"), a diffusers folder, or a
    .safetensors/.ckpt file. For a single file, `config` (a diffusers folder or hub id of the same
    model family) supplies the pipeline configuration; without it diffusers guesses the family
    and fetches its configuration from the hub. Raises `ModelLoadError` with an actionable message.
    The same weights on the same device and dtype return the same `LoadedModel` object.
    """
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    source = _resolve_source(ref, config)

    def load() -> LoadedModel:
        pipe, identity = _load(source, dt)
        pipe = pipe.to(dev)
        pipe.set_progress_bar_config(disable=True)
        return LoadedModel(pipeline=pipe, ref=str(ref), identity=identity, device=dev, dtype=dt)

    return _models.get((source.key, str(dev), dt), load)
