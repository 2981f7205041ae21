"""A screenshot of the dock in a real Krita window, on a virtual X display (Xvfb).

    python tests/krita/screenshot.py [--out docs/images/dock.png] [--no-bridge] [--document FILE.ora]
    python tests/krita/screenshot.py --mid-job --out docs/images/dock-preview.png

Installs the plugin (install_krita.py) into a throwaway HOME, with a small helper plugin that,
once Krita's window is up, opens the test collage (suite_common.build_document), shows the
Collage Diffusion dock, generates two variants on a demo-model bridge started here, and grabs
the screen (with --mid-job: while the job runs, its preview on the canvas, then cancels it and
logs what Krita's undo does to the results group). Needs: krita, xvfb (``apt-get install krita xvfb python3-pyqt5``), and the project's
environment for the bridge. Takes about a minute.

The helper plugin below is copied into the throwaway pykrita folder; it runs inside Krita.
"""

from __future__ import annotations

HELPER = r"""
import os, traceback
from krita import Extension, Krita
from collage_diffusion import qt

def tree(node, depth=0):
    return [("  " * depth) + f"{n.name()} ({n.type()}, visible={n.visible()})" + "\n" + "".join(tree(n, depth + 1))
            for n in node.childNodes()]


class Shot(Extension):
    def setup(self):
        pass

    def createActions(self, window):
        qt.QTimer.singleShot(4000, self.run)

    def run(self):
        out = os.environ["COLLAGE_SHOT_OUT"]
        try:
            self._run(out)
        except Exception:
            with open(out + ".error", "w") as f:
                f.write(traceback.format_exc())

    def _run(self, out):
        import suite_common
        from collage_diffusion import document

        app = Krita.instance()
        window = app.activeWindow()
        screen = qt.QtWidgets.QApplication.primaryScreen()
        window.qwindow().setGeometry(screen.availableGeometry())  # no window manager on Xvfb
        app.setBatchmode(True)  # no import dialogs (the SVG asks for a resolution otherwise)
        path = os.environ.get("COLLAGE_SHOT_DOCUMENT")
        doc = app.openDocument(path) if path else suite_common.build_document()
        app.setBatchmode(False)
        doc.setBatchmode(False)
        window.addView(doc)
        mid_job = os.environ.get("COLLAGE_SHOT_MID_JOB") == "1"
        if path or mid_job:
            # Large enough to see a small document; also, a fixed zoom avoids a Krita 5.1.5
            # deadlock at the fit-to-view zoom a document opens with (docs/plugin.md).
            window.activeView().canvas().setZoomLevel(6.0)
        if not path:  # (a document of ours brings its own settings: collage.json in the .ora)
            suite_common.set_prompt(doc, "a red sign, a cat and a ball on green grass, picture book style", steps=6,
                                   cat="a ginger cat", ball="a red ball", ground="green grass")
        settings = document.load_settings(doc)
        settings.variants = 2
        if mid_job:  # long enough to grab the canvas preview halfway
            settings.steps = 300
        document.save_settings(doc, settings)
        for dock in app.dockers():
            name = dock.objectName()
            if name == "collage_diffusion_dock":
                self.dock = dock
            elif name not in ("KisLayerBox",):
                dock.hide()
        qwindow = window.qwindow()
        qwindow.addDockWidget(qt.Qt.DockWidgetArea.LeftDockWidgetArea, self.dock)
        self.dock.show()
        self.dock.raise_()
        qwindow.resizeDocks([self.dock], [400], qt.Qt.Orientation.Horizontal)
        panel = self.dock.panel
        bridge = os.environ.get("COLLAGE_SHOT_BRIDGE")
        if bridge:
            panel.url.setText(bridge)
            panel._reconnect()
            qt.spin(lambda: panel.model.state == "connected", 20000)
        panel.refresh()
        grabbed, notes = None, []
        if bridge:
            panel.variants_button.click()
            qt.spin(lambda: panel.model.busy, 5000)
            if mid_job:
                from collage_diffusion.preview_layer import PREVIEW_NAME

                def halfway():
                    group = document.find_results_group(doc)
                    shown = group is not None and any(n.name() == PREVIEW_NAME for n in group.childNodes())
                    return (shown and panel.actions_section.progress.value() >= 400) or not panel.model.busy

                qt.spin(halfway, 180000)
                qt.spin(lambda: False, 1500)  # the canvas repainted
                grabbed = screen.grabWindow(0)
                notes.append("mid-job tree:\n" + "".join(reversed(tree(doc.rootNode()))))
                panel.model.cancel()
                qt.spin(lambda: not panel.model.busy, 60000)
                notes += self._undo_probe(app, doc, panel)
            qt.spin(lambda: not panel.model.busy, 120000)
        qt.spin(lambda: False, 1500)
        doc.refreshProjection()
        qt.spin(lambda: False, 1000)

        with open(out + ".txt", "w", encoding="utf-8") as f:
            f.write("".join(reversed(tree(doc.rootNode()))))
            f.write(f"\nerror: {panel.error.text()}\nnotice: {panel.notice.text()}\nprogress: {panel.progress.format()}\n")
            f.write("".join(line + "\n" for line in notes))
        (grabbed or screen.grabWindow(0)).save(out + ".tmp.png")
        os.replace(out + ".tmp.png", out)
        doc.setModified(False)

    def _undo_probe(self, app, doc, panel):
        # What Ctrl+Z (Krita's edit_undo) does after a finished job: the results group at each step.
        from collage_diffusion import document

        def names():
            group = document.find_results_group(doc)
            return [n.name() for n in group.childNodes()] if group is not None else "no results group"

        settings = document.load_settings(doc)
        settings.steps, settings.variants = 4, 1
        document.save_settings(doc, settings)
        panel.refresh()
        lines = [f"undo probe, before generate: {names()}"]
        panel.actions_section.generate_button.click()
        qt.spin(lambda: panel.model.busy, 5000)
        qt.spin(lambda: not panel.model.busy, 120000)
        lines.append(f"after generate: {names()} (error: {panel.error.text()!r})")
        undo = app.action("edit_undo")
        for i in range(5):
            undo.trigger()
            qt.spin(lambda: False, 700)
            lines.append(f"after Ctrl+Z #{i + 1}: {names()}")
        return lines

Krita.instance().addExtension(Shot(Krita.instance()))
"""

