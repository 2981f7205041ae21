"""The bridge end to end on the real demo model (through core): round trip, progress, cancel,
a client that comes back later, a restart."""

import asyncio
import io
import json

import aiohttp
import numpy as np
import pytest
from PIL import Image

from bridge_server import testing as T
from bridge_server.app import create_app
from bridge_server.config import BridgeConfig
from bridge_server.convert import engine_supports_regenerate
from bridge_server.keys import MANAGER
from krita_plugin.collage_diffusion import wire

pytestmark = pytest.mark.asyncio


@pytest.fixture
def config(tmp_path, demo_pipeline):
    # demo_pipeline: the demo model is built and loaded once per session (COLLAGE_CACHE is a tmp dir).
    return BridgeConfig(data_dir=tmp_path / "bridge", preview_interval=0.0)


async def ws_events(client, job_id, on_first=None, cancel_on=None, timeout=60):
    """Every event of the job over the websocket, until the bridge closes it after the last.
    Calls `on_first()` once the first event is in (the handler is following the job then);
    sends cancel once `cancel_on(event)` is true."""
    events = []

    async def follow(ws):
        nonlocal cancel_on
        async for msg in ws:
            assert msg.type == aiohttp.WSMsgType.TEXT
            event = wire.ProgressEvent.from_json(msg.data)
            events.append(event)
            if on_first and len(events) == 1:
                on_first()
            if cancel_on and cancel_on(event):
                await ws.send_json(wire.WS_CANCEL)
                cancel_on = None

    async with client.ws_connect(wire.route(wire.ROUTE_JOB_WS, job_id=job_id)) as ws:
        await asyncio.wait_for(follow(ws), timeout)
    return events


async def test_round_trip(aiohttp_client, config):
    client = await aiohttp_client(create_app(config))
    r = await T.submit(client, T.small_request(variants=2, seeds=[11, 12]))
    assert r.status == 202, await r.text()
    job = wire.JobStatus.from_dict(await r.json())
    assert job.state in (wire.QUEUED, wire.RUNNING) and r.headers["Location"] == f"/jobs/{job.id}"

    done = await T.wait_done(client, job.id)
    assert done.state == wire.DONE, done.error
    assert [(res.index, res.seed, res.width, res.height) for res in done.results] == [
        (0, 11, 64, 64),
        (1, 12, 64, 64),
    ]
    assert done.timings["compute"] > 0
    pixels = []
    for res in done.results:
        r = await client.get(res.url)
        assert r.status == 200 and r.content_type == "image/png"
        assert r.headers[wire.RESULT_SEED_HEADER] == str(res.seed)
        img = Image.open(io.BytesIO(await r.read()))
        assert img.size == (64, 64) and img.mode == "RGB"
        pixels.append(np.asarray(img))
    assert not np.array_equal(pixels[0], pixels[1])  # different seeds, different images

    info = await (await client.get(wire.ROUTE_INFO)).json()
    assert info["model_loaded"] is True and info["model"] == "demo" and info["queue_length"] == 0
    assert info["device"] != "auto" and "torch" in info["versions"]


async def test_progress_events_arrive_in_order(aiohttp_client, config):
    client = await aiohttp_client(create_app(config))
    manager = client.app[MANAGER]
    manager.pause()  # the job starts once the websocket follows it: every event is seen live
    r = await T.submit(client, T.small_request(steps=6))
    job_id = (await r.json())["id"]
    events = await ws_events(client, job_id, on_first=manager.resume)

    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    states = [e.state for e in events if e.kind == wire.EVENT_STATE]
    assert states == [wire.QUEUED, wire.RUNNING, wire.DONE]
    phases = [e.phase for e in events if e.kind == wire.EVENT_PROGRESS]
    order = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]
    assert order[-3:] == ["encoding", "sampling", "decoding"]
    sampling = [e for e in events if e.phase == "sampling"]
    assert [e.step for e in sampling] == list(range(1, 7)) and {e.total for e in sampling} == {6}
    previews = [e.preview for e in sampling if e.preview]
    assert previews, "a preview every step with preview_interval=0"
    assert Image.open(io.BytesIO(previews[0])).mode == "RGB"

    # The long poll tells the same story, from any point on.
    r = await client.get(wire.route(wire.ROUTE_JOB_EVENTS, job_id=job_id), params={"after": 3})
    polled = wire.EventsResponse.from_dict(await r.json())
    assert polled.done and [e.seq for e in polled.events] == [e.seq for e in events[3:]]


