"""Wire request -> `core.collage.Collage`: decode the PNGs (PIL), check what only pixels tell.

Everything here reports problems the way `wire.JobRequest.validate` does, one per field, so the
client gets a single 422 listing all of them.
"""

from __future__ import annotations

import inspect
import io
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from core.collage import Collage, CollageError, Layer
from core.embeddings import EmbeddingFiles, find_uses
from core.loras import LoraSpec
from core.model_library import LibraryEntry
from core.sizing import validate_any_size
from krita_plugin.collage_diffusion import wire

from .catalog import ModelCatalog
from .config import BridgeConfig


class RequestProblems(Exception):
    """A request the bridge will not run; `status` is the HTTP status to answer with."""

    def __init__(self, problems: list[str], status: int = 422, message: str = "invalid request"):
        self.problems = list(problems)
        self.status = status
        self.message = message
        super().__init__("; ".join(self.problems))


@dataclass
class Converted:
    """A request ready for the engine."""

    collage: Collage
    model: str
    variants: int
    seeds: list[int] | None
    base_image: np.ndarray | None  # (H, W, 3) uint8, for regenerate
    regenerate_layer: int | None
    regenerate_dilation: int
    nbytes: int  # decoded pixels held until the job runs
    loras: list[LoraSpec] = field(default_factory=list)
    output: str = wire.OUTPUT_IMAGE  # or wire.OUTPUT_LAYERS: each result also as a layer stack
    embeddings: EmbeddingFiles | None = None  # the library embeddings the texts may name
    regenerate_mask: np.ndarray | None = None  # (H, W) bool: a selection to regenerate
    controlnet: LibraryEntry | None = None  # the library ControlNet the request named


def engine_supports_regenerate() -> bool:
    """ENGINE HOOK (regenerate): whether core has `core.generate.Regenerate` and `generate` takes
    ``regenerate=``; `engine.Engine.run` passes it then. An engine without it gets regenerate
    requests validated in full and answered 422 on `regenerate_layer`."""
    import core.generate

    params = inspect.signature(core.generate.generate).parameters
    return hasattr(core.generate, "Regenerate") and "regenerate" in params


def parse_request(body: bytes, config: BridgeConfig, catalog: ModelCatalog) -> wire.JobRequest:
    """Read and validate the JSON body (no pixels decoded yet). Raises `RequestProblems`."""
    try:
        request = wire.JobRequest.from_json(body)
    except wire.WireError as error:
        unreadable = any(p.startswith("body:") for p in error.problems)
        raise RequestProblems(error.problems, status=400 if unreadable else 422) from None
    problems = request.validate(config.limits)
    problems += model_problems(request.model, config, catalog)
    if problems:
        raise RequestProblems(problems)
    return request


def model_problems(model: object, config: BridgeConfig, catalog: ModelCatalog) -> list[str]:
    if model is None or not isinstance(model, str) or catalog.allows(model):
        return []  # a non-string is reported by validate
    allowed = ", ".join(map(repr, config.models))
    if catalog.library is not None:
        allowed += " and the model folders' checkpoints listed in /info"
    return [
        f"model: {model!r} is not a model of this bridge; it allows {allowed}"
        " (a request cannot name a file on the server)"
    ]


def library_choices(request: wire.JobRequest, converted: Converted, catalog: ModelCatalog, engine) -> None:
    """Fill `converted`'s LoRAs and ControlNet from the request's names, each a library entry
    checked against the job's model family (when it is known before loading: else only the
    engine's checks when the job runs). Raises `RequestProblems` naming `loras[i]`, `controlnet`."""
    if not request.loras and request.controlnet is None:
        return
    family = catalog.details(converted.model, engine).family  # the family's id; "" when not known
    problems: list[str] = []
    converted.loras = lora_specs(request, catalog, family, problems)
    if request.controlnet is not None:
        converted.controlnet = controlnet_entry(request.controlnet, catalog, family, problems)
    if problems:
        raise RequestProblems(problems)


