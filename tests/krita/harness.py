"""Helpers shared by the tests that run the plugin in other processes (real Krita, or a Python
with PyQt5/PyQt6): a bridge on the demo model, free ports, clean environments, and the check
runner those processes use (standard library only: it runs inside Krita too)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _holds_other_python(folder: str) -> bool:
    """A PATH entry with a Python installation other than the system's: a virtualenv, or a
    pyenv/conda/python.org prefix (pyenv puts its version's bin/ first on PATH when it runs us)."""
    path = Path(folder)
    if (path.parent / "pyvenv.cfg").exists():
        return True
    if str(path) in ("/usr/bin", "/bin"):
        return False
    has_python = any((path / name).is_file() for name in ("python3", "python"))
    return has_python and any(path.parent.glob("lib/python3*/os.py"))


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without other Pythons: Krita's embedded Python (and a system Python) must not
    find a venv's or pyenv's python on PATH, or it adopts that prefix and loses the system PyQt."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if p and not _holds_other_python(p)
    )
    env.update(extra)
    return env


def throwaway_home(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment whose HOME and XDG folders are under `home` (nothing of the user's
    Krita setup is read or changed), rendering offscreen."""
    for sub in (".config", ".local/share", ".cache", "run"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    (home / "run").chmod(0o700)
    return clean_env(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_DATA_HOME=str(home / ".local/share"),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_RUNTIME_DIR=str(home / "run"),
        QT_QPA_PLATFORM="offscreen",
        PYTHONDONTWRITEBYTECODE="1",
        **extra,
    )


@contextlib.contextmanager
def bridge(data_dir: Path, timeout: float = 120.0, model: str | None = None, args: tuple[str, ...] = ()):
    """A bridge on the demo model (or `model`) on a free port, its model loaded; yields its URL.
    `args`: more of its command line (``("--models-dir", DIR)``).

    COLLAGE_CACHE comes from the environment (the demo_model_dir fixture sets it)."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "bridge.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bridge_server",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
                "--preload",
                *(["--model", model] if model else []),
                *args,
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(url + "/info", timeout=2) as r:
                        if json.loads(r.read())["model_loaded"]:
                            break
                except OSError:
                    pass
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the test bridge did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.3)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


class Skip(Exception):
    """Raised by a check that cannot run here; the message says why."""


def run_check(fn) -> dict:
    """Run the check ``fn(entry)``; its report entry: ok, skipped (why), detail (the traceback
    of a failure; a check may also put a note there), seconds."""
    entry = {"ok": False, "skipped": "", "detail": "", "seconds": 0.0}
    t = time.monotonic()
    try:
        fn(entry)
        entry["ok"] = True
    except Skip as why:
        entry["skipped"] = str(why)
    except Exception:
        entry["detail"] = traceback.format_exc()
    entry["seconds"] = round(time.monotonic() - t, 2)
    return entry
