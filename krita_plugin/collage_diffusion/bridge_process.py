"""Starting and stopping a bridge on this machine from the dock ("Start local bridge").

``install_krita.py`` records where the bridge's Python environment is, in a small JSON file next to
the plugin (``<pykrita>/collage_diffusion_bridge.json``)::

    {"python": "/home/me/collage/.venv/bin/python", "project": "/home/me/collage",
     "model": "demo", "args": []}

The dock runs ``<python> -m bridge_server --port P --model M`` in ``project`` with QProcess (it
never blocks Krita) and stops it again; Krita closing stops it too.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_NAME = "collage_diffusion_bridge.json"
CONFIG_ENV = "COLLAGE_BRIDGE_CONFIG"
READY_MARK = "Collage bridge on "


@dataclass
class BridgeEnv:
    python: str
    project: str = ""
    model: str = "demo"
    args: list[str] = field(default_factory=list)
    source: str = ""  # the file it was read from

    def problems(self) -> list[str]:
        p = []
        if not self.python or not Path(self.python).exists():
            p.append(f"the bridge's Python ({self.python or 'not set'}) does not exist; run install.py again")
        if self.project and not Path(self.project).is_dir():
            p.append(f"the project folder {self.project} does not exist; run install.py again")
        return p


def default_pykrita_dir() -> Path:
    """Krita's per-user pykrita folder on this OS (as install_krita.py uses)."""
    home = Path.home()
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA") or home / "AppData" / "Roaming") / "krita" / "pykrita"
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / "krita" / "pykrita"
    data = os.environ.get("XDG_DATA_HOME")
    base = Path(data) if data and os.path.isabs(data) else home / ".local" / "share"
    return base / "krita" / "pykrita"


def config_paths() -> list[Path]:
    """Where the recorded environment is looked for, in order."""
    paths = []
    if os.environ.get(CONFIG_ENV):
        paths.append(Path(os.environ[CONFIG_ENV]))
    # Next to the plugin package: __file__ is not resolved, so a --dev link still finds the
    # file in pykrita/ and not in the source tree.
    paths.append(Path(__file__).parent.parent / CONFIG_NAME)
    paths.append(default_pykrita_dir() / CONFIG_NAME)
    return list(dict.fromkeys(paths))


def load_config(paths: list[Path] | None = None) -> BridgeEnv | None:
    """The recorded bridge environment, or None when install.py recorded none."""
    for path in paths if paths is not None else config_paths():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("python"), str):
            args = data.get("args") if isinstance(data.get("args"), list) else []
            return BridgeEnv(
                python=data["python"],
                project=str(data.get("project") or ""),
                model=str(data.get("model") or "demo"),
                args=[str(a) for a in args],
                source=str(path),
            )
    return None


def bridge_command(env: BridgeEnv, port: int, model: str | None = None) -> tuple[str, list[str], str]:
    """(program, arguments, working folder) that start the bridge on 127.0.0.1:`port`."""
    args = ["-m", "bridge_server", "--host", "127.0.0.1", "--port", str(port), "--model", model or env.model]
    return env.python, [*args, *env.args], env.project


def _qt():
    from . import qt

    return qt


def make_local_bridge(parent=None):
    """A `LocalBridge` (a QObject: defined lazily so this module imports without Qt)."""
    qt = _qt()

    class LocalBridge(qt.QObject):
        """One bridge process. Signals: `ready(url)`, `stopped(message)`, `output(line)`."""

        ready = qt.pyqtSignal(str)
        stopped = qt.pyqtSignal(str)
        output = qt.pyqtSignal(str)

        def __init__(self, parent=None):
            super().__init__(parent)
            self.process = None
            self.url = ""
            self.lines: list[str] = []
            self._stopping = False
            self._announced = ""
            self._client = None
            self._probe = qt.QTimer(self)
            self._probe.setSingleShot(True)
            self._probe.timeout.connect(self._check_health)

        @property
        def running(self) -> bool:
            return self.process is not None and self.process.state() != qt.QProcess.ProcessState.NotRunning

        def start(self, port: int, model: str | None = None, env: BridgeEnv | None = None) -> str:
            """Start the bridge; "" when it is starting, else why it cannot (plain words)."""
            if self.running:
                return ""
            env = env or load_config()
            if env is None:
                return (
                    "No local bridge is recorded: run “python install.py” in the Collage Diffusion folder"
                    " (it records where the bridge's environment is), or start the bridge yourself."
                )
            problems = env.problems()
            if problems:
                return "Cannot start the local bridge: " + "; ".join(problems) + "."
            program, args, cwd = bridge_command(env, port, model)
            process = qt.QProcess(self)
            process.setProcessChannelMode(qt.QProcess.ProcessChannelMode.MergedChannels)
            environment = qt.QProcessEnvironment.systemEnvironment()
            environment.insert("PYTHONUNBUFFERED", "1")
            process.setProcessEnvironment(environment)
            if cwd:
                process.setWorkingDirectory(cwd)
            process.readyReadStandardOutput.connect(self._on_output)
            process.finished.connect(self._on_finished)
            process.errorOccurred.connect(self._on_error)
            self.process, self.lines, self.url, self._stopping, self._announced = process, [], "", False, ""
            process.start(program, args)
            return ""

        def stop(self, wait_ms: int = 5000) -> None:
            if not self.running:
                return
            self._stopping = True
            self.process.terminate()  # SIGTERM: aiohttp shuts down cleanly
            if not self.process.waitForFinished(wait_ms):
                self.process.kill()
                self.process.waitForFinished(2000)

        def _on_output(self) -> None:
            text = bytes(self.process.readAllStandardOutput()).decode("utf-8", "replace")
            for line in text.splitlines():
                self.lines = (self.lines + [line])[-50:]
                self.output.emit(line)
                if READY_MARK in line and not self._announced:
                    # Printed just before the server binds: ready once /health answers.
                    self._announced = line.split(READY_MARK, 1)[1].split()[0]
                    self._check_health()

        def _check_health(self) -> None:
            if not self.running or self.url:
                return
            from .client import BridgeClient

            def answered(call) -> None:
                if call.ok and self.running and not self.url:
                    self.url = self._announced
                    self.ready.emit(self.url)
                elif self.running:
                    self._probe.start(250)

            if self._client is None:
                self._client = BridgeClient(self._announced, parent=self)
            self._client.configure(self._announced, "")
            self._client.health(timeout_s=2.0).then(answered)

        def _on_error(self, error) -> None:
            if error == qt.QProcess.ProcessError.FailedToStart:
                self.stopped.emit(f"The local bridge could not start: {self.process.errorString()}.")

        def _on_finished(self, code, status=None) -> None:
            self._probe.stop()
            if self._stopping:
                self.stopped.emit("The local bridge was stopped.")
                return
            tail = "\n".join(self.lines[-6:])
            self.stopped.emit(f"The local bridge stopped (exit code {code})." + (f"\n{tail}" if tail else ""))

    return LocalBridge(parent)
