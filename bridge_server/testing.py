"""Helpers for tests and benchmarks of the bridge: requests built with the stdlib wire helpers,
a fake engine, and waiting for a job through the API (no sleeps)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from core.generate import GeneratedImage, GenerationResult
from core.progress import GenerationCancelled, Progress
from krita_plugin.collage_diffusion import wire

from .engine import RunRequest


def solid_layer(
    text: str, w: int, h: int, color=(200, 40, 40, 255), x: int = 0, y: int = 0, **settings
) -> wire.LayerSpec:
    """A layer of one colour, w×h at (x, y)."""
    return wire.LayerSpec(text=text, png=wire.encode_png(w, h, bytes(color) * (w * h)), x=x, y=y, **settings)


def small_request(**overrides) -> wire.JobRequest:
    """A valid 64×64 request with two layers and few steps: fast on the demo model."""
    fields = dict(
        prompt="a bento box with salmon sushi and ginger",
        layers=[
            solid_layer("salmon sushi", 24, 16, (250, 120, 90, 255), x=8, y=8),
            solid_layer("ginger", 16, 16, (240, 200, 200, 255), x=36, y=36, strength=0.9),
        ],
        width=64,
        height=64,
        steps=4,
        strength=1.0,
        seed=7,
    )
    fields.update(overrides)
    return wire.JobRequest(**fields)


def fake_run_job(
    step_time: float = 0.0,
    steps: int | None = None,
    fail: Callable[[RunRequest], Exception | None] | None = None,
    gate: threading.Event | None = None,
) -> Callable[[RunRequest], GenerationResult]:
    """An engine stand-in: reports `steps` (default: the collage's) sampling steps, honours
    cancel between steps, returns flat grey images of the canvas size, one per seed.

    `fail(req)` may return an exception to raise; `gate`, when given, holds the job before its
    first step until it is set or the job is cancelled, so a test can hold the worker."""

    def run(req: RunRequest) -> GenerationResult:
        c = req.collage
        req.progress(Progress("encoding", 0, 1))
        if gate is not None:  # held until the gate opens or the job is cancelled (10 s at most)
            deadline = time.monotonic() + 10
            while not gate.wait(0.005) and time.monotonic() < deadline:
                if req.cancel.is_set():
                    raise GenerationCancelled("generation cancelled")
        error = fail(req) if fail else None
        if error is not None:
            raise error
        total = steps if steps is not None else c.steps
        image = np.full((c.height, c.width, 3), 128, np.uint8)
        for i in range(total):
            if req.cancel.is_set():
                raise GenerationCancelled("generation cancelled")
            if step_time:
                time.sleep(step_time)
            req.progress(Progress("sampling", i + 1, total, preview=lambda: image[::8, ::8]))
        if req.cancel.is_set():
            raise GenerationCancelled("generation cancelled")
        seeds = req.seeds or [c.seed + k for k in range(req.variants)]
        return GenerationResult(
            images=[GeneratedImage(image.copy(), s) for s in seeds], composite=image, prompt=c.prompt
        )

    return run


def auth(token: str | None) -> dict[str, str]:
    return {wire.AUTH_HEADER: f"{wire.AUTH_SCHEME} {token}"} if token else {}


async def submit(client, request: wire.JobRequest | dict | str, headers=None):
    """POST a request with the aiohttp test client; returns the response."""
    if isinstance(request, wire.JobRequest):
        body = request.to_json()
    elif isinstance(request, dict):
        import json

        body = json.dumps(request)
    else:
        body = request
    return await client.post(
        wire.ROUTE_JOBS, data=body, headers={"Content-Type": "application/json", **(headers or {})}
    )


async def wait_done(client, job_id: str, timeout: float = 60.0, headers=None) -> wire.JobStatus:
    """Follow the job's events (long poll) until it has finished; its final status."""
    deadline = time.monotonic() + timeout
    after = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"job {job_id} did not finish within {timeout} s")
        path = wire.route(wire.ROUTE_JOB_EVENTS, job_id=job_id)
        r = await client.get(path, params={"after": after, "timeout": min(left, 10)}, headers=headers)
        assert r.status == 200, await r.text()
        events = wire.EventsResponse.from_dict(await r.json())
        after = events.last_seq
        if events.done:
            r = await client.get(wire.route(wire.ROUTE_JOB, job_id=job_id), headers=headers)
            return wire.JobStatus.from_dict(await r.json())


async def wait_event(
    client, job_id: str, predicate, timeout: float = 60.0, headers=None
) -> wire.ProgressEvent:
    """Follow the job's events (long poll) until one satisfies `predicate`; that event."""
    deadline = time.monotonic() + timeout
    after = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"job {job_id}: no such event within {timeout} s")
        path = wire.route(wire.ROUTE_JOB_EVENTS, job_id=job_id)
        r = await client.get(path, params={"after": after, "timeout": min(left, 10)}, headers=headers)
        assert r.status == 200, await r.text()
        response = wire.EventsResponse.from_dict(await r.json())
        for event in response.events:
            if predicate(event):
                return event
            after = event.seq
        if response.done:
            raise AssertionError(f"job {job_id} finished ({response.state}) without such an event")
