"""The Sweep window (the Train page's "Sweep…"): a grid of runs over rank × target set, at a fixed
parameter budget if asked, with what it will cost before it starts, a table and a heatmap of the
cells, and the ΔW analysis across the sweep's adapters.

A thin view over :mod:`core.sweep` and :mod:`core.sweep_report`: the grid is planned on the model's
``meta`` copy in a worker (exact trainable parameter counts without loading weights), and the sweep
runs in another as ordinary, resumable runs under the sweep folder, on the window's model under a
"train" ticket (refused, naming the holder, while another job has the model); Stop keeps a checkpoint and Start
with the same folder continues.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (QAbstractItemView, QCheckBox, QComboBox, QDialog, QFileDialog, QFormLayout,
                               QHBoxLayout, QLabel, QLineEdit, QListWidget, QListWidgetItem, QProgressBar,
                               QPushButton, QSpinBox, QSplitter, QTableWidget, QTableWidgetItem, QVBoxLayout,
                               QWidget)

from studio import workers

TARGET_SETS = ("attention-qv", "attention", "mlp", "all-linear", "q", "k", "v", "o", "q+k", "q+v", "q+k+v+o")
TIPS = {"attention-qv": "W_q and W_v (the paper's default)", "attention": "W_q, W_k, W_v and W_o",
        "mlp": "the MLP's matrices", "all-linear": "every linear layer but the output head",
        "q+k+v+o": "the paper's Table 5: all four attention matrices"}
COLUMNS = ("targets", "rank", "lr", "trainable", "final loss", "best eval loss", "seconds", "status")


def _plan(cfg, ranks, target_sets, budget, lrs, out, *, progress):
    """Cells with exact parameter counts on the meta model, and the step time measured on this machine."""
    from core import models, runs, sweep, sweep_report

    progress("reading the model's layers")
    model = models.meta_model(cfg.model.source, cfg.model.trust_remote_code)
    cells = sweep.plan(model, ranks=ranks, target_sets=target_sets, budget=budget, lrs=lrs)
    done = {c.key: c for c in sweep.read_results(out)} if out else {}
    for c in cells:
        if c.key in done:
            old = done[c.key]
            c.status, c.final_loss, c.best_eval_loss, c.seconds, c.best = (old.status, old.final_loss,
                                                                           old.best_eval_loss, old.seconds, old.best)
    seconds, where = sweep_report.measured_step_seconds(out, runs.list_runs(), model=cfg.model.source)
    return cells, seconds, where


def _run(ticket, cfg, out, ranks, target_sets, budget, lrs, *, progress, cancelled):
    """The sweep on the window's model under ``ticket`` (a "train" one): the loaded model when it is
    the one the settings ask for, else loaded into the window (core.session.model_for_run)."""
    from core import sweep
    from core.session import model_for_run

    def callback(kind, cell, event):
        if cancelled():
            job.request_stop()
        progress((kind, cell, event, [c for c in job.cells]))

    def status(_kind, message, _fraction):
        progress(message)

    with model_for_run(ticket, cfg.model, status, merged_means="every cell would train on top of it") as loaded:
        job = sweep.Sweep(cfg, out, ranks=ranks, target_sets=target_sets, budget=budget, lrs=lrs, library=True,
                          loaded=loaded, callback=callback)
        return job.run()


def _analyse(out, cells, *, progress):
    from core.sweep_report import delta_analysis

    progress("analysing ΔW of every finished cell")
    return delta_analysis(out, cells)


class SweepDialog(QDialog):
    """Not modal: the window stays usable while a sweep trains."""

    def __init__(self, state, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Sweep: rank × target set")
        self.state = state
        self.cells: list = []
        self.worker = None
        self.step_time: float | None = None
        split = QSplitter(Qt.Orientation.Horizontal, self)
        split.addWidget(self._form())
        split.addWidget(self._results())
        split.setStretchFactor(1, 1)
        split.setSizes([320, 760])
        lay = QVBoxLayout(self)
        lay.addWidget(split)
        self.resize(1150, 640)
        self._update_buttons()

    def _form(self) -> QWidget:
        w = QWidget()
        v = QVBoxLayout(w)
        v.setContentsMargins(0, 0, 0, 0)
        v.addWidget(QLabel("<b>Target sets</b> (one column each)"))
        self.sets = QListWidget()
        for t in TARGET_SETS:
            item = QListWidgetItem(t)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked if t in ("attention-qv", "all-linear") else Qt.CheckState.Unchecked)
            item.setToolTip(TIPS.get(t, f"the matrices {t.replace('+', ', ')} of every attention block"))
            self.sets.addItem(item)
        self.sets.setMaximumHeight(200)
        v.addWidget(self.sets)
        form = QFormLayout()
        self.ranks = QLineEdit("1,4,16")
        self.ranks.setToolTip("Comma-separated ranks, one row of the grid each")
        self.use_budget = QCheckBox("Fixed parameter budget")
        self.use_budget.setToolTip("The paper's Table 5: each target set gets the rank that trains about this many "
                                   "parameters, so more matrices means a smaller r (the ranks above are ignored)")
        self.budget = QSpinBox(minimum=1, maximum=2_000_000_000, value=1_000_000)
        self.budget.setGroupSeparatorShown(True)
        self.lrs = QLineEdit()
        self.lrs.setPlaceholderText("the Train page's")
        self.lrs.setToolTip("Optional: comma-separated learning rates; every cell is trained with each")
        self.folder = QLineEdit()
        self.folder.setToolTip("The sweep folder; Start with a folder that holds a sweep continues it")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.folder, 1)
        row.addWidget(browse)
        form.addRow("Ranks", self.ranks)
        form.addRow(self.use_budget, self.budget)
        form.addRow("Learning rates", self.lrs)
        form.addRow("Folder", row)
        v.addLayout(form)
        self.plan_button = QPushButton("Show the grid and its cost")
        self.plan_button.clicked.connect(self.plan)
        self.cost = QLabel("")
        self.cost.setWordWrap(True)
        self.start_button = QPushButton("Start")
        self.start_button.clicked.connect(self.start)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop after the current step; a checkpoint is kept and Start continues")
        self.stop_button.clicked.connect(self.stop)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.stop_button)
        self.progress = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        for x in (self.plan_button, self.cost):
            v.addWidget(x)
        v.addLayout(buttons)
        v.addWidget(self.progress)
        v.addWidget(self.status)
        v.addStretch(1)
        return w

    def _results(self) -> QWidget:
        w = QWidget()
        v = QVBoxLayout(w)
        v.setContentsMargins(0, 0, 0, 0)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        v.addWidget(self.table, 3)
        row = QHBoxLayout()
        row.addWidget(QLabel("<b>Heatmap</b> (rank × target set) of"))
        self.heat_value = QComboBox()
        self.heat_value.addItems(["best_eval_loss", "final_loss", "trainable_params", "seconds"])
        self.heat_value.currentTextChanged.connect(lambda _t: self._fill_heatmap())
        row.addWidget(self.heat_value)
        row.addStretch(1)
        self.analyse_button = QPushButton("ΔW analysis")
        self.analyse_button.setToolTip("Effective rank of each adapter's ΔW, and the subspace similarity between "
                                       "the smallest and the largest rank of each target set (the paper's section 7)")
        self.analyse_button.clicked.connect(self.analyse)
        row.addWidget(self.analyse_button)
        v.addLayout(row)
        self.heat = QTableWidget(0, 0)
        self.heat.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        v.addWidget(self.heat, 2)
        self.analysis = QLabel("")
        self.analysis.setWordWrap(True)
        v.addWidget(self.analysis)
        return w

    # -- inputs ------------------------------------------------------------------------------------
    def grid(self) -> tuple[list[int], list[str], int | None, list[float] | None]:
        from core.errors import StudioError

        sets = [self.sets.item(i).text() for i in range(self.sets.count())
                if self.sets.item(i).checkState() == Qt.CheckState.Checked]
        try:
            ranks = [int(r) for r in self.ranks.text().split(",") if r.strip()]
            lrs = [float(x) for x in self.lrs.text().split(",") if x.strip()] or None
        except ValueError:
            raise StudioError("Ranks and learning rates are comma-separated numbers, e.g. 1,4,16") from None
        budget = self.budget.value() if self.use_budget.isChecked() else None
        return ([] if budget else ranks), sets, budget, lrs

    def folder_path(self) -> str:
        if not self.folder.text().strip():
            from core.home import runs_dir
            from core.runs import default_run_name

            cfg = self.state.config
            name = cfg.name or default_run_name(cfg.model.source, cfg.data.path)
            self.folder.setText(str(runs_dir() / f"sweep-{name}"))
        return self.folder.text().strip()

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "The sweep folder")
        if path:
            self.folder.setText(path)

    def _update_buttons(self) -> None:
        running = self.worker is not None
        training = bool(getattr(self.state, "training", False))
        for b in (self.plan_button, self.start_button, self.analyse_button):
            b.setEnabled(not running)
        self.start_button.setEnabled(not running and not training)
        self.start_button.setToolTip("The Train page is training; a sweep starts when it is done" if training
                                     else "Train the cells not finished yet, one after another")
        self.stop_button.setEnabled(running and self.worker.kind == "run")
        self.analyse_button.setEnabled(not running and any(c.status == "finished" for c in self.cells))

    def _job(self, kind: str, fn, *args, on_finished, ticket=None) -> None:
        w = workers.FunctionWorker(fn, *args)
        w.kind = kind
        w.progress.connect(self._on_progress)
        w.finished.connect(on_finished)
        w.failed.connect(self.status.setText)
        w.cancelled.connect(lambda: self.status.setText(
            "Stopped; the cells not finished keep their checkpoints: Start continues them." if kind == "run"
            else "Stopped."))
        w.done.connect(self._on_done)
        self.worker = w
        workers.start(w, owner=self, ticket=ticket)
        self._update_buttons()

    # -- plan, run, analyse ------------------------------------------------------------------------
    def plan(self) -> None:
        from core.errors import StudioError

        try:
            ranks, sets, budget, lrs = self.grid()
        except StudioError as e:
            self.status.setText(str(e))
            return
        self._job("plan", _plan, self.state.config.copy(), ranks, sets, budget, lrs, self.folder_path(),
                  on_finished=self._on_planned)

    def _on_planned(self, result) -> None:
        from core.sweep import cost

        self.cells, self.step_time, where = result
        steps = self.state.config.train.steps or 0
        c = cost(self.cells, steps, self.step_time)
        text = f"{c['cells']} cells, {c['to_train']} to train × {steps} steps = {c['steps']} steps"
        if c["seconds"] is not None:
            t = c["seconds"]
            took = f"{t:.0f} s" if t < 90 else f"{t / 60:.0f} min" if t < 5400 else f"{t / 3600:.1f} h"
            text += f"; about {took} at {self.step_time:.2f} s per step ({where})"
        else:
            text += f"; {where}: the time is shown after the first cell's steps"
        self.cost.setText(text)
        self.status.setText("")
        self.show_cells(self.cells)

    def start(self) -> None:
        from core.errors import StudioError

        try:
            ranks, sets, budget, lrs = self.grid()
        except StudioError as e:
            self.status.setText(str(e))
            return
        ticket = self.state.claim("train", "the sweep", need_model=False)  # the window's model: one copy
        if ticket is None:  # a job holds the model: the window's bar says which
            self.status.setText(self.state.session.busy_message("train") or "The model is busy.")
            return
        self.progress.setRange(0, 0)
        self._job("run", _run, ticket, self.state.config.copy(), self.folder_path(), ranks, sets, budget, lrs,
                  on_finished=self._on_finished, ticket=ticket)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            self.status.setText("Stopping after this step (a checkpoint is kept)…")

    def analyse(self) -> None:
        self._job("analyse", _analyse, self.folder_path(), list(self.cells), on_finished=self._on_analysed)

    def _on_progress(self, p) -> None:
        if isinstance(p, str):
            self.status.setText(p)
            return
        kind, cell, event, cells = p
        if kind in ("cell", "done"):
            self.cells = cells
            self.show_cells(cells)
        if kind == "cell":
            self.status.setText(f"training {cell.key}: rank {cell.rank} on {cell.targets}")
        step = getattr(event, "step", None)
        if step is not None and getattr(event, "total_steps", None):
            self.progress.setRange(0, event.total_steps)
            self.progress.setValue(step)

    def _on_finished(self, cells) -> None:
        self.cells = list(cells)
        self.show_cells(self.cells)
        best = next((c for c in self.cells if c.best), None)
        left = sum(c.status != "finished" for c in self.cells)
        self.status.setText((f"{left} cells not finished: Start continues them. " if left else "Finished. ")
                            + (f"Best: {best.key}" + (" (added to the library)" if not left else "") if best else ""))
        if not left:
            self.state.library_changed.emit()

    def _on_analysed(self, result) -> None:
        parts = [f"{k}: effective rank {v:.1f}" for k, v in result["effective_rank"].items()]
        sims = [f"{t}: φ(r={s['ranks'][0]}, r={s['ranks'][1]}) = {s['phi']:.2f}" for t, s in result["similarity"].items()]
        self.analysis.setText("ΔW: " + "; ".join(parts) + ("<br>Subspace similarity: " + "; ".join(sims) if sims else ""))
        self.status.setText("")

    def _on_done(self) -> None:
        self.worker = None
        self.progress.setRange(0, 1)
        self._update_buttons()

    # -- tables ------------------------------------------------------------------------------------
    def show_cells(self, cells) -> None:
        self.table.setRowCount(len(cells))
        for i, c in enumerate(cells):
            values = [c.targets + ("  ★ best" if c.best else ""), str(c.rank), "" if c.lr is None else f"{c.lr:g}",
                      f"{c.trainable_params:,}", "" if c.final_loss is None else f"{c.final_loss:.4f}",
                      "" if c.best_eval_loss is None else f"{c.best_eval_loss:.4f}",
                      "" if c.seconds is None else f"{c.seconds:.0f}", c.status]
            for j, text in enumerate(values):
                item = QTableWidgetItem(text)
                if c.best:
                    f = item.font()
                    f.setBold(True)
                    item.setFont(f)
                self.table.setItem(i, j, item)
        self.table.resizeColumnsToContents()
        known = {self.heat_value.itemText(i) for i in range(self.heat_value.count())}
        for key in sorted({f"metrics.{m}" for c in cells for m in (c.metrics or {})} - known):
            self.heat_value.addItem(key)  # Evaluate's scores of the cells, where they were computed
        self._fill_heatmap()
        self._update_buttons()

    def _fill_heatmap(self) -> None:
        from core.sweep_report import heatmap

        h = heatmap(self.cells, self.heat_value.currentText())
        self.heat.setRowCount(len(h["ranks"]))
        self.heat.setColumnCount(len(h["targets"]))
        self.heat.setVerticalHeaderLabels([f"r = {r}" for r in h["ranks"]])
        self.heat.setHorizontalHeaderLabels(h["targets"])
        flat = [v for row in h["values"] for v in row if v is not None]
        lo, hi = (min(flat), max(flat)) if flat else (0, 0)
        for i, row in enumerate(h["values"]):
            for j, v in enumerate(row):
                text = "" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:.4f}")
                item = QTableWidgetItem(text)
                item.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
                if v is not None and hi > lo:
                    t = (v - lo) / (hi - lo)
                    good = 1 - t if h["lower_is_better"] else t  # green is better
                    item.setBackground(QBrush(QColor(int(250 - 90 * good), int(190 + 60 * good), int(190 - 20 * good))))
                self.heat.setItem(i, j, item)
        self.heat.resizeColumnsToContents()

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        if self.worker is not None:
            self.worker.cancel()
        super().closeEvent(event)
