"""Krita actions (Settings › Configure Krita › Keyboard Shortcuts, category "Collage Diffusion"):
Generate, Variants, Regenerate, Cancel, next/previous variant, each calling the dock's handler.

Krita reads an action's text, category and default shortcut from ``.action`` files in its
resource folder's ``actions/`` (beside ``pykrita/``): `ACTION_FILE` ships in this package;
install_krita.py copies it there, and `ensure_action_file` does at start-up when the plugin was
installed another way (a zip: its shortcuts then appear from the next start). The default
shortcuts are Ctrl+Alt+Shift+letter, which Krita 5.1's default shortcut schemes leave free
(they use only Ctrl+Alt+Shift+C and +I). Standard library only at import (tests read `ACTIONS`).
"""

from __future__ import annotations

import shutil
import weakref
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

CATEGORY = "Collage Diffusion"
ACTION_FILE = Path(__file__).with_name("collage_diffusion.action")


@dataclass(frozen=True)
class ActionSpec:
    id: str  # Krita's action name (unique among all of Krita's actions)
    text: str
    shortcut: str  # the default, as in the .action file
    handler: str  # the `dock.CollagePanel` method it calls


ACTIONS = (
    ActionSpec("collage_diffusion_generate", "Generate", "Ctrl+Alt+Shift+G", "action_generate"),
    ActionSpec("collage_diffusion_variants", "Generate Variants", "Ctrl+Alt+Shift+V", "action_variants"),
    ActionSpec(
        "collage_diffusion_regenerate",
        "Regenerate Selected Layer or Selection",
        "Ctrl+Alt+Shift+R",
        "action_regenerate",
    ),
    ActionSpec("collage_diffusion_cancel", "Cancel Generation", "Ctrl+Alt+Shift+X", "action_cancel"),
    ActionSpec(
        "collage_diffusion_next_variant", "Show Next Variant", "Ctrl+Alt+Shift+N", "action_next_variant"
    ),
    ActionSpec(
        "collage_diffusion_previous_variant",
        "Show Previous Variant",
        "Ctrl+Alt+Shift+P",
        "action_previous_variant",
    ),
)

#: The dock panels alive (one per Krita window); an action goes to the one of the active window.
_panels: weakref.WeakSet = weakref.WeakSet()


def register_panel(panel) -> None:
    _panels.add(panel)


def target_panel(qwindow=None):
    """The panel an action goes to: the one in `qwindow` (a Krita main window), else any live one."""
    panels = list(_panels)
    for panel in panels:
        if qwindow is not None and panel.window() is qwindow:
            return panel
    return panels[0] if panels else None


def trigger(spec: ActionSpec, qwindow=None) -> bool:
    """Call the handler of `spec` on the dock's panel; False when no dock exists yet."""
    panel = target_panel(qwindow)
    if panel is None:
        return False
    getattr(panel, spec.handler)()  # looked up now: the panel's method of this moment
    return True


def action_file_actions(path: Path = ACTION_FILE) -> dict[str, tuple[str, str, str]]:
    """{id: (category, text, shortcut)} as written in an .action file (for the tests and checks)."""
    root = ET.parse(path).getroot()
    found = {}
    for group in root.iter("Actions"):
        for action in group.iter("Action"):
            found[action.get("name")] = (
                group.get("category"),
                action.findtext("text", ""),
                action.findtext("shortcut", ""),
            )
    return found


def actions_dir(pykrita: Path) -> Path:
    """Where Krita reads user .action files: ``actions/`` beside ``pykrita/``."""
    return pykrita.parent / "actions"


def ensure_action_file(pykrita: Path | None = None) -> bool:
    """Copy `ACTION_FILE` into Krita's actions folder when it is missing or differs; True if copied."""
    target = actions_dir(pykrita or Path(__file__).resolve().parent.parent) / ACTION_FILE.name
    try:
        if target.exists() and target.read_bytes() == ACTION_FILE.read_bytes():
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ACTION_FILE, target)
        return True
    except OSError:  # a read-only install: the actions still exist, without their category
        return False


def make_extension_class():
    """The Krita extension that creates the actions in each window (lazily: needs `krita`)."""
    from krita import Extension

    class CollageExtension(Extension):
        def setup(self) -> None:
            ensure_action_file()

        def createActions(self, window) -> None:  # noqa: N802 - Krita's name
            qwindow = window.qwindow()  # `window` is a wrapper Krita deletes after this call
            for spec in ACTIONS:
                action = window.createAction(spec.id, spec.text, "tools/scripts")
                action.triggered.connect(lambda _checked=False, s=spec, w=qwindow: trigger(s, w))

    return CollageExtension
