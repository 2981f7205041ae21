"""Request handlers and the error middleware. Routes are in `app.py`; the format in `wire`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import platform
import sys

from aiohttp import WSMsgType, web

from krita_plugin.collage_diffusion import wire

from .convert import RequestProblems
from .jobs import Job, JobManager, QueueFull
from .keys import CONFIG, MANAGER

log = logging.getLogger(__name__)


def error_response(
    status: int, message: str, problems: list[str] | None = None, headers=None
) -> web.Response:
    body = wire.ErrorResponse(status=status, error=message, problems=list(problems or [])).to_dict()
    return web.json_response(body, status=status, headers=headers)


def json_ok(data: object, status: int = 200, headers=None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=_dumps)


def _dumps(data: object) -> str:
    return json.dumps(data, separators=(",", ":"))


class ApiError(Exception):
    """Raised by handlers: answered as an `ErrorResponse` by `error_middleware`."""

    def __init__(self, status: int, message: str, problems: list[str] | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.problems, self.headers = status, message, problems or [], headers


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every error is JSON (`wire.ErrorResponse`); a handler's bug is a 500, never a crash."""
    try:
        return await handler(request)
    except ApiError as error:
        return error_response(error.status, error.message, error.problems, error.headers)
    except RequestProblems as error:
        return error_response(error.status, error.message, error.problems)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[CONFIG].limits.max_request_bytes
        return error_response(413, f"body: larger than this bridge's limit of {limit} bytes")
    except web.HTTPException as error:
        if error.status < 400:
            raise
        headers = {
            k: v for k, v in error.headers.items() if k.lower() not in ("content-type", "content-length")
        }
        return error_response(error.status, error.reason, headers=headers)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as error:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, f"internal error: {type(error).__name__}: {error}")


# -- helpers ---------------------------------------------------------------------------------------


def _manager(request: web.Request) -> JobManager:
    return request.app[MANAGER]


def _job(request: web.Request) -> Job:
    job = _manager(request).get(request.match_info["job_id"])
    if job is None:
        raise ApiError(
            404, f"job {request.match_info['job_id']}: no such job (finished jobs are kept for a while)"
        )
    return job


def _query_number(
    request: web.Request, name: str, default: float, low: float, high: float, whole: bool
) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw) if whole else float(raw)
        if math.isnan(value) or not low <= value <= high:
            raise ValueError
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise ApiError(400, f"{name}: must be {kind} in {low:g}..{high:g}, got {raw!r}") from None
    return value


def _status(request: web.Request, job: Job) -> dict:
    return _manager(request).status(job).to_dict()


# -- handlers ----------------------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    return json_ok({"ok": True, "api_version": wire.API_VERSION})


async def info(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    manager = _manager(request)
    await manager.refresh_models()
    live = manager.info()
    response = wire.InfoResponse(
        api_version=wire.API_VERSION,
        version=_bridge_version(),
        model=config.model,
        models=live["models"],
        model_loaded=live["model_loaded"],
        device=live["device"],
        dtype=live["dtype"],
        queue_length=live["queue_length"],
        running=live["running"],
        versions=_versions(),
        limits=config.limits.to_dict(),
        model_details=live["model_details"],
        **live["library"],
    )
    return json_ok(response.to_dict())


async def submit(request: web.Request) -> web.Response:
    if request.content_type != "application/json":
        raise ApiError(415, f"Content-Type: must be application/json, got {request.content_type!r}")
    body = await request.read()  # raises 413 beyond client_max_size
    manager = _manager(request)
    converted = await manager.decode(body)
    try:
        job = await manager.submit(converted)
    except QueueFull as error:
        raise ApiError(503, str(error), headers={"Retry-After": "10"}) from None
    location = wire.route(wire.ROUTE_JOB, job_id=job.id)
    return json_ok(_status(request, job), status=202, headers={"Location": location})


async def list_jobs(request: web.Request) -> web.Response:
    limit = int(_query_number(request, "limit", 100, 1, 1000, whole=True))
    state = request.query.get("state")
    if state is not None and state not in wire.STATES:
        raise ApiError(400, f"state: must be one of {', '.join(wire.STATES)}, got {state!r}")
    manager = _manager(request)
    jobs = [j for j in manager.list() if state is None or j.status.state == state][:limit]
    return json_ok({"jobs": [manager.status(j).to_dict() for j in jobs]})


async def job_status(request: web.Request) -> web.Response:
    return json_ok(_status(request, _job(request)))


async def cancel_job(request: web.Request) -> web.Response:
    job = _job(request)
    _manager(request).cancel(job)
    return json_ok(_status(request, job))


async def delete_job(request: web.Request) -> web.Response:
    job = _job(request)
    deleted = await _manager(request).delete(job)
    # A running job is cancelled first and removed once it has stopped.
    return json_ok({"id": job.id, "deleted": deleted}, status=200 if deleted else 202)


async def events(request: web.Request) -> web.Response:
    """Long poll: events after `after`, waiting up to `timeout` seconds for the next one."""
    job = _job(request)
    after = int(_query_number(request, "after", 0, 0, 2**53, whole=True))
    timeout = _query_number(
        request, "timeout", wire.EVENTS_DEFAULT_TIMEOUT, 0, wire.EVENTS_MAX_TIMEOUT, whole=False
    )
    found = await _manager(request).wait_events(job, after, timeout)
    response = wire.EventsResponse(
        job_id=job.id, state=job.status.state, done=job.finished, last_seq=job.status.last_seq, events=found
    )
    return json_ok(response.to_dict())


async def websocket(request: web.Request) -> web.WebSocketResponse:
    """Progress events as JSON text messages, from `after` on; closes after the job's last one.
    The client may send ``{"type": "cancel"}``."""
    job = _job(request)
    after = int(_query_number(request, "after", 0, 0, 2**53, whole=True))
    manager = _manager(request)
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=64 * 1024)
    await ws.prepare(request)
    reader = asyncio.create_task(_read_ws(ws, manager, job))
    try:
        while not ws.closed:
            waiter = asyncio.create_task(manager.wait_events(job, after, None))
            done, _ = await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if waiter not in done:  # the client left
                waiter.cancel()
                break
            for event in waiter.result():
                await ws.send_str(_dumps(event.to_dict()))
                after = event.seq
            if job.finished and after >= job.status.last_seq:
                break
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        reader.cancel()
        with contextlib.suppress(Exception):
            await ws.close()
    return ws


