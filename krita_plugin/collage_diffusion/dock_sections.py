"""The dock's sections, top to bottom: bridge, prompt, layers, options, actions, results.

Each section builds its widgets and shows what it is given; `dock.CollagePanel` wires them to the
model and the document.
"""

from __future__ import annotations

import random

from . import qt
from .collage import NodeInfo
from .dock_widgets import LayerRow
from .model import CONNECTED, CONNECTING, DISCONNECTED, REFUSED
from .settings import OUTPUTS, SIZE_POLICIES, DocumentSettings, LayerSettings

W = qt.QtWidgets

STATE_COLORS = {CONNECTED: "#3a3", CONNECTING: "#c90", DISCONNECTED: "#c33", REFUSED: "#c33"}


def _bare_layout(widget: W.QWidget, kind=None):
    """A layout filling `widget` with no margins, so the section sits in the panel as its
    widgets would on their own."""
    layout = (kind or W.QVBoxLayout)(widget)
    layout.setContentsMargins(0, 0, 0, 0)
    return layout


class BridgeSection(W.QGroupBox):
    """Address, token, connect, start/stop a local bridge, connection state."""

    def __init__(self, url: str, token: str, parent=None):
        super().__init__("Bridge", parent)
        form = W.QGridLayout(self)
        self.url = W.QLineEdit(url)
        self.url.setToolTip(
            "The bridge's address, e.g. http://127.0.0.1:7870 or a GPU machine on the network"
        )
        self.token = W.QLineEdit(token)
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

    def show_connection(self, state: str, text: str) -> None:
        color = STATE_COLORS.get(state, "#888")
        self.status.setText(f'<span style="color:{color}">●</span> {text}')


class PromptSection(W.QWidget):
    """The prompt of the whole image and the negative prompt."""

    def __init__(self, parent=None):
        super().__init__(parent)
        v = _bare_layout(self)
        v.addWidget(W.QLabel("Prompt (the whole image)"))
        self.prompt = W.QPlainTextEdit()
        self.prompt.setPlaceholderText("a bento box with salmon sushi and pickled ginger, studio photo")
        self.prompt.setFixedHeight(56)
        v.addWidget(self.prompt)
        self.negative = W.QLineEdit()
        self.negative.setPlaceholderText("negative prompt: what to avoid")
        v.addWidget(self.negative)

    def load(self, s: DocumentSettings) -> None:
        self.prompt.setPlainText(s.prompt)
        self.negative.setText(s.negative_prompt)

    def store(self, s: DocumentSettings) -> None:
        s.prompt = self.prompt.toPlainText()
        s.negative_prompt = self.negative.text()


class LayersSection(W.QGroupBox):
    """One `LayerRow` per listed layer, top first; `row_changed(uid)` when one is edited."""

    row_changed = qt.pyqtSignal(str)

    def __init__(self, parent=None):
        super().__init__("Layers taking part", parent)
        self.rows: dict[str, LayerRow] = {}
        self.ip_adapter_why_not = ""  # why the "ip-adapter" look is not offered ("" : it is)
        self.rows_layout = W.QVBoxLayout(self)
        self.rows_layout.setSpacing(3)
        self.no_layers = W.QLabel("Open a document: its visible layers appear here.")
        self.no_layers.setWordWrap(True)
        self.rows_layout.addWidget(self.no_layers)

    def show_layers(
        self, listed: list[NodeInfo], settings: dict[str, LayerSettings], has_document: bool
    ) -> None:
        for row in self.rows.values():
            row.setParent(None)
            row.deleteLater()
        self.rows = {}
        for info in reversed(listed):  # top first, as in Krita's Layers docker
            row = LayerRow(info)
            row.offer_ip_adapter(self.ip_adapter_why_not)
            row.load(settings[info.uid])
            row.changed.connect(lambda uid=info.uid: self.row_changed.emit(uid))
            self.rows_layout.addWidget(row)
            self.rows[info.uid] = row
        self.no_layers.setVisible(not listed)
        if not has_document:
            self.no_layers.setText("Open a document: its visible layers appear here.")
        else:
            self.no_layers.setText("No visible layer: show or paint a layer.")

    def offer_ip_adapter(self, why_not: str) -> None:
        """Offer the "ip-adapter" look in every row ("") or grey it out with why."""
        if why_not == self.ip_adapter_why_not:
            return  # asked on every edit in the dock; rows built later take it in show_layers
        self.ip_adapter_why_not = why_not
        for row in self.rows.values():
            row.offer_ip_adapter(why_not)

    def show_marks(self, marks: dict[str, str]) -> None:
        """Mark each row whose layer will not take part with why (`collage.layer_marks`)."""
        for uid, row in self.rows.items():
            row.show_mark(marks.get(uid, ""))


