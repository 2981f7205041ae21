#!/usr/bin/env python3
"""Install the Collage Diffusion plugin into Krita (the Krita part of install.py).

    python3 install_krita.py                 copy the plugin into Krita's pykrita folder, enable it
    python3 install_krita.py --dev           link it instead (edits in krita_plugin/ show after a Krita restart)
    python3 install_krita.py --uninstall     remove it (and its entry in kritarc)
    python3 install_krita.py --zip OUT.zip   build a zip for Krita's Tools › Scripts › Import Python Plugin from File

Also records where the bridge's Python environment is (``--bridge-python``, default: the
project's .venv), so the dock's "Start local bridge" can start and stop a bridge itself.

Standard library only, Linux, Windows and macOS; every path comes from HOME (and APPDATA /
LOCALAPPDATA / XDG_* where the OS uses them), so a throwaway HOME gives a throwaway install.
Running it again is safe: it replaces what it installed and changes nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PLUGIN = "collage_diffusion"
SOURCE = ROOT / "krita_plugin"
CONFIG_NAME = "collage_diffusion_bridge.json"  # as krita_plugin/collage_diffusion/bridge_process.py reads it
KRITARC_GROUP = "python"  # Krita's [python] group: enable_<plugin>=true
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", ".*")


def _platform(platform: str | None) -> str:
    platform = platform or sys.platform
    return "windows" if platform.startswith("win") else "macos" if platform == "darwin" else "linux"


def _env(env: dict | None) -> dict:
    return os.environ if env is None else env


def _home(env: dict | None) -> Path:
    e = _env(env)
    if env is not None and "HOME" in e:
        return Path(e["HOME"])
    return Path(e.get("HOME") or e.get("USERPROFILE") or Path.home())


def pykrita_dir(platform: str | None = None, env: dict | None = None) -> Path:
    """Krita's per-user pykrita folder: where Krita looks for Python plugins."""
    e, home = _env(env), _home(env)
    system = _platform(platform)
    if system == "windows":
        return Path(e.get("APPDATA") or home / "AppData" / "Roaming") / "krita" / "pykrita"
    if system == "macos":
        return home / "Library" / "Application Support" / "krita" / "pykrita"
    data = e.get("XDG_DATA_HOME")
    base = Path(data) if data and os.path.isabs(data) else home / ".local" / "share"
    return base / "krita" / "pykrita"


def actions_file(pykrita: Path) -> Path:
    """Where Krita reads the plugin's .action file (its actions' category and shortcuts)."""
    return pykrita.parent / "actions" / f"{PLUGIN}.action"


def kritarc_path(platform: str | None = None, env: dict | None = None) -> Path:
    """Krita's settings file."""
    e, home = _env(env), _home(env)
    system = _platform(platform)
    if system == "windows":
        return Path(e.get("LOCALAPPDATA") or home / "AppData" / "Local") / "kritarc"
    if system == "macos":
        return home / "Library" / "Preferences" / "kritarc"
    config = e.get("XDG_CONFIG_HOME")
    base = Path(config) if config and os.path.isabs(config) else home / ".config"
    return base / "kritarc"


# -- kritarc -------------------------------------------------------------------------------------------


def set_ini_value(text: str, group: str, key: str, value: str | None) -> str:
    """`text` (an INI file) with ``key=value`` in ``[group]`` (None: the key removed).

    Line-based, so everything else in the file stays exactly as it was (Qt's INI files have
    quirks, e.g. keys with slashes and escaped values, that a parser could rewrite).
    """
    lines = text.splitlines()
    header = f"[{group}]"
    start = next((i for i, line in enumerate(lines) if line.strip() == header), None)
    if start is None:
        if value is None:
            return text
        before = (
            text.rstrip("\n") + "\n\n" if text.strip() else ""
        )  # a blank line between groups, as Qt writes
        return before + f"{header}\n{key}={value}\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].strip().startswith("[")), len(lines))
    found = [i for i in range(start + 1, end) if lines[i].split("=", 1)[0].strip() == key]
    if value is None:
        lines = [line for i, line in enumerate(lines) if i not in found]
    elif found:
        lines[found[0]] = f"{key}={value}"
        lines = [line for i, line in enumerate(lines) if i not in found[1:]]
    else:
        insert = end
        while insert > start + 1 and not lines[insert - 1].strip():
            insert -= 1  # before the blank lines that end the group
        lines.insert(insert, f"{key}={value}")
    return "\n".join(lines) + "\n"


def enable_in_kritarc(enabled: bool = True, path: Path | None = None) -> bool:
    """Enable the plugin in kritarc (``[python] enable_collage_diffusion=true``), or remove that
    entry with ``enabled=False``; whether the file changed. Krita must not be running (it
    rewrites kritarc when it quits)."""
    path = path or kritarc_path()
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    new = set_ini_value(text, KRITARC_GROUP, f"enable_{PLUGIN}", "true" if enabled else None)
    if new == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new, encoding="utf-8")
    return True


# -- files -----------------------------------------------------------------------------------------------


