"""The dock: widgets only. State and actions live in `model.CollageModel`, document access in
`document.py`, settings in the document's annotation (`settings.py`).

`CollagePanel` is a plain QWidget given a `host` (what it needs from Krita: the active document
and Krita's settings), so tests and the screenshot script can build it without Krita's docker
machinery; `CollageDock` puts it into a Krita docker.
"""

from __future__ import annotations

import random

from . import document, qt
from .bridge_process import make_local_bridge
from .collage import NodeInfo, is_default_name
from .model import CONNECTED, CONNECTING, DISCONNECTED, REFUSED, CollageModel
from .settings import SIZE_POLICIES, DocumentSettings, LayerSettings

W = qt.QtWidgets
SETTINGS_GROUP = "collage_diffusion"
DOCK_ID = "collage_diffusion_dock"
DOCK_TITLE = "Collage Diffusion"
LOCAL_PORT = 7870

STATE_COLORS = {CONNECTED: "#3a3", CONNECTING: "#c90", DISCONNECTED: "#c33", REFUSED: "#c33"}
KIND_MARKS = {"paintlayer": "", "vectorlayer": " (vector)", "filelayer": " (file)", "filllayer": " (fill)"}


class KritaHost:
    """What the panel needs from Krita."""

    def __init__(self):
        from krita import Krita

        self.krita = Krita.instance()

    def active_document(self):
        return self.krita.activeDocument()

    def read_setting(self, key: str, default: str = "") -> str:
        return self.krita.readSetting(SETTINGS_GROUP, key, default)

    def write_setting(self, key: str, value: str) -> None:
        self.krita.writeSetting(SETTINGS_GROUP, key, value)


class Slider(W.QWidget):
    """A small labelled slider over a float range, showing its value."""

    changed = qt.pyqtSignal(float)

    def __init__(self, label: str, low: float, high: float, step: float, tip: str, parent=None):
        super().__init__(parent)
        self.low, self.step = low, step
        layout = W.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        self.label = W.QLabel(label)
        self.slider = W.QSlider(qt.Qt.Orientation.Horizontal)
        self.slider.setRange(0, round((high - low) / step))
        self.slider.setMinimumWidth(24)
        self.value_label = W.QLabel()
        for widget in (self.label, self.slider, self.value_label):
            widget.setToolTip(tip)
            layout.addWidget(widget)
        layout.setStretch(1, 1)
        self.slider.valueChanged.connect(self._on_change)

    def value(self) -> float:
        return round(self.low + self.slider.value() * self.step, 4)

    def set_value(self, value: float) -> None:
        blocked = self.slider.blockSignals(True)
        self.slider.setValue(round((value - self.low) / self.step))
        self.slider.blockSignals(blocked)
        self.value_label.setText(f"{self.value():g}")

    def _on_change(self, _position: int) -> None:
        self.value_label.setText(f"{self.value():g}")
        self.changed.emit(self.value())


