"""LoRAs left loaded between jobs (core/kept_loras.py, `applied_loras(..., keep=KeepLoras(n))`):
every job computes exactly what the same job computes on a model that never kept a LoRA — the
U-Net's output at every step compared with torch.equal, the image byte for byte — whatever was
kept before it, on the demo model (U-Net and text-encoder LoRAs, kohya and diffusers names) and
the tiny SDXL (kohya LoRAs of the U-Net and both text encoders)."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from core.collage import CollageError
from core.generate import generate
from core.kept_loras import KEEP_NONE, KeepLoras, kept_adapters, kept_bytes, release
from core.loras import LoraCache, LoraSpec, applied_loras
from core.progress import GenerationCancelled
from tests import test_ip_adapter, test_loras, test_loras_encoders
from tests.test_generate import two_layer_collage
from tests.test_loras import assert_same_state, snapshot

peft = pytest.importorskip("peft")

# The LoRA files of those tests, as fixtures here too.
demo_loras = test_loras.demo_loras
demo_text_loras = test_loras_encoders.demo_text_loras
sdxl_kohya_parts = test_loras_encoders.sdxl_kohya_parts
encoder_files = test_ip_adapter.encoder_files
ip_files = test_ip_adapter.demo_files

KEEP = KeepLoras(4)


def run(model, collage, loras=(), keep=KEEP, cache=None, **kwargs) -> tuple[np.ndarray, list[torch.Tensor]]:
    """The job's image and the U-Net's output at each step."""
    outputs: list[torch.Tensor] = []

    def record(module, args, output):
        outputs.append((output.sample if hasattr(output, "sample") else output[0]).detach().clone())

    handle = model.pipeline.unet.register_forward_hook(record)
    try:
        with applied_loras(model, list(loras), cache, keep):
            result = generate(model, collage, **kwargs)
    finally:
        handle.remove()
    return result.images[0].image, outputs


def assert_same_job(got, expected) -> None:
    (image, steps), (want_image, want_steps) = got, expected
    assert len(steps) == len(want_steps) > 0
    assert all(torch.equal(a, b) for a, b in zip(steps, want_steps, strict=True))
    assert np.array_equal(image, want_image)


def peft_layers(pipe) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    parts = [pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    return sum(isinstance(m, BaseTunerLayer) for part in parts if part is not None for m in part.modules())


@pytest.fixture
def pristine(demo_pipeline):
    """The demo model without any LoRA layer before and after the test."""
    release(demo_pipeline.pipeline)
    before = snapshot(demo_pipeline.pipeline)
    yield before
    release(demo_pipeline.pipeline)
    assert_same_state(demo_pipeline.pipeline, before)


def test_each_job_gets_exactly_its_own_loras(demo_pipeline, demo_loras, demo_text_loras, pristine):
    pipe = demo_pipeline.pipeline
    collage = two_layer_collage()
    unet_only = demo_loras["kohya"]  # U-Net layers only
    both = demo_text_loras["both"]  # kohya U-Net and text-encoder layers
    text = demo_text_loras["diffusers"]  # text encoder only, diffusers names
    jobs = {
        "plain": [],
        "A": [LoraSpec(unet_only, 1.0)],
        "B": [LoraSpec(both, 0.7)],
        "T": [LoraSpec(text, 1.2)],
        "A+B": [LoraSpec(unet_only, 0.5), LoraSpec(both, 0.7)],
        "A weaker": [LoraSpec(unet_only, 0.3)],
        "A twice": [LoraSpec(unet_only, 0.4), LoraSpec(unet_only, 0.6)],
    }
    fresh = {name: run(demo_pipeline, collage, loras, keep=KEEP_NONE) for name, loras in jobs.items()}
    assert peft_layers(pipe) == 0 and not kept_adapters(pipe)
    assert len({img.tobytes() for img, _ in fresh.values()}) == len(jobs)  # each job differs

    order = ["A", "plain", "B", "A", "plain", "T", "A+B", "A weaker", "B", "plain", "A twice", "plain"]
    names = set()
    for name in order:
        assert_same_job(run(demo_pipeline, collage, jobs[name]), fresh[name])
        names |= set(kept_adapters(pipe).values())
    # Loaded once each: A, B, T and the second use of A's file in one job; nothing reloaded.
    assert len(names) == 4 and set(kept_adapters(pipe).values()) == names
    assert kept_bytes(pipe) > 0 and peft_layers(pipe) > 0
    # Outside any job, the kept adapters are off: the plain image, with nothing applied.
    assert np.array_equal(generate(demo_pipeline, collage).images[0].image, fresh["plain"][0])


def test_bound_removes_least_recently_used_and_zero_keeps_none(
    demo_pipeline, demo_loras, demo_text_loras, pristine
):
    pipe = demo_pipeline.pipeline
    a, b, t = demo_loras["kohya"], demo_text_loras["both"], demo_text_loras["kohya"]

    def job(keep, *paths):
        with applied_loras(demo_pipeline, [LoraSpec(p, 1.0) for p in paths], None, keep):
            pass
        return [k[0] for k in kept_adapters(pipe)]

    resolved = {p: str(p.resolve()) for p in (a, b, t)}
    two = KeepLoras(2)
    assert job(two, a) == [resolved[a]]
    assert job(two, b) == [resolved[a], resolved[b]]
    assert job(two, a) == [resolved[b], resolved[a]]  # a used last
    assert job(two, t) == [resolved[a], resolved[t]]  # b was the least recently used
    assert job(two, a, b, t) == [resolved[b], resolved[t]]  # all three for the job, then a goes
    one_size = max(kept_bytes(pipe) // 2, 1)
    assert job(KeepLoras(4, max_bytes=one_size), t) == [resolved[t]]  # b went by bytes
    with pytest.raises(ValueError, match="KeepLoras.max_loras"):
        KeepLoras(-1)
    assert job(KEEP_NONE) == [] and peft_layers(pipe) == 0  # 0: none kept, no PEFT layer left
    assert_same_state(pipe, pristine)
    assert job(KEEP_NONE, a) == [] and peft_layers(pipe) == 0


def test_a_file_changed_on_disk_is_loaded_again(
    demo_pipeline, demo_loras, demo_text_loras, tmp_path, pristine
):
    pipe = demo_pipeline.pipeline
    collage = two_layer_collage()
    fresh = {
        name: run(demo_pipeline, collage, [LoraSpec(path, 1.0)], keep=KEEP_NONE)
        for name, path in [("A", demo_loras["kohya"]), ("B", demo_text_loras["both"])]
    }
    path = tmp_path / "edited.safetensors"
    path.write_bytes(demo_loras["kohya"].read_bytes())
    cache = LoraCache()
    assert_same_job(run(demo_pipeline, collage, [LoraSpec(path, 1.0)], cache=cache), fresh["A"])
    old = set(kept_adapters(pipe).values())
    path.write_bytes(demo_text_loras["both"].read_bytes())  # saved again from the trainer
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert_same_job(run(demo_pipeline, collage, [LoraSpec(path, 1.0)], cache=cache), fresh["B"])
    kept = kept_adapters(pipe)
    assert len(kept) == 1 and not old & set(kept.values())  # the old version was removed


def test_cancel_and_failures_leave_the_kept_loras_off(demo_pipeline, demo_loras, demo_text_loras, pristine):
    pipe = demo_pipeline.pipeline
    collage = two_layer_collage()
    a, b = [LoraSpec(demo_loras["kohya"], 1.0)], [LoraSpec(demo_text_loras["both"], 0.8)]
    plain, with_b = (run(demo_pipeline, collage, loras, keep=KEEP_NONE) for loras in ([], b))
    cancel = threading.Event()

    def progress(p):  # cancel in the middle of sampling, with the LoRA on
        if p.phase == "sampling" and p.step == 2:
            cancel.set()

    with pytest.raises(GenerationCancelled):
        run(demo_pipeline, collage, a, progress=progress, cancel=cancel)
    assert len(kept_adapters(pipe)) == 1
    assert_same_job(run(demo_pipeline, collage), plain)
    with pytest.raises(RuntimeError, match="boom"), applied_loras(demo_pipeline, b + a, None, KEEP):
        raise RuntimeError("boom")
    assert_same_job(run(demo_pipeline, collage), plain)

    # A LoRA that fails halfway through loading: what it injected is removed, the rest is kept.
    real_load = type(pipe).load_lora_weights

    def load_then_fail(self, state, adapter_name):
        real_load(self, state, adapter_name=adapter_name)
        raise RuntimeError("disk on fire")

    kept = kept_adapters(pipe)
    third = LoraSpec(demo_text_loras["diffusers"], 1.0, field="loras[1]")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(pipe), "load_lora_weights", load_then_fail)
        with pytest.raises(CollageError, match=r"^loras\[1\]: .*disk on fire"):
            run(demo_pipeline, collage, [*a, third])
    present = {n for names in pipe.get_list_adapters().values() for n in names}
    assert kept_adapters(pipe) == kept and present == set(kept.values())
    assert_same_job(run(demo_pipeline, collage), plain)
    assert_same_job(run(demo_pipeline, collage, b), with_b)

    # Adapters removed behind the registry's back are forgotten, then loaded again when needed.
    pipe.unload_lora_weights()
    assert_same_job(run(demo_pipeline, collage, b), with_b)
    assert len(kept_adapters(pipe)) == 1


def test_embeddings_and_inversion_gradients_with_kept_text_encoder_loras(
    demo_pipeline, demo_text_loras, tmp_path, pristine
):
    """Textual-inversion embeddings splice rows into the text encoders' inputs, under the
    adapters' layers: with kept adapters, a job naming one gives the fresh model's output."""
    from core.embeddings import EmbeddingFiles
    from tests.test_embeddings import vectors, widths_of, write

    pipe = demo_pipeline.pipeline
    files = EmbeddingFiles(
        {"moody.pt": write(tmp_path / "moody.pt", "a1111.pt", vectors(widths_of(demo_pipeline), 2, 3))}
    )
    collage = two_layer_collage(steps=3, prompt="a red box next to a green leaf, embedding:moody")
    text = [LoraSpec(demo_text_loras["kohya"], 1.0)]
    fresh = {
        name: run(demo_pipeline, collage, loras, keep=KEEP_NONE, embeddings=files)
        for name, loras in [("plain", []), ("text", text)]
    }
    assert not np.array_equal(fresh["plain"][0], fresh["text"][0])
    for name in ["text", "plain", "text"]:
        assert_same_job(
            run(demo_pipeline, collage, [] if name == "plain" else text, embeddings=files), fresh[name]
        )
    # The kept adapters' weights are never trainable: gradients through the text encoder (as
    # textual inversion takes them) leave nothing behind in them.
    with applied_loras(demo_pipeline, text, None, KEEP):
        leaves = []

        def as_leaf(module, args, output):  # the token embeddings, as inversion trains them
            leaves.append(output.detach().requires_grad_(True))
            return leaves[-1]

        handle = pipe.text_encoder.get_input_embeddings().register_forward_hook(as_leaf)
        try:
            ids = pipe.tokenizer("a red box", return_tensors="pt").input_ids
            with torch.enable_grad():
                pipe.text_encoder(ids).last_hidden_state.sum().backward()
        finally:
            handle.remove()
    assert leaves[0].grad is not None
    lora = [p for n, p in pipe.text_encoder.named_parameters() if ".lora_" in n]
    assert lora and all(not p.requires_grad and p.grad is None for p in lora)


def test_ip_adapter_jobs_among_kept_loras(demo_pipeline, demo_loras, demo_text_loras, ip_files, pristine):
    """The IP-Adapter look wraps the attn2 processors for a job and calls their (LoRA-wrapped)
    projections: with adapters kept, its jobs give the fresh model's output too."""
    from core.ip_adapter import release_ip_adapters
    from core.options import EngineOptions, build_hooks
    from tests.test_ip_adapter import two_layer_collage as ip_collage

    collage = ip_collage()
    hooks, _ = build_hooks(demo_pipeline, collage, EngineOptions(ip_adapter=ip_files))
    jobs = {
        "plain": [],
        "A": [LoraSpec(demo_loras["kohya"], 1.0)],
        "B": [LoraSpec(demo_text_loras["both"], 0.7)],
    }
    try:
        fresh = {
            name: run(demo_pipeline, collage, loras, keep=KEEP_NONE, hooks=hooks)
            for name, loras in jobs.items()
        }
        assert len({img.tobytes() for img, _ in fresh.values()}) == len(jobs)
        for name in ["A", "plain", "B", "A", "plain"]:
            assert_same_job(run(demo_pipeline, collage, jobs[name], hooks=hooks), fresh[name])
    finally:
        release_ip_adapters()


