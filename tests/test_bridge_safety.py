"""Safety: malformed requests get a 4xx naming the field and the bridge keeps serving; size
limits; models only from the allowed set; the token, Origin and Host rules; the CLI's refusals."""

import base64
import json

import aiohttp
import pytest

from bridge_server import auth
from bridge_server import testing as T
from bridge_server.__main__ import main
from bridge_server.app import create_app
from bridge_server.config import BridgeConfig, is_loopback
from bridge_server.keys import MANAGER
from krita_plugin.collage_diffusion import wire

TOKEN = "a-long-enough-test-token-0123456789"


@pytest.fixture
def config(tmp_path):
    return BridgeConfig(
        data_dir=tmp_path / "bridge",
        limits=wire.Limits(max_request_bytes=2_000_000, max_layers=4, max_canvas_pixels=256 * 256),
        allowed_models=("other-model",),
    )


def req(**changes):
    return T.small_request(**changes).to_dict()


def with_layer(**changes):
    data = req()
    data["layers"][0].update(changes)
    return data


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def corrupt_png() -> bytes:
    good = wire.encode_png(16, 16, b"\xff" * 16 * 16 * 4)
    return good[:33] + b"\x00\x00\x00\x10IDATgarbage-garbage" + good[-12:]  # header fine, pixels not


MALFORMED = [
    # (body, expected status, the start of a problem (or of the error))
    ("{broken", 400, "body: not valid JSON"),
    ("[]", 400, "body: must be a JSON object"),
    ("null", 400, "body: must be a JSON object"),
    ("[" * 100_000, 400, "body: not valid JSON"),
    ('{"prompt": "\\ud800", "layers": [], "width": 1e999}', 422, "width: must be a whole number"),
    ({}, 422, "prompt: missing (required)"),
    ({**req(), "layers": "many"}, 422, "layers: must be a list of layers"),
    ({**req(), "extra": 1}, 422, "extra: unknown field"),
    (with_layer(png="not base64!"), 422, "layers[0].png: not valid base64"),
    (with_layer(png=b64(b"GIF89a" + b"\0" * 40)), 422, "layers[0].png: not a PNG image"),
    (with_layer(png=b64(corrupt_png())), 422, "layers[0].png: cannot be decoded as a PNG"),
    (with_layer(path="/etc/passwd"), 422, "layers[0].path: unknown field"),
    (with_layer(text=""), 422, "layers[0].text: must not be empty"),
    (with_layer(x="left"), 422, "layers[0].x: must be a whole number"),
    (with_layer(opacity=2), 422, "layers[0].opacity: must be in 0..1"),
    (with_layer(strength=-1), 422, "layers[0].strength: must be in 0..1"),
    (with_layer(attention_weight="lots"), 422, "layers[0].attention_weight: must be a number"),
    (with_layer(x=1000), 422, "layers[0].x, y: the layer"),
    (req(width=63), 422, "width: must be a whole number of pixels in 64..8192"),
    (req(width=512, height=512), 422, "width, height: the canvas 512×512 has 262144 pixels"),
    (req(steps=0), 422, "steps: must be a whole number in 1..1000"),
    (req(variants=100), 422, "variants: must be a whole number in 1..16"),
    (req(seed="lucky"), 422, "seed: must be a whole number"),
    (req(scheduler="magic"), 422, "scheduler: must be one of"),
    (req(model="/etc/passwd"), 422, "model: '/etc/passwd' is not a model of this bridge"),
    (req(model="../models/x.safetensors"), 422, "model: '../models/x.safetensors' is not a model"),
    (req(model=5), 422, "model: must be a model name or null"),
    (req(regenerate_layer=0), 422, "base_image: missing; regenerate_layer needs it"),
    (
        {**req(), "layers": [req()["layers"][0]] * 5},
        422,
        "layers: 5 layers, more than this bridge's limit of 4",
    ),
    (req(api_version=99), 422, "api_version: this bridge speaks API version 1"),
]


@pytest.mark.asyncio
async def test_malformed_requests_get_4xx_and_the_bridge_keeps_serving(aiohttp_client, config):
    client = await aiohttp_client(create_app(config, run_job=T.fake_run_job()))
    for body, status, expected in MALFORMED:
        r = await T.submit(client, body if isinstance(body, (dict, str)) else json.dumps(body))
        answer = await r.json()
        assert r.status == status, (expected, answer)
        assert answer["status"] == status
        assert any(p.startswith(expected) for p in answer["problems"]), (expected, answer)
    assert (await client.get(wire.ROUTE_HEALTH)).status == 200
    r = await T.submit(client, T.small_request())
    assert (await T.wait_done(client, (await r.json())["id"])).state == wire.DONE
    assert (await (await client.get(wire.ROUTE_JOBS)).json())["jobs"][0][
        "state"
    ] == wire.DONE  # only that one


