"""The dialog that asks how to combine the selected library adapters: a weight for each, exact, SVD
or a task merge (TIES, DARE) to a rank, and (to combine into the library) a name."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QButtonGroup, QComboBox, QDialog, QDialogButtonBox, QDoubleSpinBox, QFormLayout,
                               QHBoxLayout, QHeaderView, QLabel, QLineEdit, QRadioButton, QSpinBox, QTableWidget,
                               QTableWidgetItem, QVBoxLayout)


class CombineDialog(QDialog):
    """Weights for each selected adapter; exact, SVD or a task merge (TIES, DARE) to a rank; and (to
    combine) a name."""

    def __init__(self, entries: list, *, title: str, with_name: bool, parent=None):
        super().__init__(parent)
        self.setWindowTitle(title)
        self.entries = entries
        self.table = QTableWidget(len(entries), 3)
        self.table.setHorizontalHeaderLabels(["adapter", "rank", "weight"])
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().hide()
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.weights: list[QDoubleSpinBox] = []
        for i, e in enumerate(entries):
            self.table.setItem(i, 0, QTableWidgetItem(e.name))
            self.table.setItem(i, 1, QTableWidgetItem("" if e.rank is None else str(e.rank)))
            w = QDoubleSpinBox()
            w.setRange(-4.0, 4.0)
            w.setSingleStep(0.1)
            w.setDecimals(2)
            w.setValue(1.0)
            w.setToolTip("Each adapter's ΔW is multiplied by this; 1.0 keeps its full effect")
            self.weights.append(w)
            self.table.setCellWidget(i, 2, w)
        self.exact = QRadioButton("Exact (the weighted sum; rank adds up)")
        self.exact.setToolTip("Concatenate the adapters: ΔW = Σ wᵢ ΔWᵢ exactly, with rank Σ rᵢ")
        self.svd = QRadioButton("SVD of the weighted sum, truncated to the rank below")
        self.svd.setToolTip("Truncate the weighted sum to the given rank per matrix (smaller, approximate)")
        self.task = QRadioButton("Task merge, truncated to the rank below:")
        self.task.setToolTip("Merge the ΔW's as PEFT's task-arithmetic methods do, then truncate to the rank")
        self.task_mode = QComboBox()
        for label, mode, tip in (
                ("TIES", "ties", "Keep each ΔW's largest 20 % of entries, elect a sign per entry, average "
                                 "the entries that agree with it (Yadav et al., 2023)"),
                ("DARE", "dare_linear", "Drop 90 % of each ΔW's entries at random, rescale the rest, then "
                                        "add them with the weights (Yu et al., 2023)"),
                ("DARE + TIES", "dare_ties", "DARE's random drop, then TIES' sign election")):
            self.task_mode.addItem(label, mode)
            self.task_mode.setItemData(self.task_mode.count() - 1, tip, Qt.ItemDataRole.ToolTipRole)
        group = QButtonGroup(self)
        for b in (self.exact, self.svd, self.task):
            group.addButton(b)
        self.exact.setChecked(True)
        self.rank = QSpinBox()
        self.rank.setRange(1, 1024)
        self.rank.setValue(max([e.rank or 8 for e in entries] or [8]))
        self.rank.setEnabled(False)
        self.task_mode.setEnabled(False)
        self.exact.toggled.connect(lambda exact: self.rank.setEnabled(not exact))
        self.task.toggled.connect(self.task_mode.setEnabled)
        svd_row = QHBoxLayout()
        svd_row.addWidget(self.svd)
        svd_row.addStretch(1)
        task_row = QHBoxLayout()
        task_row.addWidget(self.task)
        task_row.addWidget(self.task_mode)
        task_row.addStretch(1)
        rank_row = QHBoxLayout()
        rank_row.addWidget(QLabel("Rank of the result"))
        rank_row.addWidget(self.rank)
        rank_row.addStretch(1)
        lay = QVBoxLayout(self)
        lay.addWidget(self.table)
        lay.addWidget(self.exact)
        lay.addLayout(svd_row)
        lay.addLayout(task_row)
        lay.addLayout(rank_row)
        self.name = QLineEdit()
        if with_name:
            self.name.setText(" + ".join(e.name for e in entries)[:120])
            form = QFormLayout()
            form.addRow("Name of the result", self.name)
            lay.addLayout(form)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay.addWidget(buttons)
        self.resize(520, 260 + 32 * len(entries))

    def values(self) -> dict:
        mode = "exact" if self.exact.isChecked() else ("svd" if self.svd.isChecked() else self.task_mode.currentData())
        return {"weights": [w.value() for w in self.weights], "mode": mode,
                "rank": None if mode == "exact" else self.rank.value(), "name": self.name.text().strip()}
