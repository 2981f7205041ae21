"""The queue, the worker and the job store, with a fake engine (fast): many clients at once,
failures that stay inside their job, restarts, deleting and cleaning up."""

import asyncio
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from bridge_server import testing as T
from bridge_server.app import create_app
from bridge_server.config import BridgeConfig
from bridge_server.images import encode_png
from bridge_server.jobs import INTERRUPTED_RESTART, INTERRUPTED_STOP
from bridge_server.keys import MANAGER
from bridge_server.storage import JobStore, StoredJob, select_for_cleanup
from krita_plugin.collage_diffusion import wire


@pytest.fixture
def config(tmp_path):
    return BridgeConfig(data_dir=tmp_path / "bridge")


@pytest.mark.asyncio
async def test_fifty_concurrent_submissions_all_complete(aiohttp_client, config):
    running, most = 0, 0
    lock = threading.Lock()
    inner = T.fake_run_job(steps=3)

    def run(req):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            return inner(req)
        finally:
            with lock:
                running -= 1

    client = await aiohttp_client(create_app(config, run_job=run))
    responses = await asyncio.gather(*(T.submit(client, T.small_request(seed=i)) for i in range(50)))
    assert [r.status for r in responses] == [202] * 50
    ids = [(await r.json())["id"] for r in responses]
    assert len(set(ids)) == 50

    finals = await asyncio.gather(*(T.wait_done(client, job_id) for job_id in ids))
    assert all(f.state == wire.DONE for f in finals), [f.error for f in finals if f.state != wire.DONE]
    assert sorted(f.results[0].seed for f in finals) == list(range(50))  # nothing lost or swapped
    assert most == 1  # one job at a time on the GPU
    by_start = sorted(finals, key=lambda f: f.started)
    assert [f.id for f in by_start] == [f.id for f in sorted(finals, key=lambda f: f.created)]  # in order
    listed = await (await client.get(wire.ROUTE_JOBS, params={"limit": 1000})).json()
    assert {j["id"] for j in listed["jobs"]} == set(ids)
    info = await (await client.get(wire.ROUTE_INFO)).json()
    assert info["queue_length"] == 0 and info["running"] is None


@pytest.mark.asyncio
async def test_an_error_inside_a_job_fails_that_job_only(aiohttp_client, config):
    def fail(req):
        return RuntimeError("CUDA out of memory (simulated)") if req.collage.prompt == "boom" else None

    client = await aiohttp_client(create_app(config, run_job=T.fake_run_job(fail=fail)))
    bad = (await (await T.submit(client, T.small_request(prompt="boom"))).json())["id"]
    good = (await (await T.submit(client, T.small_request())).json())["id"]
    failed = await T.wait_done(client, bad)
    assert failed.state == wire.FAILED and failed.error == "RuntimeError: CUDA out of memory (simulated)"
    assert (await client.get(f"/jobs/{bad}/results/0")).status == 409
    assert (await T.wait_done(client, good)).state == wire.DONE
    assert (await client.get(wire.ROUTE_HEALTH)).status == 200


@pytest.mark.asyncio
async def test_a_broken_engine_result_fails_the_job(aiohttp_client, config):
    client = await aiohttp_client(create_app(config, run_job=lambda req: "not a result"))
    job = (await (await T.submit(client, T.small_request())).json())["id"]
    failed = await T.wait_done(client, job)
    assert failed.state == wire.FAILED and "AttributeError" in failed.error


@pytest.mark.asyncio
async def test_interrupted_jobs_are_marked_failed_after_a_crash(aiohttp_client, config):
    ids = {wire.QUEUED: "a" * 32, wire.RUNNING: "b" * 32, wire.DONE: "c" * 32}
    store = JobStore(config.data_dir)
    store.prepare()
    for state, job_id in ids.items():  # as a crash leaves them
        store.save(wire.JobStatus(id=job_id, state=state, created=time.time(), model="demo", last_seq=2))
    client = await aiohttp_client(create_app(config, run_job=T.fake_run_job()))
    for state in (wire.QUEUED, wire.RUNNING):
        status = await (await client.get(f"/jobs/{ids[state]}")).json()
        assert status["state"] == wire.FAILED and status["error"] == INTERRUPTED_RESTART
        r = await client.get(f"/jobs/{ids[state]}/events", params={"after": 2})
        assert (await r.json())["events"][0]["message"] == INTERRUPTED_RESTART
    assert (await (await client.get(f"/jobs/{ids[wire.DONE]}")).json())["state"] == wire.DONE
    await client.close()  # the records on disk agree
    assert {j.status.id: j.status.state for j in store.load_all()} == {
        ids[wire.QUEUED]: wire.FAILED,
        ids[wire.RUNNING]: wire.FAILED,
        ids[wire.DONE]: wire.DONE,
    }


@pytest.mark.asyncio
async def test_stopping_the_bridge_fails_unfinished_jobs(aiohttp_client, config):
    gate = threading.Event()
    client = await aiohttp_client(create_app(config, run_job=T.fake_run_job(gate=gate)))
    running = (await (await T.submit(client, T.small_request())).json())["id"]
    waiting = (await (await T.submit(client, T.small_request())).json())["id"]
    await T.wait_event(client, running, lambda e: e.phase == "encoding")  # inside the engine
    await client.close()  # cancels the running job (the gate never opens)

    client = await aiohttp_client(create_app(config, run_job=T.fake_run_job()))
    for job_id in (running, waiting):
        status = await (await client.get(f"/jobs/{job_id}")).json()
        assert status["state"] == wire.FAILED and status["error"] == INTERRUPTED_STOP