class LayerRow(W.QFrame):
    """One layer: take part or not, its text, strength, attention and control weights, appearance."""

    changed = qt.pyqtSignal()

    def __init__(self, info: NodeInfo, parent=None):
        super().__init__(parent)
        self.info = info
        self.setFrameShape(W.QFrame.Shape.StyledPanel)
        layout = W.QVBoxLayout(self)
        layout.setContentsMargins(4 + 12 * info.depth, 2, 4, 2)
        layout.setSpacing(1)
        top = W.QHBoxLayout()
        self.enabled = W.QCheckBox(info.name + KIND_MARKS.get(info.kind, f" ({info.kind})"))
        self.enabled.setToolTip(
            "Take part in the collage" + (f" (in {' / '.join(info.path)})" if info.path else "")
        )
        self.appearance = W.QCheckBox("appearance")
        self.appearance.setToolTip("Learn this layer's look (textual inversion) so the result keeps it")
        top.addWidget(self.enabled, 1)
        top.addWidget(self.appearance)
        layout.addLayout(top)
        self.text = W.QLineEdit()
        if info.name.strip().lower() == "background":
            self.text.setPlaceholderText("the background; or describe it to make it an object")
        elif is_default_name(info.name):
            self.text.setPlaceholderText(f"describe it ('{info.name}' says nothing): left out until then")
        else:
            self.text.setPlaceholderText(info.name)
        self.text.setToolTip("What this layer shows, as words of the prompt (empty: the layer's name)")
        layout.addWidget(self.text)
        self.strength = Slider(
            "str", 0.0, 1.0, 0.01, "Strength: how much this layer's region may change (0: kept)"
        )
        self.attention = Slider(
            "attn", 0.0, 10.0, 0.05, "Attention weight: how strongly the layer's text keeps to its region"
        )
        self.control = Slider(
            "ctrl", 0.0, 2.0, 0.01, "Control weight: how closely the layer's shapes are kept"
        )
        sliders = W.QHBoxLayout()
        sliders.setSpacing(6)
        for slider in (self.strength, self.attention, self.control):
            sliders.addWidget(slider, 1)
            slider.changed.connect(lambda _v: self.changed.emit())
        layout.addLayout(sliders)
        self.enabled.toggled.connect(self._on_enabled)
        self.appearance.toggled.connect(lambda _v: self.changed.emit())
        self.text.textEdited.connect(lambda _t: self.changed.emit())

    def load(self, s: LayerSettings) -> None:
        for widget in (self.enabled, self.appearance, self.text):
            widget.blockSignals(True)
        self.enabled.setChecked(s.enabled)
        self.appearance.setChecked(s.appearance)
        self.text.setText(s.text)
        for widget in (self.enabled, self.appearance, self.text):
            widget.blockSignals(False)
        self.strength.set_value(s.strength)
        self.attention.set_value(s.attention_weight)
        self.control.set_value(s.control_weight)
        self._show_enabled(s.enabled)

    def store(self, s: LayerSettings) -> None:
        s.enabled = self.enabled.isChecked()
        s.appearance = self.appearance.isChecked()
        s.text = self.text.text()
        s.strength = self.strength.value()
        s.attention_weight = self.attention.value()
        s.control_weight = self.control.value()

    def _on_enabled(self, on: bool) -> None:
        self._show_enabled(on)
        self.changed.emit()

    def _show_enabled(self, on: bool) -> None:
        for widget in (self.text, self.strength, self.attention, self.control, self.appearance):
            widget.setEnabled(on)


