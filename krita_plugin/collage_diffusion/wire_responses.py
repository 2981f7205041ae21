"""Responses and events (bridge -> client): job status, progress events, the long poll's answer,
info and errors. Readers keep the fields they know (a newer bridge may send more). Standard
library only (see `wire`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .wire_fields import _encode, _known
from .wire_png import b64decode
from .wire_protocol import FINISHED_STATES


class _Message:
    """What every message record shares: JSON out (`to_dict`, `to_json`) and a lenient read in
    (`from_dict`, `from_json`: the fields it knows; a newer peer may send more). Records with
    nested records override `from_dict`."""

    def to_dict(self) -> dict:
        return _encode(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict):
        return _known(cls, data)

    @classmethod
    def from_json(cls, text: str | bytes):
        return cls.from_dict(json.loads(text))


@dataclass
class ProgressInfo:
    """Where a running job is: `step` of `total` in `phase`, for the batch of variants that
    follows the `variants_done` already finished, of `variants` asked for."""

    phase: str
    step: int
    total: int
    variants_done: int = 0
    variants: int = 1


@dataclass
class ResultLayerInfo:
    """One layer of a result's stack (output "layers"): a PNG of `width`×`height` RGBA pixels
    placed with its top-left at (x, y) on the canvas. Fetch it from `url`."""

    name: str  # the input layer's name for an object; "background"
    kind: str  # "background" or "object"
    x: int
    y: int
    width: int
    height: int
    url: str
    bytes: int = 0


@dataclass
class ResultInfo:
    """One finished variant. Fetch its PNG from `url` (a path on the bridge).

    With output "layers", `layers` is the variant as a stack, bottom to top: the background, then
    one layer per visible input layer in the request's order. Stacked with normal blending they
    give the PNG at `url` (within 1/255; exactly where an object layer is opaque)."""

    index: int
    seed: int
    width: int
    height: int
    url: str
    bytes: int = 0
    layers: list[ResultLayerInfo] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> ResultInfo:
        data = dict(data)
        data["layers"] = [_known(ResultLayerInfo, layer) for layer in data.get("layers") or []]
        return _known(cls, data)


@dataclass
class JobStatus(_Message):
    """A job as the bridge keeps it (also its record on disk). Times are Unix seconds."""

    id: str
    state: str
    created: float
    model: str
    prompt: str = ""
    width: int = 0
    height: int = 0
    layers: int = 0
    variants: int = 1
    steps: int = 0
    started: float | None = None
    finished: float | None = None
    queue_position: int | None = None  # jobs ahead of this one (the running one included)
    progress: ProgressInfo | None = None
    error: str | None = None  # why it failed or was cancelled
    problems: list[str] = field(default_factory=list)  # per-field problems behind `error`, if any
    warnings: list[str] = field(default_factory=list)
    results: list[ResultInfo] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: "queued", "compute", "save", ...
    last_seq: int = 0  # sequence number of the job's latest event

    @property
    def finished_state(self) -> bool:
        return self.state in FINISHED_STATES

    @classmethod
    def from_dict(cls, data: dict) -> JobStatus:
        data = dict(data)
        progress = data.get("progress")
        data["progress"] = _known(ProgressInfo, progress) if isinstance(progress, dict) else None
        data["results"] = [ResultInfo.from_dict(r) for r in data.get("results") or []]
        return _known(cls, data)


@dataclass
class ProgressEvent(_Message):
    """One event of a job, numbered from 1 by `seq` in the order they happened.

    kind "state": the job entered `state` (`message` says why for failed/cancelled).
    kind "progress": `step` of `total` in `phase`, for the variants after the `variants_done`
    finished ones (of `variants`); every second or so `preview` carries a small PNG (RGB, at most
    256 pixels a side) of the image as it forms.
    """

    seq: int
    job_id: str
    kind: str
    state: str
    time: float
    phase: str = ""
    step: int = 0
    total: int = 0
    variants_done: int = 0
    variants: int = 1
    message: str = ""
    preview: bytes | None = None

    @classmethod
    def from_dict(cls, data: dict) -> ProgressEvent:
        data = dict(data)
        if data.get("preview") is not None:
            data["preview"] = b64decode(data["preview"])
        return _known(cls, data)


@dataclass
class EventsResponse(_Message):
    """Answer of the long poll: events after the asked-for sequence number, and the job's state.

    `done` is true once the job has finished: then no more events come (fetch the results).
    """

    job_id: str
    state: str
    done: bool
    last_seq: int
    events: list[ProgressEvent] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> EventsResponse:
        data = dict(data)
        data["events"] = [ProgressEvent.from_dict(e) for e in data.get("events", [])]
        return _known(cls, data)


@dataclass
class ModelDetails(_Message):
    """What the dock needs to know of a model a request may name (from its files, not loaded)."""

    name: str  # as in InfoResponse.models
    # "sd1", "sd2", "sdxl"; "" when it cannot be told before loading (a hub id not yet downloaded)
    family: str
    family_label: str  # for people: "Stable Diffusion XL"
    native_size: int  # the side of the square it was trained at (pixels); 0 when unknown
    size_multiple: int = 8  # generation sizes are multiples of this


#: Kinds of the model library's entries (a bridge started with --models-dir lists them in /info).
LIBRARY_KINDS = ("checkpoint", "lora", "embedding", "controlnet", "ipadapter", "clip_vision")


@dataclass
class LibraryEntry(_Message):
    """A file or folder of the bridge's model folders (--models-dir), read from its header only.
    Requests name it by `name` (the bridge finds the file; no path crosses the wire)."""

    name: str  # its path relative to its kind's folder, forward slashes: "sdxl/illustrious.safetensors"
    kind: str  # one of LIBRARY_KINDS
    family: str = ""  # "sd1", "sd2", "sdxl"; "" when its header does not tell
    family_label: str = ""  # for people: "Stable Diffusion XL"
    size: int = 0  # bytes
    error: str = ""  # why it cannot be used ("" when it can): a LoRA among checkpoints, a damaged file


@dataclass
class InfoResponse(_Message):
    api_version: int
    version: str  # the bridge's version
    model: str  # the default model
    models: list[str]  # every model a request may name
    model_loaded: bool  # whether the default model is in memory (else the first job loads it)
    device: str  # where the model runs ("cuda:0", "cpu", ...), or will once loaded
    dtype: str
    queue_length: int  # jobs waiting, not counting the running one
    running: str | None  # the running job's id
    versions: dict[str, str]  # python, torch, diffusers, aiohttp, ...
    limits: dict
    model_details: list[ModelDetails] = field(default_factory=list)  # one per entry of `models`
    # The model folders' contents (empty without --models-dir, and from bridges before them).
    # `models` holds the usable checkpoints' names; `checkpoints` every one, unusable ones with
    # their `error`.
    checkpoints: list[LibraryEntry] = field(default_factory=list)
    loras: list[LibraryEntry] = field(default_factory=list)
    embeddings: list[LibraryEntry] = field(default_factory=list)
    controlnets: list[LibraryEntry] = field(default_factory=list)
    ipadapters: list[LibraryEntry] = field(default_factory=list)  # IP-Adapters (models/ipadapter)
    clip_vision: list[LibraryEntry] = field(default_factory=list)  # their image encoders
    # The families ("sd1", "sdxl", ...) with a usable IP-Adapter and a fitting image encoder: a
    # layer's appearance "ip-adapter" works for a model of one of them.
    ip_adapter_families: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> InfoResponse:
        data = dict(data)
        data["model_details"] = [ModelDetails.from_dict(d) for d in data.get("model_details") or []]
        for key in _LIBRARY_FIELDS:
            data[key] = [LibraryEntry.from_dict(e) for e in data.get(key) or []]
        return _known(cls, data)

    def details(self, name: str | None = None) -> ModelDetails | None:
        """The details of a model (the default one when `name` is None), if the bridge sent them."""
        name = name or self.model
        return next((d for d in self.model_details if d.name == name), None)


#: InfoResponse's field for each library kind.
_LIBRARY_FIELDS = {
    "checkpoints": "checkpoint",
    "loras": "lora",
    "embeddings": "embedding",
    "controlnets": "controlnet",
    "ipadapters": "ipadapter",
    "clip_vision": "clip_vision",
}


@dataclass
class ErrorResponse(_Message):
    """Every 4xx/5xx answer: a sentence, and the per-field problems when there are several."""

    status: int
    error: str
    problems: list[str] = field(default_factory=list)
