"""The Krita plugin inside real Krita (kritarunner, headless) against a bridge on the demo model.

The checks themselves run inside Krita (tests/krita/krita_suite.py); this file starts a bridge,
runs Krita once with a throwaway HOME, and turns each check of the JSON report into a test.
Needs Krita with Python scripting: ``apt-get install krita python3-pyqt5`` (Debian 12: Krita 5.1.5).
One run: about 10 s of Krita start-up (the first in a new HOME builds Krita's resource database),
5 s of bridge start-up and 10-20 s of checks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "krita"))
import harness  # noqa: E402

ROOT = harness.ROOT
KRITARUNNER = shutil.which("kritarunner")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        KRITARUNNER is None,
        reason="kritarunner is not installed (Debian/Ubuntu: apt-get install krita python3-pyqt5)",
    ),
]

#: The in-Krita checks (tests/krita/checks_*.py), in the order krita_suite.py runs them.
CHECKS = [
    "read_collage",
    "background_layer_becomes_the_background",
    "reading_never_changes_the_document",
    "settings_survive_save_and_reopen",
    "ora_settings_come_with_the_file",
    "layer_list_marks_left_out_layers",
    "dock_panel_builds",
    "generate_writes_new_layers",
    "auto_size_follows_the_model",
    "generate_on_sdxl",
    "regenerate_changes_only_that_layer",
    "regenerate_a_selection_changes_nothing_outside_it",
    "regenerate_after_reopen_uses_the_result_layer",
    "layer_stack_result_is_a_group",
    "dock_model_and_loras_saved_and_sent",
    "dock_ip_adapter_look_reaches_its_layer",
    "dock_clip_skip_and_controlnet_saved_and_sent",
    "cancel_stops_and_writes_nothing",
    "preview_layer_during_a_job",
    "results_history_and_discard",
    "bridge_down_gives_a_clear_error",
    "bridge_errors_in_plain_words",
    "local_bridge_starts_and_stops",
]


def models_dir(root: Path, demo_model_dir: Path, tiny_sdxl_dir: Path) -> Path:
    """A small ComfyUI-style model folder for the dock's model and LoRA checks: the demo model
    again under another name (so a chosen model can run fast), the tiny SDXL (listed, not run),
    a LoRA of the demo model that changes its output (its file tells no family), an SDXL
    LoRA's names and shapes (zeros), two ControlNets of the demo model (its own and a random one),
    and a tiny random IP-Adapter with its image encoder for the demo model."""
    from core.demo_model import ensure_demo_controlnet
    from core.models import load_pipeline
    from core.random_ip_adapter import (
        build_random_image_encoder,
        random_ip_adapter_state,
        save_image_encoder,
        save_ip_adapter,
    )
    from tests.library_files import kohya_lora
    from tests.test_bridge_controlnet import other_demo_controlnet
    from tests.test_loras import peft_unet_lora, save_kohya

    (root / "models" / "diffusers").mkdir(parents=True)
    (root / "models" / "loras" / "xl").mkdir(parents=True)
    (root / "models" / "diffusers" / "demo-copy").symlink_to(demo_model_dir, target_is_directory=True)
    (root / "models" / "diffusers" / "tiny-xl").symlink_to(tiny_sdxl_dir, target_is_directory=True)
    unet = load_pipeline("demo").pipeline.unet
    save_kohya(peft_unet_lora(unet, seed=3), root / "models" / "loras" / "ink.safetensors")
    kohya_lora(root / "models" / "loras" / "xl" / "detail.safetensors", "sdxl")
    (root / "models" / "controlnet").mkdir()
    (root / "models" / "controlnet" / "demo-edges").symlink_to(
        ensure_demo_controlnet(), target_is_directory=True
    )
    other_demo_controlnet(root / "models" / "controlnet" / "random-edges")
    (root / "models" / "ipadapter").mkdir()
    (root / "models" / "clip_vision").mkdir()
    save_ip_adapter(
        random_ip_adapter_state(unet, 24, scale=3.0), root / "models" / "ipadapter" / "ipa-demo.bin"
    )
    save_image_encoder(build_random_image_encoder(), root / "models" / "clip_vision" / "vit-tiny.safetensors")
    return root


@pytest.fixture(scope="module")
def krita_report(demo_model_dir, tiny_sdxl_dir, tmp_path_factory):
    """Runs every check inside Krita once, with a bridge on the demo model (and a small model
    folder) and one on the tiny SDXL; the JSON report."""
    tmp = tmp_path_factory.mktemp("krita")
    config = tmp / "collage_diffusion_bridge.json"
    config.write_text(json.dumps({"python": sys.executable, "project": str(ROOT), "model": "demo"}))
    report = tmp / "report.json"
    models = models_dir(tmp / "models", demo_model_dir, tiny_sdxl_dir)
    demo_bridge = harness.bridge(tmp / "bridge", args=("--models-dir", str(models)))
    with demo_bridge as url, harness.bridge(tmp / "sdxl", model=str(tiny_sdxl_dir)) as xl:
        env = harness.throwaway_home(
            tmp / "home",
            PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "krita"), str(ROOT / "krita_plugin")]),
            COLLAGE_TEST_REPORT=str(report),
            COLLAGE_TEST_BRIDGE=url,
            COLLAGE_TEST_SDXL_BRIDGE=xl,
            COLLAGE_TEST_MODELS_DIR=str(models),
            COLLAGE_TEST_DIR=str(tmp / "scratch"),
            COLLAGE_BRIDGE_CONFIG=str(config),
            COLLAGE_TEST_LOCAL_PORT=str(harness.free_port()),
        )
        t = time.monotonic()
        try:
            done = subprocess.run(
                [KRITARUNNER, "-s", "krita_suite"],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
                cwd=ROOT,
            )
        except subprocess.TimeoutExpired as timeout:  # say which check it was stuck in
            out = (
                timeout.stdout.decode(errors="replace")
                if isinstance(timeout.stdout, bytes)
                else timeout.stdout
            )
            pytest.fail(
                f"Krita did not finish in {timeout.timeout:.0f} s; its output so far:\n{(out or '')[-6000:]}"
            )
    output = done.stdout[-6000:] + done.stderr[-4000:]
    if not report.exists():
        pytest.fail(f"Krita wrote no report (exit code {done.returncode}):\n{output}")
    data = json.loads(report.read_text())
    data["output"] = output
    data["seconds"] = time.monotonic() - t
    return data


@pytest.mark.parametrize("name", CHECKS)
def test_in_krita(krita_report, name):
    assert "error" not in krita_report, krita_report["error"]
    entry = krita_report["checks"].get(name)
    assert entry is not None, f"check {name} did not run:\n{krita_report['output']}"
    if entry["skipped"]:
        pytest.skip(entry["skipped"])
    assert entry["ok"], entry["detail"]


def test_every_check_is_listed(krita_report):
    assert list(krita_report["checks"]) == CHECKS