async def test_cancel_stops_the_job_within_one_step(aiohttp_client, config):
    client = await aiohttp_client(create_app(config))
    manager = client.app[MANAGER]
    manager.pause()
    r = await T.submit(client, T.small_request(steps=300, strength=1.0))
    job_id = (await r.json())["id"]
    events = await ws_events(
        client, job_id, on_first=manager.resume, cancel_on=lambda e: e.phase == "sampling" and e.step >= 2
    )

    final = events[-1]
    assert final.kind == wire.EVENT_STATE and final.state == wire.CANCELLED
    phase, step_at_cancel, total = manager.jobs[job_id].cancelled_at
    assert phase == "sampling" and total == 300
    last_step = max(e.step for e in events if e.phase == "sampling")
    assert last_step <= step_at_cancel + 1, (last_step, step_at_cancel)
    assert "decoding" not in {e.phase for e in events}
    status = wire.JobStatus.from_dict(await (await client.get(f"/jobs/{job_id}")).json())
    assert status.state == wire.CANCELLED and status.error.startswith("cancelled during sampling")
    assert (await client.get(f"/jobs/{job_id}/results/0")).status == 409

    # The worker goes on with the next job.
    r = await T.submit(client, T.small_request())
    assert (await T.wait_done(client, (await r.json())["id"])).state == wire.DONE


async def test_cancel_over_http_while_queued_and_running(aiohttp_client, config):
    client = await aiohttp_client(create_app(config))
    manager = client.app[MANAGER]
    manager.pause()
    first = (await (await T.submit(client, T.small_request(steps=300))).json())["id"]
    second = (await (await T.submit(client, T.small_request())).json())["id"]
    status = await (await client.get(f"/jobs/{second}")).json()
    assert status["state"] == wire.QUEUED and status["queue_position"] == 1
    r = await client.post(f"/jobs/{second}/cancel")
    assert (await r.json())["state"] == wire.CANCELLED  # never started
    manager.resume()
    await T.wait_event(client, first, lambda e: e.phase == "sampling")
    await client.post(f"/jobs/{first}/cancel")
    assert (await T.wait_done(client, first)).state == wire.CANCELLED


async def test_a_client_that_went_away_finds_its_result_later(aiohttp_client, config):
    client = await aiohttp_client(create_app(config))
    async with aiohttp.ClientSession() as gone:  # submits, watches a little, disconnects
        r = await gone.post(
            client.make_url(wire.ROUTE_JOBS),
            data=T.small_request(steps=8).to_json(),
            headers={"Content-Type": "application/json"},
        )
        job_id = (await r.json())["id"]
        async with gone.ws_connect(client.make_url(wire.route(wire.ROUTE_JOB_WS, job_id=job_id))) as ws:
            await ws.receive(timeout=30)
    # A new connection, later: the job finished without anyone watching.
    done = await T.wait_done(client, job_id)
    assert done.state == wire.DONE
    r = await client.get(done.results[0].url)
    assert r.status == 200 and wire.png_size(await r.read()) == (64, 64)
    listed = await (await client.get(wire.ROUTE_JOBS)).json()
    assert job_id in [j["id"] for j in listed["jobs"]]


