"""Library: every adapter the studio knows, what each one did, and what to do with it.

The table is a :class:`LibraryTableModel` (a ``QAbstractTableModel`` over ``core.library`` entries,
studio/pages/library_table.py) behind a :class:`LibraryFilter` proxy (search box on name and notes,
base-model filter, sorting by the raw value of a column, Evaluate's stored scores among them,
entries without a figure last). Beside it, the selected adapter's details with editable notes, its
loss curve and its ΔW analysis (studio/pages/library_details.py).

Actions go through core and nowhere else:

* on the loaded model, through the session that owns it (studio/pages/library_model.py): apply,
  swap, merge, unmerge, remove from the model (core.library_jobs under a core.session ticket: a
  job another one keeps from starting is refused with the name of the job that holds the model);
  an adapter that does not fit is greyed with the reason, one trained on different weights asks
  first; the adapter's name on the model is its library id;
* on the library (here): combine the selected adapters with weights (the result is a new entry),
  export a merged model or a GGUF (in a worker with progress and cancel), export an adapter (folder
  or zip), import (folder or zip), rename, delete (to the trash, with Undo through
  ``Library.restore``). The command line does each of these too (``lora-studio library``,
  ``merge``, ``export-gguf``).
"""

from __future__ import annotations

from typing import Any, Callable

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (QAbstractItemView, QComboBox, QGridLayout, QHBoxLayout, QHeaderView, QLabel,
                               QLineEdit, QMenu, QProgressBar, QPushButton, QSplitter, QVBoxLayout, QWidget)

from studio import workers
from studio.pages import Page, setting
from studio.pages.library_details import EntryDetails, UndoBar
from studio.pages.library_files import LibraryFileActions
from studio.pages.library_model import LibraryModelSide
from studio.pages.library_table import (ALL_BASES, COLUMN, COLUMNS, LibraryFilter,  # noqa: F401
                                        LibraryTableModel, LibraryTableView, fit_columns)
from studio.widgets import gguf_dialog


class LibraryPage(LibraryModelSide, LibraryFileActions, Page):
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
        self.compat_cache: dict[tuple[int, str, str], Any] = {}  # (model, id, adapter hash) -> Compat
        self.checks_pending = False  # a check the busy model kept from starting
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
        self.score_metric = QComboBox()
        self.score_metric.setToolTip("Which stored Evaluate score the Score column shows (sort by it with its header)")
        filters = QHBoxLayout()
        filters.addWidget(self.search, 2)
        filters.addWidget(self.base_filter, 1)
        filters.addWidget(self.score_metric)

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

        actions = self._build_actions()
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
        self.details = EntryDetails()
        d = self.details
        self.title, self.facts, self.compat_label, self.notes = d.title, d.facts, d.compat_label, d.notes
        self.save_notes_button, self.curve, self.delta, self.tabs = d.save_notes_button, d.curve, d.delta, d


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

    def _build_actions(self) -> QGridLayout:
        """The action buttons in three short rows, and the table's context menu over them."""
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
        self.job_bar = QProgressBar()  # the one job bar the actions run under (library_model._run_job)
        self.job_bar.setRange(0, 1000)
        self.job_cancel = QPushButton("Cancel")
        self.job_cancel.clicked.connect(self.cancel_job)
        self.job_row = QWidget()
        jr = QHBoxLayout(self.job_row)
        jr.setContentsMargins(0, 0, 0, 0)
        jr.addWidget(self.job_bar, 1)
        jr.addWidget(self.job_cancel)
        self.job_row.hide()
        return actions

    def _wire(self) -> None:
        self.search.textChanged.connect(self.proxy.set_text)
        self.search.textChanged.connect(lambda *_: self._update_actions())
        self.base_filter.currentIndexChanged.connect(self._base_filter_changed)
        self.score_metric.currentIndexChanged.connect(lambda *_: self.model.set_metric(
            self.score_metric.currentData()))
        self.table.selectionModel().selectionChanged.connect(self._selection_changed)
        self.notes.textChanged.connect(lambda: self.save_notes_button.setEnabled(self._notes_dirty()))
        self.save_notes_button.clicked.connect(self.save_notes)
        self.load_button.clicked.connect(self.load_model)
        self.tabs.currentChanged.connect(lambda *_: self._maybe_analyse())
        self.state.library_changed.connect(self.reload)
        self.state.loaded_changed.connect(self._loaded_changed)
        self.state.session_changed.connect(self._session_changed)
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
        self._fill_score_metrics()
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

    def _fill_score_metrics(self) -> None:
        """The metrics stored by Evaluate for any entry; hidden while none has a score."""
        metrics = self.model.metrics()
        self.score_metric.blockSignals(True)
        self.score_metric.clear()
        for m in metrics:
            self.score_metric.addItem(f"Score: {m}", m)
        self.score_metric.setCurrentIndex(max(0, self.score_metric.findData(self.model.metric)))
        self.score_metric.blockSignals(False)
        self.score_metric.setVisible(bool(metrics))
        self.table.setColumnHidden(COLUMN["score"], not metrics)

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
        if entry is None:
            self.details.show_none(len(self.selected_entries()))
            return
        self.details.show_entry(entry, self.model.on_model.get(entry.id))
        self._show_compat(entry)
        self._maybe_analyse()

    def _show_compat(self, entry) -> None:
        self.details.show_compat(self.state.loaded is not None, self.model.compat.get(entry.id))

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


PAGE = LibraryPage