async def _read_ws(ws: web.WebSocketResponse, manager: JobManager, job: Job) -> None:
    async for msg in ws:
        if msg.type != WSMsgType.TEXT:
            continue
        try:
            data = json.loads(msg.data)
        except ValueError:
            data = None
        if data == wire.WS_CANCEL:
            manager.cancel(job)
        else:
            await ws.send_str(
                _dumps(wire.ErrorResponse(400, 'message: only {"type": "cancel"} is understood').to_dict())
            )


async def result_png(request: web.Request) -> web.StreamResponse:
    job = _job(request)
    index = int(request.match_info["index"])
    state = job.status.state
    if state != wire.DONE:
        detail = f": {job.status.error}" if job.status.error else ""
        raise ApiError(409, f"job {job.id} is {state}{detail}; results exist once it is done")
    if index >= len(job.status.results):
        raise ApiError(
            404, f"index: this job has {len(job.status.results)} results (0..{len(job.status.results) - 1})"
        )
    result = job.status.results[index]
    path = _manager(request).store.result_path(job.id, index)
    if not path.is_file():
        raise ApiError(404, f"job {job.id}: result {index} is gone from the data folder")
    return web.FileResponse(
        path,
        headers={
            "Content-Type": "image/png",
            wire.RESULT_SEED_HEADER: str(result.seed),
            "Cache-Control": "private, max-age=86400, immutable",
        },
    )


async def result_layer_png(request: web.Request) -> web.StreamResponse:
    """One layer of a result's stack (a job with output "layers")."""
    job = _job(request)
    index, layer = int(request.match_info["index"]), int(request.match_info["layer"])
    if job.status.state != wire.DONE:
        raise ApiError(409, f"job {job.id} is {job.status.state}; results exist once it is done")
    if index >= len(job.status.results):
        raise ApiError(404, f"index: this job has {len(job.status.results)} results")
    layers = job.status.results[index].layers
    if layer >= len(layers):
        hint = "" if layers else ' (it was not asked for with output "layers")'
        raise ApiError(404, f"layer: result {index} has {len(layers)} stack layers{hint}")
    path = _manager(request).store.result_layer_path(job.id, index, layer)
    if not path.is_file():
        raise ApiError(404, f"job {job.id}: layer {layer} of result {index} is gone from the data folder")
    return web.FileResponse(
        path, headers={"Content-Type": "image/png", "Cache-Control": "private, max-age=86400, immutable"}
    )


# -- versions ----------------------------------------------------------------------------------------


def _bridge_version() -> str:
    from . import __version__

    return __version__


def _versions() -> dict[str, str]:
    import aiohttp

    versions = {"python": platform.python_version(), "aiohttp": aiohttp.__version__, "platform": sys.platform}
    for name in ("torch", "diffusers", "transformers", "numpy", "PIL"):
        module = sys.modules.get(name)
        if module is None:
            with contextlib.suppress(ImportError):
                module = __import__(name)
        if module is not None:
            versions[name] = str(getattr(module, "__version__", "?"))
    return versions
