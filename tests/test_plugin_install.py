"""install_krita.py: the plugin into Krita's pykrita folder (copy or link), kritarc, the zip for
Krita's importer, the recorded bridge environment, uninstall; all under a throwaway HOME."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import install_krita as ik
from krita_plugin.collage_diffusion import bridge_process

ROOT = Path(__file__).resolve().parent.parent
KRITA_IMPORTER = Path("/usr/share/krita/pykrita/plugin_importer/plugin_importer.py")


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "APPDATA", "LOCALAPPDATA"):
        monkeypatch.delenv(name, raising=False)
    return home


def tree(path: Path) -> dict[str, str]:
    """Every file under `path` (links followed) with its content, for before/after comparisons."""
    out = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        out[rel] = "<link>" if p.is_symlink() else p.read_text("utf-8", "replace") if p.is_file() else "<dir>"
    return out


def test_paths_per_os():
    env = {"HOME": "/h", "APPDATA": "C:/Users/u/AppData/Roaming", "LOCALAPPDATA": "C:/Users/u/AppData/Local"}
    assert ik.pykrita_dir("linux", env) == Path("/h/.local/share/krita/pykrita")
    assert ik.pykrita_dir("linux", {**env, "XDG_DATA_HOME": "/x"}) == Path("/x/krita/pykrita")
    assert ik.pykrita_dir("linux", {**env, "XDG_DATA_HOME": "relative"}) == Path(
        "/h/.local/share/krita/pykrita"
    )
    assert ik.pykrita_dir("win32", env) == Path("C:/Users/u/AppData/Roaming/krita/pykrita")
    assert ik.pykrita_dir("win32", {"HOME": "/h"}) == Path("/h/AppData/Roaming/krita/pykrita")
    assert ik.pykrita_dir("darwin", env) == Path("/h/Library/Application Support/krita/pykrita")
    assert ik.kritarc_path("linux", env) == Path("/h/.config/kritarc")
    assert ik.kritarc_path("linux", {**env, "XDG_CONFIG_HOME": "/c"}) == Path("/c/kritarc")
    assert ik.kritarc_path("win32", env) == Path("C:/Users/u/AppData/Local/kritarc")
    assert ik.kritarc_path("darwin", env) == Path("/h/Library/Preferences/kritarc")


def test_the_plugin_looks_where_the_installer_writes(home, monkeypatch):
    assert bridge_process.default_pykrita_dir() == ik.pykrita_dir()
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    assert bridge_process.default_pykrita_dir() == ik.pykrita_dir()
    assert bridge_process.CONFIG_NAME == ik.CONFIG_NAME


@pytest.mark.parametrize(
    "before, value, after",
    [
        ("", "true", "[python]\nenable_collage_diffusion=true\n"),
        ("[General]\na=1", "true", "[General]\na=1\n\n[python]\nenable_collage_diffusion=true\n"),
        (
            "[python]\nenable_other=true\n\n[Zed]\nk=v\n",
            "true",
            "[python]\nenable_other=true\nenable_collage_diffusion=true\n\n[Zed]\nk=v\n",
        ),
        (
            "[python]\nenable_collage_diffusion=false\nx=1\nenable_collage_diffusion=true\n",
            "true",
            "[python]\nenable_collage_diffusion=true\nx=1\n",
        ),
        ("[python]\nenable_collage_diffusion=true\nx=1\n", None, "[python]\nx=1\n"),
        ("[General]\na=1\n", None, "[General]\na=1\n"),
        ("[Python]\nenable_collage_diffusion=true\n", None, "[Python]\nenable_collage_diffusion=true\n"),
    ],
)
def test_kritarc_edits_only_its_own_line(before, value, after):
    assert ik.set_ini_value(before, "python", "enable_collage_diffusion", value) == after


def test_install_copy_is_complete_and_idempotent(home):
    kritarc = home / ".config" / "kritarc"
    kritarc.parent.mkdir(parents=True)
    kritarc.write_text("[General]\nfoo=bar\n")
    other = ik.pykrita_dir() / "other_plugin"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("# someone else's\n")

    done = ik.install(bridge_python=Path("/opt/env/bin/python"))
    target = ik.pykrita_dir()
    assert target == home / ".local/share/krita/pykrita"
    package = target / "collage_diffusion"
    assert not package.is_symlink()
    shipped = {p.name for p in (ROOT / "krita_plugin/collage_diffusion").glob("*.py")}
    assert {p.name for p in package.glob("*.py")} == shipped
    assert not list(package.rglob("__pycache__"))
    assert (target / "collage_diffusion.desktop").read_text() == (
        ROOT / "krita_plugin/collage_diffusion.desktop"
    ).read_text()
    action_file = home / ".local/share/krita/actions/collage_diffusion.action"
    assert (
        action_file.read_bytes()
        == (ROOT / "krita_plugin/collage_diffusion/collage_diffusion.action").read_bytes()
    )
    record = json.loads((target / ik.CONFIG_NAME).read_text())
    assert record == {"python": "/opt/env/bin/python", "project": str(ROOT), "model": "demo", "args": []}
    assert kritarc.read_text() == "[General]\nfoo=bar\n\n[python]\nenable_collage_diffusion=true\n"
    assert any("enabled the plugin" in line for line in done)

    first = tree(home)
    again = ik.install(bridge_python=Path("/opt/env/bin/python"))
    assert tree(home) == first
    assert any("already enabled" in line for line in again)

    # the plugin side reads what was recorded
    env = bridge_process.load_config()
    assert (env.python, env.project, env.model) == ("/opt/env/bin/python", str(ROOT), "demo")

    ik.uninstall()
    assert not package.exists() and not (target / "collage_diffusion.desktop").exists()
    assert not (target / ik.CONFIG_NAME).exists() and not action_file.exists()
    assert (other / "__init__.py").exists()
    assert kritarc.read_text() == "[General]\nfoo=bar\n\n[python]\n"
    assert ik.uninstall() == []  # nothing left to do


@pytest.mark.skipif(os.name == "nt", reason="symlinks need rights on Windows (the installer uses a junction)")
def test_dev_install_links_and_switches_back(home):
    ik.install(dev=True)
    package = ik.pykrita_dir() / "collage_diffusion"
    assert package.is_symlink() and package.resolve() == (ROOT / "krita_plugin/collage_diffusion").resolve()
    ik.install(dev=True)
    assert package.is_symlink()
    ik.install(dev=False)
    assert not package.is_symlink() and (package / "wire.py").is_file()
    ik.install(dev=True)
    ik.uninstall()
    assert not package.exists() and (ROOT / "krita_plugin/collage_diffusion/wire.py").exists()


def test_zip_for_kritas_importer(tmp_path):
    out = ik.build_zip(tmp_path / "dist" / "collage_diffusion.zip")
    with zipfile.ZipFile(out) as z:
        names = z.namelist()
    assert "collage_diffusion.desktop" in names and "collage_diffusion/" in names
    assert "collage_diffusion/__init__.py" in names and "collage_diffusion/wire.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert ik.build_zip(out) == out  # rebuilding replaces it

    if not KRITA_IMPORTER.exists():
        pytest.skip("Krita's plugin importer is not installed (apt-get install krita)")
    spec = importlib.util.spec_from_file_location("krita_plugin_importer", KRITA_IMPORTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    resources = tmp_path / "resources"
    resources.mkdir()
    imported = module.PluginImporter(str(out), str(resources), lambda plugin: True).import_all()
    assert [p["name"] for p in imported] == ["collage_diffusion"]
    got = resources / "pykrita"
    assert (got / "collage_diffusion.desktop").exists()
    assert {p.name for p in (got / "collage_diffusion").glob("*.py")} == {
        p.name for p in (ROOT / "krita_plugin/collage_diffusion").glob("*.py")
    }


def test_command_line(tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")} | {"HOME": str(home)}
    run = [sys.executable, str(ROOT / "install_krita.py")]
    done = subprocess.run([*run, "--dev"], env=env, capture_output=True, text=True, check=True)
    assert "Settings › Dockers › Collage Diffusion" in done.stdout
    assert (home / ".local/share/krita/pykrita/collage_diffusion/wire.py").exists()
    out = subprocess.run(
        [*run, "--zip", str(tmp_path / "p.zip")], env=env, capture_output=True, text=True, check=True
    )
    assert "built" in out.stdout and (tmp_path / "p.zip").exists()
    subprocess.run([*run, "--uninstall"], env=env, capture_output=True, text=True, check=True)
    assert not (home / ".local/share/krita/pykrita/collage_diffusion").exists()
    again = subprocess.run([*run, "--uninstall"], env=env, capture_output=True, text=True, check=True)
    assert "was not installed" in again.stdout


def test_action_file_lists_each_action_under_its_category():
    from krita_plugin.collage_diffusion import actions

    assert actions.action_file_actions() == {
        spec.id: (actions.CATEGORY, spec.text, spec.shortcut) for spec in actions.ACTIONS
    }
    assert len({spec.shortcut.lower() for spec in actions.ACTIONS}) == len(actions.ACTIONS)


KRITA_SHARE = Path("/usr/share/krita")


@pytest.mark.skipif(not (KRITA_SHARE / "actions").is_dir(), reason="Krita's action files are not installed")
def test_default_shortcuts_leave_kritas_own_alone():
    """No default shortcut is one of Krita's: its .action files and its shortcut schemes."""
    import re

    from krita_plugin.collage_diffusion import actions

    files = [*(KRITA_SHARE / "actions").glob("*.action"), *(KRITA_SHARE / "shortcuts").glob("*.shortcuts")]
    text = "\n".join(p.read_text("utf-8", "replace") for p in files)
    taken = {
        key.strip().lower()
        for found in re.findall(r"<shortcut>([^<]*)</shortcut>|^\w+=(.*)$", text, re.MULTILINE)
        for keys in found
        for key in keys.split(";")
        if key.strip()
    }
    assert "ctrl+alt+shift+c" in taken  # the scan does read Krita's shortcuts
    assert not {spec.shortcut.lower() for spec in actions.ACTIONS} & taken


def test_ensure_action_file_copies_beside_pykrita(tmp_path):
    from krita_plugin.collage_diffusion import actions

    pykrita = tmp_path / "krita" / "pykrita"
    assert actions.ensure_action_file(pykrita)
    copied = tmp_path / "krita" / "actions" / "collage_diffusion.action"
    assert copied.read_bytes() == actions.ACTION_FILE.read_bytes()
    assert not actions.ensure_action_file(pykrita)  # the same already
