"""Masked, weighted ControlNet per layer (core/control/, algorithm.md §3) on the demo model.

The ControlNet is a tiny one built offline from the demo U-Net (`ControlNetModel.from_unet`).
Its zero-initialised output convolutions would make every residual zero, so they are filled
with small random values (fixed seed): the residuals then carry signal and the tests mean
something.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from core.collage import Collage, Layer
from core.compositing import area_resize, composite
from core.control import (
    DETECTORS,
    CannyDetector,
    ControlDetector,
    compatibility_problem,
    control_image,
    controlnet_hook,
    get_detector,
    load_controlnet,
    missing_controlnet_warning,
    step_in_range,
    unload_controlnet,
    weight_map,
    wrap_controlnet,
)
from core.generate import generate
from core.models import ModelLoadError


def block(w, h, color, inner=None):
    img = np.zeros((h, w, 4), np.uint8)
    img[...] = (*color, 255)
    if inner is not None:  # a detail inside, so the object has inner edges
        img[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3, :3] = inner
    return img


def collage(weights=(1.0, 0.0, 0.0), **overrides) -> Collage:
    kwargs = dict(
        prompt="a red box, a blue ball and a green leaf",
        layers=[
            Layer("red box", block(24, 24, (220, 40, 40), inner=(20, 20, 20)), offset=(0, 0)),
            Layer("blue ball", block(24, 24, (40, 40, 220)), offset=(40, 0)),
            Layer("green leaf", block(32, 24, (40, 200, 40)), offset=(16, 40)),
        ],
        width=64,
        height=64,
        steps=4,
        strength=0.8,
        seed=3,
    )
    kwargs.update(overrides)
    c = Collage(**kwargs)
    for layer, w in zip(c.layers, weights, strict=False):
        layer.control_weight = w
    return c


def tiny_controlnet(unet, seed=0, **config_changes):
    from diffusers import ControlNetModel

    # The layers diffusers initialises itself draw on torch's global generator, which torch seeds
    # randomly at start-up: unseeded, every run tested a different network (the flaky residuals
    # test, issue 13). Seeded on a forked generator, so the caller's global state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(unet)
        if config_changes:
            net = ControlNetModel.from_config({**net.config, **config_changes})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        zero_init = [
            *net.controlnet_down_blocks,
            net.controlnet_mid_block,
            net.controlnet_cond_embedding.conv_out,
        ]
        for module in zero_init:
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return net


@pytest.fixture(scope="module")
def model(demo_model_dir):
    from core.models import load_pipeline

    return load_pipeline("demo")


@pytest.fixture(scope="module")
def controlnet(model):
    return wrap_controlnet(tiny_controlnet(model.pipeline.unet), model, "tiny")


class _Calls(list):
    """(down residuals or None, mid residual or None) per U-Net call; `inputs` has that call's
    (sample, timestep, encoder_hidden_states)."""

    def __init__(self):
        super().__init__()
        self.inputs = []


@contextlib.contextmanager
def captured(model):
    """Record the extra arguments of every U-Net call (see `_Calls`)."""
    calls = _Calls()

    def grab(module, args, kwargs):
        calls.append(
            (kwargs.get("down_block_additional_residuals"), kwargs.get("mid_block_additional_residual"))
        )
        calls.inputs.append((args[0], args[1], kwargs["encoder_hidden_states"]))

    handle = model.pipeline.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def assert_zero_outside(c: Collage, calls):
    """Every residual is exactly 0 where the area-averaged weight map is 0, and not all 0 elsewhere."""
    weights = weight_map(composite(c))
    seen = 0
    for down, mid in calls:
        if down is None:
            continue
        for r in [*down, mid]:
            w = area_resize(weights, *r.shape[-2:])
            outside = torch.from_numpy(np.array(w == 0))
            assert outside.any()
            assert (r[..., outside] == 0).all()
            assert (r[..., ~outside] != 0).any()
            seen += 1
    assert seen


# --- control images --------------------------------------------------------------------------


def test_canny_outline_and_inner_edges_of_the_layer_only():
    c = collage(weights=(1.0, 0.0, 0.0))
    edges = control_image(c)[..., 0] > 0
    assert control_image(c).shape == (64, 64, 3) and control_image(c).dtype == np.uint8
    # The red box's outline: it touches the canvas at (0, 0), its other sides are inside.
    assert edges[:24, 22:26].any() and edges[22:26, :24].any()
    assert edges[8:16, 8:16].any()  # the dark detail inside it
    # Nothing from the weight-0 layers, nothing far from the red box.
    assert not edges[:, 28:].any() and not edges[28:, :].any()
    # The canvas border the box is cropped by is no edge: the box's pixels start at 0.
    assert not edges[0, 2:20].any() and not edges[2:20, 0].any()


def test_the_layer_border_is_an_outline_but_the_canvas_crop_is_not():
    img = block(16, 16, (128, 128, 128))  # the same grey it is put over: only alpha shows it
    c = Collage("grey", [Layer("grey", img, offset=(-8, 20), control_weight=1.0)], width=64, height=64)
    edges = control_image(c)[..., 0] > 0
    assert edges[18:38, 6:10].any()  # its right side, inside the canvas
    assert not edges[22:34, 0].any()  # where the canvas cuts it off


def test_upper_layers_hide_lower_edges_and_only_weighted_layers_draw():
    lower = Layer("box", block(32, 32, (200, 30, 30), inner=(10, 10, 10)), offset=(8, 8), control_weight=1.0)
    upper = Layer("cover", block(20, 40, (30, 30, 200)), offset=(24, 0), control_weight=0.0)
    c = Collage("x", [lower, upper], width=64, height=64)
    edges = control_image(c)[..., 0] > 0
    assert edges[8:40, 6:10].any()  # the box's left side
    assert not edges[:, 25:43].any()  # under the cover: nothing, and the cover draws nothing
    upper.control_weight = 1.0
    edges = control_image(c)[..., 0] > 0
    assert edges[:, 22:26].any()  # now the cover's own outline
    assert not edges[12:36, 28:40].any()  # but still none of the box's edges under it


def test_canny_thresholds_matter_and_detectors_are_pluggable():
    faint = block(32, 32, (120, 120, 120))
    faint[8:24, 8:24, :3] = 140  # a faint inner edge
    c = Collage("x", [Layer("faint", faint, offset=(16, 16), control_weight=1.0)], width=64, height=64)
    strict = control_image(c, detector=CannyDetector(100, 200))[..., 0] > 0
    loose = control_image(c, detector=CannyDetector(10, 30))[..., 0] > 0
    assert not strict[22:42, 22:42].any() and loose[22:42, 22:42].any()
    assert isinstance(CannyDetector(), ControlDetector) and "canny" in DETECTORS
    assert get_detector("canny", low=1, high=2) == CannyDetector(1, 2)
    with pytest.raises(ValueError, match="unknown control detector"):
        get_detector("depth")
    with pytest.raises(ValueError, match="low <= high"):
        CannyDetector(200, 100)

    class Square:  # any object with a name and __call__ will do
        name = "square"

        def __call__(self, rgba):
            return (rgba[..., 3] > 0).astype(np.float32)

    filled = control_image(c, detector=Square())[..., 0]
    assert filled[20, 20] == 255 and filled[10, 10] == 0


def test_missing_controlnet_warning_names_the_layers():
    assert missing_controlnet_warning(collage(weights=(0.0, 0.0, 0.0))) is None
    message = missing_controlnet_warning(collage(weights=(1.0, 0.0, 0.5)))
    assert "'red box', 'green leaf'" in message and "--controlnet" in message


def test_weight_map_is_the_weighted_sum_of_visible_masks():
    c = collage(weights=(1.5, 0.5, 0.0))
    w = weight_map(composite(c))
    assert w[5, 5] == 1.5 and w[5, 45] == 0.5 and w[45, 20] == 0.0 and w[30, 30] == 0.0


# --- residuals that reach the U-Net ----------------------------------------------------------


def test_residuals_are_zero_outside_weighted_layers(model, controlnet):
    c = collage(weights=(1.0, 0.0, 0.0))
    with captured(model) as calls:
        result = generate(model, c, hooks=[controlnet_hook(controlnet)])
    assert len(calls) == 3 and all(down is not None for down, _ in calls)  # 4 steps at strength 0.8
    # Every residual level, at its own resolution (the demo ControlNet: 8×8 and 4×4 latents).
    assert {tuple(r.shape[-2:]) for r in calls[0][0]} == {(8, 8), (4, 4)}
    assert calls[0][0][0].shape[0] == 2  # both classifier-free-guidance halves
    assert_zero_outside(c, calls)
    plain = generate(model, c)
    assert not np.array_equal(result.images[0].image, plain.images[0].image)
    # They are the ControlNet's residuals for that step's input, as diffusers' pipeline computes
    # them (control image in [0, 1], repeated over the batch), times the weight map.
    net = controlnet.controlnet
    assert "forward" not in net.controlnet_cond_embedding.__dict__  # the memoisation is undone
    cond = torch.from_numpy(control_image(c)).permute(2, 0, 1)[None].float() / 255.0
    weights = weight_map(composite(c))
    for (down, mid), (sample, t, embeds) in zip(calls, calls.inputs, strict=True):
        ref_down, ref_mid = net(
            sample,
            t,
            encoder_hidden_states=embeds,
            controlnet_cond=cond.repeat(2, 1, 1, 1),
            return_dict=False,
        )
        for got, ref in zip([*down, mid], [*ref_down, ref_mid], strict=True):
            w = torch.from_numpy(np.array(area_resize(weights, *ref.shape[-2:])))
            expected = ref * w
            # The hook broadcasts one control image over both halves; diffusers repeats it, so its
            # convolutions run at batch 2 and sum in another order. The results then differ by
            # rounding, which scales with the tensor's largest value and (as a random walk) with
            # the square root of the sums' length (the 1x1 output convolution's channels), not
            # with each element: a fixed 1e-6 failed now and then on an element near zero.
            # Measured over 25 ControlNets: at most 0.9 of eps * max|value| * sqrt(channels).
            atol = 4 * torch.finfo(ref.dtype).eps * float(expected.abs().max()) * ref.shape[1] ** 0.5
            torch.testing.assert_close(got, expected, rtol=0, atol=atol)


def test_residuals_scale_linearly_with_the_weight(model, controlnet):
    firsts = {}
    for w in (0.5, 1.0, 2.0):  # one step: the same U-Net input for every w
        with captured(model) as calls:
            generate(
                model,
                collage(weights=(w, w, 0.0), steps=1, strength=1.0),
                hooks=[controlnet_hook(controlnet)],
            )
        firsts[w] = [*calls[0][0], calls[0][1]]
    for half, one, two in zip(firsts[0.5], firsts[1.0], firsts[2.0], strict=True):
        assert one.abs().max() > 0
        torch.testing.assert_close(half * 2, one, rtol=1e-6, atol=0)
        torch.testing.assert_close(one * 2, two, rtol=1e-6, atol=0)


def test_conditioning_scale_scales_the_residuals(model, controlnet):
    firsts = {}
    for scale in (0.25, 1.0):
        with captured(model) as calls:
            generate(
                model,
                collage(steps=1, strength=1.0),
                hooks=[controlnet_hook(controlnet, conditioning_scale=scale)],
            )
        firsts[scale] = calls[0][1]
    torch.testing.assert_close(firsts[0.25] * 4, firsts[1.0], rtol=1e-5, atol=1e-7)


def test_all_weights_zero_is_the_run_without_controlnet(model, controlnet):
    c = collage(weights=(0.0, 0.0, 0.0))
    build = controlnet_hook(controlnet)
    with captured(model) as calls:
        with_hook = generate(model, c, hooks=[build])
    without = generate(model, c)
    assert all(down is None and mid is None for down, mid in calls)
    assert np.array_equal(with_hook.images[0].image, without.images[0].image)
    # Weighted layers that are entirely covered count as no weight too.
    covered = collage(weights=(1.0, 0.0, 0.0))
    covered.layers.append(Layer("cover", block(30, 30, (9, 9, 9)), offset=(0, 0)))
    with captured(model) as calls:
        generate(model, covered, hooks=[build])
    assert all(down is None for down, _ in calls)


def test_guidance_range_follows_diffusers(model, controlnet):
    c = collage(steps=4, strength=1.0)  # 4 steps run
    with captured(model) as calls:
        generate(model, c, hooks=[controlnet_hook(controlnet, guidance_start=0.25, guidance_end=0.75)])
    got = [down is not None for down, _ in calls]
    assert got == [step_in_range(i, 4, 0.25, 0.75) for i in range(4)] == [False, True, True, False]
    # The fraction is of the steps actually run: at strength 0.5, 4 of 8 steps run.
    with captured(model) as calls:
        generate(model, collage(steps=8, strength=0.5), hooks=[controlnet_hook(controlnet, guidance_end=0.5)])
    assert [down is not None for down, _ in calls] == [True, True, False, False]
    # No step in range: no residuals at all, and the image is the plain one.
    short = collage(steps=2, strength=1.0)
    with captured(model) as calls:
        out = generate(
            model, short, hooks=[controlnet_hook(controlnet, guidance_start=0.1, guidance_end=0.4)]
        )
    assert all(down is None for down, _ in calls)
    assert np.array_equal(out.images[0].image, generate(model, short).images[0].image)
    with pytest.raises(ValueError, match="start < end"):
        controlnet_hook(controlnet, guidance_start=0.6, guidance_end=0.5)


# --- loading ---------------------------------------------------------------------------------


def test_load_from_folder_and_single_file_and_reuse(model, tmp_path):
    from safetensors.torch import save_file

    net = tiny_controlnet(model.pipeline.unet, seed=1)
    folder = tmp_path / "tiny-controlnet"
    net.save_pretrained(folder)
    try:
        loaded = load_controlnet(folder, model=model)
        assert load_controlnet(str(folder), model=model) is loaded  # cached
        assert loaded.device == model.device and next(loaded.controlnet.parameters()).dtype == model.dtype
        ref = dict(net.state_dict())
        got = loaded.controlnet.state_dict()
        assert all(torch.equal(ref[k], got[k].to(ref[k])) for k in ref)

        single = tmp_path / "tiny-controlnet.safetensors"
        save_file({k: v.contiguous() for k, v in ref.items()}, str(single))
        from_file = load_controlnet(single, model=model, config=folder)
        assert from_file is not loaded
        assert torch.equal(
            from_file.controlnet.controlnet_mid_block.weight, got["controlnet_mid_block.weight"]
        )
        # It drives a generation.
        with captured(model) as calls:
            generate(model, collage(), hooks=[controlnet_hook(from_file)])
        assert_zero_outside(collage(), calls)
    finally:
        unload_controlnet()


def test_the_demo_models_own_controlnet(model):
    from core.demo_model import DEMO_VERSION, demo_controlnet_dir

    try:
        loaded = load_controlnet("demo", model=model)
        assert load_controlnet("demo", model=model) is loaded  # cached
        assert loaded.identity == f"demo-controlnet:{DEMO_VERSION}"
        assert (demo_controlnet_dir() / "config.json").is_file()  # unpacked once into the cache
        # Trained: the zero convolutions are no longer zero.
        assert float(loaded.controlnet.controlnet_mid_block.weight.abs().max()) > 0
    finally:
        unload_controlnet()


def test_load_errors_are_clear(model, tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_controlnet(tmp_path / "missing-controlnet", model=model)
    with pytest.raises(ModelLoadError, match="not found"):
        load_controlnet(tmp_path / "typo.safetensors", model=model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_controlnet(tmp_path / "empty", model=model)
    from safetensors.torch import save_file

    not_a_controlnet = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(2)}, str(not_a_controlnet))
    with pytest.raises(ModelLoadError, match="not a ControlNet"):
        load_controlnet(not_a_controlnet, model=model)
    with pytest.raises(ModelLoadError, match="unsupported ControlNet file type"):
        (tmp_path / "notes.txt").write_text("x")
        load_controlnet(tmp_path / "notes.txt", model=model)


def test_controlnet_of_another_base_is_refused(model, tmp_path):
    other = tiny_controlnet(model.pipeline.unet, cross_attention_dim=48)
    folder = tmp_path / "other-base"
    other.save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="48-dim text features; the loaded model has 32"):
        load_controlnet(folder, model=model)
    with pytest.raises(ModelLoadError, match="48-dim"):
        wrap_controlnet(other, model)
    sd15 = {"cross_attention_dim": 768, "in_channels": 4}
    sd21 = {"cross_attention_dim": 1024, "in_channels": 4}
    message = compatibility_problem(sd15, sd21)
    assert message.startswith(
        "this ControlNet was made for Stable Diffusion 1.x (768-dim text features); "
        "the loaded model is Stable Diffusion 2.x. Use a ControlNet made for Stable Diffusion 2.x "
        "(for Canny edges e.g. 'thibaud/controlnet-sd21-canny-diffusers')"
    )
    shape = {"block_out_channels": [32, 64], "layers_per_block": 2, "down_block_types": ["A", "B"]}
    assert "levels" in compatibility_problem(
        {**sd15, **shape}, {**sd15, **shape, "block_out_channels": [32, 32]}
    )
    assert compatibility_problem({**sd15, **shape}, {**sd15, **shape}) is None


# --- everything together ---------------------------------------------------------------------


def test_all_pieces_together(model, controlnet, monkeypatch, tmp_path):
    """Per-layer strength (one layer at 0), masked attention, appearance tokens and ControlNet on
    one collage. Attention and appearance join in when their modules are there / wired."""
    import core.generate

    c = collage(weights=(1.0, 0.5, 0.0), steps=4)
    c.layers[0].strength = 0.0  # the red box stays exactly as composited
    c.layers[1].strength = 1.0
    c.layers[0].attention_weight = 1.0
    c.layers[1].attention_weight = 2.0
    hooks = []
    try:
        from core.attention import masked_attention_hook

        hooks.append(masked_attention_hook)
    except ImportError:  # core/attention.py not there: run the rest
        pass
    if hasattr(core.generate, "appearance_tokens"):  # generate() learns appearance tokens
        from core import inversion

        monkeypatch.setattr(
            inversion.recipe, "DEFAULT_SETTINGS", inversion.InversionSettings(steps=2, resolution=64, seed=5)
        )
        monkeypatch.setattr(inversion.cache, "cache_dir", lambda: tmp_path)
        c.layers[2].appearance = True
    hooks.append(controlnet_hook(controlnet))
    with captured(model) as calls:
        result = generate(model, c, hooks=hooks)
    out, start = result.images[0].image, result.composite
    assert np.array_equal(out[:24, :24], start[:24, :24])  # the strength-0 layer
    assert not np.array_equal(out[:24, 40:64], start[:24, 40:64])
    assert_zero_outside(c, calls)
