"""The dock's small widgets: a labelled float `Slider` and one `LayerRow` per layer."""

from __future__ import annotations

from . import qt
from .collage import NodeInfo, is_default_name
from .settings import LayerSettings

W = qt.QtWidgets

#: What to do about each mark (by its first words), as the row's tooltip.
MARK_TIPS = {
    "empty": "Nothing is painted on this layer.",
    "no pixel on the canvas": "The layer lies entirely outside the canvas: move it in.",
    "hidden by group": "A group around this layer is hidden: show the group.",
    "at opacity 0": "Raise the layer's (or its group's) opacity in Krita.",
    "not described": "Its name says nothing about what it shows: type what it shows here.",
    "the background": "The bottom 'Background' is the image's background; type a text to make it an object.",
}
#: The "look" choices (the wire's appearance modes) and what each does, as the combo's tooltip.
LOOKS = ("off", "reference", "learned", "ip-adapter")
LOOK_TIP = (
    "Keep this layer's look in the result:\n"
    "off: only its text and region guide it\n"
    "reference: training-free, uses the layer's own pixels (weight: how strongly)\n"
    "learned: textual inversion of the layer, slow the first time (then cached)\n"
    "ip-adapter: the layer's image through the bridge's IP-Adapter, in its region only (weight: how"
    " strongly); offered when the bridge has one for the model"
)
#: The looks whose weight (the spin box beside the combo) means something.
WEIGHTED_LOOKS = ("reference", "ip-adapter")
KIND_MARKS = {"paintlayer": "", "vectorlayer": " (vector)", "filelayer": " (file)", "filllayer": " (fill)"}


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
    """One layer: take part or not, its text, strength, attention and control weights, its look."""

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
        self.look_label = W.QLabel("look:")
        self.appearance = W.QComboBox()
        self.appearance.addItems(list(LOOKS))
        self.appearance.setToolTip(LOOK_TIP)
        self.look_label.setToolTip(LOOK_TIP)
        self.appearance_weight = W.QDoubleSpinBox()
        self.appearance_weight.setRange(0.0, 10.0)
        self.appearance_weight.setSingleStep(0.5)
        self.appearance_weight.setDecimals(1)
        self.appearance_weight.setValue(1.0)
        self.appearance_weight.setToolTip(
            "How strongly the reference or the IP-Adapter keeps the layer's look (0: not at all)"
        )
        top.addWidget(self.enabled, 1)
        top.addWidget(self.look_label)
        top.addWidget(self.appearance)
        top.addWidget(self.appearance_weight)
        layout.addLayout(top)
        self.mark = W.QLabel()  # why the layer will not take part (collage.layer_marks), if so
        self.mark.setWordWrap(True)
        self.mark.setStyleSheet("color: gray; font-style: italic;")
        self.mark.hide()
        layout.addWidget(self.mark)
        self.reason = ""
        self._wanted = True  # the user's tick, kept while a mark shows the layer unticked
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
        self.appearance.currentIndexChanged.connect(self._on_look)
        self.appearance_weight.valueChanged.connect(lambda _v: self.changed.emit())
        self.text.textEdited.connect(lambda _t: self.changed.emit())

    def load(self, s: LayerSettings) -> None:
        quiet = (self.enabled, self.appearance, self.appearance_weight, self.text)
        for widget in quiet:
            widget.blockSignals(True)
        self._wanted = s.enabled
        self.enabled.setChecked(s.enabled and not self.reason)
        self.appearance.setCurrentIndex(LOOKS.index(s.appearance) if s.appearance in LOOKS else 0)
        self.appearance_weight.setValue(s.appearance_weight)
        self.text.setText(s.text)
        for widget in quiet:
            widget.blockSignals(False)
        self.strength.set_value(s.strength)
        self.attention.set_value(s.attention_weight)
        self.control.set_value(s.control_weight)
        self._show_enabled(s.enabled)

    def store(self, s: LayerSettings) -> None:
        s.enabled = self._wanted
        s.appearance = LOOKS[max(0, self.appearance.currentIndex())]
        s.appearance_weight = self.appearance_weight.value()
        s.text = self.text.text()
        s.strength = self.strength.value()
        s.attention_weight = self.attention.value()
        s.control_weight = self.control.value()

    def offer_ip_adapter(self, why_not: str) -> None:
        """Offer the "ip-adapter" look, or show it greyed with `why_not` (the bridge has none for
        the model). A layer that already has it keeps it, marked, so the document loses nothing;
        Generate then says why it cannot run (`choices.ip_adapter_problems`)."""
        item = self.appearance.model().item(LOOKS.index("ip-adapter"))
        item.setEnabled(not why_not)
        item.setToolTip(why_not)
        item.setText("ip-adapter" + (" (not available)" if why_not else ""))

    def _on_look(self, _index: int) -> None:
        self._show_enabled(self._wanted)
        self.changed.emit()

    def _on_enabled(self, on: bool) -> None:
        self._wanted = on
        self._show_enabled(on)
        self.changed.emit()

    #: Marks a painter fixes in this row (a text makes the layer an object): its text stays editable.
    FIXED_BY_TEXT = ("not described", "the background")

    def show_mark(self, reason: str) -> None:
        """Show the layer as left out, and why ("" : it takes part as its tick says): greyed and
        unticked in effect, the user's tick kept for when the reason goes."""
        if reason == self.reason:
            return
        self.reason = reason
        self.mark.setText(f"left out: {reason}" if reason else "")
        self.mark.setVisible(bool(reason))
        self.mark.setToolTip(MARK_TIPS.get(reason.split(" '")[0], ""))
        blocked = self.enabled.blockSignals(True)
        self.enabled.setChecked(self._wanted and not reason)
        self.enabled.blockSignals(blocked)
        self.enabled.setEnabled(not reason)
        self._show_enabled(self._wanted)

    def _show_enabled(self, on: bool) -> None:
        on = on and not self.reason
        for widget in (self.strength, self.attention, self.control, self.look_label, self.appearance):
            widget.setEnabled(on)
        # the weight is the reference's and the IP-Adapter's alone
        look = LOOKS[max(0, self.appearance.currentIndex())]
        self.appearance_weight.setEnabled(on and look in WEIGHTED_LOOKS)
        self.text.setEnabled(on or (self._wanted and self.reason in self.FIXED_BY_TEXT))
