"""The Data page's Format box: the format (auto-detected or chosen), the field mapping (which column
plays which role), the chat template (a model without one gets a choice, never a silent default:
core.chat), the max length, training on the prompt, and packing.

It edits ``state.config.data`` in place, calls ``state.changed("data")``, and emits
:attr:`FormatBox.edited` so the page reads the dataset again.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QGroupBox, QLabel, QSpinBox,
                               QVBoxLayout, QWidget)

from core.config import FORMATS

ROLE_LABELS = {"prompt": "Prompt", "completion": "Answer", "system": "System (optional)",
               "instruction": "Instruction", "input": "Input (optional)", "output": "Answer",
               "messages": "Messages", "text": "Text"}
"""How the field mapping names each format's fields."""

MAPPING_FORMAT = "prompt-completion"
"""The fields offered when the format cannot be detected: which column is the prompt, which the
answer, and (optionally) the system prompt."""


class FormatBox(QGroupBox):
    edited = Signal()
    """The format, a field, the template or an option changed (already in the config)."""

    def __init__(self, state, parent=None):
        super().__init__("Format", parent)
        self.state = state
        self.field_combos: dict[str, QComboBox] = {}
        self.format = QComboBox()
        self.format.addItems(FORMATS)
        self.format.setToolTip("auto: detected from the columns")
        self.format.currentTextChanged.connect(self._on_format)
        self.detected = QLabel("…")
        self.fields_box = QWidget()
        self.fields_form = QFormLayout(self.fields_box)
        self.fields_form.setContentsMargins(0, 0, 0, 0)
        self.max_length = QSpinBox()
        self.max_length.setRange(8, 1_048_576)
        self.max_length.setSingleStep(64)
        self.max_length.setToolTip("Longer examples are truncated (and counted below)")
        self.max_length.valueChanged.connect(self._on_options)
        self.train_on_prompt = QCheckBox("Also train on the prompt")
        self.train_on_prompt.setToolTip("Default: the loss is computed on the answers only")
        self.train_on_prompt.toggled.connect(self._on_options)
        self.packing = QCheckBox("Pack short examples together")
        self.packing.toggled.connect(self._on_options)
        form = QFormLayout(self)
        form.addRow("Format", self.format)
        form.addRow("Detected", self.detected)
        form.addRow("Fields", self.fields_box)
        form.addRow("Chat template", self._template_row())
        form.addRow("Max length", self.max_length)
        form.addRow(self.train_on_prompt)
        form.addRow(self.packing)

    def sync(self) -> None:
        """Show what ``state.config.data`` says, without announcing edits."""
        d = self.state.config.data
        for w, setter, v in ((self.format, self.format.setCurrentText, d.format),
                             (self.max_length, self.max_length.setValue, d.max_length),
                             (self.train_on_prompt, self.train_on_prompt.setChecked, d.train_on_prompt),
                             (self.packing, self.packing.setChecked, d.packing)):
            w.blockSignals(True)
            setter(v)
            w.blockSignals(False)
        self.show_template()

    def _edited(self) -> None:
        self.state.changed("data")
        self.edited.emit()

    def _on_format(self, fmt: str) -> None:
        d = self.state.config.data
        if fmt == d.format:
            return
        d.format = fmt
        d.fields = {}
        self._edited()

    def _on_field(self, *_):
        fields = {role: c.currentText() for role, c in self.field_combos.items() if c.currentText()}
        if fields == self.state.config.data.fields:
            return
        self.state.config.data.fields = fields
        self._edited()

    def _on_options(self, *_):
        d = self.state.config.data
        d.max_length = self.max_length.value()
        d.train_on_prompt = self.train_on_prompt.isChecked()
        d.packing = self.packing.isChecked()
        self._edited()

    def show_fields(self, fmt: str, columns: list[str], fields: dict) -> None:
        """One column choice per role of ``fmt`` (and per role already mapped)."""
        while self.fields_form.rowCount():
            self.fields_form.removeRow(0)
        self.field_combos.clear()
        try:
            from core import data

            roles = tuple(data.FIELDS.get(fmt, {}))
        except ImportError:
            roles = ()
        for role in dict.fromkeys(list(roles) + list(fields)):
            c = QComboBox()
            c.addItem("")
            c.addItems(columns)
            c.setCurrentText(fields.get(role, ""))
            c.currentTextChanged.connect(self._on_field)
            c.setToolTip(f"The column that holds the {role}")
            self.field_combos[role] = c
            self.fields_form.addRow(ROLE_LABELS.get(role, role), c)

    # -- the chat template: a model without one gets a choice, not a silent default (core.chat) ----
    def _template_row(self) -> QWidget:
        from core import chat

        self.template = QComboBox()
        for key, words in chat.CHOICES.items():
            self.template.addItem(words, key)
        self.template.addItem("a template file…", "")
        self.template.activated.connect(self.on_template)
        self.template_note = QLabel()
        self.template_note.setWordWrap(True)
        box = QWidget()
        v = QVBoxLayout(box)
        v.setContentsMargins(0, 0, 0, 0)
        v.addWidget(self.template)
        v.addWidget(self.template_note)
        return box

    def on_template(self, index: int) -> None:
        choice = self.template.itemData(index)
        if choice == "":
            path, _ = QFileDialog.getOpenFileName(self, "A chat template", "", "Jinja templates (*.jinja *.j2);;All files (*)")
            choice = path or self.state.config.data.chat_template
        from core import chat

        problem = chat.choice_problem(choice)
        if problem:
            self.state.show_error(problem)
            choice = self.state.config.data.chat_template
        if choice != self.state.config.data.chat_template:
            self.state.config.data.chat_template = choice
            self._edited()
        self.show_template()

    def show_template(self) -> None:
        from core import chat

        choice = self.state.config.data.chat_template or "auto"
        i = self.template.findData(choice)
        if i < 0:  # a file: shown by name above "a template file…"
            self.template.insertItem(self.template.count() - 1, Path(choice).name, choice)
            i = self.template.findData(choice)
        self.template.setCurrentIndex(i)
        tok = self.state.tokenizer
        if tok is None:
            self.template_note.setText("")
            return
        note = chat.describe(tok, choice) if choice == "auto" else ""  # a chosen one is in the box above
        self.template_note.setText(note[:1].upper() + note[1:])
        silent = choice == "auto" and not chat.has_template(tok)
        self.template_note.setStyleSheet("color: #b35900; font-weight: bold;" if silent else "color: palette(mid);")