@pytest.mark.asyncio
async def test_a_model_from_the_allowed_set_is_accepted(aiohttp_client, config):
    client = await aiohttp_client(create_app(config, run_job=T.fake_run_job()))
    r = await T.submit(client, T.small_request(model="other-model"))
    assert r.status == 202 and (await r.json())["model"] == "other-model"
    info = await (await client.get(wire.ROUTE_INFO)).json()
    assert info["models"] == ["demo", "other-model"]


@pytest.mark.asyncio
async def test_other_bad_requests(aiohttp_client, config):
    client = await aiohttp_client(create_app(config, run_job=T.fake_run_job()))
    # The wrong content type: a browser's "simple" cross-site POST is text/plain.
    r = await client.post(
        wire.ROUTE_JOBS, data=T.small_request().to_json(), headers={"Content-Type": "text/plain"}
    )
    assert r.status == 415 and (await r.json())["error"].startswith("Content-Type: must be application/json")
    # Too big: beyond client_max_size, answered before anything is decoded.
    big = T.small_request(prompt="x" * 3_000_000).to_json()
    r = await client.post(wire.ROUTE_JOBS, data=big, headers={"Content-Type": "application/json"})
    assert (
        r.status == 413
        and (await r.json())["error"] == "body: larger than this bridge's limit of 2000000 bytes"
    )
    # Unknown jobs, malformed ids, bad query values, results out of range.
    missing = "0" * 32
    assert (await client.get(f"/jobs/{missing}")).status == 404
    assert (await client.get(f"/jobs/{missing}/results/0")).status == 404
    assert (await client.get("/jobs/../../etc/passwd")).status == 404
    assert (await client.get("/jobs/ABC")).status == 404
    r = await client.get("/nowhere")
    assert r.status == 404 and (await r.json())["status"] == 404
    assert (await client.put(wire.ROUTE_JOBS)).status == 405
    job = (await (await T.submit(client, T.small_request())).json())["id"]
    await T.wait_done(client, job)
    for params, field in (
        ({"after": "-1"}, "after"),
        ({"after": "x"}, "after"),
        ({"timeout": "999"}, "timeout"),
    ):
        r = await client.get(f"/jobs/{job}/events", params=params)
        assert r.status == 400 and (await r.json())["error"].startswith(f"{field}: must be"), params
    r = await client.get(f"/jobs/{job}/results/7")
    assert r.status == 404 and (await r.json())["error"].startswith("index: this job has 1 results")
    assert (await client.get(wire.ROUTE_JOBS, params={"state": "odd"})).status == 400
    assert (await client.get(wire.ROUTE_HEALTH)).status == 200


@pytest.mark.asyncio
async def test_the_websocket_ignores_junk_and_understands_cancel(aiohttp_client, config):
    client = await aiohttp_client(create_app(config, run_job=T.fake_run_job()))
    client.app[MANAGER].pause()
    job = (await (await T.submit(client, T.small_request())).json())["id"]
    async with client.ws_connect(f"/jobs/{job}/ws") as ws:
        assert json.loads((await ws.receive(timeout=10)).data)["state"] == wire.QUEUED
        await ws.send_str("junk")
        await ws.send_bytes(b"\x00\x01")
        answer = json.loads((await ws.receive(timeout=10)).data)
        assert answer["status"] == 400 and answer["error"].startswith("message:")
        await ws.send_json(wire.WS_CANCEL)
        rest = [json.loads(m.data) async for m in ws]  # the bridge closes after the last event
    assert [(m["kind"], m["state"]) for m in rest] == [("state", wire.CANCELLED)]
    assert (await client.get(wire.ROUTE_HEALTH)).status == 200


