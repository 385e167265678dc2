"""Library: every adapter the studio knows, what each one did, and what to do with it.

The table is a :class:`LibraryTableModel` (a ``QAbstractTableModel`` over ``core.library`` entries)
behind a :class:`LibraryFilter` proxy (search box on name and notes, base-model filter, sorting by
the raw value of a column, entries without a figure last). Beside it, the selected adapter's
details with editable notes, its loss curve and its ΔW analysis (``core.analysis``, in a worker).

Actions go through core and nowhere else:

* on the loaded model (``state.loaded``): apply (``core.adapter.load_adapter`` after
  ``core.library.check_adapter``: an adapter that does not fit is greyed with the reason and cannot
  be applied; one trained on different weights asks first), swap (``core.lora.swap_adapter``),
  merge and unmerge (``core.lora.merge_adapter`` / ``unmerge_adapter``), remove from the model;
  the adapter's name on the model is its library id;
* on the library: combine the selected adapters with weights (``core.combine``; the result is a new
  entry), export a merged model (``core.export.export_merged``, in a worker with progress and
  cancel), export an adapter (folder or zip), import (folder or zip), rename, delete (to the trash,
  with Undo through ``Library.restore``).

Anything that reads weights runs in a worker; while one runs the actions that could race with it
are disabled. Nothing touches the model while it trains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (QAbstractItemView, QComboBox, QDialog, QFileDialog, QFrame, QGridLayout, QHBoxLayout,
                               QHeaderView, QInputDialog, QLabel, QLineEdit, QMenu, QMessageBox, QPlainTextEdit,
                               QProgressBar, QPushButton, QSplitter, QTabWidget, QToolButton,
                               QVBoxLayout, QWidget)

from studio import workers
from studio.messages import rephrase
from studio.pages import Page, setting
from studio.pages.library_table import (ALL_BASES, COLUMN, COLUMNS, Compat, LibraryFilter,  # noqa: F401
                                        LibraryTableModel, LibraryTableView, _created, _targets,
                                        fit_columns)
from studio.widgets import format_bytes
from studio.widgets.combine_dialog import CombineDialog
from studio.widgets.export_dialog import MergedExportDialog
from studio.widgets import gguf_dialog


# -- jobs (run in worker threads) -------------------------------------------------------------------

def check_entries(items: list[tuple[str, str, dict | None]], model, *, cancelled) -> dict[str, Compat]:
    """Compatibility of each ``(id, folder, recorded fingerprint)`` with ``model`` (a LoadedModel:
    its fingerprint was taken at load, so what is merged into it since does not count)."""
    from core.library import check_adapter

    out: dict[str, Compat] = {}
    for entry_id, folder, recorded in items:
        if cancelled():
            break
        problems, warnings = check_adapter(folder, model, recorded=recorded)
        out[entry_id] = Compat(list(problems), list(warnings))
    return out


def analyse_folder(folder: str, model=None, energy: float = 0.9):
    """core.analysis of the adapter in ``folder`` (amplification when ``model`` is given)."""
    from core import adapter as adapter_io
    from core import analysis

    return analysis.analyse(adapter_io.read_adapter(folder), model=model, energy=energy)


def apply_to_model(model, folder: str, name: str, action: str, current: str | None = None) -> str:
    """Put library adapter ``folder`` on ``model`` as adapter ``name`` and do ``action`` with it:

    * ``apply``: make it the one active adapter (merged ones stay merged);
    * ``swap``: take ``current`` out and put this one in, merged if ``current`` was (the paper's task
      switch, core.lora.swap_adapter);
    * ``merge``: fold it into the weights.
    """
    from core import adapter as adapter_io
    from core import lora

    if name not in lora.adapter_names(model):
        adapter_io.load_adapter(model, folder, name=name, activate=False)
    if action == "apply":
        lora.set_active_adapters(model, [name])
    elif action == "swap":
        if current and current != name and current in lora.adapter_names(model):
            lora.swap_adapter(model, current, name)
        else:
            lora.set_active_adapters(model, [name])
    elif action == "merge":
        active = lora.active_adapters(model)
        if name not in active:
            lora.set_active_adapters(model, active + [name])
        lora.merge_adapter(model, name)
    else:  # pragma: no cover - the page only asks for the three above
        raise ValueError(action)
    return name


def change_on_model(model, name: str, action: str) -> str:
    """``unmerge`` or ``remove`` adapter ``name`` on ``model``."""
    from core import lora

    if action == "unmerge":
        lora.unmerge_adapter(model, name)
    elif action == "remove":
        lora.remove_adapter(model, name)
    return name


def combine_into_library(root: str, entry_ids: list[str], weights: list[float], mode: str, rank: int | None,
                         name: str, notes: str):
    """core.combine.combine_into_library on the library at ``root`` (a worker job)."""
    from core import combine
    from core.library import Library

    return combine.combine_into_library(Library(root), entry_ids, weights, mode=mode, rank=rank, name=name,
                                        notes=notes)


def export_merged_model(spec_or_loaded, folders: list[str], weights: list[float], mode: str, rank: int | None,
                        out: str, dtype: str | None = None, *, progress, cancelled):
    """core.export.export_merged (weights saved in ``dtype``: fp32, bf16, fp16 or auto) with progress;
    a cancel ends it at the next progress report."""
    from core import export
    from core.errors import Cancelled

    def report(message: str, fraction: float) -> None:
        if cancelled():
            raise Cancelled()
        progress((message, fraction))

    return export.export_merged(spec_or_loaded, folders, weights, combine=mode, rank=rank, out=out,
                                dtype=dtype, progress=report)


# -- dialogs -----------------------------------------------------------------------------------------

class UndoBar(QFrame):
    """"Moved … to the trash. Undo" after a delete, until dismissed or replaced."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.label = QLabel()
        self.label.setWordWrap(True)  # many long names must not widen the window
        self.undo = QPushButton("Undo")
        close = QToolButton()
        close.setText("✕")
        close.setAutoRaise(True)
        close.clicked.connect(self.hide)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(8, 2, 4, 2)
        lay.addWidget(self.label, 1)
        lay.addWidget(self.undo)
        lay.addWidget(close)
        self.hide()


