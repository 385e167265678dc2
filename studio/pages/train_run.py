"""The Train page's run column: Start / Pause / Stop, progress with ETA and tokens per second, the
live loss plot and memory in use, and what the trainer's events do to them (a mixin of
:class:`studio.pages.train.TrainPage`, whose state it shares: ``worker``, ``pause_state``,
``events``)."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QStyle, QVBoxLayout, QWidget

from studio.widgets import format_bytes, format_duration
from studio.widgets.elided import ElidedLabel
from studio.widgets.loss_plot import LossPlot


class RunColumn:
    def _build_run_column(self) -> QWidget:
        """Start / Pause / Stop / Sweep…, the status, progress, the figures and the live loss plot."""
        st = self.style()
        self._icons = {k: st.standardIcon(getattr(QStyle.StandardPixmap, f"SP_Media{k}"))
                       for k in ("Play", "Pause", "Stop")}
        self.start_button = QPushButton(self._icons["Play"], "Start")
        self.start_button.setToolTip("Start training (Ctrl+Return)")
        self.start_button.clicked.connect(self.start)
        self.pause_button = QPushButton(self._icons["Pause"], "Pause")
        self.pause_button.setToolTip("Pause after this step (a checkpoint is written); Resume continues")
        self.pause_button.clicked.connect(self.toggle_pause)
        self.stop_button = QPushButton(self._icons["Stop"], "Stop")
        self.stop_button.setToolTip("Stop after this step and save a checkpoint; Resume continues it later "
                                    "(Ctrl+.)")
        self.stop_button.clicked.connect(self.stop)
        self.sweep_button = QPushButton("Sweep…")
        self.sweep_button.setToolTip("Train a grid of runs over rank × target set with these settings, one after "
                                     "another (the LoRA paper's Tables 5 and 6)")
        self.sweep_button.clicked.connect(self.open_sweep)
        buttons = QHBoxLayout()
        for b in (self.start_button, self.pause_button, self.stop_button, self.sweep_button):
            buttons.addWidget(b)
        buttons.addSpacing(8)
        self.status = ElidedLabel("Ready")
        buttons.addWidget(self.status, 1)

        self.progress = QProgressBar()
        self._reset_progress()
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
        self.folder_label = ElidedLabel(mode=Qt.TextElideMode.ElideMiddle)
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
        return right

    def _reset_progress(self) -> None:
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("%v / %m steps")

    def _show_pause(self, what: str) -> None:
        """The Pause button as the run really is: Pause (running), Pausing… (asked, not yet there),
        Resume with a play icon (paused)."""
        self.pause_state = what
        b = self.pause_button
        if what == "paused":
            b.setText("Resume")
            b.setIcon(self._icons["Play"])
            b.setToolTip("Continue training from where it paused")
        else:
            b.setText("Pausing…" if what == "pausing" else "Pause")
            b.setIcon(self._icons["Pause"])
            b.setToolTip("Pause after this step (a checkpoint is written); Resume continues")
        b.setEnabled(what in ("running", "paused") and self.worker is not None and not self.worker.is_cancelled())

    def on_event(self, ev) -> None:
        """One trainer event (StepEvent, EvalEvent or StatusEvent), in the GUI thread."""
        self.events += 1
        kind = type(ev).__name__
        if kind == "StepEvent":
            self._on_step(ev)
        elif kind == "EvalEvent":
            self.plot.add_eval(ev.step, ev.eval_loss)
        elif kind == "StatusEvent":
            self._on_status(ev)

    def _on_step(self, ev) -> None:
        self.plot.add_step(ev.step, ev.loss, ev.lr)
        if self.pause_state == "idle" and self.worker is not None and not self.worker.is_cancelled():
            self._show_pause("running")  # the first step: now there is something to pause
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
        if self.pause_state == "pausing":
            self.status.setText(f"Pausing after step {ev.step}…")
        elif self.pause_state == "running" and not (self.worker and self.worker.is_cancelled()):
            self.status.setText(f"Training: step {ev.step} of {total}")

    def _on_status(self, ev) -> None:
        text = ev.message or ev.kind
        if ev.kind in ("loading", "tokenizing") and self.plot.steps_received == 0:
            if ev.fraction is None:
                self.progress.setRange(0, 0)  # busy until the first step
            else:
                self.progress.setRange(0, 1000)
                self.progress.setValue(int(1000 * ev.fraction))
            self.progress.setFormat(text)
        if ev.kind == "paused":
            self._show_pause("paused")
            text = f"Paused at step {self.progress.value()}; checkpoint saved"
        elif self.pause_state in ("pausing", "paused") and ev.kind in ("training", "evaluating", "checkpoint"):
            return  # still on its way to the pause, or the evaluation a pause interrupted: keep saying so
        self.status.setText(text[:1].upper() + text[1:] if text else "")
        self.state.say(text)
