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
from diffusers import DiffusionPipeline

from .demo_model import DEMO_MODEL_ID, DEMO_VERSION, ensure_demo_model
from .families import (
    SD1,
    SDXL,
    ModelFamily,
    UnsupportedModelError,
    checkpoint_family,
    family_of_pipeline,
    sd_family_of_text_encoder,
)
from .random_models import ensure_config_folder
from .verbosity import debug_requested

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
    "a diffusers model folder (with model_index.json), or a Stable Diffusion 1.x/2.x or SDXL "
    "checkpoint file (.safetensors or .ckpt)."
)
# Pipelines whose folders hold a model of a family the engine runs (img2img variants load the same
# weights); the inpainting pipelines are refused with their own message.
_PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": None,  # SD 1.x or 2.x: told apart by the text encoder's width
    "StableDiffusionImg2ImgPipeline": None,
    "StableDiffusionXLPipeline": SDXL,
    "StableDiffusionXLImg2ImgPipeline": SDXL,
}


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says why in terms a painter can act on."""


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


@dataclass(frozen=True)
class _Source:
    kind: str  # "demo" | "hub" | "folder" | "file"
    location: str  # hub id or resolved path
    key: str  # cache key; equals the identity except for hub ids (resolved on download)
    config: str | None = None  # single files: diffusers folder or hub id with the pipeline config
    family: ModelFamily | None = None  # known before loading for folders and files


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


def folder_family(folder: Path, what: str = "model folder") -> ModelFamily:
    """The family of the diffusers pipeline in `folder`, from its model_index.json and configs;
    raises `ModelLoadError` for a folder that is not a pipeline the engine runs."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(
            f"{what} {folder} is not a diffusers model: it has no model_index.json. Expected a folder "
            "saved with diffusers (model_index.json plus unet/, vae/, text_encoder/, tokenizer/ and "
            "scheduler/ subfolders), or pick the checkpoint file (.safetensors/.ckpt) itself."
        )
    index = _read_json(index_file)
    cls = str(index.get("_class_name", "diffusers"))
    if "Inpaint" in cls:
        raise ModelLoadError(
            f"{folder} holds a {cls} (an inpainting model); use the ordinary (non-inpainting) version "
            "of the model: this tool does its own masking."
        )
    if cls not in _PIPELINE_FAMILIES:
        raise ModelLoadError(
            f"{folder} holds a {cls} model; only Stable Diffusion 1.x/2.x and SDXL pipelines are supported."
        )
    family = _PIPELINE_FAMILIES[cls]
    present = {name for name, entry in index.items() if isinstance(entry, list) and entry[0]}
    if family is SDXL and "text_encoder_2" in present and "text_encoder" not in present:
        raise ModelLoadError(
            f"{folder} is an SDXL refiner (it has only the second text encoder); the refiner only "
            "polishes finished images: use an SDXL base model or a fine-tune of it."
        )
    required = [*_REQUIRED_COMPONENTS, *(("text_encoder_2", "tokenizer_2") if family is SDXL else ())]
    missing = [c for c in required if c not in present]
    if missing:
        raise ModelLoadError(f"{folder} holds a {cls} model but lacks {', '.join(missing)}.")
    unet_config = folder / "unet" / "config.json"
    if unet_config.is_file():
        channels = _read_json(unet_config).get("in_channels", 4)
        if channels != 4:
            raise ModelLoadError(
                f"{folder}: its U-Net takes {channels} input channels (an inpainting or instruct "
                "model); only ordinary 4-channel models are supported."
            )
    if family is None:
        encoder_config = folder / "text_encoder" / "config.json"
        family = sd_family_of_text_encoder(_read_json(encoder_config) if encoder_config.is_file() else {})
    return family


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


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
        family = folder_family(path)  # first: it explains a folder that is not a model
        return _Source("folder", str(path), _folder_identity(path), family=family)

    if path.suffix.lower() not in MODEL_FILE_SUFFIXES:
        raise ModelLoadError(f"unsupported model file type '{path.suffix or '(none)'}': {path}. " + _EXPECTED)
    check_checkpoint_file(path)
    family = checkpoint_file_family(path)
    config_ref = _resolve_config(config)
    identity = f"file:{path}|{stat_key(path)}"
    if config_ref is not None:
        identity += f"|config={config_ref}"
    return _Source("file", str(path), identity, config_ref, family)


def _resolve_config(config: str | os.PathLike[str] | None) -> str | None:
    if config is None:
        return None
    config = str(config)
    if not looks_like_path(config):
        return config  # hub id
    folder = Path(config).expanduser().resolve()
    if not folder.is_dir():
        raise ModelLoadError(f"config folder not found: {folder} (it should be a diffusers model folder)")
    folder_family(folder, what="config folder")
    return str(folder)


def _checkpoint_problem(keys: list[str]) -> str | None:
    """Why these state-dict keys are not a full checkpoint of some model family, or None if they
    look like one (`checkpoint_file_family` then says which family, or why it is not supported)."""
    if any(k.startswith(("model.diffusion_model.", "conditioner.", "double_blocks.")) for k in keys):
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


def checkpoint_file_family(path: Path) -> ModelFamily:
    """The family of a single checkpoint file, read from its weight names without loading weights
    (a .safetensors header; a .ckpt is memory-mapped, so its tensors are not read either)."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                shapes = {
                    k: f.get_slice(k).get_shape() for k in keys if k.endswith("input_blocks.0.0.weight")
                }
        else:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else {}
            keys = list(state)
            shapes = {k: tuple(v.shape) for k, v in state.items() if k.endswith("input_blocks.0.0.weight")}
    except Exception as e:  # each format raises its own error types for damaged files
        raise ModelLoadError(f"{path} could not be read (damaged or incomplete download?): {e}") from e
    try:
        return checkpoint_family(keys, shapes.__getitem__)
    except UnsupportedModelError as e:
        raise ModelLoadError(f"{path} cannot be used as a model: {e}.") from e


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
    if "does not seem to contain a valid CLIP model" in message:
        # diffusers picks each text encoder's weights by their width; none had the configured one.
        return "a text encoder's width is not the configured one"
    return None


def _from_folder(folder: Path, family: ModelFamily, dtype: torch.dtype) -> DiffusionPipeline:
    return family.pipeline_class.from_pretrained(
        folder, local_files_only=True, **{DTYPE_KWARG: dtype}, **family.load_kwargs()
    )


def peek_model(ref: str | os.PathLike[str]) -> tuple[ModelFamily | None, int]:
    """(family, native size in pixels) of a model from its files, without loading any weights;
    (None, 0) when that cannot be told yet (a hub id not downloaded, a missing or broken file)."""
    try:
        source = _resolve_source(ref, None)
        folder: Path | None = None
        if source.kind == "demo":
            folder = ensure_demo_model()
        elif source.kind == "folder":
            folder = Path(source.location)
        elif source.kind == "hub":
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(source.location, "model_index.json")
            folder = Path(cached).parent if isinstance(cached, str) else None
        if folder is None:
            family = source.family
            return family, (family.native_size if family else 0)
        family = folder_family(folder)
        unet, vae = _read_json(folder / "unet" / "config.json"), _read_json(folder / "vae" / "config.json")
        factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
        return family, int(unet.get("sample_size", family.native_size // factor)) * factor
    except (ModelLoadError, OSError, ValueError):
        return None, 0


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
