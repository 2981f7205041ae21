"""The plugin's Krita actions in the real Krita application (its main window, under Xvfb):
each action exists with its text and default shortcut from the installed .action file, and
triggering it calls the dock's handler. kritarunner has no main window (opening one there
crashes Krita 5.1), so this starts `krita` itself with the plugin installed by install_krita.py
and a test-only probe plugin (tests/krita/actions_probe) that reports and ends Krita."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "krita"))
import harness  # noqa: E402

import install_krita as ik
from krita_plugin.collage_diffusion import actions

ROOT = harness.ROOT
KRITA, XVFB_RUN = shutil.which("krita"), shutil.which("xvfb-run")
PROBE = ROOT / "tests" / "krita" / "actions_probe"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        KRITA is None or XVFB_RUN is None,
        reason="needs Krita and Xvfb (Debian/Ubuntu: apt-get install krita python3-pyqt5 xvfb)",
    ),
]


@pytest.fixture(scope="module")
def probe_report(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("krita-actions")
    env = harness.throwaway_home(tmp / "home", COLLAGE_TEST_REPORT=str(tmp / "report.json"))
    env.pop("QT_QPA_PLATFORM")  # the krita application wants a display: Xvfb's
    pykrita = Path(env["XDG_DATA_HOME"]) / "krita" / "pykrita"
    kritarc = Path(env["XDG_CONFIG_HOME"]) / "kritarc"
    ik.install(target=pykrita, kritarc=kritarc)
    shutil.copytree(PROBE / "collage_actions_probe", pykrita / "collage_actions_probe")
    shutil.copyfile(PROBE / "collage_actions_probe.desktop", pykrita / "collage_actions_probe.desktop")
    text = ik.set_ini_value(
        kritarc.read_text(encoding="utf-8"), ik.KRITARC_GROUP, "enable_collage_actions_probe", "true"
    )
    kritarc.write_text(text, encoding="utf-8")
    done = subprocess.run(
        [XVFB_RUN, "-a", KRITA, "--nosplash"], env=env, capture_output=True, text=True, timeout=300
    )
    report = tmp / "report.json"
    if not report.exists():
        pytest.fail(
            f"the probe wrote no report (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return json.loads(report.read_text())


def test_each_action_exists_with_its_shortcut(probe_report):
    assert "error" not in probe_report, probe_report["error"]
    assert probe_report["actions"] == {
        spec.id: {"text": spec.text, "shortcut": spec.shortcut} for spec in actions.ACTIONS
    }


def test_each_action_calls_the_docks_handler(probe_report):
    assert probe_report["panel"], "the dock's panel was not found in Krita's window"
    assert probe_report["calls"] == [spec.handler for spec in actions.ACTIONS]
    assert probe_report["generate_error"] == "Open a document first."
