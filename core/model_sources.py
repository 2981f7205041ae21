"""What a model reference points to, told from its files without loading any weights.

A reference is "demo", a hub id, a diffusers folder or a single checkpoint file. `_resolve_source`
classifies it and checks what can be checked cheaply (a folder's `model_index.json` and configs, a
single file's header); `folder_family` and `checkpoint_file_family` say which model family it is
(or why it is not one the engine runs); `peek_model` gives family and native size for `/info`.
`core.models` loads what these describe.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .demo_model import DEMO_MODEL_ID, DEMO_VERSION, ensure_demo_model
from .families import (
    SDXL,
    ModelFamily,
    UnsupportedModelError,
    checkpoint_family,
    sd_family_of_text_encoder,
)

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


@dataclass(frozen=True)
class _Source:
    kind: str  # "demo" | "hub" | "folder" | "file"
    location: str  # hub id or resolved path
    key: str  # cache key; equals the identity except for hub ids (resolved on download)
    config: str | None = None  # single files: diffusers folder or hub id with the pipeline config
    family: ModelFamily | None = None  # known before loading for folders and files


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


def model_checkpoint_problem(keys: list[str]) -> str | None:
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
    problem_of = problem_of or model_checkpoint_problem
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
