"""Every script under benchmarks/ starts both ways the docs show, from the repository root:
`python benchmarks/NAME.py` and `python -m benchmarks.NAME` (issue 13: one failed each way on an
import). `--help` imports the whole script, then exits before any model is loaded.

The child gets no PYTHONPATH: with the repository on it, a script would import whatever it
needs however it was started, and this test could not fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.verbosity import DEBUG_ENV

ROOT = Path(__file__).resolve().parents[1]
# The scripts (a `__main__` block); the others are modules they share (benchmarks/held_out.py).
SCRIPTS = sorted(
    p.stem
    for p in (ROOT / "benchmarks").glob("*.py")
    if '__name__ == "__main__"' in p.read_text(encoding="utf-8")
)


def test_the_scripts_are_found():
    assert {"bench_generate", "bench_control", "eval_pieces"} <= set(SCRIPTS)
    assert "held_out" not in SCRIPTS and "__init__" not in SCRIPTS


@pytest.mark.parametrize("form", ["script", "module"])
@pytest.mark.parametrize("name", SCRIPTS)
def test_runs_both_ways(name, form):
    command = [f"benchmarks/{name}.py"] if form == "script" else ["-m", f"benchmarks.{name}"]
    drop = ("PYTHONPATH", DEBUG_ENV, "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    done = subprocess.run(
        [sys.executable, *command, "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage:"), done.stdout[:500]
    # Only our own messages: no library notices on import (core/verbosity.py).
    assert "[transformers]" not in done.stderr, done.stderr[-3000:]