async def test_a_restart_keeps_finished_results(aiohttp_client, config):
    client = await aiohttp_client(create_app(config))
    job_id = (await (await T.submit(client, T.small_request())).json())["id"]
    done = await T.wait_done(client, job_id)
    before = await (await client.get(done.results[0].url)).read()
    await client.close()

    client = await aiohttp_client(create_app(config))  # the same data dir
    status = wire.JobStatus.from_dict(await (await client.get(f"/jobs/{job_id}")).json())
    assert status.state == wire.DONE and status.results == done.results
    assert await (await client.get(status.results[0].url)).read() == before
    r = await client.get(wire.route(wire.ROUTE_JOB_EVENTS, job_id=job_id), params={"after": 0})
    events = wire.EventsResponse.from_dict(await r.json())
    assert events.done and events.events[-1].state == wire.DONE


async def test_a_job_whose_collage_core_rejects_fails_alone(aiohttp_client, config):
    client = await aiohttp_client(create_app(config))
    # Valid on the wire, but the only layer is fully transparent: core says so, with the field.
    layer = T.solid_layer("ghost", 16, 16, (0, 0, 0, 0), x=8, y=8)
    r = await T.submit(client, T.small_request(layers=[layer]))
    assert r.status == 422
    body = await r.json()
    assert any(p.startswith("layers[0]") and ".png: has no visible pixels" in p for p in body["problems"]), (
        body
    )
    assert (await client.get(wire.ROUTE_HEALTH)).status == 200


@pytest.mark.skipif(not engine_supports_regenerate(), reason="core has no regenerate yet")
async def test_regenerate_changes_only_that_layer(aiohttp_client, config):
    client = await aiohttp_client(create_app(config))
    first = await T.wait_done(client, (await (await T.submit(client, T.small_request())).json())["id"])
    base = await (await client.get(first.results[0].url)).read()
    r = await T.submit(
        client, T.small_request(base_image=base, regenerate_layer=0, regenerate_dilation=0, feather_px=0)
    )
    assert r.status == 202, await r.text()
    again = await T.wait_done(client, (await r.json())["id"])
    assert again.state == wire.DONE, (again.error, again.problems)
    after = await (await client.get(again.results[0].url)).read()
    a = np.asarray(Image.open(io.BytesIO(base)).convert("RGB")).astype(int)
    b = np.asarray(Image.open(io.BytesIO(after)).convert("RGB")).astype(int)
    changed = np.abs(a - b).sum(axis=2) > 0
    assert changed.any()
    # Layer 0 covers x 8..32, y 8..24: far from it nothing changes.
    assert not changed[40:, 40:].any(), json.dumps(np.argwhere(changed).tolist()[:10])


async def test_regenerate_a_selection_changes_nothing_outside_the_grown_mask(aiohttp_client, config):
    """A grey mask PNG (the dock's selection) redoes only its pixels, grown by the dilation."""
    client = await aiohttp_client(create_app(config))
    first = await T.wait_done(client, (await (await T.submit(client, T.small_request())).json())["id"])
    base = await (await client.get(first.results[0].url)).read()
    selected = np.zeros((64, 64), np.uint8)
    selected[20:36, 4:30] = 255  # part of the sushi and the background below it
    mask = wire.encode_png(64, 64, selected.tobytes(), channels=1)
    request = T.small_request(base_image=base, regenerate_mask=mask, regenerate_dilation=2, seed=99)
    r = await T.submit(client, request)
    assert r.status == 202, await r.text()
    again = await T.wait_done(client, (await r.json())["id"])
    assert again.state == wire.DONE, (again.error, again.problems)
    a = np.asarray(Image.open(io.BytesIO(base)).convert("RGB")).astype(int)
    b = np.asarray(Image.open(io.BytesIO(await (await client.get(again.results[0].url)).read())))
    changed = np.abs(a - b.astype(int)).sum(axis=2) > 0
    grown = np.zeros((64, 64), bool)
    grown[18:38, 2:32] = True  # the selection grown by 2 px (a square bound of the round growth)
    assert changed[20:36, 4:30].any()
    assert not changed[~grown].any(), np.argwhere(changed & ~grown).tolist()[:10]

    empty = wire.encode_png(64, 64, bytes(64 * 64), channels=1)
    r = await T.submit(client, T.small_request(base_image=base, regenerate_mask=empty))
    assert r.status == 422
    assert (await r.json())["problems"] == ["regenerate_mask: selects no pixel (every pixel is 0)"]


