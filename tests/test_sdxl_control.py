"""ControlNet on SDXL (core/control/), offline on the tiny SDXL with a tiny SDXL ControlNet.

The ControlNet is built from the tiny SDXL's U-Net (`core.random_models.ensure_random_controlnet`:
`ControlNetModel.from_unet`, as diffusers' own SDXL ControlNet tests do) with random values in its
zero-initialised convolutions, so that its residuals carry signal.
"""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from core.collage import Collage, Layer
from core.compositing import area_resize, composite
from core.control import (
    compatibility_problem,
    control_image,
    controlnet_hook,
    load_controlnet,
    unload_controlnet,
    weight_map,
    wrap_controlnet,
)
from core.families import FAMILIES, SD1, SD2, SDXL, families_of_unet_config
from core.generate import generate
from core.models import ModelLoadError
from core.options import EngineOptions, build_hooks

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def controlnet_dir(tiny_sdxl_dir):
    """The tiny SDXL ControlNet's diffusers folder, built once into the session's cache."""
    from core.random_models import ensure_random_controlnet

    return ensure_random_controlnet("sdxl", "tiny", tiny_sdxl_dir.parent.parent)


def tiny_controlnet(controlnet_dir):
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(controlnet_dir, local_files_only=True)


@pytest.fixture
def controlnet(tiny_sdxl, controlnet_dir):
    return wrap_controlnet(tiny_controlnet(controlnet_dir), tiny_sdxl, "tiny-sdxl")


def block(w, h, color, inner=None):
    img = np.zeros((h, w, 4), np.uint8)
    img[...] = (*color, 255)
    if inner is not None:
        img[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3, :3] = inner
    return img


def collage(weights=(1.0, 0.0), **overrides) -> Collage:
    kwargs = dict(
        prompt="a red box next to a blue ball",
        layers=[
            Layer("red box", block(48, 48, (220, 40, 40), inner=(20, 20, 20)), offset=(0, 0)),
            Layer("blue ball", block(40, 40, (40, 40, 220)), offset=(80, 72)),
        ],
        width=128,
        height=128,
        steps=4,
        strength=0.8,
        seed=3,
    )
    kwargs.update(overrides)
    c = Collage(**kwargs)
    for layer, w in zip(c.layers, weights, strict=False):
        layer.control_weight = w
    return c


class _Calls(list):
    """Per U-Net call: (down residuals or None, mid residual or None); `inputs` has the call's
    (sample, timestep, encoder_hidden_states, added_cond_kwargs)."""

    def __init__(self):
        super().__init__()
        self.inputs = []


@contextlib.contextmanager
def captured(model):
    calls = _Calls()

    def grab(module, args, kwargs):
        calls.append(
            (kwargs.get("down_block_additional_residuals"), kwargs.get("mid_block_additional_residual"))
        )
        calls.inputs.append((args[0], args[1], kwargs["encoder_hidden_states"], kwargs["added_cond_kwargs"]))

    handle = model.pipeline.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


