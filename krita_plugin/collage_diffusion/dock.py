"""The dock: widgets only. State and actions live in `model.CollageModel`, document access in
`document.py`, settings in the document's annotation (`settings.py`). The panel's sections are in
`dock_sections.py` (the model and LoRAs in `dock_models.py`), its small widgets (slider, layer
row) in `dock_widgets.py`.

`CollagePanel` is a plain QWidget given a `host` (what it needs from Krita: the active document
and Krita's settings), so tests and the screenshot script can build it without Krita's docker
machinery; `CollageDock` puts it into a Krita docker.
"""

from __future__ import annotations

from . import actions, choices, document, preview_layer, qt
from .bridge_process import make_local_bridge
from .collage import NodeInfo, layer_marks
from .dock_models import ModelSection
from .dock_sections import (
    ActionsSection,
    BridgeSection,
    LayersSection,
    OptionsSection,
    PromptSection,
    ResultsSection,
)
from .dock_widgets import LayerRow
from .model import CollageModel
from .settings import DocumentSettings, LayerSettings

W = qt.QtWidgets
SETTINGS_GROUP = "collage_diffusion"
DOCK_ID = "collage_diffusion_dock"
DOCK_TITLE = "Collage Diffusion"
LOCAL_PORT = 7870


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
        self._listed: list[tuple] = []
        self._infos: list[NodeInfo] = []  # the listed layers, with what keeps each out
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
        self._on_info()
        actions.register_panel(self)  # Krita's actions (shortcuts) call the action_* methods

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
        self.bridge_section = BridgeSection(self.model.client.url, self.model.client.token)
        self.model_section = ModelSection()
        self.prompt_section = PromptSection()
        self.layers_section = LayersSection()
        self.options_section = OptionsSection()
        self.actions_section = ActionsSection()
        self.results_section = ResultsSection()
        for section in (
            self.bridge_section,
            self.model_section,
            self.prompt_section,
            self.layers_section,
            self.options_section,
            self.actions_section,
            self.results_section,
        ):
            v.addWidget(section)
        v.addStretch(1)
        # The widgets scripts and tests reach through the panel.
        self.url, self.token = self.bridge_section.url, self.bridge_section.token
        self.prompt = self.prompt_section.prompt
        self.variants_button = self.actions_section.variants_button
        self.progress, self.notice, self.error = (
            self.actions_section.progress,
            self.actions_section.notice,
            self.actions_section.error,
        )

    @property
    def rows(self) -> dict[str, LayerRow]:
        """The layer rows by node uid."""
        return self.layers_section.rows

    def _connect(self) -> None:
        m = self.model
        m.connection_changed.connect(self.bridge_section.show_connection)
        m.busy_changed.connect(self._on_busy)
        m.progress.connect(self.actions_section.show_progress)
        m.preview.connect(self.results_section.show_preview)
        m.results_changed.connect(self._show_results)
        m.error.connect(self._on_error)
        m.notice.connect(self.notice.setText)
        m.info_changed.connect(self._on_info)
        self.model_section.changed.connect(self._changed)
        self.model_section.refresh_requested.connect(m.check_connection)
        self.bridge_section.connect_button.clicked.connect(self._reconnect)
        self.url.editingFinished.connect(self._reconnect)
        self.token.editingFinished.connect(self._reconnect)
        self.bridge_section.local_button.clicked.connect(self._toggle_local)
        self.local_bridge.ready.connect(self._on_local_ready)
        self.local_bridge.stopped.connect(self._on_local_stopped)
        self.actions_section.generate_button.clicked.connect(lambda: self._run("generate"))
        self.actions_section.variants_button.clicked.connect(lambda: self._run("variants"))
        self.actions_section.regenerate_button.clicked.connect(lambda: self._run("regenerate"))
        self.actions_section.cancel_button.clicked.connect(m.cancel)
        self.results_section.thumbs.itemClicked.connect(self._on_pick)
        self.results_section.discard_button.clicked.connect(self.discard_selected)
        self.layers_section.row_changed.connect(self._row_changed)
        self.prompt.textChanged.connect(self._changed)
        self.prompt_section.negative.textEdited.connect(self._changed)
        o = self.options_section
        for spin in (o.seed, o.steps, o.variants):
            spin.valueChanged.connect(self._changed)
        o.strength.valueChanged.connect(self._changed)
        o.size_policy.currentIndexChanged.connect(self._changed)
        o.output.currentIndexChanged.connect(self._changed)

    # -- document and settings -----------------------------------------------------------------------

    def set_document(self, doc) -> None:
        """Show `doc`'s settings and layers (None: no document)."""
        if self._save_timer.isActive():
            self.save_settings()
        self.doc = doc
        self.doc_key = document.document_key(doc)
        self.settings = document.load_settings(doc) if doc is not None else DocumentSettings()
        if doc is not None and not self.model.busy:  # a preview layer saved into the file mid-job
            preview_layer.remove_stale(doc, self.settings.results_group)
        self._snapshot = self.settings.to_json()
        self._dirty = False
        self._listed = []
        self._load_widgets()
        self.refresh()
        self._show_results()

    def refresh(self) -> None:
        """Follow the active document and its layer list (called every 1.5 s and on demand)."""
        doc = self.host.active_document()
        key = document.document_key(doc)
        if not key:  # none, or closed (a script or a test may still hold a closed one)
            doc = None
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
        else:
            self._infos = listed
            self._show_marks()  # bounds, opacity and groups' visibility change without new rows

    def _rebuild_rows(self, listed: list[NodeInfo]) -> None:
        self._infos = listed
        self.layer_settings = self.settings.resolve([(n.uid, n.name) for n in listed])
        self.layers_section.show_layers(listed, self.layer_settings, self.doc is not None)
        self._show_marks()

    def _show_marks(self) -> None:
        self.layers_section.show_marks(layer_marks(self._infos, self.layer_settings))

    def _load_widgets(self) -> None:
        s = self.settings
        self._loading = True
        try:
            self.prompt_section.load(s)
            self.model_section.load(s)
            self.options_section.load(s)
        finally:
            self._loading = False
        self._offer_looks()

    def _changed(self, *_args) -> None:
        if self._loading or self.doc is None:
            return
        self.prompt_section.store(self.settings)
        self.model_section.store(self.settings)
        self._offer_looks()  # the model (so its family) may have changed
        self.options_section.store(self.settings)
        self._dirty = True
        self._save_timer.start(400)

    def _row_changed(self, uid: str) -> None:
        row, entry = self.rows.get(uid), self.layer_settings.get(uid)
        if row is not None and entry is not None:
            row.store(entry)
            self._show_marks()  # a text given (or taken away) changes "not described"
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
        self.bridge_section.local_button.setText("Stop local bridge")
        self.url.setText(f"http://127.0.0.1:{LOCAL_PORT}")
        self.bridge_section.status.setText("Starting the local bridge…")

    def _on_local_ready(self, url: str) -> None:
        self.url.setText(url)
        self._reconnect()

    def _on_local_stopped(self, message: str) -> None:
        self.bridge_section.local_button.setText("Start local bridge")
        self.notice.setText(message)
        self.model.check_connection()

    def _on_pick(self, item) -> None:
        job, index = item.data(qt.Qt.ItemDataRole.UserRole)
        self._show_result(index, job)

    def _show_variant(self, index: int) -> None:
        self._show_result(index, None)

    def _show_result(self, index: int, job: int | None) -> None:
        """Show result `index` of job `job` (None: the current job), hiding the other results."""
        seed = self.model.pick(self.doc, index, job)
        if seed is not None:
            self._show_results()
            self.notice.setText(f"Showing the result with seed {seed}; Generate reproduces it.")
            self.options_section.seed.setValue(seed % 2**31)

    def discard_selected(self) -> None:
        """Remove the selected thumbnail's result layer (one this dock made), and its thumbnail."""
        where = self.results_section.selected()
        jobs = self.model.jobs_for(self.doc)
        if where is None or not 0 <= where[0] < len(jobs) or not 0 <= where[1] < len(jobs[where[0]].entries):
            self.notice.setText("Select a result to discard first.")
            return
        self.error.clear()
        self.model.discard(self.doc, jobs[where[0]].entries[where[1]].node_uid)

    # -- Krita actions (actions.py): the same as the dock's buttons ----------------------------------

    def action_generate(self) -> None:
        self._run("generate")

    def action_variants(self) -> None:
        self._run("variants")

    def action_regenerate(self) -> None:
        self._run("regenerate")

    def action_cancel(self) -> None:
        self.model.cancel()

    def action_next_variant(self) -> None:
        self._step_variant(1)

    def action_previous_variant(self) -> None:
        self._step_variant(-1)

    def _step_variant(self, step: int) -> None:
        self.refresh()  # follow the active document first, as a button press would
        last = self.model.results_for(self.doc)
        if last is None or len(last.entries) < 2:
            self.notice.setText("No variants to step through: press Variants first.")
            return
        self._show_variant((last.picked + step) % len(last.entries))

    # -- model signals -------------------------------------------------------------------------------

    def _on_busy(self, busy: bool) -> None:
        self.actions_section.set_busy(busy)
        self.results_section.set_busy(busy)

    def _on_info(self) -> None:
        self.model_section.show_info(self.model.info)
        self._offer_looks()

    def _offer_looks(self) -> None:
        """The looks the bridge can do for the chosen model (IP-Adapter only where it has one)."""
        info = self.model.info
        self.layers_section.offer_ip_adapter(choices.ip_adapter_missing(info, self.settings.model))

    def _on_error(self, text: str) -> None:
        self.error.setText(text)

    def _show_results(self) -> None:
        self.results_section.show_results(self.model.jobs_for(self.doc), self.model.results_for(self.doc))

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
