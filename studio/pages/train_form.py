"""The Train page's settings: length, batch, accumulation, learning rate and schedule, warmup,
maximum length, validation, evaluation and checkpoint intervals, seed and the run's name, kept in
step with ``state.config`` both ways; and their QSettings.

A view over the RunConfig: each edit writes the config and announces the part it changed; a change
made elsewhere (another page, "Load settings") is shown again here.
"""

from __future__ import annotations

from PySide6.QtWidgets import (QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox, QHBoxLayout, QLineEdit,
                               QRadioButton, QSpinBox)

from core.config import SCHEDULERS
from studio.pages import setting


class TrainSettings(QGroupBox):
    """The settings form; its controls are attributes (``steps``, ``batch``, ``lr``, ...)."""

    def __init__(self, state, parent=None):
        super().__init__("Settings", parent)
        self.state = state
        self._syncing = False
        self.by_steps = QRadioButton("Steps")
        self.by_epochs = QRadioButton("Epochs")
        self.steps = QSpinBox()
        self.steps.setRange(1, 10_000_000)
        self.epochs = QDoubleSpinBox()
        self.epochs.setRange(0.01, 1000)
        self.epochs.setDecimals(2)
        length_row = QHBoxLayout()
        for w in (self.by_steps, self.steps, self.by_epochs, self.epochs):
            length_row.addWidget(w)
        self.batch = QSpinBox()
        self.batch.setRange(1, 4096)
        self.accum = QSpinBox()
        self.accum.setRange(1, 4096)
        self.lr = QDoubleSpinBox()
        self.lr.setDecimals(6)
        self.lr.setRange(1e-6, 0.5)
        self.lr.setSingleStep(1e-5)
        self.scheduler = QComboBox()
        self.scheduler.addItems(SCHEDULERS)
        self.warmup = QSpinBox()
        self.warmup.setRange(0, 1_000_000)
        self.max_length = QSpinBox()
        self.max_length.setRange(8, 1_048_576)
        self.max_length.setSingleStep(64)
        self.val_split = QDoubleSpinBox()
        self.val_split.setRange(0.0, 0.9)
        self.val_split.setSingleStep(0.05)
        self.eval_every = QSpinBox()
        self.eval_every.setRange(0, 1_000_000)
        self.eval_every.setSpecialValueText("at the end")
        self.save_every = QSpinBox()
        self.save_every.setRange(0, 1_000_000)
        self.save_every.setSpecialValueText("only at stop and end")
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.run_name = QLineEdit()
        self.run_name.setPlaceholderText("(default: after the model and the dataset)")
        for w in (self.steps, self.batch, self.accum, self.warmup, self.max_length, self.eval_every,
                  self.save_every, self.seed, self.epochs, self.lr, self.val_split):
            w.valueChanged.connect(self._on_settings)
        self.scheduler.currentTextChanged.connect(self._on_settings)
        self.by_steps.toggled.connect(self._on_settings)
        self.run_name.textChanged.connect(self._on_settings)

        f = QFormLayout(self)
        f.addRow("Length", length_row)
        f.addRow("Batch size", self.batch)
        f.addRow("Accumulation", self.accum)
        f.addRow("Learning rate", self.lr)
        f.addRow("Schedule", self.scheduler)
        f.addRow("Warmup steps", self.warmup)
        f.addRow("Max length", self.max_length)
        f.addRow("Validation split", self.val_split)
        f.addRow("Evaluate every", self.eval_every)
        f.addRow("Save every", self.save_every)
        f.addRow("Seed", self.seed)
        f.addRow("Run name", self.run_name)
        state.config_changed.connect(self._on_config)
        self.sync_from_config()

    def sync_from_config(self) -> None:
        self._syncing = True
        c = self.state.config
        t, d = c.train, c.data
        self.by_steps.setChecked(t.steps is not None)
        self.by_epochs.setChecked(t.steps is None)
        self.steps.setValue(t.steps or 100)
        self.epochs.setValue(t.epochs or 1.0)
        self.steps.setEnabled(t.steps is not None)
        self.epochs.setEnabled(t.steps is None)
        self.batch.setValue(t.batch_size)
        self.accum.setValue(t.grad_accum)
        self.lr.setValue(t.lr)
        self.scheduler.setCurrentText(t.scheduler)
        self.warmup.setValue(t.warmup)
        self.max_length.setValue(d.max_length)
        self.val_split.setValue(d.val_split)
        self.eval_every.setValue(t.eval_every)
        self.save_every.setValue(t.save_every)
        self.seed.setValue(t.seed)
        if self.run_name.text() != c.name:
            self.run_name.setText(c.name)
        self._syncing = False

    def set_default_name(self, name: str) -> None:
        """Show the name a run gets when none is typed."""
        self.run_name.setPlaceholderText(f"{name} (after the model and the dataset)")

    def _on_settings(self, *_):
        if self._syncing:
            return
        c = self.state.config
        t = c.train
        if self.by_steps.isChecked():
            t.steps, t.epochs = self.steps.value(), None
        else:
            t.steps, t.epochs = None, float(self.epochs.value())
        self.steps.setEnabled(self.by_steps.isChecked())
        self.epochs.setEnabled(not self.by_steps.isChecked())
        t.batch_size = self.batch.value()
        t.grad_accum = self.accum.value()
        t.lr = float(self.lr.value())
        t.scheduler = self.scheduler.currentText()
        t.warmup = self.warmup.value()
        t.eval_every = self.eval_every.value()
        t.save_every = self.save_every.value()
        t.seed = self.seed.value()
        c.name = self.run_name.text().strip()
        data_changed = (c.data.max_length != self.max_length.value()
                        or c.data.val_split != float(self.val_split.value()))
        c.data.max_length = self.max_length.value()
        c.data.val_split = float(self.val_split.value())
        self._syncing = True  # our own announcement need not come back here
        try:
            self.state.changed("train")
            if data_changed:
                self.state.changed("data")
        finally:
            self._syncing = False

    def _on_config(self, part: str) -> None:
        if part in ("all", "data", "train") and not self._syncing:
            self.sync_from_config()

    # -- QSettings --------------------------------------------------------------------------------
    def save_settings(self, s) -> None:
        t = self.state.config.train
        for key in ("steps", "epochs", "batch_size", "grad_accum", "lr", "scheduler", "warmup",
                    "eval_every", "save_every", "seed"):
            v = getattr(t, key)
            s.setValue(key, "" if v is None else v)
        s.setValue("val_split", self.state.config.data.val_split)

    def restore_settings(self, s) -> None:
        t = self.state.config.train
        steps = setting(s, "steps", "", str)
        epochs = setting(s, "epochs", "", str)
        try:
            if steps:
                t.steps, t.epochs = max(1, int(steps)), None
            elif epochs:
                t.steps, t.epochs = None, float(epochs)
        except ValueError:
            pass
        t.batch_size = max(1, setting(s, "batch_size", t.batch_size, int))
        t.grad_accum = max(1, setting(s, "grad_accum", t.grad_accum, int))
        t.lr = setting(s, "lr", t.lr, float)
        sch = setting(s, "scheduler", t.scheduler, str)
        t.scheduler = sch if sch in SCHEDULERS else t.scheduler
        t.warmup = max(0, setting(s, "warmup", t.warmup, int))
        t.eval_every = max(0, setting(s, "eval_every", t.eval_every, int))
        t.save_every = max(0, setting(s, "save_every", t.save_every, int))
        t.seed = setting(s, "seed", t.seed, int)
        self.state.config.data.val_split = min(0.9, max(0.0, setting(s, "val_split", 0.0, float)))
        self.sync_from_config()
