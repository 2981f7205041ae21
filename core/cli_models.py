"""What `collage generate` takes from its model options (--model, --controlnet, --lora,
--ip-adapter/--image-encoder) and --models-dir: references core loads, checked before the model is
loaded, each problem a `CollageError` or `ValueError` naming the option."""

from __future__ import annotations

import re
from pathlib import Path

from .collage import CollageError


def model_reference(args) -> tuple[str, Path | None]:
    """--model as core loads it: a checkpoint of --models-dir by its name becomes its path (and
    sidecar config); "demo", a path or a hub id stay what they are."""
    if not args.models_dir:
        return args.model, None
    from .model_library import ModelLibrary, is_plain_reference, resolve_model_name
    from .model_sources import looks_like_path
    from .weight_files import CHECKPOINT

    library = ModelLibrary(args.models_dir)
    if library.problems():
        raise ValueError("; ".join(library.problems()))
    ref, config = resolve_model_name(args.model, library)
    if ref == args.model and not is_plain_reference(ref) and looks_like_path(ref):  # "demo" is one
        names = [e.name for e in library.entries(CHECKPOINT) if e.usable]
        shown = ", ".join(names[:20]) + (f", … ({len(names)} in all)" if len(names) > 20 else "")
        raise ValueError(
            f"--model {args.model!r}: no such file, nor a checkpoint in --models-dir "
            f"(which has: {shown or 'none'})"
        )
    return ref, config


def ip_adapter_choice(args):
    """`EngineOptions.ip_adapter`: --ip-adapter with --image-encoder, else a function finding the
    pair of --models-dir that fits the loaded model (None without either)."""
    from .ip_adapter_files import IPAdapterFiles
    from .model_library import ModelLibrary, find_ip_adapter

    if (args.ip_adapter is None) != (args.image_encoder is None):
        raise CollageError(
            [
                "--ip-adapter, --image-encoder: give both (an IP-Adapter and the image encoder it was trained with)"
            ]
        )
    if args.ip_adapter is not None:
        missing = [
            f"{o}: {p} does not exist"
            for o, p in (("--ip-adapter", args.ip_adapter), ("--image-encoder", args.image_encoder))
            if not p.exists()
        ]
        if missing:
            raise CollageError(missing)
        return IPAdapterFiles(args.ip_adapter, args.image_encoder)
    if not args.models_dir:
        return None
    library = ModelLibrary(args.models_dir)
    return lambda model: find_ip_adapter(library, model.pipeline.unet.config.cross_attention_dim)


def controlnet_reference(args) -> str | None:
    """--controlnet as core loads it: a ControlNet of --models-dir by its name becomes its path;
    "demo", an existing file or folder, or a hub id stay what they are."""
    ref = args.controlnet
    if not ref or not args.models_dir or Path(ref).expanduser().exists():
        return ref
    from .model_library import ModelLibrary
    from .weight_files import CONTROLNET

    entry = ModelLibrary(args.models_dir).find(CONTROLNET, ref)
    if entry is not None and not entry.usable:
        raise CollageError([f"--controlnet {ref}: {entry.error}"])
    return str(entry.path) if entry is not None else ref


def lora_specs(args) -> list:
    """--lora FILE_OR_NAME[:WEIGHT] options as `core.loras.LoraSpec`s: a file, else a LoRA of
    --models-dir by its name. Raises `CollageError` naming the option."""
    from .loras import LoraSpec
    from .model_library import ModelLibrary
    from .weight_files import LORA

    library = ModelLibrary(args.models_dir) if args.models_dir else None
    specs, problems = [], []
    for text in args.lora:
        where = f"--lora {text}"
        # A trailing ":number" is the weight; any other ':' is part of the name or path.
        match = re.fullmatch(r"(.+):([-+]?(?:\d+\.?\d*|\.\d+))", text)
        ref, weight = (match[1], float(match[2])) if match else (text, 1.0)
        path = Path(ref).expanduser()
        if not path.is_file():
            entry = library.find(LORA, ref) if library is not None else None
            if entry is None or not entry.usable:
                names = [e.name for e in library.entries(LORA) if e.usable] if library is not None else []
                problems.append(
                    f"{where}: no such file, nor a LoRA in --models-dir (which has: {', '.join(names) or 'none'})"
                )
                continue
            path = entry.path
        specs.append(LoraSpec(path, weight, field=where, name=ref))
    if problems:
        raise CollageError(problems)
    return specs


def embedding_files(args, collage):
    """The embeddings of --models-dir, which the texts may name (`core.embeddings`); a name none
    has is a `CollageError` now, before the model is loaded."""
    from .embeddings import EmbeddingFiles, embedding_problems
    from .model_library import ModelLibrary

    files = EmbeddingFiles.from_library(ModelLibrary(args.models_dir) if args.models_dir else None)
    texts = [("prompt", collage.prompt), ("negative_prompt", collage.negative_prompt or "")]
    texts += [(f"layers[{i}].text", layer.text) for i, layer in enumerate(collage.layers) if layer.visible]
    problems = embedding_problems(texts, files)
    if problems:
        raise CollageError(problems)
    return files