def test_tiny_sdxl_kohya_loras_of_both_text_encoders(tiny_sdxl, sdxl_kohya_parts, tmp_path):
    from tests.test_sdxl import collage as sdxl_collage

    pipe = tiny_sdxl.pipeline
    release(pipe)
    before = snapshot(pipe)
    collage = sdxl_collage(steps=3)
    paths = {}
    for part, state in sdxl_kohya_parts.items():
        paths[part] = tmp_path / f"{part}.safetensors"
        save_file(state, str(paths[part]))
    whole = tmp_path / "whole.safetensors"
    save_file({k: v for state in sdxl_kohya_parts.values() for k, v in state.items()}, str(whole))
    jobs = {
        "plain": [],
        "whole": [LoraSpec(whole, 0.8)],
        "te2": [LoraSpec(paths["te2"], 1.0)],
        "te1+unet": [LoraSpec(paths["te1"], 1.0), LoraSpec(paths["unet"], 0.9)],
    }
    fresh = {name: run(tiny_sdxl, collage, loras, keep=KEEP_NONE) for name, loras in jobs.items()}
    assert len({img.tobytes() for img, _ in fresh.values()}) == len(jobs)
    try:
        for name in ["whole", "plain", "te2", "te1+unet", "plain", "whole", "te2", "plain"]:
            assert_same_job(run(tiny_sdxl, collage, jobs[name]), fresh[name])
        assert len(kept_adapters(pipe)) == 4
    finally:
        release(pipe)
    assert peft_layers(pipe) == 0
    assert_same_state(pipe, before)


