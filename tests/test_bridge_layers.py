"""The bridge with output "layers" on the demo model: each result comes with its layer stack."""

import io

import numpy as np
import pytest
from PIL import Image

from bridge_server import testing as T
from bridge_server.app import create_app
from bridge_server.config import BridgeConfig
from core.layer_stack import StackLayer, composite_stack
from krita_plugin.collage_diffusion import wire

pytestmark = pytest.mark.asyncio


@pytest.fixture
def config(tmp_path, demo_pipeline):
    return BridgeConfig(data_dir=tmp_path / "bridge", preview_interval=0.0)


async def _png(client, url: str) -> np.ndarray:
    r = await client.get(url)
    assert r.status == 200 and r.content_type == "image/png", await r.text()
    return np.asarray(Image.open(io.BytesIO(await r.read())))


async def test_layers_round_trip_recomposes_each_variant(aiohttp_client, config):
    client = await aiohttp_client(create_app(config))
    request = T.small_request(variants=2, seeds=[3, 4], output=wire.OUTPUT_LAYERS)
    request.layers[0].name = "sushi layer"
    r = await T.submit(client, request)
    assert r.status == 202, await r.text()
    job_id = (await r.json())["id"]
    fill_event = await T.wait_event(client, job_id, lambda e: e.phase == wire.PHASE_FILL)
    assert fill_event.total > 0
    done = await T.wait_done(client, job_id)
    assert done.state == wire.DONE, (done.error, done.problems)
    assert 0 < done.timings["fill"] < done.timings["compute"]
    for res in done.results:
        flat = await _png(client, res.url)
        assert [(x.name, x.kind) for x in res.layers] == [
            ("background", "background"),
            ("sushi layer", "object"),
            ("ginger", "object"),
        ]
        stack = []
        for info in res.layers:
            pixels = await _png(client, info.url)
            assert pixels.shape == (info.height, info.width, 4)
            stack.append(StackLayer(info.name, info.kind, pixels, (info.x, info.y)))
        composed = composite_stack(stack, res.width, res.height)
        diff = np.abs(composed[..., :3].astype(int) - flat.astype(int))
        assert diff.max() <= 1 and (composed[..., 3] == 255).all()
        # The background differs from the result under the objects: it was filled.
        assert (stack[0].image[..., :3] != flat).any()
    missing = await client.get(wire.route(wire.ROUTE_JOB_RESULT_LAYER, job_id=job_id, index=0, layer=9))
    assert missing.status == 404 and "layer" in (await missing.json())["error"]


async def test_plain_jobs_have_no_stack_and_a_bad_output_is_named(aiohttp_client, config):
    client = await aiohttp_client(create_app(config))
    done = await T.wait_done(client, (await (await T.submit(client, T.small_request())).json())["id"])
    assert done.results[0].layers == [] and "fill" not in done.timings
    r = await client.get(wire.route(wire.ROUTE_JOB_RESULT_LAYER, job_id=done.id, index=0, layer=0))
    assert r.status == 404 and "output" in (await r.json())["error"]
    r = await T.submit(client, T.small_request(output="stack"))
    assert r.status == 422
    assert any(p.startswith("output:") for p in (await r.json())["problems"])
