"""The Evaluate page: did the fine-tune work? Answers of the base model and of adapters from the
library on held-out examples, scored with task metrics (core.evaluate, core.metrics).

A thin view: the form gathers the choices, one :class:`studio.workers.FunctionWorker` runs
core.library_jobs.evaluate_on_session under an "evaluate" ticket taken on the click (reading the
examples, answering on the window's model, or loading it into the window when none fits the Model
page's settings, scoring, storing the scores with each library adapter), and the page shows the two tables core.eval_results gives: systems ×
metrics with 95 % bootstrap intervals, and the examples with every system's answer, sortable by the
per-example score or by how much the adapter gains over the base.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (QAbstractItemView, QCheckBox, QComboBox, QFileDialog, QFormLayout, QGridLayout,
                               QGroupBox, QHBoxLayout, QHeaderView, QLabel, QLineEdit, QListWidget,
                               QListWidgetItem, QProgressBar, QPushButton, QSpinBox, QSplitter, QTableWidget,
                               QTableWidgetItem, QVBoxLayout, QWidget)

from core.metrics import DEFAULT_METRICS, DESCRIPTIONS, HIGHER_IS_BETTER, METRICS
from studio import workers
from studio.pages import Page, setting

SOURCES = ("A file with reference answers", "A run's validation split")
BETTER, WORSE = QColor(200, 235, 200), QColor(245, 205, 205)


def _number(value: float | None, metric: str) -> str:
    if value is None:
        return "–"
    return f"{value:.1f}" if metric in ("bleu", "chrf") else f"{value:.3f}"


class _Item(QTableWidgetItem):
    """A cell that sorts by a number (None last) while showing text."""

    def __init__(self, text: str, key: float | None = None):
        super().__init__(text)
        self.key = key
        self.setFlags(self.flags() & ~Qt.ItemFlag.ItemIsEditable)

    def __lt__(self, other):
        if isinstance(other, _Item) and (self.key is not None or other.key is not None):
            a = self.key if self.key is not None else float("-inf")
            b = other.key if other.key is not None else float("-inf")
            return a < b
        return super().__lt__(other)


class EvaluatePage(Page):
    KEY = "evaluate"
    TITLE = "Evaluate"
    ICON = "SP_FileDialogContentsView"

    def __init__(self, state, parent: QWidget | None = None):
        super().__init__(state, parent)
        self.worker = None
        self.result = None
        split = QSplitter(Qt.Orientation.Horizontal, self)
        split.addWidget(self._form())
        split.addWidget(self._results())
        split.setStretchFactor(1, 1)
        split.setSizes([330, 900])
        lay = QVBoxLayout(self)
        lay.setContentsMargins(8, 8, 8, 8)
        lay.addWidget(split)
        state.library_changed.connect(self.refresh_adapters)
        self.refresh_adapters()
        self._update_buttons()

    # -- the form ----------------------------------------------------------------------------------
    def _form(self) -> QWidget:
        w = QWidget()
        v = QVBoxLayout(w)
        v.setContentsMargins(0, 0, 0, 0)
        box = QGroupBox("Answer with")
        b = QVBoxLayout(box)
        self.base_box = QCheckBox("The base model alone")
        self.base_box.setChecked(True)
        self.adapter_list = QListWidget()
        self.adapter_list.setToolTip("Tick the library's adapters to compare; each answers the same prompts")
        self.adapter_list.itemChanged.connect(lambda _i: self._update_buttons())
        b.addWidget(self.base_box)
        self.adapter_list.setMaximumHeight(180)
        b.addWidget(self.adapter_list)
        v.addWidget(box)

        box = QGroupBox("Held-out examples")
        f = QVBoxLayout(box)
        self.source = QComboBox()
        self.source.addItems(SOURCES)
        self.source.setToolTip("A file whose rows carry reference answers (prompt/completion, instruction/output "
                               "or chat), or a run folder: its validation split, rows it never trained on")
        row = QHBoxLayout()
        self.path = QLineEdit()
        self.path.setPlaceholderText("held_out.jsonl, or a run folder")
        self.path.textChanged.connect(lambda _t: self._update_buttons())
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        row.addWidget(self.path, 1)
        row.addWidget(browse)
        f.addWidget(self.source)
        f.addLayout(row)
        v.addWidget(box)

        box = QGroupBox("Metrics")
        g = QGridLayout(box)
        self.metric_boxes = {}
        for i, m in enumerate(METRICS):
            c = QCheckBox(m)
            c.setChecked(m in DEFAULT_METRICS)
            c.setToolTip(DESCRIPTIONS[m])
            c.toggled.connect(lambda _c: self._update_buttons())
            self.metric_boxes[m] = c
            g.addWidget(c, i // 2, i % 2)
        v.addWidget(box)

        form = QFormLayout()
        self.max_new = QSpinBox(minimum=1, maximum=4096, value=128)
        self.max_new.setToolTip("The longest answer, in tokens; answers end earlier at the end-of-turn token")
        self.limit = QSpinBox(minimum=0, maximum=1_000_000, value=0)
        self.limit.setSpecialValueText("all")
        self.limit.setToolTip("Evaluate the first N examples only (0: all)")
        self.batch = QSpinBox(minimum=1, maximum=256, value=8)
        self.batch.setToolTip("Prompts answered together; Cancel stops within one batch")
        form.addRow("Max new tokens", self.max_new)
        form.addRow("Examples", self.limit)
        form.addRow("Batch size", self.batch)
        v.addLayout(form)

        row = QHBoxLayout()
        self.start_button = QPushButton("Evaluate")
        self.start_button.setDefault(True)
        self.start_button.setToolTip("Answer greedily with each ticked system and score the answers")
        self.start_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        row.addWidget(self.start_button)
        row.addWidget(self.cancel_button)
        v.addLayout(row)
        self.progress = QProgressBar()
        self.status = QLabel("Greedy decoding: the same prompts give the same answers every time.")
        self.status.setWordWrap(True)
        v.addWidget(self.progress)
        v.addWidget(self.status)
        v.addStretch(1)
        return w

    def _results(self) -> QWidget:
        w = QWidget()
        v = QVBoxLayout(w)
        v.setContentsMargins(0, 0, 0, 0)
        v.addWidget(QLabel("<b>Systems × metrics</b> (95 % bootstrap interval in brackets)"))
        self.summary = QTableWidget(0, 0)
        self.summary.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.summary.setMaximumHeight(150)
        v.addWidget(self.summary)
        row = QHBoxLayout()
        row.addWidget(QLabel("<b>Examples</b>, scored by"))
        self.sort_metric = QComboBox()
        self.sort_metric.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        self.sort_metric.setToolTip("The per-example score shown beside each answer; sort any column by clicking it")
        self.sort_metric.currentTextChanged.connect(lambda _t: self._fill_examples())
        row.addWidget(self.sort_metric)
        row.addStretch(1)
        self.export_csv = QPushButton("Export CSV…")
        self.export_csv.clicked.connect(lambda: self._export("csv"))
        self.export_json = QPushButton("Export JSON…")
        self.export_json.clicked.connect(lambda: self._export("json"))
        row.addWidget(self.export_csv)
        row.addWidget(self.export_json)
        v.addLayout(row)
        self.examples = QTableWidget(0, 0)
        self.examples.setSortingEnabled(True)
        self.examples.setWordWrap(True)
        self.examples.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        v.addWidget(self.examples, 1)
        return w

    # -- state -------------------------------------------------------------------------------------
    def refresh_adapters(self) -> None:
        from core.library import Library

        ticked = {i.data(Qt.ItemDataRole.UserRole) for i in self._items() if i.checkState() == Qt.CheckState.Checked}
        self.adapter_list.blockSignals(True)
        self.adapter_list.clear()
        try:
            entries = Library().entries()
        except Exception as e:  # noqa: BLE001 - an unreadable library is shown, not fatal
            entries = []
            self.status.setText(f"the library could not be read: {e}")
        for e in entries:
            item = QListWidgetItem(f"{e.name}  (r={e.rank}, {len(e.targets)} targets)")
            item.setData(Qt.ItemDataRole.UserRole, str(e.path))
            item.setData(Qt.ItemDataRole.UserRole + 1, e.name)
            item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(Qt.CheckState.Checked if str(e.path) in ticked else Qt.CheckState.Unchecked)
            item.setToolTip(f"{e.path}\nbase model: {e.base_model}")
            self.adapter_list.addItem(item)
        self.adapter_list.blockSignals(False)
        self._update_buttons()

    def _items(self) -> list[QListWidgetItem]:
        return [self.adapter_list.item(i) for i in range(self.adapter_list.count())]

    def chosen_adapters(self) -> list[tuple[str, str]]:
        return [(i.data(Qt.ItemDataRole.UserRole), i.data(Qt.ItemDataRole.UserRole + 1)) for i in self._items()
                if i.checkState() == Qt.CheckState.Checked]

    def chosen_metrics(self) -> list[str]:
        return [m for m, c in self.metric_boxes.items() if c.isChecked()]

    def _update_buttons(self) -> None:
        running = self.worker is not None
        ready = bool(self.path.text().strip()) and bool(self.chosen_metrics()) and (
            self.base_box.isChecked() or bool(self.chosen_adapters()))
        self.start_button.setEnabled(ready and not running)
        self.cancel_button.setEnabled(running)
        self.export_csv.setEnabled(self.result is not None and not running)
        self.export_json.setEnabled(self.result is not None and not running)

    def _browse(self) -> None:
        if self.source.currentIndex() == 1:
            path = QFileDialog.getExistingDirectory(self, "A run folder")
        else:
            path, _ = QFileDialog.getOpenFileName(self, "Held-out examples", "",
                                                  "Datasets (*.jsonl *.json *.csv *.tsv *.parquet);;All files (*)")
        if path:
            self.path.setText(path)

    # -- the job -----------------------------------------------------------------------------------
    def start(self) -> None:
        import copy

        from core.library_jobs import evaluate_on_session

        if self.worker is not None:
            return
        ticket = self.state.claim("evaluate", need_model=False)  # refused, naming the holder, while a job has the model
        if ticket is None:
            return
        w = workers.FunctionWorker(
            evaluate_on_session, ticket, copy.deepcopy(self.state.config.model), self.source.currentIndex(),
            self.path.text().strip(), self.chosen_adapters(), self.base_box.isChecked(), self.chosen_metrics(),
            self.max_new.value(), self.limit.value() or None, self.batch.value())
        w.progress.connect(self._on_progress)
        w.finished.connect(self._on_finished)
        w.failed.connect(self._on_failed)
        w.cancelled.connect(lambda: self.status.setText("Cancelled."))
        w.done.connect(self._on_done)
        self.worker = w
        self.progress.setRange(0, 0)
        self.status.setText("Starting…")
        workers.start(w, owner=self, ticket=ticket)
        self._update_buttons()

    def cancel(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            self.status.setText("Cancelling after this batch…")

    def _on_progress(self, p) -> None:
        text, done, total = p
        self.status.setText(text)
        self.progress.setRange(0, max(1, total))
        self.progress.setValue(done)

    def _on_failed(self, message: str) -> None:
        self.status.setText(message)
        self.state.show_error(message)

    def _on_finished(self, result) -> None:
        self.show_result(result)
        self.status.setText(f"Scored {len(result.examples)} examples with {len(result.systems)} systems.")
        self.state.library_changed.emit()

    def _on_done(self) -> None:
        self.worker = None
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if self.result is not None else 0)
        self._update_buttons()

    # -- results -----------------------------------------------------------------------------------
    def show_result(self, result) -> None:
        self.result = result
        cols = [m for m in result.metrics if m != "loss"] + (["loss", "perplexity"] if "loss" in result.metrics else [])
        self.summary.setColumnCount(len(cols))
        self.summary.setRowCount(len(result.systems))
        self.summary.setHorizontalHeaderLabels(cols)
        self.summary.setVerticalHeaderLabels([s.name for s in result.systems])
        for j, m in enumerate(cols):
            self.summary.horizontalHeaderItem(j).setToolTip(DESCRIPTIONS.get(m, m))
            values = [s.scores.get(m) for s in result.systems if s.scores.get(m) is not None]
            best = (max(values) if HIGHER_IS_BETTER.get(m, True) else min(values)) if values else None
            for i, s in enumerate(result.systems):
                v, ci = s.scores.get(m), s.intervals.get(m)
                text = _number(v, m) + (f"  [{_number(ci[0], m)}, {_number(ci[1], m)}]" if ci else "")
                item = _Item(text, v)
                if v is not None and v == best and len(result.systems) > 1 and values.count(best) == 1:
                    item.setFont(self._bold())
                self.summary.setItem(i, j, item)
        self.summary.resizeColumnsToContents()
        scored = list(result.metrics)
        self.sort_metric.blockSignals(True)
        self.sort_metric.clear()
        self.sort_metric.addItems(scored)
        self.sort_metric.blockSignals(False)
        self._fill_examples()
        self._update_buttons()

    def _bold(self):
        f = self.font()
        f.setBold(True)
        return f

    def _fill_examples(self) -> None:
        from core.eval_results import example_rows

        if self.result is None or not self.sort_metric.currentText():
            return
        metric = self.sort_metric.currentText()
        rows = example_rows(self.result, metric)
        names = [s.name for s in self.result.systems]
        heads = ["row", "prompt", "reference"] + [f"{n}" for n in names] + [f"score {n}" for n in names]
        if "base" in names and len(names) > 1:
            heads.append(f"Δ {metric}")
        self.examples.setSortingEnabled(False)
        self.examples.clear()
        self.examples.setColumnCount(len(heads))
        self.examples.setRowCount(len(rows))
        self.examples.setHorizontalHeaderLabels(heads)
        higher = HIGHER_IS_BETTER.get(metric, True)
        for i, r in enumerate(rows):
            self.examples.setItem(i, 0, _Item(str(r["row"]), r["row"]))
            self.examples.setItem(i, 1, _Item(r["prompt"]))
            self.examples.setItem(i, 2, _Item(r["reference"]))
            for k, n in enumerate(names):
                answer = _Item(r["answers"][n])
                base_score, score = r["scores"].get("base"), r["scores"][n]
                if n != "base" and base_score is not None and score is not None and score != base_score:
                    answer.setBackground(QBrush(BETTER if (score > base_score) == higher else WORSE))
                if n != "base" and "base" in r["answers"] and r["answers"][n] != r["answers"]["base"]:
                    answer.setToolTip(f"differs from the base model's answer:\n{r['answers']['base']}")
                self.examples.setItem(i, 3 + k, answer)
                self.examples.setItem(i, 3 + len(names) + k, _Item(_number(score, metric), score))
            if len(heads) > 3 + 2 * len(names):
                self.examples.setItem(i, len(heads) - 1, _Item(_number(r["delta"], metric), r["delta"]))
        header = self.examples.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        for c in range(len(heads)):
            self.examples.setColumnWidth(c, 50 if c == 0 else 90 if c >= 3 + len(names) else 200)
        self.examples.setSortingEnabled(True)
        self.examples.resizeRowsToContents()

    def _export(self, kind: str) -> None:
        if self.result is None:
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export the results", f"evaluation.{kind}",
                                              "CSV (*.csv)" if kind == "csv" else "JSON (*.json)")
        if path:
            self.export(path, kind)

    def export(self, path: str, kind: str) -> None:
        """Write the systems × metrics table (CSV) or results.json with every answer (JSON)."""
        from core import atomic
        from core.eval_results import results_csv

        data = self.result.to_dict()
        if kind == "csv":
            atomic.write_text(path, results_csv(data))
        else:
            atomic.write_json(path, {**data, "predictions": self.result.prediction_rows()})
        self.status.setText(f"Wrote {Path(path).name}.")

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.cancel()

    def save_settings(self, settings) -> None:
        settings.setValue("path", self.path.text())
        settings.setValue("source", self.source.currentIndex())
        settings.setValue("max_new_tokens", self.max_new.value())
        settings.setValue("metrics", ",".join(self.chosen_metrics()))

    def restore_settings(self, settings) -> None:
        self.path.setText(setting(settings, "path", ""))
        self.source.setCurrentIndex(setting(settings, "source", 0, int))
        self.max_new.setValue(setting(settings, "max_new_tokens", 128, int))
        chosen = setting(settings, "metrics", ",".join(DEFAULT_METRICS)).split(",")
        for m, c in self.metric_boxes.items():
            c.setChecked(m in chosen)


PAGE = EvaluatePage