def lora_specs(
    request: wire.JobRequest, catalog: ModelCatalog, model_family: str, problems: list[str]
) -> list[LoraSpec]:
    """The request's LoRAs as library files; a problem naming `loras[i]` for each that is not one
    or was made for another family than `model_family` (an id)."""
    specs = []
    for i, item in enumerate(request.loras):
        where, name = f"loras[{i}]", item["name"]
        entry = catalog.find_lora(name)
        if entry is None:
            problems.append(
                f"{where}.name: {name!r} is not a LoRA of this bridge's model folders (see /info's loras)"
            )
            continue
        if entry.family is not None and model_family and entry.family.id != model_family:
            problems.append(
                f"{where}: LoRA {name!r} was made for {entry.family.label}, not for the model of this job"
                f" ({model_family})"
            )
            continue
        specs.append(LoraSpec(entry.path, float(item.get("weight", 1.0)), field=where, name=name))
    return specs


def job_texts(request: wire.JobRequest) -> list[tuple[str, str]]:
    """(field, text) of every text of a request that may name embeddings (hidden layers' are not
    encoded)."""
    texts = [("prompt", request.prompt), ("negative_prompt", request.negative_prompt or "")]
    layers = enumerate(request.layers)
    return texts + [(f"layers[{i}].text", layer.text) for i, layer in layers if layer.visible]


def embedding_files(request: wire.JobRequest, catalog: ModelCatalog, model_family) -> EmbeddingFiles:
    """The library embeddings for the job, after checking the request's uses: a name that is no
    embedding of the model folders (rescanned once, so a file added a moment ago is found) or one
    made for another family than the job's model (`model_family()`: its id, "" when not known
    before loading) is `RequestProblems` naming the field. The width check against the loaded
    model's text encoders happens when the job runs (`core.embeddings`)."""
    texts = job_texts(request)
    files = catalog.embedding_files()
    found = [find_uses(text, files, where) for where, text in texts]
    if any(problems for _uses, problems in found):
        files = catalog.embedding_files(rescan=True)
        found = [find_uses(text, files, where) for where, text in texts]
    problems = [p for _uses, ps in found for p in ps]
    used: dict[str, str] = {}  # name -> the field of its first use
    for (where, _text), (uses, _problems) in zip(texts, found, strict=True):
        for u in uses:
            used.setdefault(u.name, where)
    family = model_family() if used else ""
    for name, where in used.items():
        made_for = catalog.embedding_family(name)
        if made_for is not None and family and made_for.id != family:
            problems.append(
                f"{where}: embedding {name!r} was made for {made_for.label}, not for the model of this job"
                f" ({family})"
            )
    if problems:
        raise RequestProblems(problems)
    return files


def controlnet_entry(
    name: str, catalog: ModelCatalog, model_family: str, problems: list[str]
) -> LibraryEntry | None:
    """The library ControlNet by this name; a problem naming `controlnet` when there is none or it
    was made for another family than `model_family` (an id)."""
    entry = catalog.find_controlnet(name)
    if entry is None:
        problems.append(
            f"controlnet: {name!r} is not a ControlNet of this bridge's model folders (see /info's controlnets)"
        )
        return None
    if entry.family is not None and model_family and entry.family.id != model_family:
        problems.append(
            f"controlnet: ControlNet {name!r} was made for {entry.family.label}, not for the model of this"
            f" job ({model_family})"
        )
        return None
    return entry


def ip_adapter_problems(
    request: wire.JobRequest, converted: Converted, catalog: ModelCatalog, engine
) -> None:
    """Refuse (422, naming `layers[i].appearance`) a job whose layers ask for "ip-adapter" when the
    model folders hold no IP-Adapter with an image encoder for the job's model family."""
    wanted = [
        i
        for i, spec in enumerate(request.layers)
        if spec.visible and spec.appearance == "ip-adapter" and spec.appearance_weight > 0
    ]
    if not wanted:
        return
    details = catalog.details(converted.model, engine)
    if catalog.may_have_ip_adapter(details.family):
        return
    label = details.family_label or "this model's family"
    raise RequestProblems(
        [
            f'layers[{i}].appearance: "ip-adapter" needs an IP-Adapter for {label} and its CLIP image '
            "encoder in the bridge's model folders (models/ipadapter, models/clip_vision); there is "
            "none (/info's ip_adapter_families lists the families that have one)"
            for i in wanted
        ]
    )