DESKTOP = """[Desktop Entry]
Type=Service
ServiceTypes=Krita/PythonPlugin
X-KDE-Library=collage_screenshot
X-Python-2-Compatible=false
Name=Collage screenshot helper
Comment=Takes the docs screenshot (tests/krita/screenshot.py)
"""


def main() -> int:
    import argparse
    import contextlib
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    import harness  # beside this script

    root = harness.ROOT
    sys.path.insert(0, str(root))
    import install_krita

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=root / "docs" / "images" / "dock.png")
    p.add_argument("--no-bridge", action="store_true", help="no bridge: the dock shows 'cannot reach'")
    p.add_argument("--size", default="1600x1300")
    p.add_argument(
        "--document",
        type=Path,
        help="open this document instead of building the test collage (an .ora of ours brings its settings)",
    )
    p.add_argument("--keep", action="store_true", help="keep the throwaway HOME (printed)")
    p.add_argument(
        "--mid-job",
        action="store_true",
        help="grab while a job runs (its preview on the canvas), then cancel; also logs what Ctrl+Z does",
    )
    args = p.parse_args()
    for tool in ("krita", "Xvfb"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (apt-get install krita xvfb python3-pyqt5)")

    tmp = Path(tempfile.mkdtemp(prefix="collage-shot-"))
    env = harness.throwaway_home(tmp / "home")
    pykrita = install_krita.pykrita_dir("linux", env)
    kritarc = install_krita.kritarc_path("linux", env)
    install_krita.install(dev=False, bridge_python=Path(sys.executable), target=pykrita, kritarc=kritarc)
    (pykrita / "collage_screenshot").mkdir()
    (pykrita / "collage_screenshot" / "__init__.py").write_text(HELPER)
    (pykrita / "collage_screenshot.desktop").write_text(DESKTOP)
    text = kritarc.read_text()
    text = install_krita.set_ini_value(text, "python", "enable_collage_screenshot", "true")
    # No splash, no welcome-page news, a dark theme as most painters use.
    text = install_krita.set_ini_value(text, "General", "HideSplashAfterStartup", "true")
    text = install_krita.set_ini_value(text, "SplashScreen", "HideSplashAfterStartup", "true")
    kritarc.write_text(text)

    processes = []
    try:
        with contextlib.ExitStack() as stack:
            bridge_url = ""
            if not args.no_bridge:
                os.environ.setdefault("COLLAGE_CACHE", str(tmp / "cache"))
                try:
                    bridge_url = stack.enter_context(harness.bridge(tmp / "bridge", timeout=180))
                except RuntimeError as error:
                    sys.exit(str(error))
            display = f":{harness.free_port() % 400 + 100}"
            xvfb = subprocess.Popen(["Xvfb", display, "-screen", "0", f"{args.size}x24", "-nolisten", "tcp"])
            processes.append(xvfb)
            # Its socket exists once it accepts clients (a fixed sleep was too short on a busy machine).
            x_socket = Path(f"/tmp/.X11-unix/X{display[1:]}")
            started = time.monotonic()
            while not x_socket.exists():
                if xvfb.poll() is not None or time.monotonic() - started > 30:
                    sys.exit(f"Xvfb did not start on display {display}")
                time.sleep(0.1)
            shot = tmp / "shot.png"
            kenv = {
                **env,
                "DISPLAY": display,
                "QT_QPA_PLATFORM": "xcb",
                "COLLAGE_SHOT_OUT": str(shot),
                "COLLAGE_SHOT_BRIDGE": bridge_url,
                **({"COLLAGE_SHOT_DOCUMENT": str(args.document.resolve())} if args.document else {}),
                **({"COLLAGE_SHOT_MID_JOB": "1"} if args.mid_job else {}),
                "PYTHONPATH": os.pathsep.join([str(root / "tests" / "krita")]),
            }
            klog = open(tmp / "krita.log", "w")  # noqa: SIM115
            krita = subprocess.Popen(["krita", "--nosplash"], env=kenv, stdout=klog, stderr=subprocess.STDOUT)
            processes.append(krita)
            deadline = time.monotonic() + 300
            while not shot.exists():
                error = Path(str(shot) + ".error")
                if error.exists():
                    sys.exit("the helper failed inside Krita:\n" + error.read_text())
                if krita.poll() is not None or time.monotonic() > deadline:
                    sys.exit("no screenshot; Krita's log:\n" + (tmp / "krita.log").read_text()[-3000:])
                time.sleep(0.5)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shot, args.out)
            print(f"wrote {args.out}")
            print(Path(str(shot) + ".txt").read_text())
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
