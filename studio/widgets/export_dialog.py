"""The dialog of the Library's "Export merged model…": the new folder to write and the precision of
its weights (bf16, fp16, fp32 or the checkpoint's own, as ``lora-studio merge --dtype`` offers),
each with the size it will take on disk."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import (QComboBox, QDialog, QDialogButtonBox, QFileDialog, QFormLayout, QHBoxLayout,
                               QLabel, QLineEdit, QPushButton, QVBoxLayout, QWidget)

from studio.widgets import format_bytes

PRECISIONS = (("bf16", 2, "bf16: half the size of fp32 with its range; what most models are published in"),
              ("fp16", 2, "fp16: half the size, for runtimes without bf16 (a narrower range than bf16)"),
              ("fp32", 4, "fp32: the merge exactly as computed, twice the size of bf16"),
              ("auto", None, "the base checkpoint's own precision"))


class MergedExportDialog(QDialog):
    """Where to write the merged model, and in which precision (bf16 by default)."""

    def __init__(self, suggestion: str, *, parameters: int | None = None, checkpoint_dtype: str | None = None,
                 parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Export merged model")
        self.folder = QLineEdit(suggestion)
        self.folder.setMinimumWidth(360)
        self.folder.setToolTip("A new folder: a Hugging Face model with the adapter(s) merged in")
        browse = QPushButton("Choose…")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.folder, 1)
        row.addWidget(browse)
        self.precision = QComboBox()
        for key, size, tip in PRECISIONS:
            label = key if key != "auto" else f"as the checkpoint ({checkpoint_dtype or 'its own'})"
            if size and parameters:
                label += f"  (about {format_bytes(parameters * size)})"
            self.precision.addItem(label, key)
            self.precision.setItemData(self.precision.count() - 1, tip, 3)  # Qt.ToolTipRole
        self.precision.setToolTip("The dtype of the saved weights; the merge itself is computed in fp32")
        note = QLabel("The written model is checked against the base model with the adapters unmerged "
                      "before it is moved into place.")
        note.setWordWrap(True)
        note.setStyleSheet("color: palette(placeholder-text);")
        form = QFormLayout()
        form.addRow("Folder", row)
        form.addRow("Precision", self.precision)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(note)
        lay.addWidget(buttons)

    def _browse(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export the merged model to a new folder",
                                              self.folder.text(), "New folder (*)")
        if path:
            self.folder.setText(path)

    def values(self) -> dict:
        return {"out": str(Path(self.folder.text().strip()).expanduser()), "dtype": self.precision.currentData()}
