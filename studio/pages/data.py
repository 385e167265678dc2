"""The Data page: the dataset file, its detected format and field mapping, a table preview, one
example as the model will see it (trained tokens highlighted, end-of-turn visible), the token-length
histogram, the truncated count and the problems in the file, all before training.

Everything is ``core.data``: ``read`` and ``detect_format`` for the file, ``encode`` and
``render_marked`` for the example, ``prepare`` (in a worker, with progress and cancel) for the
whole file's lengths, truncation and problems, ``token_stats`` for the histogram.
"""

from __future__ import annotations

import json
from pathlib import Path

from PySide6.QtCore import QAbstractTableModel, QModelIndex, Qt, QTimer
from PySide6.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout,
                               QHeaderView, QLabel, QLineEdit, QListWidget, QProgressBar, QPushButton,
                               QSpinBox, QSplitter, QTableView, QTabWidget, QVBoxLayout, QWidget)

from core.config import FORMATS
from studio import workers
from studio.messages import rephrase
from studio.pages import Page, setting
from studio.widgets.example_view import ExampleView
from studio.widgets.histogram import LengthHistogram

PREVIEW_ROWS = 200


def _short(v, limit: int = 160) -> str:
    s = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
    s = s.replace("\n", " ⏎ ")
    return s if len(s) <= limit else s[: limit - 1] + "…"


class RowsModel(QAbstractTableModel):
    """A read-only table over a list of dict rows (the first rows of the dataset)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.columns: list[str] = []
        self.rows: list[dict] = []

    def set_rows(self, columns: list[str], rows: list[dict]) -> None:
        self.beginResetModel()
        self.columns, self.rows = list(columns), list(rows)
        self.endResetModel()

    def rowCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.columns)

    def data(self, index, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        v = self.rows[index.row()].get(self.columns[index.column()])
        if role == Qt.ItemDataRole.DisplayRole:
            return _short(v)
        if role == Qt.ItemDataRole.ToolTipRole:
            return _short(v, 2000)
        return None

    def headerData(self, section, orientation, role=Qt.ItemDataRole.DisplayRole):
        if role != Qt.ItemDataRole.DisplayRole:
            return None
        if orientation == Qt.Orientation.Horizontal:
            return self.columns[section]
        return str(section + 1)


class ReadFailed(Exception):
    """The file was read but its format or fields do not fit: carries its columns so the page can
    offer the field mapping that fixes it."""

    def __init__(self, message: str, columns: list[str]):
        super().__init__(message)
        self.columns = columns


def _columns_and_rows(path: str) -> tuple[list[str], list[dict]]:
    """The file's columns and first rows when its format cannot be worked out, so the page can show
    them beside the field mapping that fixes it (([], []) when the file itself is unreadable)."""
    from core import data

    try:
        ds, _ = data._load(Path(path).expanduser(), None)  # the reading half of data.read
        return list(ds.column_names), ds.select(range(min(PREVIEW_ROWS, len(ds)))).to_list()
    except Exception:  # noqa: BLE001 - the file itself is unreadable: read's message says why
        return [], []


def _inspect(path: str, fmt: str, fields: dict, tokenizer, max_length: int, train_on_prompt: bool,
             chat_template: str = "auto"):
    """Read the file, detect the format, and render the first example (fast: no full tokenising)."""
    from core import data
    from core.errors import StudioError
    from studio.messages import for_window

    try:
        src = data.read(path, format=fmt, fields=fields or None)
    except StudioError as e:
        columns, rows = _columns_and_rows(path)
        return {"error": for_window(e), "columns": columns, "rows": rows}
    n = min(PREVIEW_ROWS, src.rows)
    rows = src.dataset.select(range(n)).to_list()
    out = {"source": src, "columns": list(src.columns), "rows": rows, "format": src.format,
           "fields": dict(src.fields), "count": src.rows, "pieces": None, "example_error": None}
    if tokenizer is not None and rows:
        try:
            enc = data.encode(rows[0], tokenizer, src.format, src.fields, max_length=max_length,
                              train_on_prompt=train_on_prompt, chat_template=chat_template)
            out["pieces"] = data.render_marked(enc, tokenizer)
            out["example_tokens"] = len(enc.input_ids)
            out["example_trained"] = sum(1 for x in enc.labels if x != -100)
        except Exception as e:  # noqa: BLE001 - shown beside the example, the rest still works
            out["example_error"] = workers.error_message(e)
    return out


def _prepare(cfg, tokenizer, seed, source, *, progress, cancelled):
    from core import data

    prepared = data.prepare(cfg, tokenizer, seed=seed, progress=lambda d, t: progress((d, t)),
                            cancel=cancelled, source=source)
    stats = prepared.stats.get("lengths") if isinstance(prepared.stats, dict) else None
    if not stats:
        import numpy as np

        stats = data.token_stats(np.concatenate([prepared.train.lengths, prepared.val.lengths]))
    return {"stats": stats, "truncated": prepared.truncated, "problems": list(prepared.problems),
            "train": prepared.stats.get("train_examples", len(prepared.train)),
            "val": len(prepared.val), "format": prepared.format,
            "trained_tokens": prepared.stats.get("trained_tokens"), "tokens": prepared.stats.get("tokens"),
            "skipped": prepared.stats.get("skipped", 0), "max_length": cfg.max_length, "path": str(cfg.path)}


ROLE_LABELS = {"prompt": "Prompt", "completion": "Answer", "system": "System (optional)",
               "instruction": "Instruction", "input": "Input (optional)", "output": "Answer",
               "messages": "Messages", "text": "Text"}
"""How the field mapping names each format's fields."""