# --- the family of a ControlNet, and the shipped configurations ----------------------------------


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))
def test_shipped_controlnet_configs_are_the_familys_unet_encoder(family):
    """Each family's shipped ControlNet config is `ControlNetModel.from_unet` of its shipped U-Net
    config (how diffusers/controlnet-canny-sdxl-1.0 and lllyasviel's SD 1.5 ControlNets are shaped):
    built on the meta device, every weight has the same shape, and its family reads back."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from core.random_models import component_config

    shipped = json.loads((family.controlnet_config_dir / "config.json").read_text())
    with torch.device("meta"):
        derived = ControlNetModel.from_unet(
            UNet2DConditionModel.from_config(component_config(family, "unet"))
        )
        net = ControlNetModel.from_config(shipped)
    assert {k: v for k, v in shipped.items() if not k.startswith("_")} == {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in derived.config.items()
        if not k.startswith("_")
    }
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in derived.state_dict().items()}
    # SD 1.5: ~361 M (lllyasviel's); SDXL: ~1.25 B, 2.5 GB in float16 like the published fp16 file.
    counts = {"sd1": 361_279_120, "sd2": 364_228_240, "sdxl": 1_251_014_160}
    assert sum(p.numel() for p in net.parameters()) == counts[family.id]
    assert families_of_unet_config(shipped) == [family]


def test_the_family_of_a_controlnet_is_read_from_its_config():
    assert families_of_unet_config({"cross_attention_dim": 2048, "addition_embed_type": "text_time"}) == [
        SDXL
    ]
    assert families_of_unet_config({"cross_attention_dim": 80, "addition_embed_type": "text_time"}) == [SDXL]
    assert families_of_unet_config({"cross_attention_dim": 768}) == [SD1]
    assert families_of_unet_config({"cross_attention_dim": 1024, "addition_embed_type": None}) == [SD2]
    # A width no family has (a small test model): it is one of the families without added embedding.
    assert families_of_unet_config({"cross_attention_dim": 32}) == [SD1, SD2]
    assert families_of_unet_config({"cross_attention_dim": 768, "addition_embed_type": "image"}) == []


def test_compatibility_names_both_families():
    sd15 = json.loads((SD1.controlnet_config_dir / "config.json").read_text())
    sdxl = json.loads((SDXL.controlnet_config_dir / "config.json").read_text())
    message = compatibility_problem(sd15, sdxl, SDXL)
    assert message == (
        "this ControlNet was made for Stable Diffusion 1.x (768-dim text features); the loaded model is "
        "Stable Diffusion XL. Use a ControlNet made for Stable Diffusion XL (for Canny edges e.g. "
        "'diffusers/controlnet-canny-sdxl-1.0')."
    )
    # The model's family defaults to what its U-Net config says.
    assert compatibility_problem(sdxl, sd15).startswith(
        "this ControlNet was made for Stable Diffusion XL (2048-dim text features); the loaded model is "
        "Stable Diffusion 1.x. Use a ControlNet made for Stable Diffusion 1.x (for Canny edges e.g. "
        "'lllyasviel/control_v11p_sd15_canny')"
    )
    assert compatibility_problem(sdxl, sdxl, SDXL) is None
    # A smaller SDXL ControlNet (less attention, as diffusers' "-small" ones) still fits: its
    # residuals have the U-Net's shapes.
    small = {**sdxl, "down_block_types": ["DownBlock2D"] * 3, "transformer_layers_per_block": [0, 0, 1]}
    assert compatibility_problem(small, sdxl, SDXL) is None
    assert "levels" in compatibility_problem({**sdxl, "block_out_channels": [320, 640, 640]}, sdxl, SDXL)


# --- residuals on SDXL --------------------------------------------------------------------------


def test_residuals_are_masked_and_get_the_added_conditioning(tiny_sdxl, controlnet):
    c = collage(weights=(1.0, 0.0))
    with captured(tiny_sdxl) as calls:
        result = generate(tiny_sdxl, c, hooks=[controlnet_hook(controlnet)])
    assert len(calls) == 3 and all(down is not None for down, _ in calls)  # 4 steps at strength 0.8
    assert {tuple(r.shape[-2:]) for r in calls[0][0]} == {(16, 16), (8, 8)}  # both latent levels
    assert calls[0][0][0].shape[0] == 2  # both classifier-free-guidance halves

    weights = weight_map(composite(c))
    net = controlnet.controlnet
    cond = torch.from_numpy(control_image(c)).permute(2, 0, 1)[None].float() / 255.0
    for (down, mid), (sample, t, embeds, added) in zip(calls, calls.inputs, strict=True):
        assert set(added) == {"text_embeds", "time_ids"}
        assert added["time_ids"].tolist() == [[128, 128, 0, 0, 128, 128]] * 2
        # The ControlNet's residuals for that step's input and added conditioning, as diffusers'
        # SDXL ControlNet pipeline computes them, times the weight map at each resolution.
        ref_down, ref_mid = net(
            sample,
            t,
            encoder_hidden_states=embeds,
            controlnet_cond=cond.repeat(2, 1, 1, 1),
            added_cond_kwargs=added,
            return_dict=False,
        )
        for got, ref in zip([*down, mid], [*ref_down, ref_mid], strict=True):
            w = torch.from_numpy(np.array(area_resize(weights, *ref.shape[-2:])))
            outside = w == 0
            assert outside.any() and (~outside).any()
            assert (got[..., outside] == 0).all()  # exactly zero where no weighted layer reaches
            assert (got[..., ~outside] != 0).any()
            # Elsewhere equal up to float rounding (one control image broadcast vs one per sample).
            scale = float(ref.abs().max())
            torch.testing.assert_close(got, ref * w, rtol=1e-4, atol=1e-5 * scale)
    plain = generate(tiny_sdxl, c)
    assert not np.array_equal(result.images[0].image, plain.images[0].image)


def test_the_added_conditioning_changes_the_residuals(tiny_sdxl, controlnet):
    """The SDXL ControlNet needs the pooled text embedding and time_ids (it raises without them),
    and they matter: another generation size (time_ids) gives other residuals."""
    net = controlnet.controlnet
    with captured(tiny_sdxl) as calls:
        generate(tiny_sdxl, collage(steps=1, strength=1.0), hooks=[controlnet_hook(controlnet)])
    sample, t, embeds, added = calls.inputs[0]
    cond = torch.from_numpy(control_image(collage())).permute(2, 0, 1)[None].float() / 255.0
    run = dict(encoder_hidden_states=embeds, controlnet_cond=cond, return_dict=False)
    with pytest.raises(ValueError, match="text_embeds"):
        net(sample, t, added_cond_kwargs={}, **run)
    _, mid = net(sample, t, added_cond_kwargs=added, **run)
    other = {**added, "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)}
    _, other_mid = net(sample, t, added_cond_kwargs=other, **run)
    assert not torch.allclose(mid, other_mid)
    torch.testing.assert_close(
        calls[0][1],
        mid * torch.from_numpy(np.array(area_resize(weight_map(composite(collage())), *mid.shape[-2:]))),
        rtol=1e-4,
        atol=1e-5 * float(mid.abs().max()),
    )


def test_generate_with_build_hooks_keeps_strength_zero_pixels(tiny_sdxl, controlnet_dir):
    c = collage(weights=(1.0, 1.0))
    c.layers[0].strength = 0.0  # the red box stays exactly as composited
    options = EngineOptions(controlnet=str(controlnet_dir))
    try:
        hooks, warnings = build_hooks(tiny_sdxl, c, options)
        assert warnings == []
        with captured(tiny_sdxl) as calls:
            result = generate(tiny_sdxl, c, hooks=hooks)
        assert any(down is not None for down, _ in calls)
    finally:
        unload_controlnet()
    without = generate(tiny_sdxl, c, hooks=build_hooks(tiny_sdxl, c, EngineOptions())[0])
    out, start = result.images[0].image, result.composite
    assert np.array_equal(out[:48, :48], start[:48, :48])
    assert not np.array_equal(out, without.images[0].image)
    assert np.array_equal(without.images[0].image[:48, :48], start[:48, :48])


def test_without_a_controlnet_the_warning_suggests_an_sdxl_one(tiny_sdxl):
    _, warnings = build_hooks(tiny_sdxl, collage(weights=(1.0, 0.0)), EngineOptions())
    assert len(warnings) == 1 and "diffusers/controlnet-canny-sdxl-1.0" in warnings[0]


# --- loading ------------------------------------------------------------------------------------


def test_a_controlnet_of_another_family_is_refused(tiny_sdxl, demo_pipeline, controlnet_dir, tmp_path):
    try:
        with pytest.raises(ModelLoadError) as refused:
            load_controlnet("demo", model=tiny_sdxl)
        message = str(refused.value)
        assert "made for Stable Diffusion 1.x or Stable Diffusion 2.x (32-dim text features)" in message
        assert "the loaded model is Stable Diffusion XL" in message
        assert "'diffusers/controlnet-canny-sdxl-1.0'" in message
        # And the other way round, before the weights are read (the folder's config.json says it).
        empty = tmp_path / "sdxl-config-only"
        empty.mkdir()
        (empty / "config.json").write_text((controlnet_dir / "config.json").read_text())
        with pytest.raises(
            ModelLoadError,
            match=r"made for Stable Diffusion XL \(80-dim text features\); "
            r"the loaded model is Stable Diffusion 1.x.*lllyasviel/control_v11p_sd15_canny",
        ):
            load_controlnet(empty, model=demo_pipeline)
        with pytest.raises(ModelLoadError, match="Stable Diffusion XL"):
            wrap_controlnet(tiny_controlnet(controlnet_dir), demo_pipeline)
        # A hook built for one model refuses another's generation.
        sd1_net = load_controlnet("demo", model=demo_pipeline)
        with pytest.raises(ModelLoadError, match="the loaded model is Stable Diffusion XL"):
            generate(tiny_sdxl, collage(), hooks=[controlnet_hook(sd1_net)])
    finally:
        unload_controlnet()


def _assert_same_weights(net, loaded):
    ref, got = net.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    assert [k for k in ref if not torch.equal(ref[k], got[k].to(ref[k]))] == []


def test_load_from_folder_and_single_files_offline(tiny_sdxl, controlnet_dir, tmp_path, offline):
    from safetensors.torch import save_file

    from core.ldm_export import controlnet_to_ldm

    net = tiny_controlnet(controlnet_dir)
    try:
        from_folder = load_controlnet(controlnet_dir, model=tiny_sdxl)
        _assert_same_weights(net, from_folder.controlnet)
        # diffusers' layout, as diffusers/controlnet-canny-sdxl-1.0's files are.
        plain = tmp_path / "tiny-sdxl-controlnet.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(plain))
        from_file = load_controlnet(plain, model=tiny_sdxl, config=controlnet_dir)
        _assert_same_weights(net, from_file.controlnet)
        # The original (control_model.*) layout, SDXL's label_emb included, in both file formats.
        original = controlnet_to_ldm(net)
        assert "control_model.label_emb.0.0.weight" in original
        assert (
            "control_model.input_hint_block.14.weight" in original
            and "control_model.zero_convs.5.0.weight" in original
        )
        sgm = tmp_path / "tiny-sdxl-controlnet-original.safetensors"
        save_file(original, str(sgm))
        _assert_same_weights(net, load_controlnet(sgm, model=tiny_sdxl, config=controlnet_dir).controlnet)
        pth = tmp_path / "tiny-sdxl-controlnet-original.pth"
        torch.save({"state_dict": original}, pth)
        from_pth = load_controlnet(pth, model=tiny_sdxl, config=controlnet_dir)
        _assert_same_weights(net, from_pth.controlnet)
        # It drives a generation.
        with captured(tiny_sdxl) as calls:
            generate(tiny_sdxl, collage(steps=2, strength=1.0), hooks=[controlnet_hook(from_pth)])
        assert all(down is not None for down, _ in calls)
    finally:
        unload_controlnet()


def test_a_single_file_without_config_uses_the_shipped_one(
    tiny_sdxl, controlnet_dir, tmp_path, offline, monkeypatch
):
    """Without `config`, an SDXL ControlNet file loads with the configuration shipped for SDXL's
    full-size ControlNets (offline). The tiny one does not have those shapes: a clear error that
    says what to give; with the shipped folder standing for the tiny config, it loads."""
    from safetensors.torch import save_file

    import core.families
    from core.ldm_export import controlnet_to_ldm

    net = tiny_controlnet(controlnet_dir)
    path = tmp_path / "tiny-sdxl-controlnet.safetensors"
    save_file(controlnet_to_ldm(net), str(path))
    try:
        with pytest.raises(
            ModelLoadError,
            match=r"does not fit the configuration .*sdxl-controlnet.*"
            r"has shape .*--controlnet-config",
        ):
            load_controlnet(path, model=tiny_sdxl)
        configs = tmp_path / "configs"
        (configs / "sdxl-controlnet").mkdir(parents=True)
        (configs / "sdxl-controlnet" / "config.json").write_text((controlnet_dir / "config.json").read_text())
        monkeypatch.setattr(core.families, "CONFIGS_DIR", configs)
        _assert_same_weights(net, load_controlnet(path, model=tiny_sdxl).controlnet)
    finally:
        unload_controlnet()


def test_a_file_missing_weights_is_refused(tiny_sdxl, controlnet_dir, tmp_path, offline):
    """diffusers itself would leave weights the file lacks at random values (or on the meta device):
    SDXL's label_emb, for instance, which its converter of the original layout drops."""
    from safetensors.torch import save_file

    from core.ldm_export import controlnet_to_ldm

    state = controlnet_to_ldm(tiny_controlnet(controlnet_dir))
    del state["control_model.label_emb.0.2.bias"]
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    try:
        with pytest.raises(ModelLoadError, match="lacks add_embedding.linear_2.bias"):
            load_controlnet(path, model=tiny_sdxl, config=controlnet_dir)
    finally:
        unload_controlnet()


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))
def test_full_size_controlnet_files_of_each_family_fit_the_shipped_config(family):
    """Real shapes, on the meta device (no memory): a full-size ControlNet's weight names, in
    diffusers' layout and in the original one (lllyasviel's SD 1.5 .pth files, Stability's SDXL
    layout with label_emb), are recognised as the family's and convert onto every weight of the
    shipped configuration, with their shapes."""
    from pathlib import Path

    from diffusers import ControlNetModel

    from core.control.files import (
        default_config,
        describe_controlnet_weights,
        diffusers_weights,
        fitting_weights,
    )
    from core.ldm_export import controlnet_to_ldm

    config = json.loads((family.controlnet_config_dir / "config.json").read_text())
    with torch.device("meta"):
        net = ControlNetModel.from_config(config)
    state = net.state_dict()
    for weights in (state, controlnet_to_ldm(net)):
        info = describe_controlnet_weights(list(weights), lambda k, w=weights: w[k].shape)
        assert info.family is family and info.full_size
        assert info.original_layout == (weights is not state)
        assert default_config(info) == family.controlnet_config_dir
        fitted = fitting_weights(Path("x"), diffusers_weights(weights, config, info), config, "the config")
        assert fitted.keys() == state.keys()
        assert all(fitted[k].shape == state[k].shape for k in state)


def test_a_smaller_sdxl_controlnet_file_offline_asks_for_its_config(
    tiny_sdxl, controlnet_dir, tmp_path, offline
):
    """SDXL ControlNets without attention at the second level (diffusers' "-small"/"-mid") are
    not the shipped full-size shape: diffusers' choice of configuration is on the hub, which an
    offline computer cannot reach; the error says what to give instead."""
    from safetensors.torch import save_file

    state = {
        k: v.contiguous()
        for k, v in tiny_controlnet(controlnet_dir).state_dict().items()
        if not k.startswith("down_blocks.1.attentions.")
    }
    path = tmp_path / "small.safetensors"
    save_file(state, str(path))
    try:
        with pytest.raises(
            ModelLoadError,
            match=r"'diffusers/controlnet-canny-sdxl-1.0-small'\) could not be fetched.*--controlnet-config",
        ):
            load_controlnet(path, model=tiny_sdxl)
    finally:
        unload_controlnet()