# -- the page ----------------------------------------------------------------------------------------

class LibraryPage(Page):
    KEY = "library"
    TITLE = "Library"
    ICON = "SP_DirIcon"

    def __init__(self, state, parent: QWidget | None = None):
        super().__init__(state, parent)
        from core.library import Library

        self.library = Library()
        self.model = LibraryTableModel(self)
        self.proxy = LibraryFilter(self)
        self.proxy.setSourceModel(self.model)
        self.trashed: list = []  # entries deleted in this session, most recent last (for Undo)
        self.job: workers.Worker | None = None
        self.job_name = ""
        self.check_worker: workers.Worker | None = None
        self.analysis_worker: workers.Worker | None = None
        self.analysis_cache: dict[tuple[str, bool], Any] = {}
        self.compat_cache: dict[tuple[int, str, str], Compat] = {}
        self.current_id: str | None = None
        self.last_report: dict | None = None

        # dialogs go through these, so tests (and scripts) can answer them
        self.ask_text: Callable[[str, str, str], str | None] = self._ask_text
        self.ask_confirm: Callable[[str, str], bool] = self._ask_confirm
        self.ask_combine: Callable[[list, str, bool], dict | None] = self._ask_combine
        self.ask_save_path: Callable[[str, str, str], tuple[str, bool] | None] = self._ask_save_path
        self.ask_merged_export: Callable[[str], dict | None] = self._ask_merged_export
        self.ask_import_path: Callable[[bool], str | None] = self._ask_import_path

        self._build()
        self._wire()
        self.reload()

    # -- layout -----------------------------------------------------------------------------------
    def _build(self) -> None:
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search names, notes and targets…")
        self.search.setClearButtonEnabled(True)
        self.base_filter = QComboBox()
        self.base_filter.setMinimumContentsLength(18)
        self.base_filter.setToolTip("Show only adapters trained on this base model")
        filters = QHBoxLayout()
        filters.addWidget(self.search, 2)
        filters.addWidget(self.base_filter, 1)

        self.table = LibraryTableView()
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(COLUMN["created"], Qt.SortOrder.DescendingOrder)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.table.setAlternatingRowColors(True)
        self.table.verticalHeader().hide()
        self.table.setWordWrap(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setContextMenuPolicy(Qt.ContextMenuPolicy.ActionsContextMenu)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        header.setStretchLastSection(False)  # fit_columns gives spare width to the name instead
        self.empty = QLabel("The library is empty. Train an adapter on the Train page, or import one "
                            "(a PEFT adapter folder or a zip of one).")
        self.empty.setWordWrap(True)
        self.empty.setStyleSheet("color: palette(placeholder-text);")

        self.model_line = QLabel()
        self.model_line.setWordWrap(True)
        self.load_button = QPushButton("Load model")
        self.load_button.setToolTip("Load the model chosen on the Model page, to apply adapters to it")
        model_row = QHBoxLayout()
        model_row.addWidget(self.model_line, 1)
        model_row.addWidget(self.load_button)

        def button(text: str, tip: str, slot) -> QPushButton:
            b = QPushButton(text)
            b.setToolTip(tip)
            b.clicked.connect(slot)
            return b

        self.apply_button = button("Apply", "Put this adapter on the loaded model and make it the active one",
                                   self.apply_selected)
        self.swap_button = button("Swap to this", "Replace the active adapter with this one, merged if it was "
                                  "(the base weights are untouched)", self.swap_selected)
        self.merge_button = button("Merge", "Fold this adapter into the model's weights: no extra cost per token",
                                   self.merge_selected)
        self.unmerge_button = button("Unmerge", "Take this adapter back out of the weights", self.unmerge_selected)
        self.detach_button = button("Remove from model", "Take this adapter off the loaded model",
                                    self.detach_selected)
        self.combine_button = button("Combine…", "Make one adapter from the selected ones, with weights",
                                     self.combine_selected)
        self.export_merged_button = button("Export merged model…", "Write a Hugging Face model folder with the "
                                           "selected adapter(s) merged in", self.export_merged_selected)
        self.export_button = button("Export adapter…", "Save this adapter as a PEFT folder or a zip",
                                    self.export_selected)
        self.export_gguf_button = button("Export GGUF…", "GGUF for llama.cpp / Ollama: the model with the selected "
                                         "adapter(s) merged in, or the adapter alone, and a Modelfile",
                                         lambda: gguf_dialog.export_from_library(self))
        self.import_button = QPushButton("Import")
        self.import_button.setToolTip("Add an adapter (ours or PEFT's) from a folder or a zip")
        menu = QMenu(self.import_button)
        menu.addAction("Adapter folder…", lambda: self.import_dialog(folder=True))
        menu.addAction("Zip file…", lambda: self.import_dialog(folder=False))
        self.import_button.setMenu(menu)
        self.rename_button = button("Rename…", "Give this adapter a new name", self.rename_selected)
        self.delete_button = button("Delete", "Move the selected adapters to the trash (Undo brings them back)",
                                    self.delete_selected)
        # the actions in rows short enough that the page never needs more than the window's default
        # width (one row of all seven library actions made the window widen itself to 1296 px)
        actions = QGridLayout()
        actions.setContentsMargins(0, 0, 0, 0)
        for row, (label, buttons) in enumerate((
                ("Model:", (self.apply_button, self.swap_button, self.merge_button, self.unmerge_button,
                            self.detach_button)),
                ("Library:", (self.combine_button, self.export_merged_button, self.export_gguf_button,
                              self.export_button)),
                ("", (self.import_button, self.rename_button, self.delete_button)))):
            line = QHBoxLayout()
            for b in buttons:
                line.addWidget(b)
            line.addStretch(1)
            if label:
                actions.addWidget(QLabel(label), row, 0)
            actions.addLayout(line, row, 1)
        # the table's context menu, with the usual keys for rename (F2) and delete (Del)
        for b, key in ((self.apply_button, None), (self.merge_button, None), (self.export_button, None),
                       (self.rename_button, QKeySequence(Qt.Key.Key_F2)),
                       (self.delete_button, QKeySequence(QKeySequence.StandardKey.Delete))):
            act = QAction(b.text().rstrip("…"), self.table)
            act.triggered.connect(b.click)  # a disabled button ignores click(): same rules as the buttons
            if key is not None:
                act.setShortcut(key)
                act.setShortcutContext(Qt.ShortcutContext.WidgetShortcut)
            self.table.addAction(act)

        self.job_bar = QProgressBar()
        self.job_bar.setRange(0, 1000)
        self.job_cancel = QPushButton("Cancel")
        self.job_cancel.clicked.connect(self.cancel_job)
        self.job_row = QWidget()
        jr = QHBoxLayout(self.job_row)
        jr.setContentsMargins(0, 0, 0, 0)
        jr.addWidget(self.job_bar, 1)
        jr.addWidget(self.job_cancel)
        self.job_row.hide()
        self.undo_bar = UndoBar()
        self.undo_bar.undo.clicked.connect(self.undo_delete)

        left = QWidget()
        ll = QVBoxLayout(left)
        ll.setContentsMargins(0, 0, 0, 0)
        ll.addLayout(filters)
        ll.addWidget(self.table, 1)
        ll.addWidget(self.empty)
        ll.addWidget(self.undo_bar)
        ll.addLayout(model_row)
        ll.addLayout(actions)
        ll.addWidget(self.job_row)

        # -- the selected adapter -------------------------------------------------------------------
        self.title = QLabel()
        self.title.setWordWrap(True)
        self.title.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.facts = QLabel()
        self.facts.setWordWrap(True)
        self.facts.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.facts.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        self.compat_label = QLabel()
        self.compat_label.setWordWrap(True)
        self.notes = QPlainTextEdit()
        self.notes.setPlaceholderText("Notes: what this adapter is for, how it did…")
        self.notes.setMinimumHeight(80)
        self.save_notes_button = QPushButton("Save notes")
        self.save_notes_button.setEnabled(False)
        details = QWidget()
        dl = QVBoxLayout(details)
        dl.addWidget(self.title)
        dl.addWidget(self.compat_label)
        dl.addWidget(self.facts)
        dl.addWidget(QLabel("<b>Notes</b>"))
        dl.addWidget(self.notes, 1)
        row = QHBoxLayout()
        row.addStretch(1)
        row.addWidget(self.save_notes_button)
        dl.addLayout(row)

        from studio.widgets.curves import CurvesPlot
        from studio.widgets.delta_plot import DeltaPlot

        self.curve = CurvesPlot()
        self.delta = DeltaPlot()
        self.tabs = QTabWidget()
        self.tabs.addTab(details, "Details")
        self.tabs.addTab(self.curve, "Loss curve")
        self.tabs.addTab(self.delta, "ΔW analysis")

        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(left)
        split.addWidget(self.tabs)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        split.setChildrenCollapsible(False)
        split.setSizes([720, 340])  # the table (all its columns) first; the details wrap
        self.splitter = split
        lay = QVBoxLayout(self)
        lay.addWidget(split)

    def _wire(self) -> None:
        self.search.textChanged.connect(self.proxy.set_text)
        self.search.textChanged.connect(lambda *_: self._update_actions())
        self.base_filter.currentIndexChanged.connect(self._base_filter_changed)
        self.table.selectionModel().selectionChanged.connect(self._selection_changed)
        self.notes.textChanged.connect(lambda: self.save_notes_button.setEnabled(self._notes_dirty()))
        self.save_notes_button.clicked.connect(self.save_notes)
        self.load_button.clicked.connect(self.load_model)
        self.tabs.currentChanged.connect(lambda *_: self._maybe_analyse())
        self.state.library_changed.connect(self.reload)
        self.state.loaded_changed.connect(self._loaded_changed)
        self.state.training_changed.connect(lambda *_: self._update_actions())

    # -- reading the library ----------------------------------------------------------------------
    def reload(self) -> None:
        """Read the entries again (after any change, here or elsewhere) and keep the selection."""
        keep = self.selected_ids()
        try:
            entries = self.library.entries()
        except Exception as e:  # noqa: BLE001 - a broken library must not break the window
            self.state.show_error(workers.error_message(e))
            entries = []
        self.model.set_entries(entries)
        self._fill_base_filter(entries)
        self.empty.setVisible(not entries)
        self.table.setVisible(bool(entries))
        fit_columns(self.table)
        self.select_ids(keep)
        self._refresh_model_side()
        self._start_checks()
        if self.current_id and self.model.row_of(self.current_id) < 0:
            self._show_entry(None)

    def _fill_base_filter(self, entries) -> None:
        current = self.proxy.base_model
        bases = sorted({e.base_model for e in entries if e.base_model})
        self.base_filter.blockSignals(True)
        self.base_filter.clear()
        self.base_filter.addItem(ALL_BASES, "")
        for b in bases:
            self.base_filter.addItem(b, b)
        i = self.base_filter.findData(current)
        self.base_filter.setCurrentIndex(max(0, i))
        self.base_filter.blockSignals(False)
        if i < 0 and current:
            self.proxy.set_base_model("")

    def _base_filter_changed(self, *_):
        self.proxy.set_base_model(self.base_filter.currentData() or "")

    # -- selection --------------------------------------------------------------------------------
    def selected_entries(self) -> list:
        rows = self.table.selectionModel().selectedRows()
        out = [self.proxy.mapToSource(r).row() for r in sorted(rows, key=lambda r: r.row())]
        return [self.model.entries[r] for r in out]

    def selected_ids(self) -> list[str]:
        return [e.id for e in self.selected_entries()] if self.table.selectionModel() else []

    def select_ids(self, ids: list[str]) -> None:
        sel = self.table.selectionModel()
        sel.clearSelection()
        first = None
        for entry_id in ids:
            row = self.model.row_of(entry_id)
            if row < 0:
                continue
            index = self.proxy.mapFromSource(self.model.index(row, 0))
            if index.isValid():
                sel.select(index, sel.SelectionFlag.Select | sel.SelectionFlag.Rows)
                first = first or index
        if first is not None:
            sel.setCurrentIndex(first, sel.SelectionFlag.NoUpdate)  # keep the whole selection
            self.table.scrollTo(first)

    def select_name(self, name: str) -> None:
        self.select_ids([e.id for e in self.model.entries if e.name == name])

    def current_entry(self):
        entries = self.selected_entries()
        return entries[0] if len(entries) == 1 else None

    def _selection_changed(self, *_):
        if self._notes_dirty():
            self.save_notes()
        self._show_entry(self.current_entry())
        self._update_actions()

    # -- details ----------------------------------------------------------------------------------
    def _show_entry(self, entry) -> None:
        self.current_id = entry.id if entry is not None else None
        self.notes.blockSignals(True)
        if entry is None:
            n = len(self.selected_entries())
            self.title.setText(f"<b>{n} adapters selected</b>" if n > 1 else "<b>No adapter selected</b>")
            self.facts.setText("Select one adapter to see its details, loss curve and ΔW analysis."
                               if n <= 1 else "Combine them, or export them merged into one model.")
            self.compat_label.setText("")
            self.notes.setPlainText("")
            self.notes.setEnabled(False)
            self.curve.clear("")
            self.delta.set_message("Select one adapter to see what it changed.")
            self.notes.blockSignals(False)
            self.save_notes_button.setEnabled(False)
            return
        self.notes.setEnabled(True)
        self.notes.setPlainText(entry.notes or "")
        self.notes.blockSignals(False)
        self.save_notes_button.setEnabled(False)
        self.title.setText(f"<b style='font-size: 14pt'>{_html(entry.name)}</b>")
        t = entry.training or {}
        base = entry.base_model or "unknown"
        rows = [("Base model", "default (the bundled SmolLM2-135M-Instruct)" if base == "default" else base),
                ("Rank / alpha", f"r = {entry.rank}, α = {entry.alpha:g}" + (" (rsLoRA)" if entry.rslora else "")
                 if entry.rank is not None and entry.alpha is not None else "?"),
                ("Targets", f"{_targets(entry)} ({entry.modules} modules)"),
                ("Parameters", f"{entry.trainable_params:,}" if entry.trainable_params else "?"),
                ("Size on disk", format_bytes(entry.size_bytes)),
                ("Created", _created(entry.created))]
        if t:
            bits = []
            if t.get("steps") is not None:
                bits.append(f"{t['steps']} steps")
            if isinstance(t.get("final_loss"), (int, float)):
                bits.append(f"final loss {t['final_loss']:.4f}")
            best = next((t[k] for k in ("best_eval_loss", "best_val_loss") if isinstance(t.get(k), (int, float))), None)
            if best is not None:
                bits.append(f"best validation loss {best:.4f}")
            seconds = next((t[k] for k in ("duration_seconds", "duration_s") if isinstance(t.get(k), (int, float))),
                           None)
            if seconds is not None:
                from studio.widgets import format_duration

                bits.append(f"{format_duration(seconds)} of training")
            if bits:
                rows.append(("Training", ", ".join(bits)))
        ds = entry.dataset or {}
        if ds.get("path"):
            rows.append(("Dataset", str(ds["path"]) + (f" ({ds['rows']} rows)" if ds.get("rows") else "")))
        if entry.imported_from:
            rows.append(("Came from", entry.imported_from))
        from core.eval_results import stored_summary

        evaluated = stored_summary(entry.path)  # written by the Evaluate page
        if evaluated:
            rows.append(("Evaluation", evaluated))
        rows.append(("Folder", str(entry.path)))
        on = self.model.on_model.get(entry.id)
        if on:
            rows.append(("On the model", on))
        self.facts.setText("<table cellspacing='0' cellpadding='2'>" + "".join(
            f"<tr><td style='color: palette(placeholder-text); padding-right: 10px'>{_html(k)}</td>"
            f"<td>{_html(v)}</td></tr>" for k, v in rows) + "</table>")
        self._show_compat(entry)
        self.curve.set_series([(entry.name, entry.loss_curve, entry.eval_curve)],
                              message_if_empty="This adapter has no recorded loss curve (it was not trained "
                                               "by the studio, or its studio.json was lost).")
        self.delta.set_message("The analysis runs when this tab is shown.")
        self._maybe_analyse()

    def _show_compat(self, entry) -> None:
        c = self.model.compat.get(entry.id)
        if self.state.loaded is None:
            self.compat_label.setText("No model is loaded; load one to apply this adapter.")
        elif c is None:
            self.compat_label.setText("Checking whether it fits the loaded model…")
        elif c.problems:
            self.compat_label.setText("<span style='color:#C0392B'><b>Does not fit the loaded model:</b> "
                                      + _html(rephrase("; ".join(c.problems))) + "</span>")
        elif c.warnings:
            self.compat_label.setText("<span style='color:#C77700'><b>Fits, with a warning:</b> "
                                      + _html(rephrase("; ".join(c.warnings))) + "</span>")
        else:
            self.compat_label.setText("Fits the loaded model.")

    def _notes_dirty(self) -> bool:
        if self.current_id is None:
            return False
        row = self.model.row_of(self.current_id)
        return row >= 0 and self.notes.toPlainText() != (self.model.entries[row].notes or "")

    def save_notes(self) -> None:
        if self.current_id is None:
            return
        try:
            entry = self.library.set_notes(self.current_id, self.notes.toPlainText())
        except Exception as e:  # noqa: BLE001
            self.state.show_error(workers.error_message(e))
            return
        row = self.model.row_of(entry.id)
        if row >= 0:
            self.model.entries[row] = entry
        self.save_notes_button.setEnabled(False)
        self.state.say(f"notes of {entry.name} saved")

    # -- ΔW analysis --------------------------------------------------------------------------------
    def _maybe_analyse(self) -> None:
        """Analyse the current adapter when the ΔW tab is visible (cached per adapter and model)."""
        entry = self.current_entry()
        if entry is None or self.tabs.currentWidget() is not self.delta:
            return
        c = self.model.compat.get(entry.id)
        loaded = self.state.loaded
        with_model = loaded is not None and c is not None and c.ok and not self.state.training
        key = (entry.id, with_model)
        if key in self.analysis_cache:
            self.delta.set_analysis(self.analysis_cache[key])
            return
        if self.analysis_worker is not None:
            self.analysis_worker.cancel()
        self.delta.set_message("Computing the singular values of every ΔW…")
        w = workers.FunctionWorker(analyse_folder, str(entry.path), loaded.model if with_model else None)
        self.analysis_worker = w

        def done(result, w=w, key=key):
            self.analysis_cache[key] = result
            if w is self.analysis_worker and self.current_id == key[0]:
                self.delta.set_analysis(result)

        def failed(message, w=w):
            if w is self.analysis_worker:
                self.delta.set_message(f"The analysis failed: {message}")

        def finish(w=w):
            if w is self.analysis_worker:
                self.analysis_worker = None
                self._update_actions()

        w.finished.connect(done)
        w.failed.connect(failed)
        w.done.connect(finish)
        workers.start(w, owner=self)
        self._update_actions()

    # -- the loaded model -------------------------------------------------------------------------
    def _loaded_changed(self, loaded) -> None:
        self.analysis_cache = {k: v for k, v in self.analysis_cache.items() if not k[1]}
        self._refresh_model_side()
        self._start_checks()

    def _refresh_model_side(self) -> None:
        """The line about the loaded model and the "On the model" column."""
        loaded = self.state.loaded
        on: dict[str, str] = {}
        if loaded is None:
            self.model_line.setText("No model is loaded: load it to apply, swap and merge adapters.")
        else:
            from core import lora

            names = lora.adapter_names(loaded.model)
            active = lora.active_adapters(loaded.model)
            merged = lora.merged_adapters(loaded.model)
            for n in names:
                on[n] = "merged" if n in merged else ("active" if n in active else "loaded")
            shown = ", ".join(f"{self._display_name(n)} ({on[n]})" for n in names) or "no adapter"
            self.model_line.setText(f"Loaded: {_model_name(loaded)} on {loaded.device} · {shown}")
        self.load_button.setVisible(loaded is None)
        self.model.set_on_model(on)
        self._update_actions()

    def _display_name(self, adapter_name: str) -> str:
        row = self.model.row_of(adapter_name)
        return self.model.entries[row].name if row >= 0 else adapter_name

    def _start_checks(self) -> None:
        """Check the entries against the loaded model, in a worker; rows grey out as results come.

        Results are kept per model and adapter file: whether an adapter fits the base model does not
        change when adapters are applied or merged, so only new entries and a newly loaded model are
        checked (and a check made after a merge does not mistake the merge for other weights)."""
        if self.check_worker is not None:
            self.check_worker.cancel()
            self.check_worker = None
        loaded = self.state.loaded
        if loaded is None or not self.model.entries:
            self.model.set_compat({})
            self._update_actions()
            return
        key = id(loaded.model)
        known = {e.id: self.compat_cache[(key, e.id, e.adapter_hash)] for e in self.model.entries
                 if (key, e.id, e.adapter_hash) in self.compat_cache}
        self.model.set_compat(known)
        todo = [e for e in self.model.entries if e.id not in known]
        if not todo or self.state.training:
            self._update_actions()
            return
        items = [(e.id, str(e.path), e.base_fingerprint) for e in todo]
        hashes = {e.id: e.adapter_hash for e in todo}
        w = workers.FunctionWorker(check_entries, items, loaded)
        self.check_worker = w

        def done(result, w=w):
            for entry_id, compat in result.items():
                self.compat_cache[(key, entry_id, hashes[entry_id])] = compat
            if w is self.check_worker:
                self.model.set_compat({**self.model.compat, **result})
                entry = self.current_entry()
                if entry is not None:
                    self._show_compat(entry)
                    self._maybe_analyse()
                self._update_actions()

        def finish(w=w):
            if w is self.check_worker:
                self.check_worker = None
                self._update_actions()

        w.finished.connect(done)
        w.failed.connect(self.state.show_error)
        w.done.connect(finish)
        workers.start(w, owner=self)

    def load_model(self) -> None:
        from studio.pages.playground import load_session_model

        if self.state.loaded is not None or self.job is not None:
            return
        m = self.state.config.model
        self._run_job("Loading the model", load_session_model, m.source, m.device, m.precision, m.trust_remote_code,
                      on_done=lambda loaded: self.state.loaded is None and self.state.set_loaded(loaded),
                      cancellable=False)

    # -- what can be done now ---------------------------------------------------------------------
    def _update_actions(self) -> None:
        selected = self.selected_entries()
        one = selected[0] if len(selected) == 1 else None
        loaded = self.state.loaded
        idle = self.job is None
        # a check or an analysis reads the weights a merge would change under it: wait for them
        model_free = (loaded is not None and not self.state.training and idle and self.check_worker is None
                      and self.analysis_worker is None)
        compat = self.model.compat.get(one.id) if one is not None else None
        fits = compat is not None and compat.ok
        on = self.model.on_model.get(one.id) if one is not None else None
        active_other = [n for n, s in self.model.on_model.items() if s in ("active", "merged") and
                        (one is None or n != one.id)]
        reason = ""
        if loaded is None:
            reason = "Load a model first"
        elif self.state.training:
            reason = "The model is training"
        elif one is None:
            reason = "Select one adapter"
        elif compat is None:
            reason = "Checking whether it fits the loaded model…"
        elif compat.problems:
            reason = "Does not fit the loaded model: " + compat.problems[0]
        for b, ok, tip in (
                (self.apply_button, model_free and fits and on != "active", "Put this adapter on the loaded model "
                                                                            "and make it the active one"),
                (self.swap_button, model_free and fits and bool(active_other) and on not in ("active", "merged"),
                 "Replace the active adapter with this one, merged if it was"),
                (self.merge_button, model_free and fits and on != "merged", "Fold this adapter into the weights"),
                (self.unmerge_button, model_free and on == "merged", "Take this adapter back out of the weights"),
                (self.detach_button, model_free and on is not None, "Take this adapter off the loaded model")):
            b.setEnabled(bool(ok))
            b.setToolTip(tip if ok or not reason else f"{tip}\n({reason})")
        self.combine_button.setEnabled(idle and len(selected) >= 2)
        self.export_merged_button.setEnabled(idle and len(selected) >= 1)
        self.export_gguf_button.setEnabled(idle and len(selected) >= 1)
        self.export_button.setEnabled(idle and one is not None)
        self.rename_button.setEnabled(idle and one is not None)
        self.delete_button.setEnabled(idle and bool(selected) and not (
            self.state.training and any(self.model.on_model.get(e.id) for e in selected)))
        self.import_button.setEnabled(idle)
        self.load_button.setEnabled(idle and not self.state.training)

    # -- jobs -------------------------------------------------------------------------------------
    def _run_job(self, label: str, fn, *args, on_done=None, cancellable: bool = True, **kwargs) -> workers.Worker:
        """Run one job at a time with a progress bar (and Cancel when the job can stop)."""
        w = workers.FunctionWorker(fn, *args, **kwargs)
        self.job, self.job_name = w, label
        self.job_bar.setRange(0, 0)  # busy until the job reports a fraction
        self.job_bar.setFormat(label + "…")
        self.job_bar.setTextVisible(True)
        self.job_cancel.setVisible(cancellable)
        self.job_cancel.setEnabled(True)
        self.job_row.show()

        def progress(p):
            if isinstance(p, tuple) and len(p) == 2:
                message, fraction = p
                self.job_bar.setRange(0, 1000)
                self.job_bar.setValue(int(1000 * max(0.0, min(1.0, float(fraction)))))
                self.job_bar.setFormat(f"{label}: {message} (%p%)")

        def finished(result):
            if on_done is not None:
                on_done(result)

        def cancelled():
            self.state.say(f"{label.lower()}: cancelled")

        def done():
            self.job = None
            self.job_row.hide()
            self._update_actions()

        w.progress.connect(progress)
        w.finished.connect(finished)
        w.failed.connect(self.state.show_error)
        w.cancelled.connect(cancelled)
        w.done.connect(done)
        workers.start(w, owner=self)
        self._update_actions()
        return w

    def cancel_job(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.job_cancel.setEnabled(False)
            self.job_bar.setFormat(f"{self.job_name}: cancelling…")

    # -- model actions ----------------------------------------------------------------------------
    def _model_action(self, action: str) -> None:
        entry = self.current_entry()
        loaded = self.state.loaded
        if entry is None or loaded is None or self.job is not None or self.state.training:
            return
        compat = self.model.compat.get(entry.id)
        if compat is None or compat.problems:
            self.state.show_error(f"{entry.name} cannot be applied to the loaded model: "
                                  + ("; ".join(compat.problems) if compat else "it has not been checked yet"))
            return
        if compat.warnings and not self.ask_confirm(
                "The base model differs", "\n\n".join(compat.warnings) + "\n\nApply it anyway?"):
            return
        current = next((n for n, s in self.model.on_model.items() if s in ("active", "merged") and n != entry.id),
                       None)
        verbs = {"apply": "Applying", "swap": "Swapping to", "merge": "Merging"}
        self._run_job(f"{verbs[action]} {entry.name}", apply_to_model, loaded.model, str(entry.path), entry.id,
                      action, current, on_done=lambda _: self._model_changed(f"{entry.name}: {action} done"),
                      cancellable=False)

    def apply_selected(self) -> None:
        self._model_action("apply")

    def swap_selected(self) -> None:
        self._model_action("swap")

    def merge_selected(self) -> None:
        self._model_action("merge")

    def _change(self, action: str) -> None:
        entry = self.current_entry()
        loaded = self.state.loaded
        if entry is None or loaded is None or self.job is not None or self.state.training:
            return
        label = {"unmerge": "Unmerging", "remove": "Removing"}[action]
        self._run_job(f"{label} {entry.name}", change_on_model, loaded.model, entry.id, action,
                      on_done=lambda _: self._model_changed(f"{entry.name}: {action} done"), cancellable=False)

    def unmerge_selected(self) -> None:
        self._change("unmerge")

    def detach_selected(self) -> None:
        self._change("remove")

    def _model_changed(self, message: str) -> None:
        self.state.say(message)
        self.analysis_cache = {k: v for k, v in self.analysis_cache.items() if not k[1]}
        self._refresh_model_side()
        entry = self.current_entry()
        if entry is not None:
            self._show_entry(entry)
        self.state.loaded_changed.emit(self.state.loaded)  # the playground lists what is on the model

    # -- library actions --------------------------------------------------------------------------
    def combine_selected(self) -> None:
        entries = self.selected_entries()
        if len(entries) < 2 or self.job is not None:
            return
        values = self.ask_combine(entries, "Combine adapters", True)
        if not values:
            return
        from core.combine import provenance

        name = values["name"] or " + ".join(e.name for e in entries)
        notes = provenance([e.name for e in entries], values["weights"], values["mode"], values["rank"])
        notes = notes[0].upper() + notes[1:]

        def added(result):
            entry, report = result
            self.last_report = report
            self.state.library_changed.emit()
            self.select_ids([entry.id])
            self.state.say(f"{entry.name} added to the library")

        self._run_job("Combining", combine_into_library, str(self.library.root), [e.id for e in entries],
                      values["weights"], values["mode"], values["rank"], name, notes, on_done=added,
                      cancellable=False)

    def export_merged_selected(self) -> None:
        entries = self.selected_entries()
        if not entries or self.job is not None:
            return
        values = {"weights": [1.0], "mode": "exact", "rank": None}
        if len(entries) > 1:
            values = self.ask_combine(entries, "Export merged model", False)
            if not values:
                return
        spec = self.state.loaded if self.state.loaded is not None else self.state.config.model.source
        base = _model_name(self.state.loaded) if self.state.loaded is not None else Path(str(spec)).name
        suggestion = str(Path.home() / f"{base}-{'-'.join(e.id for e in entries)[:60]}-merged")
        chosen = self.ask_merged_export(suggestion)
        if not chosen:
            return
        out, dtype = chosen["out"], chosen["dtype"]

        def exported(report):
            self.last_report = report
            size = format_bytes(report.get("size_bytes")) if isinstance(report, dict) else ""
            self.state.say(f"merged model written to {out} ({size}, {report.get('dtype', dtype)}), "
                           "verified by its logits")

        self._run_job("Exporting the merged model", export_merged_model, spec, [str(e.path) for e in entries],
                      values["weights"], values["mode"], values["rank"], out, dtype, on_done=exported)

    def export_selected(self) -> None:
        entry = self.current_entry()
        if entry is None or self.job is not None:
            return
        chosen = self.ask_save_path(f"Export {entry.name}", str(Path.home() / entry.id), "zip")
        if not chosen:
            return
        dest, as_zip = chosen
        try:
            out = self.library.export(entry.id, dest, zip=as_zip)
        except Exception as e:  # noqa: BLE001
            self.state.show_error(workers.error_message(e))
            return
        self.state.say(f"{entry.name} exported to {out}")

    def import_dialog(self, folder: bool = True) -> None:
        path = self.ask_import_path(folder)
        if path:
            self.import_path(path)

    def import_path(self, path: str):
        try:
            entry = self.library.import_path(path)
        except Exception as e:  # noqa: BLE001
            self.state.show_error(workers.error_message(e))
            return None
        self.state.library_changed.emit()
        self.select_ids([entry.id])
        self.state.say(f"{entry.name} imported")
        return entry

    def rename_selected(self) -> None:
        entry = self.current_entry()
        if entry is None:
            return
        new = self.ask_text("Rename adapter", "New name:", entry.name)
        if not new or new.strip() == entry.name:
            return
        try:
            self.library.rename(entry.id, new)
        except Exception as e:  # noqa: BLE001
            self.state.show_error(workers.error_message(e))
            return
        self.state.library_changed.emit()

    def delete_selected(self) -> None:
        entries = self.selected_entries()
        if not entries or self.job is not None:
            return
        removed = []
        for e in entries:
            try:
                removed.append(self.library.remove(e.id))
            except Exception as ex:  # noqa: BLE001
                self.state.show_error(workers.error_message(ex))
        if not removed:
            return
        self.trashed.append(removed)
        names = ", ".join(e.name for e in removed)
        self.undo_bar.label.setText(f"Moved {names} to the trash.")
        self.undo_bar.show()
        self.state.library_changed.emit()

    def undo_delete(self) -> None:
        if not self.trashed:
            return
        batch = self.trashed.pop()
        restored = []
        for t in batch:
            try:
                restored.append(self.library.restore(t.id))
            except Exception as e:  # noqa: BLE001
                self.state.show_error(workers.error_message(e))
        self.undo_bar.hide()
        self.state.library_changed.emit()
        self.select_ids([e.id for e in restored])

    # -- dialogs (replaceable) --------------------------------------------------------------------
    def _ask_text(self, title: str, label: str, text: str) -> str | None:
        value, ok = QInputDialog.getText(self, title, label, QLineEdit.EchoMode.Normal, text)
        return value if ok else None

    def _ask_confirm(self, title: str, text: str) -> bool:
        return QMessageBox.question(self, title, text) == QMessageBox.StandardButton.Yes

    def _ask_combine(self, entries: list, title: str, with_name: bool) -> dict | None:
        dialog = CombineDialog(entries, title=title, with_name=with_name, parent=self)
        return dialog.values() if dialog.exec() == QDialog.DialogCode.Accepted else None

    def _ask_save_path(self, title: str, suggestion: str, zip_option: str) -> tuple[str, bool] | None:
        """A new path to write; with ``zip_option`` the user may pick a zip instead of a folder."""
        filters = "New folder (*)" if not zip_option else "PEFT adapter folder (*);;Zip archive (*.zip)"
        path, chosen = QFileDialog.getSaveFileName(self, title, suggestion, filters)
        if not path:
            return None
        return path, "zip" in chosen.lower() or path.lower().endswith(".zip")

    def _ask_merged_export(self, suggestion: str) -> dict | None:
        """``{"out": folder, "dtype": "bf16" | "fp16" | "fp32" | "auto"}``, or None when cancelled."""
        info = self.state.model_info
        summary = info.summary if info is not None else {}
        dialog = MergedExportDialog(suggestion, parameters=summary.get("parameters"),
                                    checkpoint_dtype=summary.get("dtype"), parent=self)
        return dialog.values() if dialog.exec() == QDialog.DialogCode.Accepted else None

    def _ask_import_path(self, folder: bool) -> str | None:
        if folder:
            return QFileDialog.getExistingDirectory(self, "Import an adapter folder") or None
        path, _ = QFileDialog.getOpenFileName(self, "Import a zipped adapter", "", "Zip archive (*.zip)")
        return path or None

    # -- window hooks -----------------------------------------------------------------------------
    def page_shown(self) -> None:
        self.reload()

    def shutdown(self) -> None:
        if self._notes_dirty():
            self.save_notes()
        for w in (self.job, self.check_worker, self.analysis_worker):
            if w is not None:
                w.cancel()

    def save_settings(self, settings) -> None:
        settings.setValue("search", self.search.text())
        settings.setValue("sort_column", self.proxy.sortColumn())
        settings.setValue("sort_descending", self.proxy.sortOrder() == Qt.SortOrder.DescendingOrder)
        settings.setValue("splitter", self.splitter.saveState())
        settings.setValue("tab", self.tabs.currentIndex())

    def restore_settings(self, settings) -> None:
        self.search.setText(setting(settings, "search", "", str))
        col = setting(settings, "sort_column", COLUMN["created"], int)
        desc = setting(settings, "sort_descending", True, bool)
        if 0 <= col < len(COLUMNS):
            self.table.sortByColumn(col, Qt.SortOrder.DescendingOrder if desc else Qt.SortOrder.AscendingOrder)
        state = settings.value("splitter")
        if state is not None:
            self.splitter.restoreState(state)
        self.tabs.setCurrentIndex(setting(settings, "tab", 0, int))


def _html(text: Any) -> str:
    """Escaped for rich text, with a zero-width space after each path separator and underscore so a
    long path or name wraps in the details instead of widening the window."""
    text = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("/", "/\u200b").replace("\\", "\\\u200b").replace("_", "_\u200b")


def _model_name(loaded) -> str:
    ref = getattr(loaded, "ref", None)
    if ref is not None and getattr(ref, "name", None):
        return ref.name
    spec = str(getattr(loaded, "spec", "") or "")
    return "SmolLM2-135M-Instruct" if spec == "default" else (Path(spec).name or spec)


PAGE = LibraryPage
