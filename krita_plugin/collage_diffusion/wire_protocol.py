"""The wire format's vocabulary: API version, defaults, the layer-naming rule, routes, job states,
event kinds, phases, limits and `WireError`. Standard library only (see `wire`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

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
# GET -> image/png: layer {layer} (0-based, bottom to top) of result {index}'s stack (output "layers")
ROUTE_JOB_RESULT_LAYER = "/jobs/{job_id}/results/{index}/layers/{layer}"

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
PHASE_FILL = "filling background"  # a layer stack's background fill (output "layers")
PHASES = (PHASE_LOADING, "encoding", "sampling", "decoding", PHASE_FILL)

#: What a job gives back per variant (`JobRequest.output`): one flat image, or also the image as
#: a layer stack (one layer per object, a background with their places filled).
OUTPUT_IMAGE, OUTPUT_LAYERS = "image", "layers"
OUTPUTS = (OUTPUT_IMAGE, OUTPUT_LAYERS)

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
