"""The Model page's left side: the base models this machine has (``core.models.list_models``: the
bundled default, the local Hugging Face cache, folders and GGUF files the user added), a search
field, Add folder / Add GGUF file, and the Hub download box under it (studio.widgets.hub_panel).

Listing imports torch, so it runs in a worker. A click on a row emits :attr:`ModelList.picked`; the
page decides whether the model may change (not during a training run).
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QAbstractItemView, QFileDialog, QGroupBox, QHBoxLayout, QHeaderView, QLineEdit,
                               QPushButton, QTableWidget, QTableWidgetItem, QVBoxLayout)

from studio import workers
from studio.widgets import format_bytes

KIND_TEXT = {"default": "bundled", "hub": "HF cache", "folder": "folder", "gguf": "GGUF"}
"""How the list names where a model comes from."""


def _list_models():
    from core import models

    return models.list_models()


def _add_model(path: str):
    from core import models

    models.add_user_model(path)
    return models.list_models()


class ModelList(QGroupBox):
    """The list of base models. ``picked(spec)``: a row was clicked or a model was added."""

    picked = Signal(str)

    def __init__(self, state, parent=None):
        super().__init__("Base model", parent)
        self.state = state
        self.models: list[dict] = []
        self.worker = None
        self.search = QLineEdit()
        self.search.setPlaceholderText("Search models…")
        self.search.setClearButtonEnabled(True)
        self.search.textChanged.connect(self.filter)
        self.table = self._table()
        add_folder = QPushButton("Add folder…")
        add_folder.setToolTip("A Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer)")
        add_folder.clicked.connect(self._add_folder)
        add_gguf = QPushButton("Add GGUF file…")
        add_gguf.clicked.connect(self._add_gguf)
        refresh = QPushButton("Refresh")
        refresh.clicked.connect(self.refresh)
        buttons = QHBoxLayout()
        for b in (add_folder, add_gguf):
            buttons.addWidget(b)
        buttons.addStretch(1)
        buttons.addWidget(refresh)
        lay = QVBoxLayout(self)
        lay.addWidget(self.search)
        lay.addWidget(self.table, 1)
        lay.addLayout(buttons)

    def _table(self) -> QTableWidget:
        table = QTableWidget(0, 3)
        table.setHorizontalHeaderLabels(["Name", "Source", "Size"])
        table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        table.verticalHeader().hide()
        table.setShowGrid(False)
        table.setAlternatingRowColors(True)
        hh = table.horizontalHeader()
        hh.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        hh.setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        hh.setSectionResizeMode(2, QHeaderView.ResizeMode.ResizeToContents)
        table.itemSelectionChanged.connect(self._on_pick)
        return table

    def refresh(self) -> None:
        w = workers.FunctionWorker(_list_models)
        w.finished.connect(self.set_models)
        w.failed.connect(self.state.show_error)
        self.worker = workers.start(w, owner=self)

    def set_models(self, models: list[dict]) -> None:
        self.models = list(models)
        spec = self.state.config.model.source
        if not any(m["spec"] == spec for m in self.models):
            # The chosen model is not in the list (e.g. a folder given by path): show it anyway.
            self.models.append({"name": spec, "kind": "folder", "path": spec, "size_bytes": None,
                                "spec": spec, "source": "user"})
        self.table.blockSignals(True)
        self.table.setRowCount(len(self.models))
        for row, m in enumerate(self.models):
            self._set_row(row, m)
            if m["spec"] == spec:
                self.table.selectRow(row)
        self.table.blockSignals(False)
        self.filter(self.search.text())

    def _set_row(self, row: int, m: dict) -> None:
        name = QTableWidgetItem(m["name"])
        tip = m["path"]
        if m.get("problem"):
            tip += f"\n{m['problem']}"
            name.setForeground(Qt.GlobalColor.red)
        elif m.get("kind") in ("default", "gguf") and not m.get("converted", True):
            tip += "\nconverted to safetensors once, on first use"
        name.setToolTip(tip)
        name.setData(Qt.ItemDataRole.UserRole, m["spec"])
        self.table.setItem(row, 0, name)
        self.table.setItem(row, 1, QTableWidgetItem(KIND_TEXT.get(m["kind"], m["kind"])))
        size = QTableWidgetItem(format_bytes(m.get("size_bytes")))
        size.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        self.table.setItem(row, 2, size)

    def filter(self, text: str) -> None:
        t = text.strip().lower()
        for row, m in enumerate(self.models):
            hay = f"{m['name']} {m['path']} {m['kind']}".lower()
            self.table.setRowHidden(row, bool(t) and t not in hay)

    def select_current(self) -> None:
        """Select the chosen model's row (it changed elsewhere) without announcing a pick."""
        spec = self.state.config.model.source
        for row in range(self.table.rowCount()):
            if self.table.item(row, 0).data(Qt.ItemDataRole.UserRole) == spec:
                if self.table.currentRow() != row:
                    self.table.blockSignals(True)
                    self.table.selectRow(row)
                    self.table.blockSignals(False)
                return

    def _on_pick(self) -> None:
        rows = self.table.selectionModel().selectedRows()
        if rows:
            self.picked.emit(self.table.item(rows[0].row(), 0).data(Qt.ItemDataRole.UserRole))

    # -- adding a folder or a GGUF file -----------------------------------------------------------
    def add_path(self, path: str) -> None:
        w = workers.FunctionWorker(_add_model, path)
        w.finished.connect(lambda models, p=path: (self.set_models(models), self._pick_added(p)))
        w.failed.connect(self.state.show_error)
        workers.start(w, owner=self)

    def _pick_added(self, path: str) -> None:
        target = str(Path(path).expanduser().resolve())
        for m in self.models:
            if str(Path(m["path"]).expanduser().resolve()) == target:
                self.picked.emit(m["spec"])
                self.set_models(self.models)
                return

    def _add_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "A Hugging Face checkpoint folder")
        if path:
            self.add_path(path)

    def _add_gguf(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "A GGUF model file", "", "GGUF models (*.gguf)")
        if path:
            self.add_path(path)
