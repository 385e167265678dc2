"""Earlier runs on the Train page: the list (with each run's status), Resume for a run that can go
on, "Load settings" to train again like an earlier run; and the banner that offers, in one click, to
resume an unfinished run.

Views only: listing runs and reading their configuration are ``core.runs`` and ``RunConfig.load``,
called in workers.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QComboBox, QFrame, QGroupBox, QHBoxLayout, QPushButton, QToolButton, QVBoxLayout

from studio import workers
from studio.widgets.elided import ElidedLabel


def list_runs() -> list[dict]:
    from core import runs

    found = runs.list_runs()
    for r in found:
        r["resumable"] = runs.resumable(r)
    return found


def load_run(run_dir: str):
    """The run's RunConfig and its metrics rows."""
    from core import runs
    from core.config import RunConfig

    cfg = RunConfig.load(Path(run_dir) / "config.json")
    return cfg, runs.read_metrics(run_dir)


def describe(r: dict) -> str:
    """``name (stopped at step 4 of 200)``: what a person needs to pick a run."""
    step, total, status = r.get("step"), r.get("total_steps"), r.get("status") or ""
    if status == "finished":
        where = f", {step} steps" if step else ""
    else:
        where = f" at step {step} of {total}" if step and total else ""
    return f"{r['name']} ({status}{where})" if status else r["name"]


class EarlierRuns(QGroupBox):
    """The runs in the studio's runs folder; ``resume_requested(path)`` and ``load_requested(path)``."""

    resume_requested = Signal(str)
    load_requested = Signal(str)
    listed = Signal(list)

    def __init__(self, parent=None):
        super().__init__("Earlier runs", parent)
        self.runs: list[dict] = []
        self.busy = False
        self.combo = QComboBox()
        self.combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.combo.setMinimumContentsLength(16)
        self.combo.setToolTip("Earlier runs in the studio's runs folder")
        self.combo.currentIndexChanged.connect(self._update_buttons)
        refresh = QToolButton()
        refresh.setText("↻")
        refresh.setToolTip("Refresh the list of runs")
        refresh.clicked.connect(self.refresh)
        self.resume_button = QPushButton("Resume")
        self.resume_button.setToolTip("Continue the chosen run from its newest checkpoint")
        self.resume_button.clicked.connect(lambda: self._emit(self.resume_requested))
        self.load_button = QPushButton("Load settings")
        self.load_button.setToolTip("Put the chosen run's settings into the form, to train again like it")
        self.load_button.clicked.connect(lambda: self._emit(self.load_requested))
        top = QHBoxLayout()
        top.addWidget(self.combo, 1)
        top.addWidget(refresh)
        buttons = QHBoxLayout()
        buttons.addWidget(self.resume_button)
        buttons.addWidget(self.load_button)
        buttons.addStretch(1)
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addLayout(buttons)
        self._update_buttons()

    def refresh(self) -> None:
        w = workers.FunctionWorker(list_runs)
        w.heavy = False  # listing reads small JSON files: no torch
        w.finished.connect(self.show_runs)
        w.failed.connect(self.combo.setToolTip)
        workers.start(w, owner=self)

    def show_runs(self, found: list[dict]) -> None:
        keep = self.combo.currentData()
        self.runs = list(found)
        self.combo.blockSignals(True)
        self.combo.clear()
        for r in self.runs:
            self.combo.addItem(describe(r), r["path"])
            self.combo.setItemData(self.combo.count() - 1, r["path"], Qt.ItemDataRole.ToolTipRole)
        at = self.combo.findData(keep) if keep else -1
        self.combo.setCurrentIndex(at if at >= 0 else (0 if self.runs else -1))
        self.combo.blockSignals(False)
        self._update_buttons()
        self.listed.emit(self.runs)

    def current(self) -> dict | None:
        i = self.combo.currentIndex()
        return self.runs[i] if 0 <= i < len(self.runs) else None

    def select(self, path: str) -> None:
        at = self.combo.findData(path)
        if at >= 0:
            self.combo.setCurrentIndex(at)

    def set_busy(self, busy: bool) -> None:
        self.busy = busy
        self._update_buttons()

    def _update_buttons(self, *_) -> None:
        r = self.current()
        can = bool(r and r.get("resumable"))
        self.resume_button.setEnabled(can and not self.busy)
        if r is None:
            tip = "No earlier run"
        elif can:
            tip = f"Continue {r['name']} from step {r.get('step')} of {r.get('total_steps')}"
        else:
            tip = f"{r['name']} is {r.get('status') or 'not resumable'}: nothing left to continue"
        self.resume_button.setToolTip(tip)
        self.load_button.setEnabled(r is not None and not self.busy)

    def _emit(self, signal) -> None:
        r = self.current()
        if r is not None and not self.busy:
            signal.emit(r["path"])


class ResumeBanner(QFrame):
    """"The run X stopped at step 4 of 200 and can be resumed. [Resume] [✕]"."""

    resume_requested = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("ResumeBanner")
        self.path: str | None = None
        self.dismissed: set[str] = set()
        self.label = ElidedLabel()
        self.button = QPushButton("Resume")
        self.button.clicked.connect(lambda: self.path and self.resume_requested.emit(self.path))
        close = QToolButton()
        close.setText("✕")
        close.setAutoRaise(True)
        close.setToolTip("Dismiss")
        close.clicked.connect(self.dismiss)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(10, 4, 4, 4)
        lay.addWidget(self.label, 1)
        lay.addWidget(self.button)
        lay.addWidget(close)
        self.setStyleSheet("#ResumeBanner { background: rgba(0, 114, 178, 30); border: 1px solid "
                           "rgba(0, 114, 178, 120); border-radius: 4px; }")
        self.hide()

    def offer(self, runs: list[dict], *, busy: bool) -> None:
        """Show the newest run that can be resumed (unless dismissed or a run is training)."""
        r = next((r for r in runs if r.get("resumable") and r["path"] not in self.dismissed), None)
        if r is None or busy:
            self.path = None
            self.hide()
            return
        self.path = r["path"]
        self.label.setText(f"The run “{r['name']}” {r.get('status')} at step {r.get('step')} of "
                           f"{r.get('total_steps')} and can be resumed.")
        self.show()

    def dismiss(self) -> None:
        if self.path:
            self.dismissed.add(self.path)
        self.path = None
        self.hide()
