#!/usr/bin/env python3
"""Set up Collage Diffusion: a virtual environment with the right PyTorch build and the project.

    python3 install.py            set up (or update) the environment in .venv and install the
                                  Krita plugin (--dev links it instead of copying; --no-krita skips it)
    python3 install.py --demo     the same, then generate an image from examples/shapes.ora on the demo model
    python3 install.py --test     set up with the test tools (and, on Debian/Ubuntu as root, Krita
                                  itself for the in-Krita tests; .venv-qt6 with PyQt6 for the
                                  Krita 6 tests), then run the linter and the tests
    python3 install.py --uninstall  remove the plugin from Krita (the environment stays)

Runs on the Python that starts it (3.10+), standard library only, on Linux, Windows and macOS.
Re-running is safe: an existing environment is reused and only what is missing is installed.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TORCH_VERSION = "2.13.0"  # the release the project is tested with
TORCH_INDEX = "https://download.pytorch.org/whl"


def venv_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kwargs)


def has_nvidia_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether an HTTPS host answers at all (pip would otherwise retry a dead index for minutes)."""
    host = url.split("/")[2]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def torch_install_args(choice: str) -> list[str]:
    """pip arguments for the PyTorch build that fits this machine (or the one asked for)."""
    spec = f"torch=={TORCH_VERSION}"
    if choice == "auto":
        if sys.platform == "darwin":
            choice = "default"  # PyPI's macOS wheels include the MPS (Apple GPU) backend
        elif has_nvidia_gpu():
            choice = "cuda"
        else:
            choice = "cpu"
    if choice == "cuda":
        # PyPI's Linux wheel is the CUDA build; on Windows PyPI only has the CPU build.
        return [spec] if sys.platform.startswith("linux") else [spec, "--index-url", f"{TORCH_INDEX}/cu128"]
    if choice == "rocm":
        return [spec, "--index-url", f"{TORCH_INDEX}/rocm6.4"]
    if choice == "cpu" and sys.platform.startswith("linux"):
        # PyTorch's CPU index avoids the multi-GB CUDA download that PyPI's Linux wheel is.
        # Where it cannot be reached (a mirror-only network), pip's own configuration decides.
        if reachable(TORCH_INDEX):
            return [spec, "--index-url", f"{TORCH_INDEX}/cpu"]
        print(f"note: {TORCH_INDEX} is not reachable; taking torch from pip's configured indexes")
    return [spec]


def torch_installed(python: Path) -> bool:
    probe = f"import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '{TORCH_VERSION}' else 1)"
    return subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0


def setup(env: Path, torch_choice: str, test: bool) -> Path:
    if sys.version_info < (3, 10):  # noqa: UP036 - install.py may be started by an old Python
        sys.exit(f"Python 3.10 or newer is needed, this is {platform.python_version()}")
    python = venv_python(env)
    if not python.exists():
        print(f"creating virtual environment {env}")
        venv.EnvBuilder(with_pip=True).create(env)
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    if torch_choice != "skip" and not torch_installed(python):
        run([*pip, "install", *torch_install_args(torch_choice)])
    extras = "[test]" if test else ""
    run([*pip, "install", "-e", f"{ROOT}{extras}"])
    return python


# What PyQt6's wheel links against beyond libc and libstdc++ (it bundles Qt and ICU): soname and
# the Debian package that has it. Krita's own dependencies bring most of them.
QT6_LIBS = {
    "libEGL.so.1": "libegl1",
    "libGL.so.1": "libgl1",
    "libX11.so.6": "libx11-6",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libfontconfig.so.1": "libfontconfig1",
    "libfreetype.so.6": "libfreetype6",
    "libdbus-1.so.3": "libdbus-1-3",
    "libglib-2.0.so.0": "libglib2.0-0",
    "libgssapi_krb5.so.2": "libgssapi-krb5-2",
    "libbrotlidec.so.1": "libbrotli1",
    "libzstd.so.1": "libzstd1",
}


def missing_qt6_libs() -> list[str]:
    """Debian packages for the libraries PyQt6 needs that the dynamic linker does not know."""
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    try:
        known = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []  # no ldconfig to ask: let the PyQt6 import say what is missing
    return [package for soname, package in QT6_LIBS.items() if soname not in known]


