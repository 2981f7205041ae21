"""The bridge's wire format, defined once: used by the bridge server and by the Krita plugin.

STANDARD LIBRARY ONLY. Krita runs plugins on its own Python (stdlib + PyQt, no numpy, no PIL),
so everything here must work there; the bridge imports it as
``from krita_plugin.collage_diffusion import wire``. docs/api.md documents the protocol with
examples; this module is its reference.

Everything travels as JSON; images are PNG files, base64-encoded inside the JSON. Layers are
cropped to their visible content before sending (`crop_to_content`), so a big canvas with small
objects stays cheap. Result images are fetched as plain PNG (``GET /jobs/{id}/results/{k}``).

The request classes are built leniently by `from_json` (which only rejects what cannot be read
at all: bad JSON, wrong structure, bad base64, unknown fields) and checked by `validate`, which
returns every problem as ``"<field>: <what is wrong>"``, e.g. ``"layers[2].strength: must be in 0..1"``.
The bridge answers 422 with that list; the plugin can run the same `validate` before sending.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
import zlib
from dataclasses import dataclass, field, fields

#: Bumped on an incompatible change. A request may name the version it speaks (`api_version`).
API_VERSION = 1

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7870
DEFAULT_MODEL = "demo"

# Layer names. The dock and `core.formats` (the CLI's reader of .ora/.psd) read names by this one
# rule, so a document gives the same collage from the dock as from `collage generate`.
# Names image editors give new layers: they say nothing about what the layer shows.
_DEFAULT_NAME = re.compile(
    r"""^(?:(?:paint|vector|fill|file|clone|text|shape|pasted|new|group)\s+)?
        (?:layer|background|group|shape|rectangle|ellipse|polygon|clipboard)
        (?:\s*\#?\d+)?                     # "Layer 3", "Layer #3"
        (?:\s+copy(?:\s*\#?\d+)?)*         # "Layer 3 copy 2"
        (?:\s*\(merged\))?$""",
    re.IGNORECASE | re.VERBOSE,
)


def is_default_name(name: str) -> bool:
    """Empty, a bare number, or a name an editor makes up ("Layer 3", "Paint Layer 2", "Background")."""
    name = name.strip()
    return not name or name.isdigit() or bool(_DEFAULT_NAME.match(name))


#: The token travels as ``Authorization: Bearer <token>`` on every request, websocket included.
AUTH_HEADER = "Authorization"
AUTH_SCHEME = "Bearer"

# ---------------------------------------------------------------------------------------------
# Routes. `{job_id}` is 32 lowercase hex digits, `{index}` a result index (0-based).

ROUTE_HEALTH = "/health"  # GET: HealthResponse
ROUTE_INFO = "/info"  # GET: InfoResponse
ROUTE_JOBS = "/jobs"  # POST JobRequest -> 202 JobStatus; GET -> JobList
ROUTE_JOB = "/jobs/{job_id}"  # GET -> JobStatus; DELETE -> DeleteResponse
ROUTE_JOB_CANCEL = "/jobs/{job_id}/cancel"  # POST -> JobStatus
ROUTE_JOB_EVENTS = "/jobs/{job_id}/events"  # GET ?after=N&timeout=S -> EventsResponse (long poll)
ROUTE_JOB_WS = "/jobs/{job_id}/ws"  # websocket ?after=N: ProgressEvent messages
ROUTE_JOB_RESULT = "/jobs/{job_id}/results/{index}"  # GET -> image/png; header X-Collage-Seed

RESULT_SEED_HEADER = "X-Collage-Seed"

#: Long-poll wait: the default and the most a client may ask for, seconds.
EVENTS_DEFAULT_TIMEOUT = 20.0
EVENTS_MAX_TIMEOUT = 60.0


def route(template: str, **params: object) -> str:
    """A concrete path: ``route(ROUTE_JOB_WS, job_id=job.id)``."""
    return template.format(**params)


# ---------------------------------------------------------------------------------------------
# Job states and event kinds.

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
FINISHED_STATES = (DONE, FAILED, CANCELLED)

EVENT_STATE = "state"  # the job changed state (message: the error, for "failed")
EVENT_PROGRESS = "progress"  # a step of a phase; now and then with a preview PNG
EVENT_KINDS = (EVENT_STATE, EVENT_PROGRESS)

#: Phases the engine reports today. `phase` is display text: new phases appear (e.g.
#: "learning appearance of 'cat'"), so a client shows unknown ones as they are.
PHASE_LOADING = "loading model"
PHASES = (PHASE_LOADING, "encoding", "sampling", "decoding")

#: The schedulers a request may name; the same list as `core.collage.SCHEDULERS`.
SCHEDULERS = ("default", "ddim", "euler", "dpm++2m")

#: Websocket client -> server message that cancels the job.
WS_CANCEL = {"type": "cancel"}


# ---------------------------------------------------------------------------------------------
# Limits.


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. The bridge reports its own in `InfoResponse.limits`."""

    max_request_bytes: int = 256 * 1024 * 1024  # the whole HTTP body (JSON with base64 PNGs)
    max_layers: int = 32
    max_side: int = 8192  # canvas width or height
    max_canvas_pixels: int = 4096 * 4096  # width * height
    max_layer_pixels: int = 4096 * 4096  # one layer's PNG, after cropping to content
    max_variants: int = 16
    max_steps: int = 1000
    max_text_chars: int = 4000  # prompt, negative prompt, each layer's text and name

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> Limits:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class WireError(ValueError):
    """A message that cannot be read at all. ``problems`` names each field, like `validate`."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


# ---------------------------------------------------------------------------------------------
# The request.


@dataclass
class LayerSpec:
    """One layer: its PNG (RGBA, cropped to content) placed with its top-left pixel at (x, y).

    The per-layer settings are those of `core.collage.Layer`; `strength` None means the job's.
    """

    text: str
    png: bytes
    x: int = 0
    y: int = 0
    name: str = ""
    visible: bool = True
    opacity: float = 1.0
    strength: float | None = None  # SDEdit strength of this layer; None = the job's `strength`
    attention_weight: float = 1.0  # masked cross-attention weight, 0..10 (0 = off)
    control_weight: float = 0.0  # ControlNet weight inside this layer, 0..2 (0 = off)
    appearance: bool = False  # learn this layer's look as a textual-inversion token

    def to_dict(self) -> dict:
        return _encode(self)


@dataclass
class JobRequest:
    """Everything a job needs: the collage (prompt, settings, layers bottom to top) and variants.

    Defaults are those of `core.collage.Collage`. Variant k uses seed ``seed + k`` unless
    `seeds` lists them (then ``len(seeds) == variants``).

    "Regenerate": `base_image` (a PNG of the whole canvas, usually an earlier result) with
    `regenerate_layer` (an index into `layers`) asks to redo only that layer's region of the
    base, `regenerate_dilation` pixels around it included. Both or neither must be given.
    """

    prompt: str
    layers: list[LayerSpec]
    width: int = 512
    height: int = 512
    negative_prompt: str = ""
    seed: int = 0
    seeds: list[int] | None = None
    variants: int = 1
    steps: int = 30
    guidance_scale: float = 7.5
    strength: float = 0.75
    scheduler: str = "default"
    feather_px: int = 4  # blend width inside the border of regenerated regions
    model: str | None = None  # one of the bridge's allowed models (InfoResponse.models); None = default
    background: list[int] = field(default_factory=lambda: [255, 255, 255])  # RGB under the layers
    background_png: bytes | None = None  # or a canvas-size RGB/RGBA PNG under the layers
    base_image: bytes | None = None  # canvas-size PNG to regenerate from
    regenerate_layer: int | None = None  # index into `layers`
    regenerate_dilation: int = 8  # how far around the layer's visible pixels may change
    api_version: int = API_VERSION

    # -- JSON -------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return _encode(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> JobRequest:
        """Read a request; raises `WireError` for what cannot be read (not for bad values)."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as error:
            raise WireError([f"body: not valid JSON ({error})"]) from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: object) -> JobRequest:
        problems: list[str] = []
        if not isinstance(data, dict):
            raise WireError([f"body: must be a JSON object, got {_json_type(data)}"])
        kwargs = _read_fields(cls, data, "", problems, binary=("background_png", "base_image"))
        for name in ("prompt", "layers"):
            if name not in data:
                problems.append(f"{name}: missing (required)")
        layers = data.get("layers", [])
        specs: list[LayerSpec] = []
        if not isinstance(layers, list):
            problems.append(f"layers: must be a list of layers, got {_json_type(layers)}")
        else:
            for i, item in enumerate(layers):
                where = f"layers[{i}]"
                if not isinstance(item, dict):
                    problems.append(f"{where}: must be an object, got {_json_type(item)}")
                    continue
                layer_kwargs = _read_fields(LayerSpec, item, where + ".", problems, binary=("png",))
                for name in ("text", "png"):
                    if name not in item:
                        problems.append(f"{where}.{name}: missing (required)")
                if not problems:
                    specs.append(LayerSpec(**layer_kwargs))
        if problems:
            raise WireError(problems)
        kwargs["layers"] = specs
        return cls(**kwargs)

    # -- validation --------------------------------------------------------------------------

    def validate(self, limits: Limits | None = None) -> list[str]:
        """Every problem of this request, each naming its field; empty when it is fine.

        Checks types, ranges and limits, and reads each PNG's header (not its pixels: the
        bridge decodes them and checks what only pixels tell, e.g. a layer with no visible pixel).
        """
        lim = limits or Limits()
        p: list[str] = []
        if not _is_int(self.api_version) or self.api_version != API_VERSION:
            p.append(f"api_version: this bridge speaks API version {API_VERSION}, got {self.api_version!r}")
        _check_text(p, "prompt", self.prompt, lim.max_text_chars, allow_empty=True)
        _check_text(p, "negative_prompt", self.negative_prompt, lim.max_text_chars, allow_empty=True)
        canvas_ok = True
        for name in ("width", "height"):
            value = getattr(self, name)
            if not _is_int(value) or not 64 <= value <= lim.max_side:
                p.append(f"{name}: must be a whole number of pixels in 64..{lim.max_side}, got {value!r}")
                canvas_ok = False
            elif value % 8:
                p.append(f"{name}: must be a multiple of 8, got {value}")
                canvas_ok = False
        if canvas_ok and self.width * self.height > lim.max_canvas_pixels:
            p.append(
                f"width, height: the canvas {self.width}×{self.height} has {self.width * self.height}"
                f" pixels, more than this bridge's limit of {lim.max_canvas_pixels}"
            )
            canvas_ok = False
        canvas = (self.width, self.height) if canvas_ok else None

        if not _is_int(self.variants) or not 1 <= self.variants <= lim.max_variants:
            p.append(f"variants: must be a whole number in 1..{lim.max_variants}, got {self.variants!r}")
        _check_int(p, "seed", self.seed, 0, 2**63 - 1)
        if self.seeds is not None:
            if not isinstance(self.seeds, list):
                p.append(f"seeds: must be a list of whole numbers or null, got {_json_type(self.seeds)}")
            else:
                if _is_int(self.variants) and len(self.seeds) != self.variants:
                    p.append(f"seeds: gives {len(self.seeds)} seeds for {self.variants} variants")
                for i, s in enumerate(self.seeds):
                    _check_int(p, f"seeds[{i}]", s, 0, 2**63 - 1)
        _check_int(p, "steps", self.steps, 1, lim.max_steps)
        _check_number(p, "guidance_scale", self.guidance_scale, 0.0, 100.0)
        _check_number(p, "strength", self.strength, 0.0, 1.0)
        _check_int(p, "feather_px", self.feather_px, 0, 64)
        if self.scheduler not in SCHEDULERS:
            p.append(f"scheduler: must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip()):
            p.append(f"model: must be a model name or null, got {self.model!r}")
        if (
            not isinstance(self.background, list)
            or len(self.background) != 3
            or not all(_is_int(c) and 0 <= c <= 255 for c in self.background)
        ):
            p.append(
                f"background: must be an RGB colour, three whole numbers 0..255, got {self.background!r}"
            )
        if self.background_png is not None:
            _check_png(p, "background_png", self.background_png, lim.max_canvas_pixels, canvas)
        self._validate_regenerate(p, lim, canvas)
        self._validate_layers(p, lim, canvas)
        return p

    def _validate_regenerate(self, p: list[str], lim: Limits, canvas: tuple[int, int] | None) -> None:
        if (self.base_image is None) != (self.regenerate_layer is None):
            given, missing = (
                ("base_image", "regenerate_layer")
                if self.base_image is not None
                else ("regenerate_layer", "base_image")
            )
            p.append(f"{missing}: missing; {given} needs it (regenerate takes both, or neither)")
        if self.base_image is not None:
            _check_png(p, "base_image", self.base_image, lim.max_canvas_pixels, canvas)
        if self.regenerate_layer is not None:
            n = len(self.layers) if isinstance(self.layers, list) else 0
            if not _is_int(self.regenerate_layer) or not 0 <= self.regenerate_layer < max(n, 1):
                p.append(
                    f"regenerate_layer: must be the index of a layer, 0..{max(n - 1, 0)}, got {self.regenerate_layer!r}"
                )
            elif self.regenerate_layer < n and self.layers[self.regenerate_layer].visible is False:
                p.append(f"regenerate_layer: layer {self.regenerate_layer} is hidden (visible is false)")
            _check_int(p, "regenerate_dilation", self.regenerate_dilation, 0, 256)

    def _validate_layers(self, p: list[str], lim: Limits, canvas: tuple[int, int] | None) -> None:
        if not isinstance(self.layers, list) or not self.layers:
            p.append("layers: a collage needs at least one layer")
            return
        if len(self.layers) > lim.max_layers:
            p.append(f"layers: {len(self.layers)} layers, more than this bridge's limit of {lim.max_layers}")
            return
        for i, layer in enumerate(self.layers):
            w = f"layers[{i}]"
            _check_text(p, f"{w}.text", layer.text, lim.max_text_chars, allow_empty=False)
            _check_text(p, f"{w}.name", layer.name, lim.max_text_chars, allow_empty=True)
            size = _check_png(p, f"{w}.png", layer.png, lim.max_layer_pixels, None)
            xy_ok = True
            for name in ("x", "y"):
                value = getattr(layer, name)
                if not _is_int(value) or abs(value) > 2 * lim.max_side:
                    p.append(
                        f"{w}.{name}: must be a whole number of pixels, |{name}| ≤ {2 * lim.max_side}, got {value!r}"
                    )
                    xy_ok = False
            if size and xy_ok and canvas and layer.visible is True:
                (lw, lh), (cw, ch) = size, canvas
                if layer.x >= cw or layer.y >= ch or layer.x + lw <= 0 or layer.y + lh <= 0:
                    p.append(
                        f"{w}.x, y: the layer ({lw}×{lh} at {layer.x},{layer.y}) lies entirely outside"
                        f" the {cw}×{ch} canvas"
                    )
            for name in ("visible", "appearance"):
                if not isinstance(getattr(layer, name), bool):
                    p.append(f"{w}.{name}: must be true or false, got {getattr(layer, name)!r}")
            _check_number(p, f"{w}.opacity", layer.opacity, 0.0, 1.0)
            if layer.strength is not None:
                _check_number(p, f"{w}.strength", layer.strength, 0.0, 1.0)
            _check_number(p, f"{w}.attention_weight", layer.attention_weight, 0.0, 10.0)
            _check_number(p, f"{w}.control_weight", layer.control_weight, 0.0, 2.0)

    def summary(self) -> str:
        """One line for logs: never the pixels."""
        n = len(self.layers) if isinstance(self.layers, list) else 0
        return f"{self.width}×{self.height}, {n} layers, {self.variants} variants, {self.steps} steps"


# ---------------------------------------------------------------------------------------------
# Responses and events (bridge -> client).


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
class ResultInfo:
    """One finished variant. Fetch its PNG from `url` (a path on the bridge)."""

    index: int
    seed: int
    width: int
    height: int
    url: str
    bytes: int = 0


@dataclass
class JobStatus:
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

    def to_dict(self) -> dict:
        return _encode(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> JobStatus:
        data = dict(data)
        progress = data.get("progress")
        data["progress"] = _known(ProgressInfo, progress) if isinstance(progress, dict) else None
        data["results"] = [_known(ResultInfo, r) for r in data.get("results") or []]
        return _known(cls, data)

    @classmethod
    def from_json(cls, text: str | bytes) -> JobStatus:
        return cls.from_dict(json.loads(text))


@dataclass
class ProgressEvent:
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

    def to_dict(self) -> dict:
        return _encode(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> ProgressEvent:
        data = dict(data)
        if data.get("preview") is not None:
            data["preview"] = b64decode(data["preview"])
        return _known(cls, data)

    @classmethod
    def from_json(cls, text: str | bytes) -> ProgressEvent:
        return cls.from_dict(json.loads(text))


@dataclass
class EventsResponse:
    """Answer of the long poll: events after the asked-for sequence number, and the job's state.

    `done` is true once the job has finished: then no more events come (fetch the results).
    """

    job_id: str
    state: str
    done: bool
    last_seq: int
    events: list[ProgressEvent] = field(default_factory=list)

    def to_dict(self) -> dict:
        return _encode(self)

    @classmethod
    def from_dict(cls, data: dict) -> EventsResponse:
        data = dict(data)
        data["events"] = [ProgressEvent.from_dict(e) for e in data.get("events", [])]
        return _known(cls, data)


@dataclass
class InfoResponse:
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

    def to_dict(self) -> dict:
        return _encode(self)

    @classmethod
    def from_dict(cls, data: dict) -> InfoResponse:
        return _known(cls, data)


@dataclass
class ErrorResponse:
    """Every 4xx/5xx answer: a sentence, and the per-field problems when there are several."""

    status: int
    error: str
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return _encode(self)


# ---------------------------------------------------------------------------------------------
# PNG helpers (pure Python: the plugin can crop and encode without numpy or Qt if it must).

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's header, or None when `data` is not a PNG."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < 24 or data[:8] != PNG_SIGNATURE:
        return None
    if data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def encode_png(width: int, height: int, pixels: bytes, channels: int = 4, level: int = 6) -> bytes:
    """An 8-bit PNG from raw rows (RGBA when `channels` is 4, RGB when 3)."""
    color_type = {3: 2, 4: 6}[channels]
    stride = width * channels
    if len(pixels) != stride * height:
        raise ValueError(
            f"pixels: {len(pixels)} bytes, a {width}×{height}×{channels} image has {stride * height}"
        )
    raw = b"".join(b"\x00" + pixels[y * stride : (y + 1) * stride] for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, level))
        + chunk(b"IEND", b"")
    )


def content_box(width: int, height: int, rgba: bytes) -> tuple[int, int, int, int] | None:
    """The bounding box (x, y, w, h) of the pixels with alpha > 0, or None if there are none.

    `rgba` is width*height*4 bytes, rows top to bottom (QImage.Format_RGBA8888 or ARGB32: the
    alpha byte offset is given by the byte order; here it is the 4th byte of each pixel).
    """
    alpha = rgba[3::4]
    zero_row = bytes(width)
    rows = [y for y in range(height) if alpha[y * width : (y + 1) * width] != zero_row]
    if not rows:
        return None
    x0, x1 = width, 0
    for y in rows:
        row = alpha[y * width : (y + 1) * width]
        x0 = min(x0, width - len(row.lstrip(b"\x00")))
        x1 = max(x1, len(row.rstrip(b"\x00")))
    return x0, rows[0], x1 - x0, rows[-1] + 1 - rows[0]


def crop_to_content(width: int, height: int, rgba: bytes) -> tuple[int, int, int, int, bytes] | None:
    """(x, y, w, h, cropped RGBA bytes) of the visible part of an RGBA image, or None if empty."""
    box = content_box(width, height, rgba)
    if box is None:
        return None
    x, y, w, h = box
    stride = width * 4
    cropped = b"".join(rgba[(y + r) * stride + x * 4 : (y + r) * stride + (x + w) * 4] for r in range(h))
    return x, y, w, h, cropped


def layer_from_rgba(
    text: str, width: int, height: int, rgba: bytes, x: int = 0, y: int = 0, **settings: object
) -> LayerSpec | None:
    """A LayerSpec from an uncropped RGBA image placed at (x, y): cropped, PNG-encoded.

    None when the image has no visible pixel (such a layer is not sent at all).
    """
    cropped = crop_to_content(width, height, rgba)
    if cropped is None:
        return None
    cx, cy, w, h, pixels = cropped
    return LayerSpec(text=text, png=encode_png(w, h, pixels), x=x + cx, y=y + cy, **settings)  # type: ignore[arg-type]


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str) -> bytes:
    """Standard base64 (padding required); a ``data:image/png;base64,`` prefix is allowed."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    return base64.b64decode(text, validate=True)


# ---------------------------------------------------------------------------------------------
# Internals.


def _encode(obj: object) -> object:
    """Dataclasses to dicts, bytes to base64, recursively."""
    if hasattr(obj, "__dataclass_fields__"):
        return {f.name: _encode(getattr(obj, f.name)) for f in fields(obj)}  # type: ignore[arg-type]
    if isinstance(obj, (bytes, bytearray)):
        return b64encode(bytes(obj))
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    return obj


def _known(cls, data: dict):
    """`cls` from the fields of `data` it knows: a newer bridge may send more (responses only)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def _read_fields(cls: type, data: dict, prefix: str, problems: list[str], binary: tuple[str, ...]) -> dict:
    """The known fields of `data` for `cls` (values as given; base64 decoded for `binary`)."""
    names = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            problems.append(f"{prefix}{key}: unknown field")
        elif key == "layers" and cls is JobRequest:
            continue
        elif key in binary and value is not None:
            if not isinstance(value, str):
                problems.append(f"{prefix}{key}: must be a base64-encoded PNG, got {_json_type(value)}")
                continue
            try:
                kwargs[key] = b64decode(value)
            except (binascii.Error, ValueError):
                problems.append(f"{prefix}{key}: not valid base64")
        else:
            kwargs[key] = value
    return kwargs


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(p: list[str], name: str, value: object, low: int, high: int) -> None:
    if not _is_int(value) or not low <= value <= high:  # type: ignore[operator]
        shown = "2^63-1" if high == 2**63 - 1 else str(high)
        p.append(f"{name}: must be a whole number in {low}..{shown}, got {value!r}")


def _check_number(p: list[str], name: str, value: object, low: float, high: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        p.append(f"{name}: must be a number in {low:g}..{high:g}, got {value!r}")
    elif math.isnan(value) or not low <= value <= high:
        p.append(f"{name}: must be in {low:g}..{high:g}, got {value!r}")


def _check_text(p: list[str], name: str, value: object, max_chars: int, allow_empty: bool) -> None:
    if not isinstance(value, str):
        p.append(f"{name}: must be text, got {_json_type(value)}")
    elif not allow_empty and not value.strip():
        p.append(f"{name}: must not be empty")
    elif len(value) > max_chars:
        p.append(f"{name}: {len(value)} characters, more than the limit of {max_chars}")


def _check_png(
    p: list[str], name: str, data: object, max_pixels: int, canvas: tuple[int, int] | None
) -> tuple[int, int] | None:
    size = png_size(data)  # type: ignore[arg-type]
    if size is None:
        p.append(f"{name}: not a PNG image")
        return None
    w, h = size
    if w == 0 or h == 0:
        p.append(f"{name}: the image is empty ({w}×{h})")
        return None
    if w * h > max_pixels:
        p.append(f"{name}: {w}×{h} is {w * h} pixels, more than this bridge's limit of {max_pixels}")
        return None
    if canvas is not None and (w, h) != canvas:
        p.append(f"{name}: is {w}×{h}, must be the canvas size {canvas[0]}×{canvas[1]}")
    return size
