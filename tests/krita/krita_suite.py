"""The plugin inside real Krita: run by ``kritarunner -s krita_suite`` (tests/test_plugin_krita.py).

kritarunner runs one module per Krita start: this one imports the checks (checks_reading.py,
checks_generating.py, checks_dock_choices.py, checks_jobs.py; shared helpers in
suite_common.py) and runs them all in one start.

Environment:
    COLLAGE_TEST_REPORT   where to write the JSON report (required)
    COLLAGE_TEST_BRIDGE   the bridge's URL (a bridge on the demo model); checks that need it
                          are reported as skipped without it
    COLLAGE_TEST_DIR      a scratch folder (documents saved as .kra, the SVG of the vector layer)
    COLLAGE_TEST_ONLY     comma-separated check names to run (default: all)
    COLLAGE_BRIDGE_CONFIG a local-bridge config (bridge_process.py) for the "local bridge" check

The report: ``{"checks": {name: {"ok": bool, "skipped": str, "detail": str, "seconds": float}},
"krita": version}``. Each check builds what it needs; a failing check does not stop the others.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import checks_dock_choices
import checks_generating
import checks_jobs
import checks_reading
from harness import Skip, run_check  # beside this module
from suite_common import CHECKS, krita

#: The check modules (each registers its checks on import), in the order they run.
MODULES = (checks_reading, checks_generating, checks_dock_choices, checks_jobs)

# -- running ---------------------------------------------------------------------------------------------


def _without_bridge(report):
    raise Skip("no COLLAGE_TEST_BRIDGE")


#: Exceptions raised in Qt callbacks (slots, timers) while a check ran. Krita's own hook would
#: show each in a modal dialog, which in batch mode waits forever; here each fails its check.
CALLBACK_ERRORS: list[str] = []


def _callback_error(exc_type, exc, tb) -> None:
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    CALLBACK_ERRORS.append(text)
    print(f"[krita_suite] exception in a Qt callback:\n{text}")
    sys.stdout.flush()


def run_all() -> dict:
    only = {s for s in os.environ.get("COLLAGE_TEST_ONLY", "").split(",") if s}
    bridge = os.environ.get("COLLAGE_TEST_BRIDGE")
    krita().setBatchmode(True)
    sys.excepthook = _callback_error
    checks = {}
    order = [module.__name__ for module in MODULES]
    for name, fn, needs_bridge in sorted(CHECKS, key=lambda c: order.index(c[1].__module__)):
        if only and name not in only:
            continue
        entry = run_check(fn if bridge or not needs_bridge else _without_bridge)
        if CALLBACK_ERRORS:  # the plugin raised in a slot during this check: a bug, whatever else
            entry["ok"] = False
            entry["detail"] = "exception in a Qt callback:\n" + "\n".join(CALLBACK_ERRORS) + entry["detail"]
            CALLBACK_ERRORS.clear()
        checks[name] = entry
        print(
            f"[krita_suite] {name}: {'ok' if entry['ok'] else entry['skipped'] or 'FAILED'} ({entry['seconds']} s)"
            + (f": {entry['detail']}" if entry["ok"] and entry["detail"] else "")
        )
        if not entry["ok"] and not entry["skipped"]:
            print(entry["detail"])
        sys.stdout.flush()
    from collage_diffusion import qt

    return {"checks": checks, "krita": krita().version(), "qt": qt.QT_BINDING}


def __main__(args):  # kritarunner's entry point
    report_path = os.environ.get("COLLAGE_TEST_REPORT")
    try:
        report = run_all()
    except Exception:
        report = {"checks": {}, "error": traceback.format_exc()}
        print(report["error"])
    if report_path:
        Path(report_path).write_text(json.dumps(report, indent=2), encoding="utf-8")