class CollagePanel(W.QWidget):
    """Everything the dock shows."""

    def __init__(self, host, model: CollageModel | None = None, parent=None):
        super().__init__(parent)
        self.host = host
        self.model = model or CollageModel(
            host.read_setting("url", f"http://127.0.0.1:{LOCAL_PORT}"), host.read_setting("token", ""), self
        )
        self.local_bridge = make_local_bridge(self)
        self.doc = None
        self.doc_key = ""
        self.settings = DocumentSettings()
        self.layer_settings: dict[str, LayerSettings] = {}
        self.rows: dict[str, LayerRow] = {}
        self._listed: list[tuple] = []
        self._loading = False
        self._dirty = False  # edits not yet written into the document
        self._snapshot = ""  # the settings as last read from or written to the document
        self._build()
        self._connect()
        self._save_timer = qt.QTimer(self)
        self._save_timer.setSingleShot(True)
        self._save_timer.timeout.connect(self.save_settings)
        self._watch = qt.QTimer(self)
        self._watch.timeout.connect(self.refresh)
        self._watch.start(1500)
        self._on_busy(False)

    # -- building ------------------------------------------------------------------------------------

    def _build(self) -> None:
        outer = W.QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        scroll = W.QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(W.QFrame.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(qt.Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        outer.addWidget(scroll)
        body = W.QWidget()
        scroll.setWidget(body)
        v = W.QVBoxLayout(body)
        v.setContentsMargins(6, 6, 6, 6)

        # Bridge
        bridge = W.QGroupBox("Bridge")
        form = W.QGridLayout(bridge)
        self.url = W.QLineEdit(self.model.client.url)
        self.url.setToolTip(
            "The bridge's address, e.g. http://127.0.0.1:7870 or a GPU machine on the network"
        )
        self.token = W.QLineEdit(self.model.client.token)
        self.token.setEchoMode(W.QLineEdit.EchoMode.Password)
        self.token.setPlaceholderText("token (only if the bridge asks for one)")
        self.connect_button = W.QPushButton("Connect")
        self.local_button = W.QPushButton("Start local bridge")
        self.local_button.setToolTip(
            "Start (or stop) a bridge on this machine, from the environment install.py set up"
        )
        self.status = W.QLabel("Not connected yet.")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(qt.Qt.TextInteractionFlag.TextSelectableByMouse)
        form.addWidget(W.QLabel("Address"), 0, 0)
        form.addWidget(self.url, 0, 1, 1, 2)
        form.addWidget(W.QLabel("Token"), 1, 0)
        form.addWidget(self.token, 1, 1, 1, 2)
        buttons = W.QHBoxLayout()
        buttons.addWidget(self.connect_button)
        buttons.addWidget(self.local_button)
        form.addLayout(buttons, 2, 0, 1, 3)
        form.addWidget(self.status, 3, 0, 1, 3)
        v.addWidget(bridge)

        # Prompt
        v.addWidget(W.QLabel("Prompt (the whole image)"))
        self.prompt = W.QPlainTextEdit()
        self.prompt.setPlaceholderText("a bento box with salmon sushi and pickled ginger, studio photo")
        self.prompt.setFixedHeight(56)
        v.addWidget(self.prompt)
        self.negative = W.QLineEdit()
        self.negative.setPlaceholderText("negative prompt: what to avoid")
        v.addWidget(self.negative)

        # Layers
        self.layers_box = W.QGroupBox("Layers taking part")
        self.layers_layout = W.QVBoxLayout(self.layers_box)
        self.layers_layout.setSpacing(3)
        self.no_layers = W.QLabel("Open a document: its visible layers appear here.")
        self.no_layers.setWordWrap(True)
        self.layers_layout.addWidget(self.no_layers)
        v.addWidget(self.layers_box)

        # Generation settings
        opts = W.QGridLayout()
        self.seed = W.QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.seed_random = W.QToolButton()
        self.seed_random.setText("Random")
        self.seed_random.setToolTip("A new random seed")
        self.steps = W.QSpinBox()
        self.steps.setRange(1, 1000)
        self.size_policy = W.QComboBox()
        for key, label in SIZE_POLICIES.items():
            self.size_policy.addItem(label, key)
        self.variants = W.QSpinBox()
        self.variants.setRange(1, 16)
        self.strength = W.QDoubleSpinBox()
        self.strength.setRange(0.0, 1.0)
        self.strength.setSingleStep(0.05)
        self.strength.setToolTip("How much the background (what no layer covers) may change")
        seed_row = W.QHBoxLayout()
        seed_row.addWidget(self.seed, 1)
        seed_row.addWidget(self.seed_random)
        opts.addWidget(W.QLabel("Seed"), 0, 0)
        opts.addLayout(seed_row, 0, 1, 1, 3)
        opts.addWidget(W.QLabel("Steps"), 1, 0)
        opts.addWidget(self.steps, 1, 1)
        opts.addWidget(W.QLabel("Variants"), 1, 2)
        opts.addWidget(self.variants, 1, 3)
        opts.addWidget(W.QLabel("Size"), 2, 0)
        opts.addWidget(self.size_policy, 2, 1, 1, 3)
        opts.addWidget(W.QLabel("Strength"), 3, 0)
        opts.addWidget(self.strength, 3, 1)
        opts.setColumnStretch(1, 1)
        opts.setColumnStretch(3, 1)
        v.addLayout(opts)

        # Actions
        row = W.QHBoxLayout()
        self.generate_button = W.QPushButton("Generate")
        self.generate_button.setDefault(True)
        self.variants_button = W.QPushButton("Variants")
        self.variants_button.setToolTip("Several images from new random seeds; pick one below")
        row.addWidget(self.generate_button, 2)
        row.addWidget(self.variants_button, 1)
        v.addLayout(row)
        self.regenerate_button = W.QPushButton("Regenerate selected layer")
        self.regenerate_button.setToolTip("Redo only the active layer's region of the last result")
        v.addWidget(self.regenerate_button)
        row = W.QHBoxLayout()
        self.progress = W.QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(True)
        self.progress.setFormat("idle")
        self.cancel_button = W.QPushButton("Cancel")
        row.addWidget(self.progress, 1)
        row.addWidget(self.cancel_button)
        v.addLayout(row)
        self.notice = W.QLabel()
        self.notice.setWordWrap(True)
        self.error = W.QLabel()
        self.error.setWordWrap(True)
        self.error.setStyleSheet("color: #d44;")
        self.error.setTextInteractionFlags(qt.Qt.TextInteractionFlag.TextSelectableByMouse)
        v.addWidget(self.notice)
        v.addWidget(self.error)

        # Results
        self.preview = W.QLabel()
        self.preview.setAlignment(qt.Qt.AlignmentFlag.AlignCenter)
        self.preview.hide()
        v.addWidget(self.preview)
        self.thumbs = W.QListWidget()
        self.thumbs.setViewMode(W.QListView.ViewMode.IconMode)
        self.thumbs.setIconSize(qt.QSize(96, 96))
        self.thumbs.setResizeMode(W.QListView.ResizeMode.Adjust)
        self.thumbs.setMovement(W.QListView.Movement.Static)
        self.thumbs.setFixedHeight(128)
        self.thumbs.setToolTip("Finished variants: click one to show it (its seed goes into the Seed field)")
        v.addWidget(W.QLabel("Results"))
        v.addWidget(self.thumbs)
        v.addStretch(1)

    def _connect(self) -> None:
        m = self.model
        m.connection_changed.connect(self._on_connection)
        m.busy_changed.connect(self._on_busy)
        m.progress.connect(self._on_progress)
        m.preview.connect(self._on_preview)
        m.results_changed.connect(self._show_results)
        m.error.connect(self._on_error)
        m.notice.connect(self.notice.setText)
        self.connect_button.clicked.connect(self._reconnect)
        self.url.editingFinished.connect(self._reconnect)
        self.token.editingFinished.connect(self._reconnect)
        self.local_button.clicked.connect(self._toggle_local)
        self.local_bridge.ready.connect(self._on_local_ready)
        self.local_bridge.stopped.connect(self._on_local_stopped)
        self.generate_button.clicked.connect(lambda: self._run("generate"))
        self.variants_button.clicked.connect(lambda: self._run("variants"))
        self.regenerate_button.clicked.connect(lambda: self._run("regenerate"))
        self.cancel_button.clicked.connect(m.cancel)
        self.thumbs.itemClicked.connect(self._on_pick)
        self.seed_random.clicked.connect(lambda: self.seed.setValue(random.randrange(2**31)))
        self.prompt.textChanged.connect(self._changed)
        self.negative.textEdited.connect(self._changed)
        for spin in (self.seed, self.steps, self.variants):
            spin.valueChanged.connect(self._changed)
        self.strength.valueChanged.connect(self._changed)
        self.size_policy.currentIndexChanged.connect(self._changed)

    # -- document and settings -----------------------------------------------------------------------

    def set_document(self, doc) -> None:
        """Show `doc`'s settings and layers (None: no document)."""
        if self._save_timer.isActive():
            self.save_settings()
        self.doc = doc
        self.doc_key = document.document_key(doc) if doc is not None else ""
        self.settings = document.load_settings(doc) if doc is not None else DocumentSettings()
        self._snapshot = self.settings.to_json()
        self._dirty = False
        self._listed = []
        self._load_widgets()
        self.refresh()
        self._show_results()

    def refresh(self) -> None:
        """Follow the active document and its layer list (called every 1.5 s and on demand)."""
        doc = self.host.active_document()
        key = document.document_key(doc) if doc is not None else ""
        if key != self.doc_key:
            self.set_document(doc)
            return
        if doc is None:
            if self.rows or self._listed:
                self._listed = []
                self._rebuild_rows([])
            return
        if not self._dirty:
            stored = document.load_settings(doc)
            if stored.to_json() != self._snapshot:  # changed elsewhere (a script, the model): show it
                self.settings, self._snapshot, self._listed = stored, stored.to_json(), []
                self._load_widgets()
        listed = document.list_layers(doc, self.settings.results_group)
        signature = [(n.uid, n.name, n.kind, n.depth) for n in listed]
        if signature != self._listed:
            self._listed = signature
            self._rebuild_rows(listed)

    def _rebuild_rows(self, listed: list[NodeInfo]) -> None:
        for row in self.rows.values():
            row.setParent(None)
            row.deleteLater()
        self.rows = {}
        self.layer_settings = self.settings.resolve([(n.uid, n.name) for n in listed])
        for info in reversed(listed):  # top first, as in Krita's Layers docker
            row = LayerRow(info)
            row.load(self.layer_settings[info.uid])
            row.changed.connect(lambda uid=info.uid: self._row_changed(uid))
            self.layers_layout.addWidget(row)
            self.rows[info.uid] = row
        self.no_layers.setVisible(not listed)
        if self.doc is None:
            self.no_layers.setText("Open a document: its visible layers appear here.")
        else:
            self.no_layers.setText("No visible layer: show or paint a layer.")

    def _load_widgets(self) -> None:
        s = self.settings
        self._loading = True
        try:
            self.prompt.setPlainText(s.prompt)
            self.negative.setText(s.negative_prompt)
            self.seed.setValue(min(s.seed, 2**31 - 1))
            self.steps.setValue(s.steps)
            self.variants.setValue(s.variants)
            self.strength.setValue(s.strength)
            index = self.size_policy.findData(s.size_policy)
            self.size_policy.setCurrentIndex(max(0, index))
        finally:
            self._loading = False

    def _changed(self, *_args) -> None:
        if self._loading or self.doc is None:
            return
        s = self.settings
        s.prompt = self.prompt.toPlainText()
        s.negative_prompt = self.negative.text()
        s.seed = self.seed.value()
        s.steps = self.steps.value()
        s.variants = self.variants.value()
        s.strength = round(self.strength.value(), 4)
        s.size_policy = self.size_policy.currentData() or "document"
        self._dirty = True
        self._save_timer.start(400)

    def _row_changed(self, uid: str) -> None:
        row, entry = self.rows.get(uid), self.layer_settings.get(uid)
        if row is not None and entry is not None:
            row.store(entry)
            self._dirty = True
            self._save_timer.start(400)

    def save_settings(self) -> None:
        """Write the edits made in the dock into the document (nothing when there are none)."""
        self._save_timer.stop()
        if self.doc is None or not self._dirty:
            return
        try:
            self.settings.update_layers(self.layer_settings)
            stored = document.load_settings(self.doc)
            self.settings.results_group = stored.results_group or self.settings.results_group
            document.save_settings(self.doc, self.settings)
            self._snapshot = self.settings.to_json()
            self._dirty = False
        except RuntimeError:  # the document was closed meanwhile
            self.doc = None

    # -- actions -------------------------------------------------------------------------------------

    def _run(self, kind: str) -> None:
        self.save_settings()
        self.error.clear()
        doc = self.host.active_document()
        if doc is not None and document.document_key(doc) != self.doc_key:
            self.set_document(doc)
        self.model.generate(doc, kind)

    def _reconnect(self) -> None:
        self.host.write_setting("url", self.url.text().strip())
        self.host.write_setting("token", self.token.text().strip())
        self.model.configure(self.url.text(), self.token.text())

    def _toggle_local(self) -> None:
        if self.local_bridge.running:
            self.local_bridge.stop()
            return
        problem = self.local_bridge.start(LOCAL_PORT)
        if problem:
            self._on_error(problem)
            return
        self.local_button.setText("Stop local bridge")
        self.url.setText(f"http://127.0.0.1:{LOCAL_PORT}")
        self.status.setText("Starting the local bridge…")

    def _on_local_ready(self, url: str) -> None:
        self.url.setText(url)
        self._reconnect()

    def _on_local_stopped(self, message: str) -> None:
        self.local_button.setText("Start local bridge")
        self.notice.setText(message)
        self.model.check_connection()

    def _on_pick(self, item) -> None:
        index = self.thumbs.row(item)
        seed = self.model.pick(self.doc, index)
        if seed is not None:
            self.notice.setText(f"Showing variant {index + 1} (seed {seed}); Generate reproduces it.")
            self.seed.setValue(seed % 2**31)

    # -- model signals -------------------------------------------------------------------------------

    def _on_connection(self, state: str, text: str) -> None:
        color = STATE_COLORS.get(state, "#888")
        self.status.setText(f'<span style="color:{color}">●</span> {text}')

    def _on_busy(self, busy: bool) -> None:
        for button in (self.generate_button, self.variants_button, self.regenerate_button):
            button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)
        if busy:
            self.preview.clear()
        else:
            self.preview.hide()

    def _on_progress(self, text: str, fraction: float) -> None:
        self.progress.setValue(int(fraction * 1000))
        self.progress.setFormat(text)

    def _on_preview(self, png: bytes) -> None:
        pixmap = qt.QPixmap()
        if pixmap.loadFromData(png, "PNG"):
            self.preview.setPixmap(pixmap.scaled(128, 128, qt.Qt.AspectRatioMode.KeepAspectRatio))
            self.preview.show()

    def _on_error(self, text: str) -> None:
        self.error.setText(text)

    def _show_results(self) -> None:
        self.thumbs.clear()
        last = self.model.results_for(self.doc)
        if last is None:
            return
        for entry in last.entries:
            pixmap = qt.QPixmap()
            pixmap.loadFromData(entry.png, "PNG")
            icon = qt.QIcon(pixmap.scaled(96, 96, qt.Qt.AspectRatioMode.KeepAspectRatio))
            item = W.QListWidgetItem(icon, f"seed {entry.seed}")
            item.setToolTip(entry.name)
            self.thumbs.addItem(item)
        self.thumbs.setCurrentRow(last.picked)

    def shutdown(self) -> None:
        self.save_settings()
        self._watch.stop()
        self.model.stop_monitor()
        self.local_bridge.stop()


def make_dock_class():
    """The Krita docker class (defined lazily: `krita` exists only inside Krita)."""
    from krita import DockWidget

    class CollageDock(DockWidget):
        def __init__(self):
            super().__init__()
            self.setWindowTitle(DOCK_TITLE)
            self.panel = CollagePanel(KritaHost())
            self.setWidget(self.panel)
            self.panel.model.start_monitor()
            qt.QtWidgets.QApplication.instance().aboutToQuit.connect(self.panel.shutdown)

        def canvasChanged(self, canvas) -> None:  # noqa: N802 - Krita's name
            self.panel.refresh()

    return CollageDock