MAPPING_FORMAT = "prompt-completion"
"""The fields offered when the format cannot be detected: which column is the prompt, which the
answer, and (optionally) the system prompt."""


class DataPage(Page):
    KEY = "data"
    TITLE = "Data"
    ICON = "SP_FileDialogDetailedView"

    def __init__(self, state, parent=None):
        super().__init__(state, parent)
        self.inspected: dict | None = None
        self.prepared: dict | None = None
        self._inspect_worker = None
        self._prepare_worker = None
        self._pending_prepare = False
        self._field_combos: dict[str, QComboBox] = {}
        self._errors: dict[str, str] = {}  # what this page put in the message bar, by source (for retracting)

        # -- the file -------------------------------------------------------------------------------
        self.path = QLineEdit()
        self.path.setPlaceholderText("a .jsonl, .json, .csv, .parquet or .txt file, or a save_to_disk folder")
        self.path.editingFinished.connect(self._on_path_edited)
        browse = QPushButton("Choose file…")
        browse.clicked.connect(self._browse)
        sample = QPushButton("Use the sample")
        sample.setToolTip("The bundled sample dataset")
        sample.clicked.connect(self.use_sample)
        file_row = QHBoxLayout()
        file_row.addWidget(self.path, 1)
        file_row.addWidget(browse)
        file_row.addWidget(sample)

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

        fmt_box = QGroupBox("Format")
        ff = QFormLayout(fmt_box)
        ff.addRow("Format", self.format)
        ff.addRow("Detected", self.detected)
        ff.addRow("Fields", self.fields_box)
        ff.addRow("Chat template", self._template_row())
        ff.addRow("Max length", self.max_length)
        ff.addRow(self.train_on_prompt)
        ff.addRow(self.packing)

        self.count_label = QLabel("…")
        self.truncated_label = QLabel("…")
        self.stats_label = QLabel("…")
        self.stats_label.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.hide()
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.hide()
        self.cancel_button.clicked.connect(self.cancel)
        prog_row = QHBoxLayout()
        prog_row.addWidget(self.progress, 1)
        prog_row.addWidget(self.cancel_button)
        self.problems = QListWidget()
        self.problems.setWordWrap(True)
        self.problems.setAlternatingRowColors(True)
        stats_box = QGroupBox("Examples")
        sv = QVBoxLayout(stats_box)
        sf = QFormLayout()
        sf.addRow("Examples", self.count_label)
        sf.addRow("Truncated", self.truncated_label)
        sf.addRow("Tokens", self.stats_label)
        sv.addLayout(sf)
        sv.addLayout(prog_row)
        problems_box = QGroupBox("Problems in the file")
        pv = QVBoxLayout(problems_box)
        pv.addWidget(self.problems)

        left = QWidget()
        ll = QVBoxLayout(left)
        ll.setContentsMargins(0, 0, 0, 0)
        ll.addWidget(fmt_box)
        ll.addWidget(stats_box)
        ll.addWidget(problems_box, 1)

        # -- preview, example, histogram ------------------------------------------------------------
        self.table_model = RowsModel(self)
        self.table = QTableView()
        self.table.setModel(self.table_model)
        self.table.setAlternatingRowColors(True)
        self.table.setWordWrap(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.verticalHeader().setDefaultSectionSize(22)
        self.example = ExampleView()
        self.example_info = QLabel()
        ex = QWidget()
        el = QVBoxLayout(ex)
        el.setContentsMargins(0, 0, 0, 0)
        el.addWidget(self.example_info)
        el.addWidget(self.example, 1)
        self.histogram = LengthHistogram()
        self.tabs = QTabWidget()
        self.tabs.addTab(ex, "Example as trained")
        self.tabs.addTab(self.histogram, "Token lengths")
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.table)
        split.addWidget(self.tabs)
        split.setSizes([300, 420])

        body = QSplitter(Qt.Orientation.Horizontal)
        body.addWidget(left)
        body.addWidget(split)
        body.setSizes([360, 800])
        body.setStretchFactor(1, 1)
        lay = QVBoxLayout(self)
        lay.addLayout(file_row)
        lay.addWidget(body, 1)

        self._inspect_timer = QTimer(self)
        self._inspect_timer.setSingleShot(True)
        self._inspect_timer.setInterval(150)
        self._inspect_timer.timeout.connect(self.inspect)
        self._prepare_timer = QTimer(self)
        self._prepare_timer.setSingleShot(True)
        self._prepare_timer.setInterval(400)
        self._prepare_timer.timeout.connect(self.analyse)

        state.tokenizer_changed.connect(self._on_tokenizer)
        state.config_changed.connect(self._on_config)
        self._sync_from_config()

    # -- choosing the file ------------------------------------------------------------------------
    def current_path(self) -> str:
        from core.home import sample_dataset

        return self.state.config.data.path or str(sample_dataset())

    def set_path(self, path: str) -> None:
        """Use ``path`` (empty: the bundled sample); the format and fields are detected again."""
        d = self.state.config.data
        d.path = path
        d.format = "auto"
        d.fields = {}
        self._sync_from_config()
        self.state.changed("data")
        self._inspect_timer.start()

    def use_sample(self) -> None:
        self.set_path("")

    def _browse(self) -> None:
        start = str(Path(self.current_path()).parent)
        path, _ = QFileDialog.getOpenFileName(
            self, "A dataset", start, "Datasets (*.jsonl *.json *.csv *.parquet *.txt);;All files (*)")
        if path:
            self.set_path(path)

    def _on_path_edited(self) -> None:
        text = self.path.text().strip()
        from core.home import sample_dataset

        if text == str(sample_dataset()):
            text = ""
        if text != self.state.config.data.path:
            self.set_path(text)

    def _on_format(self, fmt: str) -> None:
        d = self.state.config.data
        if fmt == d.format:
            return
        d.format = fmt
        d.fields = {}
        self.state.changed("data")
        self._inspect_timer.start()

    def _on_field(self, *_):
        fields = {role: c.currentText() for role, c in self._field_combos.items() if c.currentText()}
        if fields == self.state.config.data.fields:
            return
        self.state.config.data.fields = fields
        self.state.changed("data")
        self._inspect_timer.start()

    def _on_options(self, *_):
        d = self.state.config.data
        d.max_length = self.max_length.value()
        d.train_on_prompt = self.train_on_prompt.isChecked()
        d.packing = self.packing.isChecked()
        self.state.changed("data")
        self._inspect_timer.start()

    def _sync_from_config(self) -> None:
        d = self.state.config.data
        self.path.setText(self.current_path())
        for w, v in ((self.format, d.format),):
            w.blockSignals(True)
            w.setCurrentText(v)
            w.blockSignals(False)
        self._show_template()
        for w, v in ((self.max_length, d.max_length),):
            w.blockSignals(True)
            w.setValue(v)
            w.blockSignals(False)
        for w, v in ((self.train_on_prompt, d.train_on_prompt), (self.packing, d.packing)):
            w.blockSignals(True)
            w.setChecked(v)
            w.blockSignals(False)

    def _on_config(self, part: str) -> None:
        if part == "all":
            self._sync_from_config()
            self._inspect_timer.start()
        elif part == "data" and self.max_length.value() != self.state.config.data.max_length:
            self._sync_from_config()  # max length edited on the Train page
            self._inspect_timer.start()

    def _on_tokenizer(self, tok) -> None:
        self._show_template()
        if tok is not None:
            self._inspect_timer.start()

    def page_shown(self) -> None:
        if self.inspected is None and self._inspect_worker is None:
            self._inspect_timer.start()

    # -- the chat template: a model without one gets a choice, not a silent default (core.chat) ----
    def _template_row(self) -> QWidget:
        from core import chat

        self.template = QComboBox()
        for key, words in chat.CHOICES.items():
            self.template.addItem(words, key)
        self.template.addItem("a template file…", "")
        self.template.activated.connect(self._on_template)
        self.template_note = QLabel()
        self.template_note.setWordWrap(True)
        box = QWidget()
        v = QVBoxLayout(box)
        v.setContentsMargins(0, 0, 0, 0)
        v.addWidget(self.template)
        v.addWidget(self.template_note)
        return box

    def _on_template(self, index: int) -> None:
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
            self.state.changed("data")
            self._inspect_timer.start()
        self._show_template()

    def _show_template(self) -> None:
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

    # -- reading, in workers ----------------------------------------------------------------------
    def inspect(self) -> None:
        """Read the file and render its first example (then analyse the whole file)."""
        if self._inspect_worker is not None:
            self._inspect_worker.cancel()
        d = self.state.config.data
        w = workers.FunctionWorker(_inspect, self.current_path(), d.format, dict(d.fields),
                                   self.state.tokenizer, d.max_length, d.train_on_prompt, d.chat_template)
        self._inspect_worker = w
        self.detected.setText("reading…")
        w.finished.connect(lambda r, w=w: self._on_inspected(r, w))
        w.failed.connect(lambda m, w=w: self._on_failed(m, w))
        workers.start(w, owner=self)

    def _on_failed(self, message: str, w) -> None:
        if w is not self._inspect_worker:
            return
        self._inspect_worker = None
        self._show_fields("", [], {})
        self.inspected = None
        self.prepared = None
        self.state.set_data_summary(None)
        self.table_model.set_rows([], [])
        self.detected.setText("–")
        self.count_label.setText("–")
        self.truncated_label.setText("–")
        self.stats_label.setText("–")
        self.truncated_label.setStyleSheet("")
        self.example.set_message(message)
        self.example_info.setText("")  # the previous file's "First example: ..." is not this file's
        self.histogram.clear()
        self.problems.clear()
        self.problems.addItem(message)
        self._show_error("inspect", message)

    def _show_error(self, source: str, message: str) -> None:
        self._errors[source] = message
        self.state.show_error(message)

    def _retract_error(self, *sources: str) -> None:
        """The input is good again: take back the messages this page showed about it."""
        for source in sources:
            self.state.retract_error(self._errors.pop(source, None))

    def _on_inspected(self, r: dict, w) -> None:
        if w is not self._inspect_worker:
            return
        if "error" in r:
            self._on_failed(r["error"], w)
            if r["columns"]:  # readable, but the format or fields need help: the rows and the mapping
                self._show_rows(r["columns"], r["rows"])
                fmt = self.state.config.data.format
                self._show_fields(fmt if fmt != "auto" else MAPPING_FORMAT, r["columns"],
                                  self.state.config.data.fields)
                self.detected.setText("not recognised: map the columns below")
                self.example.set_message("The first example appears here once the columns are mapped "
                                         "(Fields, on the left) or the format is chosen.")
            return
        self._inspect_worker = None
        self._retract_error("inspect", "prepare")
        self.inspected = r
        self._show_rows(r["columns"], r["rows"])
        auto = self.state.config.data.format == "auto"
        self.detected.setText(f"{r['format']}" + (" (detected)" if auto else " (chosen)"))
        self.count_label.setText(f"{r['count']:,}")
        self._show_fields(r["format"], r["columns"], r["fields"])
        if r["pieces"] is not None:
            self.example.set_pieces(r["pieces"])
            self.example_info.setText(f"First example: {r.get('example_tokens', 0)} tokens, "
                                      f"{r.get('example_trained', 0)} of them trained (highlighted)")
        elif r["example_error"]:
            self.example.set_message(r["example_error"])
            self.example_info.setText("")
        else:
            self.example.set_message("Waiting for the model's tokenizer…")
            self.example_info.setText("")
        self._prepare_timer.start()

    def _show_rows(self, columns: list[str], rows: list[dict]) -> None:
        self.table_model.set_rows(columns, rows)
        self.table.resizeColumnsToContents()
        for col in range(len(columns)):
            self.table.setColumnWidth(col, min(self.table.columnWidth(col), 280))

    def _show_fields(self, fmt: str, columns: list[str], fields: dict) -> None:
        while self.fields_form.rowCount():
            self.fields_form.removeRow(0)
        self._field_combos.clear()
        try:
            from core import data

            roles = tuple(data.FIELDS.get(fmt, {}))
        except ImportError:
            roles = ()
        roles = tuple(dict.fromkeys(list(roles) + list(fields)))
        for role in roles:
            c = QComboBox()
            c.addItem("")
            c.addItems(columns)
            c.setCurrentText(fields.get(role, ""))
            c.currentTextChanged.connect(self._on_field)
            c.setToolTip(f"The column that holds the {role}")
            self._field_combos[role] = c
            self.fields_form.addRow(ROLE_LABELS.get(role, role), c)

    def analyse(self) -> None:
        """Tokenise the whole file (a worker): lengths, truncation, problems."""
        tok = self.state.tokenizer
        if tok is None or self.inspected is None:
            return
        if self._prepare_worker is not None:
            self._pending_prepare = True
            self._prepare_worker.cancel()
            return
        cfg = self.state.config.copy()
        cfg.data.path = self.current_path()
        w = workers.FunctionWorker(_prepare, cfg.data, tok, cfg.train.seed, self.inspected.get("source"))
        self._prepare_worker = w
        self.progress.setRange(0, 0)
        self.progress.show()
        self.cancel_button.show()
        w.progress.connect(self._on_prepare_progress)
        w.finished.connect(self._on_prepared)
        w.failed.connect(self._on_prepare_failed)
        w.done.connect(self._prepare_done)
        workers.start(w, owner=self)

    def cancel(self) -> None:
        for w in (self._prepare_worker, self._inspect_worker):
            if w is not None:
                w.cancel()

    def _on_prepare_progress(self, p) -> None:
        done, total = p
        if total:
            self.progress.setRange(0, int(total))
            self.progress.setValue(int(done))

    def _on_prepared(self, r: dict) -> None:
        self.prepared = r
        self.state.set_data_summary(r)  # the memory estimate uses the real lengths
        st = r["stats"]
        total = r["train"] + r["val"]
        self.count_label.setText(f"{total:,} ({r['train']:,} train, {r['val']:,} validation)"
                                 if r["val"] else f"{total:,}")
        pct = 100 * r["truncated"] / total if total else 0
        self.truncated_label.setText(f"{r['truncated']:,} ({pct:.1f} %) longer than "
                                     f"{self.state.config.data.max_length} tokens")
        self.truncated_label.setStyleSheet("color: #D55E00;" if r["truncated"] else "")
        if st.get("count"):
            text = (f"mean {st.get('mean', 0):.0f}, median {st.get('p50', 0):.0f}, p90 {st.get('p90', 0):.0f}, "
                    f"max {st.get('max', 0):,} per example")
            if r.get("tokens"):
                text += f"; {r['tokens']:,} in all, {r.get('trained_tokens') or 0:,} trained"
            self.stats_label.setText(text)
        h = st.get("histogram") or {}
        self.histogram.set_histogram(h.get("edges", []), h.get("counts", []), self.state.config.data.max_length)
        self._retract_error("prepare")
        self.problems.clear()
        for p in r["problems"]:
            p = rephrase(p)  # a row's problem may name --max-length: the window has Max length
            self.problems.addItem(p)
            self.problems.item(self.problems.count() - 1).setToolTip(p)
        if not r["problems"]:
            self.problems.addItem("none found")

    def _on_prepare_failed(self, message: str) -> None:
        self.prepared = None
        self.state.set_data_summary(None)
        self.problems.clear()
        self.problems.addItem(message)
        self._show_error("prepare", message)

    def _prepare_done(self) -> None:
        self._prepare_worker = None
        self.progress.hide()
        self.cancel_button.hide()
        if self._pending_prepare:
            self._pending_prepare = False
            self.analyse()

    # -- settings ---------------------------------------------------------------------------------
    def save_settings(self, s) -> None:
        d = self.state.config.data
        s.setValue("path", d.path)
        s.setValue("format", d.format)
        s.setValue("fields", json.dumps(d.fields))
        s.setValue("max_length", d.max_length)
        s.setValue("train_on_prompt", d.train_on_prompt)
        s.setValue("packing", d.packing)

    def restore_settings(self, s) -> None:
        d = self.state.config.data
        d.path = setting(s, "path", d.path, str)
        fmt = setting(s, "format", d.format, str)
        d.format = fmt if fmt in FORMATS else "auto"
        try:
            f = json.loads(setting(s, "fields", "{}", str))
            d.fields = {str(k): str(v) for k, v in f.items()} if isinstance(f, dict) else {}
        except ValueError:
            d.fields = {}
        d.max_length = max(8, setting(s, "max_length", d.max_length, int))
        d.train_on_prompt = setting(s, "train_on_prompt", d.train_on_prompt, bool)
        d.packing = setting(s, "packing", d.packing, bool)
        self._sync_from_config()

    def shutdown(self) -> None:
        self.cancel()


PAGE = DataPage
