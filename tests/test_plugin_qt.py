"""The plugin's Qt code on PyQt5 (Krita 5) and PyQt6 (Krita 6), outside Krita, against a bridge on
the demo model: tests/krita/qt_smoke.py run by a Python that has the binding.

Interpreters tried: this one, the system's python3 (Debian: python3-pyqt5), those listed in
COLLAGE_QT_PYTHONS (os.pathsep-separated; ``install.py --test`` lists the PyQt6 venv it makes),
and the checkout's ``.venv-qt6`` (that venv's default place). A binding no interpreter has is
skipped, saying so.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "krita"))
import harness  # noqa: E402

SMOKE = harness.ROOT / "tests" / "krita" / "qt_smoke.py"
QT6_VENV = harness.ROOT / ".venv-qt6"  # made by install.py --test
CHECKS = [
    "binding_and_images",
    "reading_with_qt",
    "writing_results",
    "dock_panel",
    "dock_model_and_loras",
    "dock_controlnet_and_clip_skip",
    "dock_ip_adapter_look",
    "generate_regenerate_and_errors",
    "reconnects",
    "local_bridge",
]


@functools.cache
def interpreter_for(binding: int) -> str | None:
    env = harness.clean_env()
    candidates = [sys.executable, shutil.which("python3", path=env["PATH"]), "/usr/bin/python3"]
    candidates += [p for p in os.environ.get("COLLAGE_QT_PYTHONS", "").split(os.pathsep) if p]
    candidates.append(str(QT6_VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")))
    probe = f"import PyQt{binding}.QtWidgets, PyQt{binding}.QtNetwork"
    for python in dict.fromkeys(c for c in candidates if c and Path(c).exists()):
        try:
            if (
                subprocess.run([python, "-c", probe], env=env, capture_output=True, timeout=60).returncode
                == 0
            ):
                return python
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


@pytest.fixture(scope="module")
def bridge_url(demo_model_dir, tmp_path_factory):
    if interpreter_for(5) is None and interpreter_for(6) is None:
        pytest.skip(
            "no Python with PyQt5 or PyQt6 (apt-get install python3-pyqt5, or set COLLAGE_QT_PYTHONS)"
        )
    with harness.bridge(tmp_path_factory.mktemp("bridge")) as url:
        yield url


@functools.cache
def _run(binding: int, url: str, tmp: str) -> dict:
    python = interpreter_for(binding)
    Path(tmp).mkdir(parents=True, exist_ok=True)
    report = Path(tmp) / f"qt{binding}.json"
    config = Path(tmp) / "bridge.json"
    config.write_text(json.dumps({"python": sys.executable, "project": str(harness.ROOT), "model": "demo"}))
    env = harness.throwaway_home(
        Path(tmp) / f"home{binding}",
        COLLAGE_QT=str(binding),
        COLLAGE_TEST_BRIDGE=url,
        COLLAGE_BRIDGE_CONFIG=str(config),
        COLLAGE_TEST_LOCAL_PORT=str(harness.free_port()),
        COLLAGE_CACHE=os.environ.get("COLLAGE_CACHE", ""),
    )
    done = subprocess.run(
        [python, str(SMOKE), str(report)], env=env, capture_output=True, text=True, timeout=300
    )
    if not report.exists():
        pytest.fail(
            f"{python} wrote no report (exit code {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    return json.loads(report.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("binding", [5, 6], ids=["PyQt5", "PyQt6"])
@pytest.mark.parametrize("name", CHECKS)
def test_qt_binding(binding, name, bridge_url, tmp_path_factory):
    if interpreter_for(binding) is None:
        pytest.skip(
            f"no Python with PyQt{binding} here (Krita {binding if binding == 6 else '5.x'} embeds it);"
            " list one in COLLAGE_QT_PYTHONS to run these"
            + (" (python3 install.py --test makes one)" if binding == 6 else "")
        )
    report = _run(binding, bridge_url, str(tmp_path_factory.getbasetemp() / "qt-smoke"))
    assert report["qt"] == binding
    entry = report["checks"][name]
    if entry["skipped"]:
        pytest.skip(entry["skipped"])
    assert entry["ok"], entry["detail"]
