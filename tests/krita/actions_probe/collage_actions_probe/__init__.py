"""A test-only Krita plugin (tests/test_plugin_krita_actions.py installs it beside Collage
Diffusion in a throwaway HOME): once Krita's window is up, it looks up each of the plugin's
actions in Krita, triggers it with the dock's handler replaced by a recorder, triggers Generate
once for real (no document: the dock says so), writes a JSON report and ends Krita."""

import json
import os
import traceback

from krita import Extension, Krita
from PyQt5.QtCore import QTimer

REPORT = os.environ.get("COLLAGE_TEST_REPORT", "")


def probe(qwindow) -> dict:
    from collage_diffusion import actions

    report = {"actions": {}, "calls": [], "panel": False}
    app = Krita.instance()
    for spec in actions.ACTIONS:
        action = app.action(spec.id)
        report["actions"][spec.id] = (
            None if action is None else {"text": action.text(), "shortcut": action.shortcut().toString()}
        )
    panel = actions.target_panel(qwindow)
    report["panel"] = panel is not None
    if panel is None:
        return report
    for spec in actions.ACTIONS:
        setattr(panel, spec.handler, lambda name=spec.handler: report["calls"].append(name))
    for spec in actions.ACTIONS:
        action = app.action(spec.id)
        if action is not None:
            action.trigger()
    for spec in actions.ACTIONS:
        delattr(panel, spec.handler)  # the real handlers again
    app.action(actions.ACTIONS[0].id).trigger()  # Generate, for real, with no document open
    report["generate_error"] = panel.error.text()
    return report


def finish(qwindow) -> None:
    try:
        report = probe(qwindow)
    except Exception:
        report = {"error": traceback.format_exc()}
    with open(REPORT, "w", encoding="utf-8") as out:
        json.dump(report, out)
    os._exit(0)  # Krita's own quit crashes headless; the report is all the test needs


class Probe(Extension):
    def setup(self) -> None:
        pass

    def createActions(self, window) -> None:  # noqa: N802 - Krita's name
        qwindow = window.qwindow()  # the wrapper is deleted after this call
        QTimer.singleShot(1500, lambda: finish(qwindow))


if REPORT:
    Krita.instance().addExtension(Probe(Krita.instance()))