class OptionsSection(W.QWidget):
    """Seed, steps, variants, size and the background's strength."""

    def __init__(self, parent=None):
        super().__init__(parent)
        opts = _bare_layout(self, W.QGridLayout)
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
        self.output = W.QComboBox()  # "Result as": one layer, or one layer per object + background
        for key, label in OUTPUTS.items():
            self.output.addItem(label, key)
        self.output.setToolTip("Layer stack: one layer per object and a background with their places filled")
        opts.addWidget(W.QLabel("Result as"), 4, 0)
        opts.addWidget(self.output, 4, 1, 1, 3)
        opts.setColumnStretch(1, 1)
        opts.setColumnStretch(3, 1)
        self.seed_random.clicked.connect(lambda: self.seed.setValue(random.randrange(2**31)))

    def load(self, s: DocumentSettings) -> None:
        self.seed.setValue(min(s.seed, 2**31 - 1))
        self.steps.setValue(s.steps)
        self.variants.setValue(s.variants)
        self.strength.setValue(s.strength)
        index = self.size_policy.findData(s.size_policy)
        self.size_policy.setCurrentIndex(max(0, index))
        self.output.setCurrentIndex(max(0, self.output.findData(s.output)))

    def store(self, s: DocumentSettings) -> None:
        s.seed = self.seed.value()
        s.steps = self.steps.value()
        s.variants = self.variants.value()
        s.strength = round(self.strength.value(), 4)
        s.size_policy = self.size_policy.currentData() or "auto"
        s.output = self.output.currentData() or "image"


class ActionsSection(W.QWidget):
    """Generate, variants, regenerate, cancel; the progress bar, notices and errors."""

    def __init__(self, parent=None):
        super().__init__(parent)
        v = _bare_layout(self)
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

    def set_busy(self, busy: bool) -> None:
        for button in (self.generate_button, self.variants_button, self.regenerate_button):
            button.setEnabled(not busy)
        self.cancel_button.setEnabled(busy)

    def show_progress(self, text: str, fraction: float) -> None:
        self.progress.setValue(int(fraction * 1000))
        self.progress.setFormat(text)


class ResultsSection(W.QWidget):
    """The live preview while a job runs, and the recent jobs' results as thumbnails (newest
    first), with Discard."""

    def __init__(self, parent=None):
        super().__init__(parent)
        v = _bare_layout(self)
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
        self.thumbs.setToolTip(
            "This document's recent results, newest first: click one to show it and hide the other"
            " results (its seed goes into the Seed field)"
        )
        self.discard_button = W.QPushButton("Discard")
        self.discard_button.setToolTip(
            "Remove the selected result's layer (one this dock made) from 'Collage results'"
        )
        self.discard_button.setEnabled(False)
        row = W.QHBoxLayout()
        row.addWidget(W.QLabel("Results"), 1)
        row.addWidget(self.discard_button)
        v.addLayout(row)
        v.addWidget(self.thumbs)

    def set_busy(self, busy: bool) -> None:
        if busy:
            self.preview.clear()
        else:
            self.preview.hide()

    def show_preview(self, png: bytes) -> None:
        pixmap = qt.QPixmap()
        if pixmap.loadFromData(png, "PNG"):
            self.preview.setPixmap(pixmap.scaled(128, 128, qt.Qt.AspectRatioMode.KeepAspectRatio))
            self.preview.show()

    def show_results(self, jobs: list, current=None) -> None:
        """`jobs`: the model's recent jobs of the document, oldest first (each with entries holding
        png, seed, name, and `picked`); `current`: the one whose picked result is selected."""
        self.thumbs.clear()
        for j in reversed(range(len(jobs))):
            for i, entry in enumerate(jobs[j].entries):
                pixmap = qt.QPixmap()
                pixmap.loadFromData(entry.png, "PNG")
                icon = qt.QIcon(pixmap.scaled(96, 96, qt.Qt.AspectRatioMode.KeepAspectRatio))
                item = W.QListWidgetItem(icon, f"seed {entry.seed}")
                item.setToolTip(entry.name)
                item.setData(qt.Qt.ItemDataRole.UserRole, (j, i))
                self.thumbs.addItem(item)
                if jobs[j] is current and i == current.picked:
                    self.thumbs.setCurrentItem(item)
        self.discard_button.setEnabled(self.thumbs.count() > 0)

    def selected(self) -> tuple[int, int] | None:
        """(job, index) of the selected thumbnail, or None."""
        item = self.thumbs.currentItem()
        return tuple(item.data(qt.Qt.ItemDataRole.UserRole)) if item is not None else None
