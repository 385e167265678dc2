"""The Data page's right side: the first rows of the dataset as a table, and under it two tabs, the
first example as it will be trained (trained tokens highlighted, studio.widgets.example_view) and
the token-length histogram (studio.widgets.histogram). A plain view: the page hands it what
core.data_preview computed.
"""

from __future__ import annotations

import json

from PySide6.QtCore import QAbstractTableModel, QModelIndex, Qt
from PySide6.QtWidgets import QHeaderView, QLabel, QSplitter, QTableView, QTabWidget, QVBoxLayout, QWidget

from studio.widgets.example_view import ExampleView
from studio.widgets.histogram import LengthHistogram


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


class PreviewPane(QSplitter):
    """The rows above, the example and the histogram below."""

    def __init__(self, parent=None):
        super().__init__(Qt.Orientation.Vertical, parent)
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
        self.addWidget(self.table)
        self.addWidget(self.tabs)
        self.setSizes([300, 420])

    def show_rows(self, columns: list[str], rows: list[dict]) -> None:
        self.table_model.set_rows(columns, rows)
        self.table.resizeColumnsToContents()
        for col in range(len(columns)):
            self.table.setColumnWidth(col, min(self.table.columnWidth(col), 280))

    def show_example(self, r: dict) -> None:
        """The first example of core.data_preview.preview's result (``example_error`` as a message)."""
        if r.get("pieces") is not None:
            self.example.set_pieces(r["pieces"])
            self.example_info.setText(f"First example: {r.get('example_tokens', 0)} tokens, "
                                      f"{r.get('example_trained', 0)} of them trained (highlighted)")
        elif r.get("example_error"):
            self.show_message(r["example_error"])
        else:
            self.show_message("Waiting for the model's tokenizer…")

    def show_message(self, message: str) -> None:
        self.example.set_message(message)
        self.example_info.setText("")  # the previous file's "First example: ..." is not this one's

    def clear(self, message: str) -> None:
        self.table_model.set_rows([], [])
        self.show_message(message)
        self.histogram.clear()