def to_collage(request: wire.JobRequest, config: BridgeConfig) -> Converted:
    """Decode the validated request into a collage the engine can run. Raises `RequestProblems`."""
    problems: list[str] = []
    canvas = (request.width, request.height)
    layers = []
    nbytes = 0
    for i, spec in enumerate(request.layers):
        image = decode_png(problems, f"layers[{i}].png", spec.png, "RGBA")
        if image is None:
            continue
        nbytes += image.nbytes
        layers.append(
            Layer(
                text=spec.text,
                image=image,
                offset=(spec.x, spec.y),
                name=spec.name,
                visible=spec.visible,
                opacity=float(spec.opacity),
                strength=None if spec.strength is None else float(spec.strength),
                attention_weight=float(spec.attention_weight),
                control_weight=float(spec.control_weight),
                appearance=spec.appearance,
                appearance_weight=float(spec.appearance_weight),
            )
        )
    background: tuple[int, int, int] | np.ndarray = tuple(request.background)  # type: ignore[assignment]
    if request.background_png is not None:
        decoded = decode_png(problems, "background_png", request.background_png, None)
        if decoded is not None:
            background = decoded
            nbytes += decoded.nbytes
    base_image = None
    if request.base_image is not None:
        base_image = decode_png(problems, "base_image", request.base_image, "RGB")
        if base_image is not None:
            nbytes += base_image.nbytes
    regenerate_mask = None
    if request.regenerate_mask is not None:
        grey = decode_png(problems, "regenerate_mask", request.regenerate_mask, "L")
        if grey is not None:
            regenerate_mask = grey > 0
            nbytes += regenerate_mask.nbytes
            if not regenerate_mask.any():
                problems.append("regenerate_mask: selects no pixel (every pixel is 0)")
    if problems:
        raise RequestProblems(problems)

    collage = Collage(
        prompt=request.prompt,
        layers=layers,
        width=request.width,
        height=request.height,
        negative_prompt=request.negative_prompt,
        seed=request.seed,
        steps=request.steps,
        guidance_scale=float(request.guidance_scale),
        strength=float(request.strength),
        model=request.model or config.model,
        scheduler=request.scheduler,
        clip_skip=request.clip_skip,
        background=background,
    )
    if hasattr(collage, "feather_px"):
        collage.feather_px = request.feather_px
    try:
        validate_any_size(collage)  # any canvas size: the engine generates at a valid one
    except CollageError as error:
        raise RequestProblems([_wire_names(p) for p in error.problems]) from None
    if base_image is not None and base_image.shape[:2] != (canvas[1], canvas[0]):
        raise RequestProblems([f"base_image: must be the canvas size {canvas[0]}×{canvas[1]}"])
    if request.regenerate_layer is not None and not engine_supports_regenerate():
        raise RequestProblems(
            ["regenerate_layer: not supported by this engine yet (base_image and regenerate_layer are valid)"]
        )
    return Converted(
        collage=collage,
        model=request.model or config.model,
        variants=request.variants,
        seeds=list(request.seeds) if request.seeds is not None else None,
        base_image=base_image,
        regenerate_layer=request.regenerate_layer,
        regenerate_dilation=request.regenerate_dilation,
        nbytes=nbytes,
        output=request.output,
        regenerate_mask=regenerate_mask,
    )


def decode_png(problems: list[str], name: str, data: bytes, mode: str | None) -> np.ndarray | None:
    """The PNG as a uint8 array in `mode` (None: RGB, or RGBA when it has alpha), or None after
    adding a problem. The header was checked against the limits before, so no bomb gets here."""
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            img.load()
            target = mode or (
                "RGBA" if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info else "RGB"
            )
            return np.asarray(img.convert(target), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        problems.append(f"{name}: cannot be decoded as a PNG ({error})")
        return None


def _wire_names(problem: str) -> str:
    """Core names a layer's pixels `.image` and its placement `.offset`; the wire says png and x, y."""
    problem = re.sub(r"^(layers\[\d+\][^:]*)\.image:", r"\1.png:", problem)
    return re.sub(r"^(layers\[\d+\][^:]*)\.offset:", r"\1.x, y:", problem)