@pytest.mark.asyncio
async def test_delete_jobs(aiohttp_client, config):
    gate = threading.Event()
    client = await aiohttp_client(create_app(config, run_job=T.fake_run_job(gate=gate)))
    manager = client.app[MANAGER]
    gate.set()
    finished = (await (await T.submit(client, T.small_request())).json())["id"]
    await T.wait_done(client, finished)
    assert (config.data_dir / "jobs" / finished / "result-0.png").is_file()
    r = await client.delete(f"/jobs/{finished}")
    assert r.status == 200 and (await r.json()) == {"id": finished, "deleted": True}
    assert (await client.get(f"/jobs/{finished}")).status == 404
    assert not (config.data_dir / "jobs" / finished).exists()

    gate.clear()
    running = (await (await T.submit(client, T.small_request())).json())["id"]
    queued = (await (await T.submit(client, T.small_request())).json())["id"]
    await T.wait_event(client, running, lambda e: e.phase == "encoding")
    assert (await client.delete(f"/jobs/{queued}")).status == 200
    r = await client.delete(f"/jobs/{running}")
    assert r.status == 202 and (await r.json())["deleted"] is False  # cancelled, removed once stopped
    job = manager.jobs[running]
    gate.set()

    async def removed():
        while not job.deleted:
            await job.changed.wait()

    await asyncio.wait_for(removed(), 10)
    assert (await client.get(f"/jobs/{running}")).status == 404
    await asyncio.wait_for(manager._in_io(lambda: None), 10)
    assert not (config.data_dir / "jobs" / running).exists()
    assert not (config.data_dir / "jobs" / queued).exists()


@pytest.mark.asyncio
async def test_a_full_queue_answers_503(aiohttp_client, config):
    config.max_queue = 2
    client = await aiohttp_client(create_app(config, run_job=T.fake_run_job()))
    client.app[MANAGER].pause()
    for _ in range(2):
        assert (await T.submit(client, T.small_request())).status == 202
    r = await T.submit(client, T.small_request())
    assert r.status == 503 and "queue is full" in (await r.json())["error"] and r.headers["Retry-After"]
    client.app[MANAGER].resume()


@pytest.mark.asyncio
async def test_cleanup_by_age_and_size_at_startup(aiohttp_client, config):
    client = await aiohttp_client(create_app(config, run_job=T.fake_run_job()))
    ids = []
    for _ in range(4):
        ids.append((await (await T.submit(client, T.small_request())).json())["id"])
        await T.wait_done(client, ids[-1])
    await client.close()
    store = JobStore(config.data_dir)
    old = {j.status.id: j for j in store.load_all()}[ids[0]].status
    old.finished -= 10 * 86400  # finished ten days ago
    store.save(old)
    one_job = store.folder_bytes(ids[1])

    config.keep_seconds = 7 * 86400
    config.keep_bytes = int(one_job * 2.5)  # room for two jobs: the oldest other one goes
    client = await aiohttp_client(create_app(config, run_job=T.fake_run_job()))
    listed = [j["id"] for j in (await (await client.get(wire.ROUTE_JOBS)).json())["jobs"]]
    assert listed == [ids[3], ids[2]]
    assert sorted(p.name for p in (config.data_dir / "jobs").iterdir()) == sorted(ids[2:])


def test_cleanup_never_removes_unfinished_jobs():
    def job(i, state, finished, size):
        status = wire.JobStatus(id=f"{i:032x}", state=state, created=float(i), model="m", finished=finished)
        return StoredJob(status, size)

    jobs = [
        job(1, wire.RUNNING, None, 100),
        job(2, wire.DONE, 2.0, 100),
        job(3, wire.FAILED, 3.0, 100),
        job(4, wire.QUEUED, None, 100),
        job(5, wire.DONE, 100.0, 100),
    ]
    assert select_for_cleanup(jobs, now=101.0, keep_seconds=50, keep_bytes=10**6) == [
        f"{2:032x}",
        f"{3:032x}",
    ]
    assert select_for_cleanup(jobs, now=101.0, keep_seconds=10**6, keep_bytes=250) == [
        f"{2:032x}",
        f"{3:032x}",
        f"{5:032x}",
    ]


def test_unreadable_records_are_removed(tmp_path):
    store = JobStore(tmp_path)
    store.prepare()
    (store.root / ("a" * 32)).mkdir()
    (store.root / ("a" * 32) / "job.json").write_text("{half a rec")
    (store.root / ("b" * 32)).mkdir()  # crashed before its record was written
    (store.root / "not-a-job").mkdir()  # not ours: left alone
    assert store.load_all() == []
    assert sorted(p.name for p in store.root.iterdir()) == ["not-a-job"]


@pytest.mark.parametrize("level", [0, 1, 6])
@pytest.mark.parametrize("channels", [3, 4])
def test_result_pngs_are_exact(channels, level):
    image = np.random.default_rng(0).integers(0, 256, (33, 47, channels), dtype=np.uint8)
    decoded = Image.open(io.BytesIO(encode_png(image, level)))
    assert decoded.mode == ("RGB" if channels == 3 else "RGBA")
    assert np.array_equal(np.asarray(decoded), image)


def test_result_png_level_follows_the_bind():
    """Stored PNGs on loopback (bytes are free there, encoding is not); compressed beyond it;
    an explicit level wins either way."""
    smooth = np.tile(np.arange(64, dtype=np.uint8)[None, :, None], (64, 1, 3))
    assert BridgeConfig(host="127.0.0.1").png_level == 0
    assert BridgeConfig(host="0.0.0.0", token="x" * 16).png_level == 1
    assert BridgeConfig(host="127.0.0.1", result_png_level=6).png_level == 6
    assert len(encode_png(smooth, 0)) > 64 * 64 * 3 > len(encode_png(smooth, 1))
