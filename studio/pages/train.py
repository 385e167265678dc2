"""The Train page: the training settings, Start / Pause / Stop, progress with ETA and tokens per
second, the live loss plot and memory in use; resuming an earlier run.

Start hands a copy of ``state.config`` to a :class:`studio.workers.TrainWorker`, which runs
``core.train.Trainer`` in a thread; its events arrive here as signals, the plot appends them to
its buffers and redraws on its own timer. When the run ends (finished or stopped), its adapter is
adopted into the library (``core.library.Library().adopt_run``) and the state says so.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                               QLineEdit, QProgressBar, QPushButton, QRadioButton, QScrollArea, QSpinBox,
                               QStyle, QVBoxLayout, QWidget)

from core.config import SCHEDULERS
from studio import workers
from studio.pages import Page, setting
from studio.widgets import format_bytes, format_duration
from studio.widgets.loss_plot import LossPlot


def _list_runs():
    from core import runs

    return runs.list_runs()


def _adopt(run_dir: str):
    from core.library import Library

    return Library().adopt_run(run_dir)


def _load_run(run_dir: str):
    from core import runs
    from core.config import RunConfig

    cfg = RunConfig.load(Path(run_dir) / "config.json")
    return cfg, runs.read_metrics(run_dir)


def _run_folder_name(model: str, name: str) -> str:
    stem = name or (Path(model).stem if model != "default" else "smollm2")
    stem = re.sub(r"[^\w.-]+", "-", stem).strip("-") or "run"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{stem}"


class TrainPage(Page):
    KEY = "train"
    TITLE = "Train"
    ICON = "SP_MediaSeekForward"

    def __init__(self, state, parent=None):
        super().__init__(state, parent)
        self.worker: workers.TrainWorker | None = None
        self.run_dir: str | None = None
        self.last_result = None
        self.last_adopted = None
        self.events = 0
        self._syncing = False

        # -- settings -------------------------------------------------------------------------------
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
        self.run_name.setPlaceholderText("(default: the run folder's name)")
        for w in (self.steps, self.batch, self.accum, self.warmup, self.max_length, self.eval_every,
                  self.save_every, self.seed):
            w.valueChanged.connect(self._on_settings)
        for w in (self.epochs, self.lr, self.val_split):
            w.valueChanged.connect(self._on_settings)
        self.scheduler.currentTextChanged.connect(self._on_settings)
        self.by_steps.toggled.connect(self._on_settings)
        self.run_name.textChanged.connect(self._on_settings)

        form_box = QGroupBox("Settings")
        f = QFormLayout(form_box)
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

        # -- resume ---------------------------------------------------------------------------------
        self.runs = QComboBox()
        self.runs.setMinimumWidth(160)
        self.runs.setToolTip("Earlier runs in the studio's runs folder")
        refresh = QPushButton("↻")
        refresh.setToolTip("Refresh the list of runs")
        refresh.setFixedWidth(32)
        refresh.clicked.connect(self.refresh_runs)
        self.resume_button = QPushButton("Resume")
        self.resume_button.setToolTip("Continue the chosen run from its newest checkpoint")
        self.resume_button.clicked.connect(self.resume_selected)
        resume_box = QGroupBox("Earlier runs")
        rl = QHBoxLayout(resume_box)
        rl.addWidget(self.runs, 1)
        rl.addWidget(refresh)
        rl.addWidget(self.resume_button)

        left = QWidget()
        ll = QVBoxLayout(left)
        ll.setContentsMargins(0, 0, 0, 0)
        ll.addWidget(form_box)
        ll.addWidget(resume_box)
        ll.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidget(left)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setMinimumWidth(340)
        scroll.setMaximumWidth(420)

        # -- controls, progress, plot ---------------------------------------------------------------
        st = self.style()
        self.start_button = QPushButton(st.standardIcon(QStyle.StandardPixmap.SP_MediaPlay), "Start")
        self.start_button.setToolTip("Start training (Ctrl+Return)")
        self.start_button.clicked.connect(self.start)
        self.pause_button = QPushButton(st.standardIcon(QStyle.StandardPixmap.SP_MediaPause), "Pause")
        self.pause_button.setToolTip("Pause after this step (a checkpoint is written); Resume continues")
        self.pause_button.clicked.connect(self.toggle_pause)
        self.stop_button = QPushButton(st.standardIcon(QStyle.StandardPixmap.SP_MediaStop), "Stop")
        self.stop_button.setToolTip("Stop after this step and keep the adapter (Ctrl+.)")
        self.stop_button.clicked.connect(self.stop)
        self.sweep_button = QPushButton("Sweep…")
        self.sweep_button.setToolTip("Train a grid of runs over rank × target set with these settings, one after "
                                     "another (the LoRA paper's Tables 5 and 6)")
        self.sweep_button.clicked.connect(self.open_sweep)
        buttons = QHBoxLayout()
        for b in (self.start_button, self.pause_button, self.stop_button, self.sweep_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        self.status = QLabel("Ready")
        buttons.addWidget(self.status)

        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("%v / %m steps")
        self.step_label = QLabel("–")
        self.eta_label = QLabel("–")
        self.speed_label = QLabel("–")
        self.loss_label = QLabel("–")
        self.memory_label = QLabel("–")
        stats = QHBoxLayout()
        for title, lab in (("loss", self.loss_label), ("ETA", self.eta_label), ("speed", self.speed_label),
                           ("memory", self.memory_label)):
            t = QLabel(f"{title}:")
            t.setStyleSheet("color: palette(placeholder-text);")
            stats.addWidget(t)
            stats.addWidget(lab)
            stats.addSpacing(14)
        stats.addStretch(1)
        self.plot = LossPlot()
        self.folder_label = QLabel()
        self.folder_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.folder_label.setStyleSheet("color: palette(placeholder-text);")

        right = QWidget()
        rr = QVBoxLayout(right)
        rr.setContentsMargins(0, 0, 0, 0)
        rr.addLayout(buttons)
        rr.addWidget(self.progress)
        rr.addLayout(stats)
        rr.addWidget(self.plot, 1)
        rr.addWidget(self.folder_label)

        lay = QHBoxLayout(self)
        lay.addWidget(scroll)
        lay.addWidget(right, 1)

        state.config_changed.connect(self._on_config)
        self._sync_from_config()
        self._set_running(False)
        self._runs_listed = False

    # -- settings <-> config ----------------------------------------------------------------------
    def _sync_from_config(self) -> None:
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
        self.state.changed("train")
        if data_changed:
            self.state.changed("data")

    def _on_config(self, part: str) -> None:
        if part in ("all", "data", "train") and not self._syncing:
            c = self.state.config
            if part == "all" or self.max_length.value() != c.data.max_length:
                self._sync_from_config()

    # -- running ----------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.worker is not None

    def _set_running(self, on: bool) -> None:
        self.start_button.setEnabled(not on)
        self.resume_button.setEnabled(not on)
        self.pause_button.setEnabled(on)
        self.stop_button.setEnabled(on)
        if not on:
            self.pause_button.setText("Pause")

    def start(self, *, resume_dir: str | None = None, cfg=None) -> bool:
        """Start a run with the current settings (or resume ``resume_dir``); False if it cannot."""
        if self.running:
            return False
        from core.home import runs_dir

        if cfg is None:
            cfg = self.state.config.copy()
            if not cfg.data.path:
                from core.home import sample_dataset

                cfg.data.path = str(sample_dataset())
            cfg.out = str(runs_dir() / _run_folder_name(cfg.model.source, cfg.name))
        problems = cfg.problems()
        if problems:
            self.state.show_error("Cannot start: " + "; ".join(problems))
            return False
        self.run_dir = resume_dir or cfg.out
        self.last_result = None
        self.last_adopted = None
        self.events = 0
        if resume_dir is None:
            self.plot.clear()
        self.progress.setRange(0, 0)  # busy: loading the model and tokenising come first
        self.progress.setFormat("starting…")
        for lab in (self.eta_label, self.speed_label, self.loss_label, self.memory_label):
            lab.setText("–")
        self.folder_label.setText(f"Run folder: {self.run_dir}")
        w = workers.TrainWorker(cfg, resume=resume_dir is not None)
        self.worker = w
        w.progress.connect(self.on_event)
        w.finished.connect(self._on_finished)
        w.failed.connect(self._on_failed)
        w.cancelled.connect(lambda: self.status.setText("Stopped before it began"))
        w.done.connect(self._on_done)
        self.status.setText("Starting…")
        self._set_running(True)
        self.pause_button.setEnabled(False)  # until the first step: there is nothing to pause before it
        self.state.set_training(True)
        workers.start(w, owner=self)
        return True

    def open_sweep(self) -> None:
        """The Sweep window (studio/pages/sweep.py) over this page's settings; one per page."""
        from studio.pages.sweep import SweepDialog

        if getattr(self, "sweep_dialog", None) is None:
            self.sweep_dialog = SweepDialog(self.state, self)
        self.sweep_dialog.show()
        self.sweep_dialog.raise_()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.status.setText("Stopping after this step…")
            self.pause_button.setEnabled(False)

    def toggle_pause(self) -> None:
        w = self.worker
        if w is None:
            return
        if w.paused:
            w.resume()
            self.pause_button.setText("Pause")
            self.status.setText("Training")
        else:
            w.pause()
            self.pause_button.setText("Resume")
            self.status.setText("Pausing after this step…")

    def on_event(self, ev) -> None:
        """One trainer event (StepEvent, EvalEvent or StatusEvent), in the GUI thread."""
        self.events += 1
        kind = type(ev).__name__
        if kind == "StepEvent":
            self.plot.add_step(ev.step, ev.loss, ev.lr)
            if self.worker is not None and not self.pause_button.isEnabled() and not self.worker.is_cancelled():
                self.pause_button.setEnabled(True)
            total = max(1, int(ev.total_steps or 1))
            if self.progress.maximum() != total:
                self.progress.setRange(0, total)
                self.progress.setFormat("%v / %m steps")
            self.progress.setValue(min(int(ev.step), total))
            if ev.loss is not None:
                smooth = self.plot.last_smoothed()
                self.loss_label.setText(f"{ev.loss:.4f}" + (f" (smoothed {smooth:.4f})" if smooth else ""))
            self.eta_label.setText(format_duration(ev.eta))
            tps = getattr(ev, "tokens_per_second", None)
            self.speed_label.setText(f"{tps:,.0f} tok/s" if tps else "–")
            mem = getattr(ev, "memory_bytes", None)
            self.memory_label.setText(format_bytes(mem) if mem else "–")
            if not (self.worker and self.worker.paused):
                self.status.setText(f"Training: step {ev.step} of {total}")
        elif kind == "EvalEvent":
            self.plot.add_eval(ev.step, ev.eval_loss)
        elif kind == "StatusEvent":
            text = ev.message or ev.kind
            if ev.kind in ("loading", "tokenizing") and self.plot.steps_received == 0:
                if ev.fraction is None:
                    self.progress.setRange(0, 0)  # busy until the first step
                else:
                    self.progress.setRange(0, 1000)
                    self.progress.setValue(int(1000 * ev.fraction))
                self.progress.setFormat(text)
            if ev.kind == "paused":
                self.pause_button.setText("Resume")
                if self.worker is not None:
                    self.worker.paused = True
            elif ev.kind == "training" and self.worker is not None and not self.worker.paused:
                self.pause_button.setText("Pause")
            self.status.setText(text[:1].upper() + text[1:] if text else "")
            self.state.say(text)

    def _on_finished(self, result) -> None:
        self.last_result = result
        status = getattr(result, "status", None) or "finished"
        self.status.setText(f"Run {status}; adding its adapter to the library…")
        run_dir = str(getattr(result, "out", None) or self.run_dir)
        if getattr(result, "adapter", None) is None:
            self.status.setText(f"Run {status} before its first step; nothing to add to the library")
            return
        w = workers.FunctionWorker(_adopt, run_dir)
        w.finished.connect(self._on_adopted)
        w.failed.connect(self._on_adopt_failed)
        workers.start(w, owner=self)

    def _on_adopted(self, entry) -> None:
        self.last_adopted = entry
        name = getattr(entry, "name", None) or (entry.get("name") if isinstance(entry, dict) else None)
        self.status.setText(f"Done; the adapter is in the library{f' as {name}' if name else ''}")
        self.state.library_changed.emit()
        self.state.say("adapter added to the library")

    def _on_adopt_failed(self, message: str) -> None:
        self.status.setText("Done, but the adapter could not be added to the library")
        self.state.show_error(message)

    def _on_failed(self, message: str) -> None:
        self.status.setText("Failed")
        self.state.show_error(message)

    def _on_done(self) -> None:
        self.worker = None
        if self.progress.maximum() == 0:  # ended before its first step
            self.progress.setRange(0, 1)
            self.progress.setValue(0)
            self.progress.setFormat("%v / %m steps")
        self._set_running(False)
        self.state.set_training(False)
        self.refresh_runs()

    # -- earlier runs -----------------------------------------------------------------------------
    def page_shown(self) -> None:
        if not self._runs_listed:
            self.refresh_runs()

    def refresh_runs(self) -> None:
        self._runs_listed = True
        w = workers.FunctionWorker(_list_runs)
        w.finished.connect(self._show_runs)
        w.failed.connect(lambda m: self.runs.setToolTip(m))
        workers.start(w, owner=self)

    def _show_runs(self, runs: list[dict]) -> None:
        self.runs.clear()
        for r in runs:
            step, total = r.get("step"), r.get("total_steps")
            where = f", step {step} of {total}" if step and total else ""
            extra = f" ({r['status']}{where})" if r.get("status") else ""
            self.runs.addItem(f"{r['name']}{extra}", r["path"])
            self.runs.setItemData(self.runs.count() - 1, r["path"], Qt.ItemDataRole.ToolTipRole)
        self.resume_button.setEnabled(bool(runs) and not self.running)

    def resume_selected(self) -> None:
        path = self.runs.currentData()
        if not path or self.running:
            return
        w = workers.FunctionWorker(_load_run, path)
        w.finished.connect(lambda r, p=path: self._resume_loaded(p, *r))
        w.failed.connect(self.state.show_error)
        workers.start(w, owner=self)

    def _resume_loaded(self, path: str, cfg, metrics) -> None:
        rows = metrics if isinstance(metrics, list) else list(metrics or [])
        self.plot.set_history(rows)
        cfg.out = path
        self.start(resume_dir=path, cfg=cfg)

    # -- settings ---------------------------------------------------------------------------------
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
        self._sync_from_config()

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.stop()


PAGE = TrainPage
