"""Choosing the pieces (core/options.py) and the CLI's ControlNet options, on the demo model."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.cli import main
from core.models import ModelLoadError
from core.options import EngineOptions, build_hooks
from tests.test_control import tiny_controlnet

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory, demo_model_dir):
    from core.models import load_pipeline

    folder = tmp_path_factory.mktemp("controlnet")
    tiny_controlnet(load_pipeline("demo").pipeline.unet).save_pretrained(folder)
    return folder


def controlled_collage():
    from core.formats import load_collage

    collage = load_collage(EXAMPLES / "room.ora").collage
    collage.layers[1].control_weight = 1.0
    return collage


def test_demo_model_brings_its_own_controlnet(demo_pipeline):
    hooks, warnings = build_hooks(demo_pipeline, controlled_collage(), EngineOptions())
    # masked attention, self-attention modulation (on by default) + the demo's edge ControlNet
    assert len(hooks) == 3 and warnings == []
    plain = controlled_collage()
    plain.layers[1].control_weight = 0.0
    hooks, warnings = build_hooks(demo_pipeline, plain, EngineOptions())
    assert len(hooks) == 2 and warnings == []  # no layer asks: the attention pieces only


def test_other_models_without_controlnet_warn(demo_pipeline):
    other = replace(demo_pipeline, identity="folder:/my/model")
    hooks, warnings = build_hooks(other, controlled_collage(), EngineOptions())
    assert len(hooks) == 2
    assert any("control" in w.lower() for w in warnings)  # a layer asks for ControlNet, none is loaded


def test_controlnet_adds_a_hook(demo_pipeline, controlnet_dir):
    hooks, warnings = build_hooks(
        demo_pipeline, controlled_collage(), EngineOptions(controlnet=str(controlnet_dir))
    )
    assert len(hooks) == 3 and warnings == []


def test_a_controlnet_that_cannot_load_raises_or_warns(demo_pipeline, tmp_path):
    options = EngineOptions(controlnet=str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError):
        build_hooks(demo_pipeline, controlled_collage(), options)
    hooks, warnings = build_hooks(demo_pipeline, controlled_collage(), options, controlnet_errors="warn")
    assert len(hooks) == 2 and warnings[0].startswith("generated without ControlNet")


def test_cli_with_controlnet_and_collage_schedule(demo_model_dir, controlnet_dir, tmp_path):
    out = tmp_path / "room.png"
    args = [
        "generate",
        str(EXAMPLES / "room.ora"),
        "-o",
        str(out),
        "--steps",
        "2",
        "--controlnet",
        str(controlnet_dir),
    ]
    assert main([*args, "--attention-schedule", "collage"]) == 0
    assert np.asarray(Image.open(out)).shape == (256, 256, 3)