@pytest.mark.asyncio
async def test_the_token_is_required_on_every_route(aiohttp_client, config, monkeypatch):
    config.token = TOKEN
    client = await aiohttp_client(create_app(config, run_job=T.fake_run_job()))
    good = T.auth(TOKEN)
    job = (await (await T.submit(client, T.small_request(), headers=good)).json())["id"]
    await T.wait_done(client, job, headers=good)
    routes = [
        ("GET", wire.ROUTE_HEALTH),
        ("GET", wire.ROUTE_INFO),
        ("GET", wire.ROUTE_JOBS),
        ("POST", wire.ROUTE_JOBS),
        ("GET", f"/jobs/{job}"),
        ("GET", f"/jobs/{job}/events"),
        ("GET", f"/jobs/{job}/results/0"),
        ("POST", f"/jobs/{job}/cancel"),
        ("DELETE", f"/jobs/{job}"),
        ("GET", "/nowhere"),  # even a 404 is not told to a stranger
    ]
    for headers in (
        {},
        T.auth("wrong"),
        T.auth(TOKEN + "x"),
        {"Authorization": TOKEN},
        {"Authorization": "Basic " + TOKEN},
    ):
        for method, path in routes:
            r = await client.request(method, path, headers=headers)
            assert r.status == 401, (method, path, headers)
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await client.ws_connect(f"/jobs/{job}/ws", headers=headers)
        assert info.value.status == 401

    # With the token: every route answers, and the check is hmac.compare_digest every time.
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert (await client.get(f"/jobs/{job}", headers=good)).status == 200
    assert (
        await client.get(f"/jobs/{job}/results/0", headers={"Authorization": f"bearer {TOKEN}"})
    ).status == 200
    async with client.ws_connect(f"/jobs/{job}/ws", headers=good) as ws:
        assert json.loads((await ws.receive()).data)["job_id"] == job
    assert len(calls) == 3
    assert (await client.delete(f"/jobs/{job}", headers=good)).status == 200


def test_token_matching():
    digest = auth._digest(TOKEN)
    assert auth.token_matches(f"Bearer {TOKEN}", digest)
    assert auth.token_matches(f"bearer  {TOKEN}", digest)
    for bad in (None, "", "Bearer", f"Bearer {TOKEN[:-1]}", f"Token {TOKEN}", TOKEN):
        assert not auth.token_matches(bad, digest), bad


@pytest.mark.asyncio
async def test_browsers_are_refused_without_cors(aiohttp_client, config):
    client = await aiohttp_client(create_app(config, run_job=T.fake_run_job()))
    r = await client.get(wire.ROUTE_INFO, headers={"Origin": "https://evil.example"})
    assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
    r = await client.options(wire.ROUTE_JOBS, headers={"Origin": "https://evil.example"})
    assert r.status == 403
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await client.ws_connect(f"/jobs/{'0' * 32}/ws", headers={"Origin": "https://evil.example"})
    # DNS rebinding: a page on a name that resolves to 127.0.0.1 sends its own Host.
    r = await client.get(wire.ROUTE_INFO, headers={"Host": "rebind.evil.example:7870"})
    assert r.status == 403 and (await r.json())["error"].startswith("Host:")
    for host in ("localhost:7870", "127.0.0.1", "[::1]:7870"):
        assert (await client.get(wire.ROUTE_HEALTH, headers={"Host": host})).status == 200, host
    r = await client.get(wire.ROUTE_HEALTH)
    assert r.status == 200 and not any(h.startswith("Access-Control") for h in r.headers)


@pytest.mark.asyncio
async def test_an_allowed_origin_gets_cors(aiohttp_client, config):
    config.allowed_origins = ("http://localhost:3000",)
    client = await aiohttp_client(create_app(config, run_job=T.fake_run_job()))
    r = await client.options(wire.ROUTE_JOBS, headers={"Origin": "http://localhost:3000"})
    assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    r = await client.get(wire.ROUTE_INFO, headers={"Origin": "http://localhost:3000"})
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("127.0.0.2", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.5", False),
        ("gpu-box", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_a_network_bind_needs_a_token(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("COLLAGE_BRIDGE_TOKEN", raising=False)
    assert main(["--host", "0.0.0.0", "--data-dir", str(tmp_path)]) == 2
    assert "--host 0.0.0.0: listening beyond this machine needs --token" in capsys.readouterr().err
    assert main(["--host", "192.168.1.5", "--token", "short", "--data-dir", str(tmp_path)]) == 2
    assert "--token: must be at least 16 characters" in capsys.readouterr().err
    assert BridgeConfig(host="0.0.0.0", token=TOKEN, data_dir=tmp_path).problems() == []
    assert BridgeConfig(data_dir=tmp_path).problems() == []  # loopback: no token needed
    monkeypatch.setenv("COLLAGE_BRIDGE_TOKEN", TOKEN)
    from bridge_server.__main__ import config_from_args, parser

    config = config_from_args(
        parser().parse_args(["--host", "0.0.0.0", "--allow-model", "x", "--allow-model", "x"])
    )
    assert config.token == TOKEN and config.problems() == [] and config.models == ["demo", "x"]
