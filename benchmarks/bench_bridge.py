"""What the bridge costs beyond the engine: transport overhead, and memory over many jobs.

    python benchmarks/bench_bridge.py [--repeats 5] [--jobs 200] [--memory-engine demo|fake]

1. Transport overhead of one job with 8 layers on a 2048² canvas: from the client starting to
   build the JSON body until every result PNG is fetched, minus the engine's own time (the job's
   `timings.compute`). The bridge runs in its own process on a real TCP port; its engine is a
   stand-in that returns a ready 2048² image at once, so what is measured is the bridge: upload,
   JSON and base64, PNG decoding and validation, queue, job records, result PNG encoding, the
   event long poll and the download. The client's own cropping and PNG encoding of the layers
   (done by Qt in the plugin, here by the stdlib helpers in `wire`) is reported apart.
2. The bridge's memory (resident set of its process) after 10 jobs and after `--jobs` jobs, run
   by the real `collage-bridge` on the demo model (or the stand-in engine), 8 clients at a time.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as `python benchmarks/NAME.py`: set up as `python -m benchmarks.NAME` is
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import benchmarks  # noqa: F401  (benchmarks/__init__.py)

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import tempfile
import time

import aiohttp

from krita_plugin.collage_diffusion import wire

ROOT = Path(__file__).resolve().parents[1]
CANVAS = 2048


# -- the stand-in engine's server process ----------------------------------------------------------


def serve_fake(port: int, data_dir: str) -> None:
    """Run the bridge with an engine that returns a prepared image of the canvas size at once."""
    import numpy as np
    from aiohttp import web

    from bridge_server.app import create_app
    from bridge_server.config import BridgeConfig
    from core.generate import GeneratedImage, GenerationResult
    from core.progress import Progress

    rng = np.random.default_rng(0)
    ready: dict[tuple[int, int], np.ndarray] = {}

    def picture(w: int, h: int) -> np.ndarray:
        # Smooth colour plus some grain: compresses about like a photo, unlike pure noise.
        if (w, h) not in ready:
            y, x = np.mgrid[0:h, 0:w]
            base = np.stack(
                [x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // max(w + h, 1)], -1
            )
            grain = rng.normal(0, 6, (h, w, 3))
            ready[(w, h)] = np.clip(base + grain, 0, 255).astype(np.uint8)
        return ready[(w, h)]

    def run(req):
        c = req.collage
        for i in range(c.steps):
            req.progress(Progress("sampling", i + 1, c.steps))
        seeds = req.seeds or [c.seed + k for k in range(req.variants)]
        image = picture(c.width, c.height)
        return GenerationResult([GeneratedImage(image, s) for s in seeds], image, c.prompt)

    config = BridgeConfig(port=port, data_dir=Path(data_dir), preview_interval=3600)
    web.run_app(create_app(config, run_job=run), host="127.0.0.1", port=port, print=None, access_log=None)


# -- helpers ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import psutil  # not Linux: psutil, if installed

    return psutil.Process(pid).memory_info().rss / 2**20


async def wait_up(
    session: aiohttp.ClientSession, base: str, proc: subprocess.Popen, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the bridge exited with {proc.returncode}")
        try:
            async with session.get(base + wire.ROUTE_HEALTH) as r:
                if r.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError("the bridge did not come up")


def start(args: list[str], data_dir: str, env=None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, *args, "--port", str(port), "--data-dir", data_dir],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def run_job(
    session: aiohttp.ClientSession, base: str, body: str
) -> tuple[wire.JobStatus, list[bytes], dict]:
    """Submit, follow the long poll to the end, fetch every result. Returns times in seconds."""
    t0 = time.perf_counter()
    async with session.post(
        base + wire.ROUTE_JOBS, data=body, headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == 202, await r.text()
        job_id = (await r.json())["id"]
    t_submitted = time.perf_counter()
    after, done = 0, False
    while not done:
        url = base + wire.route(wire.ROUTE_JOB_EVENTS, job_id=job_id)
        async with session.get(url, params={"after": after, "timeout": 30}) as r:
            events = wire.EventsResponse.from_dict(await r.json())
        after, done = events.last_seq, events.done
    async with session.get(base + wire.route(wire.ROUTE_JOB, job_id=job_id)) as r:
        status = wire.JobStatus.from_dict(await r.json())
    t_done = time.perf_counter()
    images = []
    for result in status.results:
        async with session.get(base + result.url) as r:
            images.append(await r.read())
    t_end = time.perf_counter()
    return (
        status,
        images,
        {
            "submit": t_submitted - t0,
            "wait": t_done - t_submitted,
            "fetch": t_end - t_done,
            "total": t_end - t0,
        },
    )


# -- 1. transport overhead -----------------------------------------------------------------------


def eight_layers() -> tuple[list[wire.LayerSpec], float]:
    """8 objects (ellipses of texture, 250..700 px) on full 2048² layers, cropped and encoded
    with the stdlib helpers as a stdlib client would; returns the layers and the seconds it took."""
    import random

    rnd = random.Random(1)
    full = []
    for i in range(8):
        w, h = rnd.randint(250, 700), rnd.randint(250, 700)
        x0, y0 = rnd.randint(0, CANVAS - w), rnd.randint(0, CANVAS - h)
        rows = []
        for y in range(h):
            dy = (y - h / 2) / (h / 2)
            row = bytearray(w * 4)
            for x in range(0, w):
                dx = (x - w / 2) / (w / 2)
                if dx * dx + dy * dy <= 1:
                    v = (x * 7 + y * 13 + rnd.randrange(24)) & 0xFF
                    row[x * 4 : x * 4 + 4] = bytes((v, (v * 3 + i * 40) & 0xFF, (255 - v), 255))
            rows.append(bytes(row))
        full.append((f"object {i}", x0, y0, w, h, rows))

    start = time.perf_counter()
    layers = []
    stride = CANVAS * 4
    for text, x0, y0, w, _h, rows in full:
        # The full canvas-size layer as Krita would hand it over, then cropped to its content.
        canvas = bytearray(stride * CANVAS)
        for r, row in enumerate(rows):
            at = (y0 + r) * stride + x0 * 4
            canvas[at : at + w * 4] = row
        layers.append(wire.layer_from_rgba(text, CANVAS, CANVAS, bytes(canvas)))
    return layers, time.perf_counter() - start


async def transport(repeats: int, variants: int) -> None:
    layers, prep = eight_layers()
    request = wire.JobRequest(
        prompt="a table with " + ", ".join(layer.text for layer in layers),
        layers=layers,
        width=CANVAS,
        height=CANVAS,
        steps=20,
        variants=variants,
    )
    assert request.validate() == [], request.validate()
    layer_png = sum(len(layer.png) for layer in layers)
    with tempfile.TemporaryDirectory() as data_dir:
        proc, base = start([__file__, "--serve-fake"], data_dir)
        try:
            async with aiohttp.ClientSession() as session:
                await wait_up(session, base, proc)
                runs = []
                for i in range(repeats + 1):  # the first one warms up
                    body = request.to_json()
                    if i == 0:
                        body_mb = len(body) / 2**20
                    status, images, times = await run_job(session, base, body)
                    assert status.state == wire.DONE, status.error
                    times["compute"] = status.timings["compute"]
                    times["save"] = status.timings["save"]
                    times["overhead"] = times["total"] - times["compute"]
                    if i:
                        runs.append(times)
        finally:
            stop(proc)

    def med(key: str) -> float:
        return statistics.median(t[key] for t in runs) * 1000

    print(f"1. transport: 8 layers on a {CANVAS}² canvas, {variants} variant(s), median of {repeats}")
    print(
        f"   client crop + PNG (stdlib)  {prep * 1000:8.1f} ms   layer PNGs {layer_png / 2**20:.2f} MiB, JSON body {body_mb:.2f} MiB"
    )
    print(f"   submit (upload, decode, validate, record)  {med('submit'):8.1f} ms")
    print(
        f"   wait for done (engine {med('compute'):.1f} ms, result PNG + write {med('save'):.1f} ms)  {med('wait'):8.1f} ms"
    )
    print(
        f"   fetch {len(images)} result PNG(s) ({sum(map(len, images)) / 2**20:.2f} MiB)  {med('fetch'):8.1f} ms"
    )
    print(
        f"   TRANSPORT OVERHEAD (total - engine)  {med('overhead'):8.1f} ms   (total {med('total'):.1f} ms)"
    )


# -- 2. memory -------------------------------------------------------------------------------------


async def memory(jobs: int, engine: str, concurrency: int = 8) -> None:
    from bridge_server.testing import small_request

    body = small_request(steps=2, variants=1).to_json()
    with tempfile.TemporaryDirectory() as data_dir:
        args = ["-m", "bridge_server"] if engine == "demo" else [__file__, "--serve-fake"]
        proc, base = start(args, data_dir)
        try:
            async with aiohttp.ClientSession() as session:
                await wait_up(session, base, proc)
                marks: dict[int, float] = {}
                done = 0
                t0 = time.perf_counter()

                async def client(n: int) -> None:
                    nonlocal done
                    for _ in range(n):
                        status, _, _ = await run_job(session, base, body)
                        assert status.state == wire.DONE, status.error
                        done += 1

                for target in (10, jobs):
                    todo = target - done
                    share = [
                        todo // concurrency + (1 if k < todo % concurrency else 0) for k in range(concurrency)
                    ]
                    await asyncio.gather(*(client(n) for n in share if n))
                    marks[target] = rss_mb(proc.pid)
                elapsed = time.perf_counter() - t0
                async with session.get(base + wire.ROUTE_INFO) as r:
                    info = await r.json()
        finally:
            stop(proc)
    print(
        f"2. memory of the bridge process ({engine} engine on {info['device']}, 64² jobs, {concurrency} clients)"
    )
    print(f"   after {10:4d} jobs: {marks[10]:8.1f} MB")
    print(
        f"   after {jobs:4d} jobs: {marks[jobs]:8.1f} MB   ({marks[jobs] - marks[10]:+.1f} MB; {jobs} jobs in {elapsed:.1f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--memory-engine", choices=["demo", "fake"], default="demo")
    parser.add_argument("--skip-transport", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--serve-fake", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fake:
        serve_fake(args.port, args.data_dir)
        return
    if not args.skip_transport:
        asyncio.run(transport(args.repeats, args.variants))
    if not args.skip_memory:
        asyncio.run(memory(args.jobs, args.memory_engine))


if __name__ == "__main__":
    main()
