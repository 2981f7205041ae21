"""The bridge's wire format, defined once: used by the bridge server and by the Krita plugin.

STANDARD LIBRARY ONLY. Krita runs plugins on its own Python (stdlib + PyQt, no numpy, no PIL),
so everything here must work there; the bridge imports it as
``from krita_plugin.collage_diffusion import wire``. docs/api.md documents the protocol with
examples; this module is its reference.

Everything travels as JSON; images are PNG files, base64-encoded inside the JSON. Layers are
cropped to their visible content before sending (`crop_to_content`), so a big canvas with small
objects stays cheap. Result images are fetched as plain PNG (``GET /jobs/{id}/results/{k}``), and
the layers of a result's stack likewise (``.../results/{k}/layers/{j}``).

Defined in six modules, all re-exported here (import `wire`, not them): `wire_protocol` (version,
routes, states, limits, the layer-naming rule), `wire_request` (the request and its checks),
`wire_responses` (status, events, info, errors), `wire_png` (PNG and base64 helpers),
`wire_sizes` (generation sizes) and `wire_fields` (reading and checking fields).

The request classes are built leniently by `from_json` (which only rejects what cannot be read
at all: bad JSON, wrong structure, bad base64, unknown fields) and checked by `validate`, which
returns every problem as ``"<field>: <what is wrong>"``, e.g. ``"layers[2].strength: must be in 0..1"``.
The bridge answers 422 with that list; the plugin can run the same `validate` before sending.
"""

from __future__ import annotations

from .wire_png import (
    PNG_SIGNATURE,
    b64decode,
    b64encode,
    content_box,
    crop_to_content,
    encode_png,
    png_size,
)
from .wire_protocol import (
    API_VERSION,
    AUTH_HEADER,
    AUTH_SCHEME,
    CANCELLED,
    DEFAULT_HOST,
    DEFAULT_MODEL,
    DEFAULT_PORT,
    DONE,
    EVENT_KINDS,
    EVENT_PROGRESS,
    EVENT_STATE,
    EVENTS_DEFAULT_TIMEOUT,
    EVENTS_MAX_TIMEOUT,
    FAILED,
    FINISHED_STATES,
    OUTPUT_IMAGE,
    OUTPUT_LAYERS,
    OUTPUTS,
    PHASE_FILL,
    PHASE_LOADING,
    PHASES,
    QUEUED,
    RESULT_SEED_HEADER,
    ROUTE_HEALTH,
    ROUTE_INFO,
    ROUTE_JOB,
    ROUTE_JOB_CANCEL,
    ROUTE_JOB_EVENTS,
    ROUTE_JOB_RESULT,
    ROUTE_JOB_RESULT_LAYER,
    ROUTE_JOB_WS,
    ROUTE_JOBS,
    RUNNING,
    SCHEDULERS,
    STATES,
    WS_CANCEL,
    Limits,
    WireError,
    is_default_name,
    route,
)
from .wire_request import (
    JobRequest,
    LayerSpec,
    layer_from_rgba,
)
from .wire_responses import (
    LIBRARY_KINDS,
    ErrorResponse,
    EventsResponse,
    InfoResponse,
    JobStatus,
    LibraryEntry,
    ModelDetails,
    ProgressEvent,
    ProgressInfo,
    ResultInfo,
    ResultLayerInfo,
)
from .wire_sizes import auto_size, nearest_size, round8

__all__ = [
    "API_VERSION",
    "AUTH_HEADER",
    "AUTH_SCHEME",
    "CANCELLED",
    "DEFAULT_HOST",
    "DEFAULT_MODEL",
    "DEFAULT_PORT",
    "DONE",
    "EVENTS_DEFAULT_TIMEOUT",
    "EVENTS_MAX_TIMEOUT",
    "EVENT_KINDS",
    "EVENT_PROGRESS",
    "EVENT_STATE",
    "ErrorResponse",
    "EventsResponse",
    "FAILED",
    "FINISHED_STATES",
    "InfoResponse",
    "JobRequest",
    "JobStatus",
    "LIBRARY_KINDS",
    "LayerSpec",
    "LibraryEntry",
    "Limits",
    "ModelDetails",
    "OUTPUTS",
    "OUTPUT_IMAGE",
    "OUTPUT_LAYERS",
    "PHASES",
    "PHASE_FILL",
    "PHASE_LOADING",
    "PNG_SIGNATURE",
    "ProgressEvent",
    "ProgressInfo",
    "QUEUED",
    "RESULT_SEED_HEADER",
    "ROUTE_HEALTH",
    "ROUTE_INFO",
    "ROUTE_JOB",
    "ROUTE_JOBS",
    "ROUTE_JOB_CANCEL",
    "ROUTE_JOB_EVENTS",
    "ROUTE_JOB_RESULT",
    "ROUTE_JOB_RESULT_LAYER",
    "ROUTE_JOB_WS",
    "RUNNING",
    "ResultInfo",
    "ResultLayerInfo",
    "SCHEDULERS",
    "STATES",
    "WS_CANCEL",
    "WireError",
    "auto_size",
    "b64decode",
    "b64encode",
    "content_box",
    "crop_to_content",
    "encode_png",
    "is_default_name",
    "layer_from_rgba",
    "nearest_size",
    "png_size",
    "round8",
    "route",
]
