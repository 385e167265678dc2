"""The Train page: the training settings, Start / Pause / Stop, progress with ETA and tokens per
second, the live loss plot and memory in use; earlier runs (resume one, or load its settings), and
"Copy as command".

Start hands a copy of ``state.config`` to a :class:`studio.workers.TrainWorker`, which runs
``core.train.Trainer`` in a thread on the window's model (the session's, core.session.model_for_run:
loaded for the run only when the window holds none or another, and kept loaded after it), holding
it for the run so the Playground and the Library are refused with a message naming the run; its events arrive here as signals, the plot appends them to
its buffers and redraws on its own timer. A finished run's adapter is adopted into the library
(``core.library.Library().adopt_run``); a stopped one stays out of it until it is resumed and
finishes, so the library never holds a partial adapter. A run that fails before its first checkpoint
leaves nothing on disk (``core.train``), and the page forgets it as soon as the input changes.

The settings form is :mod:`studio.pages.train_form`, the earlier runs and the resume banner
:mod:`studio.pages.train_runs`, the run column (buttons, progress, plot) and what the trainer's events
do to it :mod:`studio.pages.train_run`.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QApplication, QHBoxLayout, QPushButton, QScrollArea, QVBoxLayout, QWidget

from studio import workers
from studio.pages import Page
from studio.pages.train_form import TrainSettings
from studio.pages.train_run import RunColumn
from studio.pages.train_runs import EarlierRuns, ResumeBanner, load_run

FORM_CONTROLS = ("by_steps", "by_epochs", "steps", "epochs", "batch", "accum", "lr", "scheduler", "warmup",
                 "max_length", "val_split", "eval_every", "save_every", "seed", "run_name")


def _adopt(run_dir: str):
    from core.library import Library

    return Library().adopt_run(run_dir)


def run_folder_for(cfg) -> str:
    """Where a new run of ``cfg`` goes: the studio's runs folder, named after the run (its name, or
    the model and the dataset), never an existing folder."""
    from core import runs

    name = cfg.name or runs.default_run_name(cfg.model.source, cfg.data.path)
    return str(runs.new_run_folder(name))


class TrainPage(RunColumn, Page):
    KEY = "train"
    TITLE = "Train"
    ICON = "SP_MediaSeekForward"

    settled = Signal()
    """The run and what follows it (adding the adapter to the library) are over."""

    def __init__(self, state, parent=None):
        super().__init__(state, parent)
        self.worker: workers.TrainWorker | None = None
        self.run_dir: str | None = None
        self.last_result = None
        self.last_adopted = None
        self.events = 0
        self.pause_state = "idle"  # idle, running, pausing, paused
        self._failed_message: str | None = None
        self._adopting = False

        # -- settings, earlier runs -----------------------------------------------------------------
        self.form = TrainSettings(state)
        for name in FORM_CONTROLS:
            setattr(self, name, getattr(self.form, name))
        self.command_button = QPushButton("Copy as command")
        self.command_button.setToolTip("Copy the lora-studio train command that runs these settings")
        self.command_button.clicked.connect(self.copy_command)
        self.earlier = EarlierRuns()
        self.earlier.resume_requested.connect(self.resume_path)
        self.earlier.load_requested.connect(self.load_settings_of)
        self.earlier.listed.connect(self._on_runs_listed)
        self.runs, self.resume_button = self.earlier.combo, self.earlier.resume_button
        self.banner = ResumeBanner()
        self.banner.resume_requested.connect(self.resume_path)

        left = QWidget()
        ll = QVBoxLayout(left)
        ll.setContentsMargins(0, 0, 0, 0)
        ll.addWidget(self.form)
        ll.addWidget(self.command_button, 0, Qt.AlignmentFlag.AlignLeft)
        ll.addWidget(self.earlier)
        ll.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidget(left)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setMinimumWidth(340)
        scroll.setMaximumWidth(420)
        self.settings_column = scroll

        right = self._build_run_column()

        lay = QHBoxLayout(self)
        lay.addWidget(scroll)
        lay.addWidget(right, 1)

        state.config_changed.connect(self._on_config)
        self._set_running(False)
        self._runs_listed = False
        self._update_default_name()

    # -- settings <-> config ----------------------------------------------------------------------
    def _sync_from_config(self) -> None:
        self.form.sync_from_config()

    def _on_config(self, part: str) -> None:
        if part in ("all", "model", "data"):
            self._update_default_name()
        if not self.running:
            self._forget_failure()

    def _update_default_name(self) -> None:
        from core import runs

        c = self.state.config
        self.form.set_default_name(runs.default_run_name(c.model.source, c.data.path))

    def _forget_failure(self) -> None:
        """The input changed since a run failed: its "Failed", its progress text and its message
        are about an input that is gone."""
        if self._failed_message is None:
            return
        self.state.retract_error(self._failed_message)
        self._failed_message = None
        self.status.setText("Ready")
        self.state.say("")
        self._reset_progress()
        self.folder_label.setText("")

    def command_line(self) -> str:
        """The ``lora-studio train`` command of the current settings, as a shell line."""
        from studio.commands.train import command_line

        cfg = self._new_config()
        return shlex.join(command_line(cfg))

    def copy_command(self) -> str:
        text = self.command_line()
        QApplication.clipboard().setText(text)
        self.command_button.setToolTip(text)
        self.state.say(f"copied: {text}")
        return text

    def load_settings_of(self, path: str) -> None:
        """Put an earlier run's settings into the form ("train again like this")."""
        w = workers.FunctionWorker(load_run, path)
        w.heavy = False
        w.finished.connect(lambda r, p=path: self._settings_loaded(p, r[0]))
        w.failed.connect(self.state.show_error)
        workers.start(w, owner=self)

    def _settings_loaded(self, path: str, cfg) -> None:
        from dataclasses import fields

        c = self.state.config  # edited in place: every page holds this very object
        for section in ("model", "lora", "data", "train"):
            mine, theirs = getattr(c, section), getattr(cfg, section)
            for f in fields(mine):
                # the model is chosen below; its permission to run its own code is never taken from a
                # file (as `train --config` does not): only the Model page's checkbox gives it
                if (section, f.name) not in (("model", "source"), ("model", "trust_remote_code")):
                    setattr(mine, f.name, getattr(theirs, f.name))
        c.out, c.name = "", ""  # a new run: its own folder and name
        self.state.set_model(cfg.model.source)  # reads the model's facts again when it is another
        self.state.changed("all")
        self.state.say(f"settings of {path} loaded")

    # -- running ----------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.worker is not None

    def _set_running(self, on: bool) -> None:
        self.start_button.setEnabled(not on)
        self.earlier.set_busy(on)
        self.pause_button.setEnabled(on)
        self.stop_button.setEnabled(on)
        if not on:
            self._show_pause("idle")

    def _new_config(self):
        """A copy of the settings for a new run, with its data and run folder filled in."""
        cfg = self.state.config.copy()
        if not cfg.data.path:
            from core.home import sample_dataset

            cfg.data.path = str(sample_dataset())
        cfg.out = run_folder_for(cfg)
        return cfg

    def start(self, *, resume_dir: str | None = None, cfg=None) -> bool:
        """Start a run with the current settings (or resume ``resume_dir``); False if it cannot."""
        if self.running:
            return False
        if cfg is None:
            cfg = self._new_config()
        problems = cfg.problems()
        if problems:
            self.state.show_error("Cannot start: " + "; ".join(problems))
            return False
        holder = next((t for t in self.state.session.holders() if t.exclusive), None)
        if holder is not None:  # a generation, a merge...: the run would change the model under it
            from core.session import ModelBusy

            self.state.show_error(str(ModelBusy("train", holder)))
            return False
        self._forget_failure()
        self.run_dir = resume_dir or cfg.out
        self.last_result = None
        self.last_adopted = None
        self.events = 0
        if resume_dir is None:
            self.plot.clear()
        self.plot.set_peak_lr(cfg.train.lr)
        self.progress.setRange(0, 0)  # busy: loading the model and tokenising come first
        self.progress.setFormat("starting…")
        for lab in (self.eta_label, self.speed_label, self.loss_label, self.memory_label):
            lab.setText("–")
        self.folder_label.setText(f"Run folder: {self.run_dir}")
        # on the window's model (loaded for the run when it has none, or another): never a second copy
        w = workers.TrainWorker(cfg, resume=resume_dir is not None, session=self.state.session,
                                label=f"training {cfg.name or Path(self.run_dir).name}")
        self.worker = w
        w.progress.connect(self.on_event)
        w.finished.connect(self._on_finished)
        w.failed.connect(self._on_failed)
        w.cancelled.connect(lambda: self.status.setText("Stopped before it began"))
        w.done.connect(self._on_done)
        self.status.setText("Starting…")
        self._set_running(True)
        self.pause_button.setEnabled(False)  # until the first step: there is nothing to pause before it
        self.banner.offer([], busy=True)
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
            self.status.setText("Stopping: saving a checkpoint after this step…")
            self.pause_button.setEnabled(False)

    def toggle_pause(self) -> None:
        w = self.worker
        if w is None or self.pause_state == "pausing":
            return
        if self.pause_state == "paused":
            w.resume()
            self._show_pause("running")
            self.status.setText(f"Training: step {self.progress.value()} of {self.progress.maximum()}")
        else:
            w.pause()
            self._show_pause("pausing")
            self.status.setText(f"Pausing after step {self.progress.value()}…")

    def _on_finished(self, result) -> None:
        self.last_result = result
        status = getattr(result, "status", None) or "finished"
        if getattr(result, "adapter", None) is None:
            self.status.setText(f"Run {status} before its first step; nothing to add to the library")
            return
        if status != "finished":  # a partial adapter stays out of the library until the run finishes
            self.status.setText(f"Stopped at step {result.step} of {result.total_steps}; checkpoint saved. "
                                "Resume it to finish; its adapter goes to the library then")
            self.state.say(f"stopped at step {result.step} of {result.total_steps}")
            return
        self.status.setText("Finished; adding its adapter to the library…")
        self._adopting = True
        w = workers.FunctionWorker(_adopt, str(getattr(result, "out", None) or self.run_dir))
        w.finished.connect(self._on_adopted)
        w.failed.connect(self._on_adopt_failed)
        w.done.connect(self._adopt_done)
        workers.start(w, owner=self)

    def _on_adopted(self, entry) -> None:
        self.last_adopted = entry
        name = getattr(entry, "name", None) or (entry.get("name") if isinstance(entry, dict) else None)
        self.status.setText(f"Finished; the adapter is in the library{f' as {name}' if name else ''}")
        self.state.library_changed.emit()
        self.state.say("adapter added to the library")

    def _on_adopt_failed(self, message: str) -> None:
        self.status.setText("Finished, but the adapter could not be added to the library")
        self.state.show_error(message)

    def _adopt_done(self) -> None:
        self._adopting = False
        self.settled.emit()

    def _on_failed(self, message: str) -> None:
        self._failed_message = message
        self.status.setText("Failed: " + message)
        if self.run_dir and not Path(self.run_dir).exists():  # nothing was kept: name no folder
            self.folder_label.setText("")
        self.state.say("training failed")
        self.state.show_error(message)

    def _on_done(self) -> None:
        self.worker = None
        if self.plot.steps_received == 0:  # ended before its first step: no progress to show
            self._reset_progress()
        self._set_running(False)
        self.state.set_training(False)
        self.refresh_runs()
        if not self._adopting:
            self.settled.emit()

    @property
    def busy(self) -> bool:
        """A run trains, or its adapter is still being added to the library."""
        return self.running or self._adopting

    # -- earlier runs -----------------------------------------------------------------------------
    def page_shown(self) -> None:
        if not self._runs_listed:
            self.refresh_runs()

    def refresh_runs(self) -> None:
        self._runs_listed = True
        self.earlier.refresh()

    def _on_runs_listed(self, runs: list[dict]) -> None:
        self.banner.offer(runs, busy=self.running)
        if self.run_dir:
            self.earlier.select(self.run_dir)

    def resume_selected(self) -> None:
        r = self.earlier.current()
        if r is not None and r.get("resumable"):
            self.resume_path(r["path"])

    def resume_path(self, path: str) -> None:
        if self.running:
            return
        self.banner.dismiss()
        w = workers.FunctionWorker(load_run, path)
        w.heavy = False
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
        self.form.save_settings(s)

    def restore_settings(self, s) -> None:
        self.form.restore_settings(s)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.stop()


PAGE = TrainPage
