"""The dock's model section: the model picker, the LoRA list, the ControlNet picker and the clip
skip, filled from the bridge's /info (`choices.py` decides the entries; this module only shows them). Saved with the document by
`dock.CollagePanel` through `load`/`store`, like the other sections."""

from __future__ import annotations

from . import choices, qt
from .settings import DocumentSettings, LoraChoice
from .wire_request import MAX_CLIP_SKIP, MAX_LORA_WEIGHT, MAX_LORAS
from .wire_responses import InfoResponse

W = qt.QtWidgets
WARN_STYLE = "color: #d44;"
CLIP_SKIP_AUTO = "auto (model default)"
CLIP_SKIP_TIP = (
    "Which text-encoder layer reads the prompt, counted as in A1111: 1 = the last, 2 = the one"
    " before it. Auto is the model family's default (SD 1.x: 1, SDXL: 2); anime SD 1.5 models"
    " and Pony/Illustrious SDXL models are usually made for 2. Saved with the document"
)
CONTROLNET_TIP = (
    "The ControlNet that makes a layer's edges guide the picture. It only matters for layers whose"
    " control (ctrl) weight is above 0; without one no ControlNet runs. Lists the bridge's"
    " ControlNets made for the chosen model's family; saved with the document"
)


class LoraRow(W.QWidget):
    """One chosen LoRA: its name (and what is wrong with it), its weight, a remove button."""

    changed = qt.pyqtSignal()
    removed = qt.pyqtSignal()

    def __init__(self, choice: LoraChoice, parent=None):
        super().__init__(parent)
        self.name = choice.name
        row = W.QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        self.label = W.QLabel(choice.name)
        self.label.setToolTip(choice.name)
        self.label.setMinimumWidth(40)
        self.weight = W.QDoubleSpinBox()
        self.weight.setRange(-MAX_LORA_WEIGHT, MAX_LORA_WEIGHT)
        self.weight.setSingleStep(0.05)
        self.weight.setDecimals(2)
        self.weight.setValue(choice.weight)
        self.weight.setToolTip("The LoRA's weight: 1 as made, 0 no effect, negative the opposite")
        self.remove = W.QToolButton()
        self.remove.setText("✕")
        self.remove.setToolTip("Remove this LoRA")
        row.addWidget(self.label, 1)
        row.addWidget(self.weight)
        row.addWidget(self.remove)
        self.weight.valueChanged.connect(lambda _v: self.changed.emit())
        self.remove.clicked.connect(self.removed.emit)

    def choice(self) -> LoraChoice:
        return LoraChoice(self.name, round(self.weight.value(), 4))

    def show_mark(self, mark: str) -> None:
        self.label.setText(f"{self.name} ({mark})" if mark else self.name)
        self.label.setToolTip(f"{self.name}: {mark}" if mark else self.name)  # the dock may cut the text
        self.label.setStyleSheet(WARN_STYLE if mark else "")


