"""The Data page: the dataset (a file, a ``save_to_disk`` folder, or a Hub dataset with its split and
configuration), its detected format and field mapping, a table preview, one example as the model
will see it (trained tokens highlighted, end-of-turn visible), the token-length histogram, the
truncated count and the problems in the file, all before training.

The parts: studio.pages.data_source (where the data comes from), data_format (format, fields, chat
template, options), data_preview (rows, example, histogram). What they show is
core.data_preview: ``preview`` for the first rows and example (fast), ``analyse`` (in a worker,
with progress and cancel) for the whole file's lengths, truncation and problems.
"""

from __future__ import annotations

import json

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (QFormLayout, QGroupBox, QHBoxLayout, QLabel, QListWidget, QProgressBar, QPushButton,
                               QSplitter, QVBoxLayout, QWidget)

from core.config import FORMATS
from studio import workers
from studio.messages import for_window, rephrase
from studio.pages import Page, setting
from studio.pages.data_format import MAPPING_FORMAT, FormatBox
from studio.pages.data_preview import PreviewPane
from studio.pages.data_source import SourceRow, sample_path


def _inspect(path: str, d: dict, tokenizer):
    """core.data_preview.preview in a worker, its errors phrased for the window."""
    from core import data_preview

    out = data_preview.preview(path, tokenizer=tokenizer, **d)
    if "error" in out:
        out["error"] = for_window(out["error"])
    elif out["example_error"] is not None:
        out["example_error"] = workers.error_message(out["example_error"])
    return out