def _remove(path: Path) -> bool:
    """Remove a file, a link (to a folder too: only the link) or a folder; whether it existed."""
    if path.is_symlink():
        path.unlink()  # a link to a folder: only the link goes
        return True
    if os.name == "nt" and _is_junction(path):
        os.rmdir(path)  # removes the junction, not the folder it points to
        return True
    if path.is_dir():
        shutil.rmtree(path)
        return True
    if path.exists():
        path.unlink()
        return True
    return False


def _is_junction(path: Path) -> bool:
    is_junction = getattr(os.path, "isjunction", None)  # Python 3.12+
    if is_junction is not None:
        return is_junction(path)
    try:
        return bool(os.readlink(path))
    except (OSError, ValueError):
        return False


def _link_dir(source: Path, target: Path) -> str:
    """Link target → source; a junction on Windows without symlink rights; "link"/"junction"."""
    try:
        target.symlink_to(source, target_is_directory=True)
        return "link"
    except OSError:
        if os.name != "nt":
            raise
    subprocess.run(["cmd", "/c", "mklink", "/J", str(target), str(source)], check=True, capture_output=True)
    return "junction"


def default_bridge_python(root: Path = ROOT) -> Path:
    venv = root / ".venv"
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def install(
    dev: bool = False,
    bridge_python: Path | None = None,
    target: Path | None = None,
    kritarc: Path | None = None,
    model: str = "demo",
) -> list[str]:
    """Install the plugin into `target` (default: Krita's pykrita folder) and enable it.

    Returns what was done, one line each. Replaces an earlier install of it (copy or link).
    """
    target = target or pykrita_dir()
    target.mkdir(parents=True, exist_ok=True)
    done = []
    package, desktop = target / PLUGIN, target / f"{PLUGIN}.desktop"
    _remove(package)
    _remove(desktop)
    if dev:
        how = _link_dir(SOURCE / PLUGIN, package)
        done.append(f"{how}ed {package} -> {SOURCE / PLUGIN}")
    else:
        shutil.copytree(SOURCE / PLUGIN, package, ignore=IGNORED)
        done.append(f"copied the plugin to {package}")
    shutil.copyfile(SOURCE / f"{PLUGIN}.desktop", desktop)
    done.append(f"copied {desktop.name}")
    # Krita reads actions' categories and default shortcuts from actions/ beside pykrita/.
    action_file = actions_file(target)
    action_file.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SOURCE / PLUGIN / action_file.name, action_file)
    done.append(f"copied the shortcuts' action file to {action_file}")
    python = Path(bridge_python) if bridge_python else default_bridge_python()
    record = {"python": str(python), "project": str(ROOT), "model": model, "args": []}
    (target / CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    done.append(f"recorded the bridge's environment ({python}) in {target / CONFIG_NAME}")
    rc = kritarc or kritarc_path()
    changed = enable_in_kritarc(True, rc)
    done.append(f"enabled the plugin in {rc}" if changed else f"the plugin was already enabled in {rc}")
    return done


def uninstall(target: Path | None = None, kritarc: Path | None = None) -> list[str]:
    """Remove what `install` put there; the rest of pykrita and kritarc stay as they are."""
    target = target or pykrita_dir()
    done = []
    for path in (target / PLUGIN, target / f"{PLUGIN}.desktop", target / CONFIG_NAME, actions_file(target)):
        if _remove(path):
            done.append(f"removed {path}")
    rc = kritarc or kritarc_path()
    if enable_in_kritarc(False, rc):
        done.append(f"removed the plugin's entry from {rc}")
    return done


def build_zip(out: Path) -> Path:
    """A zip for Krita's "Import Python Plugin from File": the .desktop file and the package
    folder at the top (with its folder entry, which Krita's importer looks for)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(SOURCE / f"{PLUGIN}.desktop", f"{PLUGIN}.desktop")
        z.writestr(f"{PLUGIN}/", b"")
        for path in sorted((SOURCE / PLUGIN).rglob("*")):
            rel = path.relative_to(SOURCE)
            if (
                any(part == "__pycache__" or part.startswith(".") for part in rel.parts)
                or path.suffix == ".pyc"
            ):
                continue
            if path.is_dir():
                z.writestr(rel.as_posix() + "/", b"")
            else:
                z.write(path, rel.as_posix())
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = p.add_mutually_exclusive_group()
    action.add_argument("--uninstall", action="store_true", help="remove the plugin from Krita")
    action.add_argument(
        "--zip", type=Path, metavar="OUT", help="only build the zip for Krita's plugin importer"
    )
    p.add_argument("--dev", action="store_true", help="link the plugin instead of copying it")
    p.add_argument("--bridge-python", type=Path, help="the Python that runs the bridge (default: .venv's)")
    p.add_argument("--pykrita", type=Path, help=f"install here instead of {pykrita_dir()}")
    p.add_argument("--kritarc", type=Path, help=f"Krita's settings file (default: {kritarc_path()})")
    args = p.parse_args(argv)
    if args.zip:
        print(f"built {build_zip(args.zip)}")
        return 0
    if args.uninstall:
        done = uninstall(args.pykrita, args.kritarc)
        print("\n".join(done) if done else "the plugin was not installed")
        return 0
    for line in install(args.dev, args.bridge_python, args.pykrita, args.kritarc):
        print(line)
    print("Restart Krita, then show the dock: Settings › Dockers › Collage Diffusion.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
