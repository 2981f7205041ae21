"""The application factory and the routes table."""

from __future__ import annotations

from aiohttp import web

from krita_plugin.collage_diffusion import wire

from . import handlers
from .auth import security_middleware
from .config import BridgeConfig
from .engine import RunJob
from .handlers import error_middleware
from .jobs import JobManager
from .keys import CONFIG, MANAGER

JOB_ID = "{job_id:[0-9a-f]{32}}"


def _path(template: str) -> str:
    """A wire route with the bridge's patterns: job ids are 32 hex digits, indexes numbers."""
    return (
        template.replace("{job_id}", JOB_ID)
        .replace("{index}", r"{index:\d{1,4}}")
        .replace("{layer}", r"{layer:\d{1,4}}")
    )


ROUTES = [
    web.get(wire.ROUTE_HEALTH, handlers.health, allow_head=False),
    web.get(wire.ROUTE_INFO, handlers.info, allow_head=False),
    web.post(wire.ROUTE_JOBS, handlers.submit),
    web.get(wire.ROUTE_JOBS, handlers.list_jobs, allow_head=False),
    web.get(_path(wire.ROUTE_JOB), handlers.job_status, allow_head=False),
    web.delete(_path(wire.ROUTE_JOB), handlers.delete_job),
    web.post(_path(wire.ROUTE_JOB_CANCEL), handlers.cancel_job),
    web.get(_path(wire.ROUTE_JOB_EVENTS), handlers.events, allow_head=False),
    web.get(_path(wire.ROUTE_JOB_WS), handlers.websocket, allow_head=False),
    web.get(_path(wire.ROUTE_JOB_RESULT), handlers.result_png, allow_head=False),
    web.get(_path(wire.ROUTE_JOB_RESULT_LAYER), handlers.result_layer_png, allow_head=False),
]


def create_app(config: BridgeConfig, *, run_job: RunJob | None = None) -> web.Application:
    """The bridge as an aiohttp application. `run_job` replaces the engine (tests, benchmarks)."""
    app = web.Application(
        client_max_size=config.limits.max_request_bytes,
        # Outermost first: the security checks wrap everything, errors become JSON inside them.
        middlewares=[security_middleware(config), error_middleware],
    )
    app[CONFIG] = config
    app[MANAGER] = JobManager(config, run_job=run_job)
    app.add_routes(ROUTES)
    app.cleanup_ctx.append(_manager_ctx)
    return app


async def _manager_ctx(app: web.Application):
    manager = app[MANAGER]
    await manager.start()
    yield
    await manager.stop()