class ModelSection(W.QGroupBox):
    """The model (the bridge's default or another it lists), the LoRAs with their weights, the
    ControlNet and the clip skip. `changed()` when the painter edits any; `refresh_requested()`
    for the ↻ button."""

    changed = qt.pyqtSignal()
    refresh_requested = qt.pyqtSignal()

    def __init__(self, parent=None):
        super().__init__("Model", parent)
        self.info: InfoResponse | None = None
        self.model_name = ""  # the document's choice, also while the bridge does not list it
        self.controlnet_name = ""  # the same for the ControlNet ("": the bridge's own)
        self.rows: list[LoraRow] = []
        v = W.QVBoxLayout(self)
        top = W.QHBoxLayout()
        self.model = W.QComboBox()
        self.model.setToolTip("The model to generate with (from the bridge's list); saved with the document")
        self.model.setSizeAdjustPolicy(W.QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.model.setMinimumContentsLength(12)
        self.refresh_button = W.QToolButton()
        self.refresh_button.setText("↻")
        self.refresh_button.setToolTip("Ask the bridge again for its models and LoRAs (new files show up)")
        top.addWidget(self.model, 1)
        top.addWidget(self.refresh_button)
        v.addLayout(top)
        self.note = W.QLabel()
        self.note.setWordWrap(True)
        self.note.setStyleSheet(WARN_STYLE)
        self.note.hide()
        v.addWidget(self.note)
        self.lora_layout = W.QVBoxLayout()
        self.lora_layout.setSpacing(1)
        v.addLayout(self.lora_layout)
        add = W.QHBoxLayout()
        self.add_combo = W.QComboBox()
        self.add_combo.setSizeAdjustPolicy(W.QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.add_combo.setMinimumContentsLength(10)
        self.add_button = W.QPushButton("Add LoRA")
        self.all_families = W.QCheckBox("all")
        self.all_families.setToolTip("Also offer LoRAs made for other model families than the chosen model's")
        add.addWidget(self.add_combo, 1)
        add.addWidget(self.add_button)
        add.addWidget(self.all_families)
        v.addLayout(add)
        form = W.QFormLayout()
        form.setContentsMargins(0, 0, 0, 0)
        self.controlnet = W.QComboBox()
        self.controlnet.setToolTip(CONTROLNET_TIP)
        self.controlnet.setSizeAdjustPolicy(
            W.QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
        )
        self.controlnet.setMinimumContentsLength(10)
        self.clip_skip = W.QComboBox()
        self.clip_skip.setToolTip(CLIP_SKIP_TIP)
        self.clip_skip.addItem(CLIP_SKIP_AUTO, 0)  # 0: None in the settings (a null item data reads badly)
        for n in range(1, MAX_CLIP_SKIP + 1):
            self.clip_skip.addItem(str(n), n)
        form.addRow("ControlNet", self.controlnet)
        form.addRow("Clip skip", self.clip_skip)
        form.labelForField(self.controlnet).setToolTip(CONTROLNET_TIP)
        form.labelForField(self.clip_skip).setToolTip(CLIP_SKIP_TIP)
        v.addLayout(form)
        self.model.currentIndexChanged.connect(self._on_model)
        self.controlnet.currentIndexChanged.connect(self._on_controlnet)
        self.clip_skip.currentIndexChanged.connect(lambda _i: self.changed.emit())
        self.add_button.clicked.connect(self._on_add)
        self.all_families.toggled.connect(lambda _on: self._show_offer())
        self.refresh_button.clicked.connect(self.refresh_requested.emit)
        self.show_info(None)

    # -- what the bridge offers ----------------------------------------------------------------------

    def show_info(self, info: InfoResponse | None) -> None:
        """The bridge's lists (again): the picker, the LoRAs to add, the marks of the chosen ones."""
        self.info = info
        self._show_models()
        self._show_offer()
        self._show_controlnets()

    @property
    def family(self) -> str:
        return choices.chosen_family(self.info, self.model_name)

    def _show_models(self) -> None:
        blocked = self.model.blockSignals(True)
        try:
            self.model.clear()
            options = choices.model_options(self.info, self.model_name)
            for i, option in enumerate(options):
                self.model.addItem(option.label, option.name)
                self.model.setItemData(i, option.tip, qt.Qt.ItemDataRole.ToolTipRole)
                if not option.usable and not option.missing:  # shown, not choosable
                    self.model.model().item(i).setEnabled(False)
            index = next((i for i, o in enumerate(options) if o.name == self.model_name), 0)
            self.model.setCurrentIndex(index)
            missing = options[index].missing
        finally:
            self.model.blockSignals(blocked)
        self.note.setVisible(missing)
        if missing:
            self.note.setText(
                f"The model '{self.model_name}' saved with this document is not on this bridge:"
                " choose another one to generate."
            )

    def _show_offer(self) -> None:
        family = self.family
        chosen = [row.name for row in self.rows]
        self.add_combo.clear()
        offer = choices.lora_options(self.info, family, chosen, self.all_families.isChecked())
        for i, option in enumerate(offer):
            self.add_combo.addItem(option.label, option.name)
            self.add_combo.setItemData(i, option.tip, qt.Qt.ItemDataRole.ToolTipRole)
            if not option.usable:
                self.add_combo.model().item(i).setEnabled(False)
        full = len(self.rows) >= MAX_LORAS
        self.add_button.setEnabled(any(o.usable for o in offer) and not full)
        self.add_button.setToolTip(
            f"At most {MAX_LORAS} LoRAs" if full else "Add the LoRA chosen on the left"
        )
        self.add_combo.setEnabled(bool(offer))
        if not offer:
            self.add_combo.addItem("no LoRA to add" if self.info is not None else "(connect to list LoRAs)")
        for row in self.rows:
            row.show_mark(choices.lora_mark(self.info, family, row.name))

    def _show_controlnets(self) -> None:
        """The ControlNets that fit the chosen model's family, the document's choice selected."""
        blocked = self.controlnet.blockSignals(True)
        try:
            self.controlnet.clear()
            options = choices.controlnet_options(self.info, self.family, self.controlnet_name)
            for i, option in enumerate(options):
                self.controlnet.addItem(option.label, option.name)
                self.controlnet.setItemData(i, option.tip, qt.Qt.ItemDataRole.ToolTipRole)
                if not option.usable and not option.missing:
                    self.controlnet.model().item(i).setEnabled(False)
            index = next((i for i, o in enumerate(options) if o.name == self.controlnet_name), 0)
            self.controlnet.setCurrentIndex(index)
            missing = options[index].missing
        finally:
            self.controlnet.blockSignals(blocked)
        self.controlnet.setStyleSheet(WARN_STYLE if missing else "")
        self.controlnet.setToolTip(f"{options[index].tip}\n\n{CONTROLNET_TIP}" if missing else CONTROLNET_TIP)

    # -- the document's choice -----------------------------------------------------------------------

    def load(self, s: DocumentSettings) -> None:
        self.model_name = s.model
        for row in self.rows:
            row.setParent(None)
            row.deleteLater()
        self.rows = []
        for lora in s.loras:
            self._add_row(lora)
        self.controlnet_name = s.controlnet
        blocked = self.clip_skip.blockSignals(True)
        self.clip_skip.setCurrentIndex(max(0, self.clip_skip.findData(s.clip_skip or 0)))
        self.clip_skip.blockSignals(blocked)
        self.show_info(self.info)

    def store(self, s: DocumentSettings) -> None:
        s.model = self.model_name
        s.loras = [row.choice() for row in self.rows]
        s.controlnet = self.controlnet_name
        s.clip_skip = self.clip_skip.currentData() or None

    def choose_controlnet(self, name: str) -> bool:
        """Pick a ControlNet by name ("": the bridge's own), as the painter would; False if not listed."""
        index = self.controlnet.findData(name)
        if index >= 0:
            self.controlnet.setCurrentIndex(index)
        return index >= 0

    def choose_clip_skip(self, value: int | None) -> bool:
        """Pick the clip skip (None: auto), as the painter would; False outside 1..MAX_CLIP_SKIP."""
        index = self.clip_skip.findData(value or 0)
        if index >= 0:
            self.clip_skip.setCurrentIndex(index)
        return index >= 0

    def choose_model(self, name: str) -> bool:
        """Pick a model by name, as the painter would (scripts and tests); False if not listed."""
        index = self.model.findData(name)
        if index >= 0:
            self.model.setCurrentIndex(index)
        return index >= 0

    def add_lora(self, name: str, weight: float = 1.0) -> bool:
        """Add a LoRA offered by the bridge, as the painter would; False if it is not offered."""
        index = self.add_combo.findData(name)
        if index < 0 or not self.add_button.isEnabled():
            return False
        self.add_combo.setCurrentIndex(index)
        self.add_button.click()
        self.rows[-1].weight.setValue(weight)
        return True

    def _on_model(self, index: int) -> None:
        if index < 0:
            return
        self.model_name = self.model.itemData(index) or ""
        self._show_models()  # drops "(not on this bridge)" once another model is chosen
        self._show_offer()  # the LoRAs that fit follow the model's family
        self._show_controlnets()  # and so do the ControlNets
        self.changed.emit()

    def _on_controlnet(self, index: int) -> None:
        if index < 0:
            return
        self.controlnet_name = self.controlnet.itemData(index) or ""
        self._show_controlnets()  # drops the mark once another ControlNet is chosen
        self.changed.emit()

    def _on_add(self) -> None:
        index = self.add_combo.currentIndex()
        name = self.add_combo.itemData(index) if index >= 0 else None
        if not name or not self.add_combo.model().item(index).isEnabled() or len(self.rows) >= MAX_LORAS:
            return
        self._add_row(LoraChoice(name))
        self._show_offer()
        self.changed.emit()

    def _add_row(self, choice: LoraChoice) -> None:
        row = LoraRow(choice)
        row.changed.connect(self.changed.emit)
        row.removed.connect(lambda row=row: self._remove(row))
        self.lora_layout.addWidget(row)
        self.rows.append(row)

    def _remove(self, row: LoraRow) -> None:
        self.rows.remove(row)
        row.setParent(None)
        row.deleteLater()
        self._show_offer()
        self.changed.emit()