def _analyse(cfg, tokenizer, seed, source, *, progress, cancelled):
    from core import data_preview

    return data_preview.analyse(cfg, tokenizer, seed, source, progress=lambda d, t: progress((d, t)),
                                cancel=cancelled)


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
        self._errors: dict[str, str] = {}  # what this page put in the message bar, by source (for retracting)

        self.source = SourceRow(state)
        self.source.path_chosen.connect(self.set_path)
        self.source.hub_edited.connect(lambda: self._inspect_timer.start())
        self.path = self.source.path
        self.format_box = FormatBox(state)
        self.format_box.edited.connect(lambda: self._inspect_timer.start())
        fb = self.format_box
        self.format, self.detected, self.fields_form = fb.format, fb.detected, fb.fields_form
        self.template, self.template_note, self._on_template = fb.template, fb.template_note, fb.on_template
        self.max_length, self.train_on_prompt, self.packing = fb.max_length, fb.train_on_prompt, fb.packing
        self._field_combos = fb.field_combos

        left = QWidget()
        ll = QVBoxLayout(left)
        ll.setContentsMargins(0, 0, 0, 0)
        ll.addWidget(self.format_box)
        ll.addWidget(self._stats_box())
        problems_box = QGroupBox("Problems in the file")
        self.problems = QListWidget()
        self.problems.setWordWrap(True)
        self.problems.setAlternatingRowColors(True)
        QVBoxLayout(problems_box).addWidget(self.problems)
        ll.addWidget(problems_box, 1)

        self.preview = PreviewPane()
        pv = self.preview
        self.table, self.table_model, self.tabs = pv.table, pv.table_model, pv.tabs
        self.example, self.example_info, self.histogram = pv.example, pv.example_info, pv.histogram
        body = QSplitter(Qt.Orientation.Horizontal)
        body.addWidget(left)
        body.addWidget(self.preview)
        body.setSizes([360, 800])
        body.setStretchFactor(1, 1)
        lay = QVBoxLayout(self)
        lay.addWidget(self.source)
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

    def _stats_box(self) -> QGroupBox:
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
        box = QGroupBox("Examples")
        sv = QVBoxLayout(box)
        sf = QFormLayout()
        sf.addRow("Examples", self.count_label)
        sf.addRow("Truncated", self.truncated_label)
        sf.addRow("Tokens", self.stats_label)
        sv.addLayout(sf)
        sv.addLayout(prog_row)
        return box

    # -- choosing the dataset ---------------------------------------------------------------------
    def current_path(self) -> str:
        return self.state.config.data.path or sample_path()

    def set_path(self, path: str) -> None:
        """Use ``path`` (empty: the bundled sample); the format and fields are detected again, and a
        Hub dataset's split and configuration start from their defaults."""
        d = self.state.config.data
        d.path = path
        d.format = "auto"
        d.fields = {}
        d.split = d.subset = ""
        self._sync_from_config()
        self.state.changed("data")
        self._inspect_timer.start()

    def use_sample(self) -> None:
        self.set_path("")

    def _sync_from_config(self) -> None:
        self.source.sync(self.current_path())
        self.format_box.sync()

    def _on_config(self, part: str) -> None:
        if part == "all":
            self._sync_from_config()
            self._inspect_timer.start()
        elif part == "data" and self.max_length.value() != self.state.config.data.max_length:
            self._sync_from_config()  # max length edited on the Train page
            self._inspect_timer.start()

    def _on_tokenizer(self, tok) -> None:
        self.format_box.show_template()
        if tok is not None:
            self._inspect_timer.start()

    def page_shown(self) -> None:
        if self.inspected is None and self._inspect_worker is None:
            self._inspect_timer.start()

    # -- reading, in workers ----------------------------------------------------------------------
    def inspect(self) -> None:
        """Read the dataset and render its first example (then analyse the whole of it)."""
        if self._inspect_worker is not None:
            self._inspect_worker.cancel()
        d = self.state.config.data
        options = dict(format=d.format, fields=dict(d.fields), split=d.split, subset=d.subset,
                       max_length=d.max_length, train_on_prompt=d.train_on_prompt, chat_template=d.chat_template)
        w = workers.FunctionWorker(_inspect, self.current_path(), options, self.state.tokenizer)
        self._inspect_worker = w
        self.detected.setText("reading…")
        w.finished.connect(lambda r, w=w: self._on_inspected(r, w))
        w.failed.connect(lambda m, w=w: self._on_failed(m, w))
        workers.start(w, owner=self)

    def _on_failed(self, message: str, w) -> None:
        if w is not self._inspect_worker:
            return
        self._inspect_worker = None
        self.format_box.show_fields("", [], {})
        self.inspected = None
        self.prepared = None
        self.state.set_data_summary(None)
        self.preview.clear(message)
        for label in (self.detected, self.count_label, self.truncated_label, self.stats_label):
            label.setText("–")
        self.truncated_label.setStyleSheet("")
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
                self.preview.show_rows(r["columns"], r["rows"])
                fmt = self.state.config.data.format
                self.format_box.show_fields(fmt if fmt != "auto" else MAPPING_FORMAT, r["columns"],
                                            self.state.config.data.fields)
                self.detected.setText("not recognised: map the columns below")
                self.example.set_message("The first example appears here once the columns are mapped "
                                         "(Fields, on the left) or the format is chosen.")
            return
        self._inspect_worker = None
        self._retract_error("inspect", "prepare")
        self.inspected = r
        self.preview.show_rows(r["columns"], r["rows"])
        auto = self.state.config.data.format == "auto"
        self.detected.setText(f"{r['format']}" + (" (detected)" if auto else " (chosen)"))
        self.count_label.setText(f"{r['count']:,}")
        self.format_box.show_fields(r["format"], r["columns"], r["fields"])
        self.preview.show_example(r)
        self._prepare_timer.start()

    def analyse(self) -> None:
        """Tokenise the whole dataset (a worker): lengths, truncation, problems."""
        tok = self.state.tokenizer
        if tok is None or self.inspected is None:
            return
        if self._prepare_worker is not None:
            self._pending_prepare = True
            self._prepare_worker.cancel()
            return
        cfg = self.state.config.copy()
        cfg.data.path = self.current_path()
        w = workers.FunctionWorker(_analyse, cfg.data, tok, cfg.train.seed, self.inspected.get("source"))
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
        for key in ("path", "split", "subset", "format", "max_length", "train_on_prompt", "packing"):
            s.setValue(key, getattr(d, key))
        s.setValue("fields", json.dumps(d.fields))

    def restore_settings(self, s) -> None:
        d = self.state.config.data
        d.path = setting(s, "path", d.path, str)
        d.split = setting(s, "split", d.split, str)
        d.subset = setting(s, "subset", d.subset, str)
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