@pytest.mark.asyncio
async def test_the_bridge_keeps_loras_until_another_model_or_its_stop(
    aiohttp_client, demo_pipeline, tiny_sdxl_dir, tmp_path
):
    from bridge_server import testing as T
    from bridge_server.app import create_app
    from bridge_server.config import BridgeConfig
    from bridge_server.keys import MANAGER
    from tests.test_loras import _run_png, peft_unet_lora, save_kohya

    release(demo_pipeline.pipeline)
    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    save_kohya(peft_unet_lora(demo_pipeline.pipeline.unet, seed=3), loras / "ink.safetensors")
    config = BridgeConfig(
        data_dir=tmp_path / "bridge",
        preview_interval=0.0,
        models_dirs=(tmp_path / "models",),
        allowed_models=(str(tiny_sdxl_dir),),
    )
    client = await aiohttp_client(create_app(config))
    engine = client.app[MANAGER].engine
    assert engine.keep_loras == KeepLoras(4, 1024**3)
    ink = T.small_request(steps=3, loras=[{"name": "ink.safetensors"}])
    plain = await _run_png(client, T.small_request(steps=3))
    inked = await _run_png(client, ink)
    kept = kept_adapters(demo_pipeline.pipeline)
    assert len(kept) == 1 and inked != plain
    assert await _run_png(client, T.small_request(steps=3)) == plain
    assert await _run_png(client, ink) == inked
    assert kept_adapters(demo_pipeline.pipeline) == kept  # not loaded again

    await _run_png(client, T.small_request(steps=3, model=str(tiny_sdxl_dir)))  # another model
    assert not kept_adapters(demo_pipeline.pipeline) and peft_layers(demo_pipeline.pipeline) == 0
    assert await _run_png(client, ink) == inked  # the demo model loaded again, the LoRA with it
    current = engine.current.pipeline
    assert len(kept_adapters(current)) == 1
    await client.close()  # the bridge stops: what it left loaded goes
    assert not kept_adapters(current) and peft_layers(current) == 0


def test_bridge_loaded_loras_from_the_command_line(capsys, tmp_path):
    from bridge_server.__main__ import config_from_args, main, parser
    from bridge_server.jobs import JobManager

    args = ["--loaded-loras", "2", "--loaded-lora-mb", "64", "--data-dir", str(tmp_path)]
    config = config_from_args(parser().parse_args(args))
    assert (config.loaded_loras, config.loaded_lora_bytes) == (2, 64 * 2**20) and config.problems() == []
    assert JobManager(config).engine.keep_loras == KeepLoras(2, 64 * 2**20)
    config = config_from_args(parser().parse_args(["--loaded-loras", "0"]))
    assert (config.loaded_loras, config.loaded_lora_bytes) == (0, 2**30)
    assert main(["--loaded-loras", "-1", "--loaded-lora-mb", "-5", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--loaded-loras: must be 0 (none kept) or more, got -1" in err
    assert "--loaded-lora-mb: must be 0 or more, got -5" in err