def ensure_system_packages_for_tests() -> None:
    """The plugin's tests run inside real Krita (kritarunner) and on PyQt6 (Krita 6's binding).
    What is missing of Debian's Krita and the libraries PyQt6 links against is installed where
    that is possible without asking (root with apt-get, as on CI); elsewhere those tests skip."""
    packages = [] if shutil.which("kritarunner") else ["krita", "python3-pyqt5"]
    if not shutil.which("xvfb-run"):  # the plugin's Krita actions need Krita's window (on Xvfb)
        packages.append("xvfb")
    if sys.platform.startswith("linux"):
        packages += missing_qt6_libs()
    if not packages:
        return
    on_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if sys.platform.startswith("linux") and on_root and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-qq"], env=env)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], env=env)
        return
    if "krita" in packages:
        print("note: Krita's kritarunner is not installed; the in-Krita plugin tests will be skipped")
    if "xvfb" in packages:
        print("note: xvfb-run is not installed; the test of the plugin's Krita actions will be skipped")
    if libs := [p for p in packages if p not in ("krita", "python3-pyqt5", "xvfb")]:
        print(f"note: PyQt6 needs these system packages, missing here: {' '.join(libs)}")


def ensure_qt6_python(env: Path) -> Path | None:
    """A small virtual environment beside `env` with PyQt6, Krita 6's binding, for the tests of the
    plugin's Qt code (tests/test_plugin_qt.py); reused when it already imports PyQt6. Its Python,
    or None (with a note) where PyQt6 cannot be installed: those tests then skip."""
    qt_env = env.with_name(env.name + "-qt6")
    python = venv_python(qt_env)
    probe = [str(python), "-c", "import PyQt6.QtWidgets, PyQt6.QtNetwork"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"creating {qt_env} with PyQt6 for the Krita 6 (PyQt6) tests")
    if not python.exists():
        venv.EnvBuilder(with_pip=True).create(qt_env)
    # Wheels only: building PyQt6 from source needs a Qt SDK and takes long.
    pip = [str(python), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--only-binary", ":all:", "PyQt6"])  # the probe below judges
    done = subprocess.run(probe, capture_output=True, text=True)
    if done.returncode == 0:
        return python
    print(f"note: PyQt6 does not import in {qt_env}; the PyQt6 tests will be skipped\n{done.stderr[-1500:]}")
    return None


def install_plugin(python: Path, dev: bool) -> None:
    import install_krita

    for line in install_krita.install(dev=dev, bridge_python=python):
        print(line)
    print(
        f"Krita plugin zip (for Krita's 'Import Python Plugin from File'): {install_krita.build_zip(ROOT / 'dist' / 'collage_diffusion.zip')}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv", help="where the environment lives")
    parser.add_argument(
        "--torch",
        default=os.environ.get("COLLAGE_TORCH", "auto"),
        choices=["auto", "cpu", "cuda", "rocm", "default", "skip"],
        help="which PyTorch build to install (auto: CUDA with an NVIDIA GPU, MPS on macOS, else CPU)",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--demo", action="store_true", help="then generate examples/shapes.ora on the demo model"
    )
    action.add_argument("--test", action="store_true", help="then run ruff and the test suite")
    action.add_argument("--uninstall", action="store_true", help="remove the plugin from Krita")
    parser.add_argument("--dev", action="store_true", help="link the Krita plugin to this checkout")
    parser.add_argument("--no-krita", action="store_true", help="do not install the Krita plugin")
    args, rest = parser.parse_known_args()

    if args.uninstall:
        import install_krita

        for line in install_krita.uninstall() or ["the plugin was not installed"]:
            print(line)
        return 0
    python = setup(args.venv.resolve(), args.torch, test=args.test)
    qt6_python = None
    if args.test:
        ensure_system_packages_for_tests()  # the tests use throwaway Krita homes: the user's Krita is untouched
        qt6_python = ensure_qt6_python(args.venv.resolve())
    elif not args.no_krita:
        install_plugin(python, args.dev)
    if args.demo:
        out = ROOT / "out" / "shapes.png"
        run(
            [python, "-m", "core.cli", "generate", ROOT / "examples" / "shapes.ora", "-o", out, *rest],
            cwd=ROOT,
        )
        print(f"\nDone: open {out}")
    elif args.test:
        run([python, "-m", "ruff", "check", "."], cwd=ROOT)
        run([python, "-m", "ruff", "format", "--check", "."], cwd=ROOT)
        env = dict(os.environ)
        if qt6_python:
            listed = [str(qt6_python), *filter(None, env.get("COLLAGE_QT_PYTHONS", "").split(os.pathsep))]
            env["COLLAGE_QT_PYTHONS"] = os.pathsep.join(listed)
        run([python, "-m", "pytest", *rest], cwd=ROOT, env=env)
    else:
        print(f"\nReady. Python environment: {args.venv}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as error:
        sys.exit(error.returncode or 1)
