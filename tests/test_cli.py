"""`collage generate` on each input format, end to end on the demo model."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.cli import main
from core.compositing import composite
from core.formats import load_collage
from core.verbosity import DEBUG_ENV

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def small_psd(path: Path) -> Path:
    from psd_tools import PSDImage
    from psd_tools.api.layers import PixelLayer

    psd = PSDImage.new("RGBA", (64, 64))
    for name, color, (x, y) in [
        ("a red ball", (220, 30, 30), (4, 4)),
        ("a blue box", (30, 30, 220), (30, 28)),
    ]:
        img = np.zeros((24, 24, 4), np.uint8)
        img[...] = (*color, 255)
        PixelLayer.frompil(Image.fromarray(img), psd, name=name, top=y, left=x)
    psd.save(path)
    return path


@pytest.fixture
def inputs(tmp_path):
    folder = shutil.copytree(EXAMPLES / "bento", tmp_path / "bento")
    return {"folder": folder, "ora": EXAMPLES / "room.ora", "psd": small_psd(tmp_path / "scene.psd")}


@pytest.mark.parametrize("kind", ["folder", "ora", "psd"])
def test_generate_png_from_each_format(demo_model_dir, inputs, tmp_path, kind, capsys):
    out = tmp_path / "out" / "result.png"
    code = main(["generate", str(inputs[kind]), "-o", str(out), "--steps", "3", "--seed", "5"])
    assert code == 0, capsys.readouterr().err
    image = np.asarray(Image.open(out))
    doc = load_collage(inputs[kind])
    assert image.shape == (doc.collage.height, doc.collage.width, 3)
    assert "seed 5" in capsys.readouterr().out


def test_variants_write_one_png_per_seed(demo_model_dir, inputs, tmp_path):
    out = tmp_path / "v.png"
    assert (
        main(
            ["generate", str(inputs["psd"]), "-o", str(out), "--steps", "2", "--seed", "9", "--variants", "2"]
        )
        == 0
    )
    first, second = (np.asarray(Image.open(tmp_path / f"v-seed{s}.png")) for s in (9, 10))
    assert not np.array_equal(first, second)


def test_ora_output_keeps_input_layers_and_adds_results_on_top(demo_model_dir, inputs, tmp_path):
    out = tmp_path / "room-result.ora"
    assert main(["generate", str(inputs["ora"]), "-o", str(out), "--steps", "2", "--variants", "2"]) == 0
    before, after = load_collage(inputs["ora"]), load_collage(out)
    # Results are marked as such and are not read back as collage layers.
    assert [layer.text for layer in after.collage.layers] == [layer.text for layer in before.collage.layers]
    for a, b in zip(before.collage.layers, after.collage.layers, strict=True):
        assert np.array_equal(a.image, b.image) and a.offset == b.offset
    result_names = [node.name for node in after.tree if "result" in node.name]
    assert len(result_names) == 2


def test_bad_input_is_a_clear_error_and_writes_nothing(demo_model_dir, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", str(tmp_path / "missing.ora"), "-o", str(out)]) == 2
    assert "missing.ora" in capsys.readouterr().err
    assert main(["generate", str(EXAMPLES / "room.ora"), "-o", str(tmp_path / "x.jpg")]) == 2
    assert "--output: must end in .png or .ora" in capsys.readouterr().err
    assert main(["generate", str(EXAMPLES / "room.ora"), "-o", str(out), "--strength", "2"]) == 2
    assert "strength: must be in 0..1" in capsys.readouterr().err
    assert main(["generate", str(EXAMPLES / "room.ora"), "-o", str(out), "--clip-skip", "0"]) == 2
    assert "clip_skip: must be a whole number in 1..12" in capsys.readouterr().err
    assert not out.exists()


def test_inspect_lists_layers(capsys):
    assert main(["inspect", str(EXAMPLES / "room.ora")]) == 0
    text = capsys.readouterr().out
    assert "'a red armchair'" in text and "256×256" in text


def test_terminal_shows_our_messages_and_one_bar_per_phase(demo_model_dir, tmp_path):
    """What `install.py --demo` shows, in a child process as a user runs it (issue 13): no
    library notices, and one sampling bar counting the steps that run: 10 steps at the
    document's highest strength, 0.8, run 8 (a bar made before the strength plan said 10)."""
    drop = (DEBUG_ENV, "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")
    env = {k: v for k, v in os.environ.items() if k not in drop}  # COLLAGE_CACHE: the demo model
    out = tmp_path / "shapes.png"
    done = subprocess.run(
        [sys.executable, "-m", "core.cli", "generate", EXAMPLES / "shapes.ora", "-o", out, "--steps", "10"],
        cwd=EXAMPLES.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.exists()
    assert "[transformers]" not in done.stderr and "[diffusers]" not in done.stderr, done.stderr
    # tqdm redraws its line after "\r"; a bar starts by drawing "0/total".
    draws = re.findall(r"sampling: +\d+%\|[^|]*\| *(\d+)/(\d+)", done.stderr)
    assert draws, done.stderr
    assert {total for _, total in draws} == {"8"}, draws
    assert [n for n, _ in draws].count("0") == 1, draws
    assert draws[-1] == ("8", "8") and done.stderr.endswith("\n")
    # Nothing else: the model line and the bar.
    lines = [line for line in re.split(r"[\r\n]+", done.stderr) if line.strip()]
    assert all(line.startswith(("loading model", "sampling:")) for line in lines), lines


@pytest.mark.parametrize("verbose", [False, True])
def test_verbose_is_an_option_of_each_command(monkeypatch, capsys, verbose):
    calls = []  # set_verbose itself: tests/test_verbosity.py
    monkeypatch.setattr("core.cli.set_verbose", lambda: calls.append(1))
    assert main(["inspect", str(EXAMPLES / "shapes.ora"), *(["-v"] if verbose else [])]) == 0
    assert calls == ([1] if verbose else [])
    assert "'red heart'" in capsys.readouterr().out


def test_size_auto_generates_at_the_models_size_and_scales_back(demo_model_dir, inputs, tmp_path, capsys):
    """room.ora is bigger than the demo model's 64² native size: auto generates near 64² and the
    PNG still has the canvas size; --size document generates at the canvas size itself."""
    doc = load_collage(inputs["ora"]).collage
    auto, document = tmp_path / "auto.png", tmp_path / "document.png"
    assert main(["generate", str(inputs["ora"]), "-o", str(auto), "--steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "scaled back" in err
    assert (
        main(["generate", str(inputs["ora"]), "-o", str(document), "--steps", "2", "--size", "document"]) == 0
    )
    assert "scaled back" not in capsys.readouterr().err
    for path in (auto, document):
        assert np.asarray(Image.open(path)).shape == (doc.height, doc.width, 3)
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error
        main(["generate", str(inputs["ora"]), "-o", str(document), "--size", "huge"])
    assert exit_info.value.code == 2
    assert "size must be auto, document or WIDTHxHEIGHT" in capsys.readouterr().err


def test_generate_on_an_sdxl_single_file(demo_model_dir, tiny_sdxl, tiny_sdxl_dir, inputs, tmp_path, capsys):
    """`collage generate --model <SDXL .safetensors>` (its diffusers config given, as the tiny model
    has no standard shapes), written by the project's LDM exporter."""
    from core.ldm_export import save_as_ldm_checkpoint

    checkpoint = save_as_ldm_checkpoint(tiny_sdxl.pipeline, tmp_path / "tiny-xl.safetensors")
    out = tmp_path / "xl.png"
    code = main(
        [
            "generate",
            str(inputs["psd"]),
            "-o",
            str(out),
            "--steps",
            "2",
            "--model",
            str(checkpoint),
            "--model-config",
            str(tiny_sdxl_dir),
            "--size",
            "128x128",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert np.asarray(Image.open(out)).shape == (64, 64, 3)
    assert "Stable Diffusion XL" in capsys.readouterr().err


def test_every_piece_on_sdxl_through_the_cli(demo_model_dir, tiny_sdxl_dir, tmp_path, monkeypatch, capsys):
    """The bento folder with every piece switched on in its manifest (attention weight, per-layer
    strength 0 and 0.7, a ControlNet weight, appearance) on the tiny SDXL with a tiny SDXL
    ControlNet: it runs, learns the appearance token, and the strength-0 layer keeps its bytes."""
    import tomllib

    from core import inversion
    from core.inversion import InversionSettings
    from core.random_models import ensure_random_controlnet

    monkeypatch.setattr(inversion.recipe, "DEFAULT_SETTINGS", InversionSettings(steps=2, resolution=128))
    folder = shutil.copytree(EXAMPLES / "bento", tmp_path / "bento")
    manifest = (folder / "collage.toml").read_text()
    manifest = manifest.replace('text = "rice"', 'text = "rice"\nstrength = 0.0')
    manifest = manifest.replace(
        'text = "edamame"', 'text = "edamame"\ncontrol_weight = 1.0\nappearance = true'
    )
    (folder / "collage.toml").write_text(manifest)
    layers = tomllib.loads(manifest)["layers"]
    assert [layer.get("strength") for layer in layers][:3] == [0.0, None, 0.7]

    controlnet = ensure_random_controlnet("sdxl", "tiny", demo_model_dir.parent.parent)
    out = tmp_path / "xl.png"
    code = main(
        [
            "generate",
            str(folder),
            "-o",
            str(out),
            "--steps",
            "3",
            "--model",
            str(tiny_sdxl_dir),
            "--controlnet",
            str(controlnet),
            "--size",
            "document",
        ]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert "warning" not in err.lower(), err  # the ControlNet fits: no "no ControlNet" warning
    assert "learning appearance of 'edamame'" in err
    image = np.asarray(Image.open(out))
    doc = load_collage(folder).collage
    assert doc.layers[0].strength == 0.0 and doc.layers[1].attention_weight == 1.5
    assert doc.layers[3].appearance and doc.layers[3].control_weight == 1.0
    composite_image = composite(doc).image
    rice = doc.layers[0]
    x, y = rice.offset
    h, w = rice.image.shape[:2]
    inner = rice.image[8 : h - 8, 8 : w - 8, 3] == 255  # opaque rice pixels away from the feather
    covered = np.ones_like(inner)
    for upper in doc.layers[1:]:  # pixels another layer covers are not the rice's
        ux, uy = upper.offset
        uh, uw = upper.image.shape[:2]
        ys, xs = np.mgrid[y + 8 : y + h - 8, x + 8 : x + w - 8]
        over = (ys >= uy) & (ys < uy + uh) & (xs >= ux) & (xs < ux + uw)
        covered &= ~over
    keep = inner & covered
    assert keep.sum() > 100
    region = (slice(y + 8, y + h - 8), slice(x + 8, x + w - 8))
    assert np.array_equal(image[region][keep], composite_image[region][keep])
    assert not np.array_equal(image, composite_image)


def test_regenerate_mask_redoes_only_the_grown_mask(demo_model_dir, inputs, tmp_path, capsys):
    from core.strength import region_mask

    psd = inputs["psd"]
    base = tmp_path / "base.png"
    assert main(["generate", str(psd), "-o", str(base), "--steps", "3", "--size", "document"]) == 0
    selected = np.zeros((64, 64), np.uint8)
    selected[40:56, 6:20] = 255
    mask = tmp_path / "selection.png"
    Image.fromarray(selected, "L").save(mask)
    out = tmp_path / "again.png"
    args = ["generate", str(psd), "-o", str(out), "--steps", "3", "--seed", "9", "--size", "document"]
    assert main([*args, "--base", str(base), "--regenerate-mask", str(mask), "--dilation", "3"]) == 0
    before = np.asarray(Image.open(base).convert("RGB"))
    after = np.asarray(Image.open(out).convert("RGB"))
    grown = region_mask(selected.astype(np.float32), 3)
    assert np.array_equal(after[~grown], before[~grown])
    assert not np.array_equal(after[selected > 0], before[selected > 0])

    capsys.readouterr()
    assert main([*args, "--regenerate-mask", str(mask)]) == 2
    assert "--base: missing; --regenerate-mask needs it" in capsys.readouterr().err
    Image.fromarray(selected[:32], "L").save(mask)
    assert main([*args, "--base", str(base), "--regenerate-mask", str(mask)]) == 2
    assert "--regenerate-mask: is 64×32, the canvas is 64×64" in capsys.readouterr().err