async def test_info_describes_each_model_and_a_job_runs_on_sdxl(
    aiohttp_client, tmp_path, demo_pipeline, tiny_sdxl_dir
):
    """/info tells the dock each model's family and native size (read from the files, nothing
    loaded), and a request that names the SDXL model runs on it."""
    sdxl = str(tiny_sdxl_dir)
    config = BridgeConfig(data_dir=tmp_path / "bridge", preview_interval=0.0, allowed_models=(sdxl,))
    client = await aiohttp_client(create_app(config))
    info = wire.InfoResponse.from_dict(await (await client.get(wire.ROUTE_INFO)).json())
    assert info.details("demo") == wire.ModelDetails("demo", "sd1", "Stable Diffusion 1.x", 64, 8)
    assert info.details(sdxl) == wire.ModelDetails(sdxl, "sdxl", "Stable Diffusion XL", 256, 64)

    request = T.small_request(steps=3, width=128, height=128, model=sdxl)
    r = await T.submit(client, request)
    assert r.status == 202, await r.text()
    done = await T.wait_done(client, (await r.json())["id"])
    assert done.state == wire.DONE, done.error
    assert [(res.width, res.height) for res in done.results] == [(128, 128)]


async def test_any_canvas_size_comes_back_at_that_size(aiohttp_client, config):
    """100×75 is no multiple of 8: the engine generates at 104×72 and scales back. The results have
    the request's size, and the strength-0 layer's pixels are its own bytes; a regenerate request
    on that canvas (base image at 100×75) changes nothing far from its layer."""
    client = await aiohttp_client(create_app(config))
    kept = T.solid_layer("salmon sushi", 30, 20, (250, 120, 90, 255), x=7, y=5, strength=0.0)
    changed = T.solid_layer("ginger", 20, 20, (240, 200, 200, 255), x=71, y=49)
    request = T.small_request(width=100, height=75, layers=[kept, changed], steps=3, feather_px=0)
    r = await T.submit(client, request)
    assert r.status == 202, await r.text()
    done = await T.wait_done(client, (await r.json())["id"])
    assert done.state == wire.DONE, (done.error, done.problems)
    assert [(res.width, res.height) for res in done.results] == [(100, 75)]
    base = await (await client.get(done.results[0].url)).read()
    image = np.asarray(Image.open(io.BytesIO(base)).convert("RGB"))
    assert image.shape == (75, 100, 3)
    assert (image[5:25, 7:37] == (250, 120, 90)).all()  # strength 0: the layer's own bytes
    assert not (image[49:69, 71:91] == (240, 200, 200)).all()  # strength 1: generated

    if not engine_supports_regenerate():
        return
    again = T.small_request(
        width=100,
        height=75,
        layers=[kept, changed],
        steps=3,
        feather_px=0,
        base_image=base,
        regenerate_layer=1,
        regenerate_dilation=0,
    )
    r = await T.submit(client, again)
    assert r.status == 202, await r.text()
    redone = await T.wait_done(client, (await r.json())["id"])
    assert redone.state == wire.DONE, (redone.error, redone.problems)
    after = np.asarray(Image.open(io.BytesIO(await (await client.get(redone.results[0].url)).read())))
    assert after.shape == (75, 100, 3)
    diff = np.abs(after.astype(int) - image.astype(int)).sum(axis=2) > 0
    assert diff[49:69, 71:91].any()
    assert not diff[:40, :60].any()  # far from the regenerated layer: the base image's bytes


async def test_a_canvas_under_64_px_is_refused(aiohttp_client, config):
    client = await aiohttp_client(create_app(config))
    r = await T.submit(client, T.small_request(width=63, height=100))
    assert r.status == 422
    problems = (await r.json())["problems"]
    assert problems == ["width: must be a whole number of pixels in 64..8192, got 63"], problems
