"""The Data page's top rows: where the dataset comes from. A file or ``save_to_disk`` folder typed in,
chosen, or the bundled sample; or a dataset on the Hugging Face Hub typed as ``org/name``
(core.hub_datasets), which brings out its Split and Configuration fields (``DataConfig.split`` and
``DataConfig.subset``, the command line's ``--data-split`` and ``--data-config``).
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QFileDialog, QHBoxLayout, QLabel, QLineEdit, QPushButton, QVBoxLayout, QWidget


def is_hub_dataset(text: str) -> bool:
    from core import hub_datasets  # no torch, no datasets: fine while the window starts

    return bool(text) and hub_datasets.is_hub_dataset(text)


def sample_path() -> str:
    from core.home import sample_dataset

    return str(sample_dataset())


class SourceRow(QWidget):
    """Emits ``path_chosen(text)`` (empty: the bundled sample) and ``hub_edited()`` once a Hub
    dataset's split or configuration changed in ``state.config.data``."""

    path_chosen = Signal(str)
    hub_edited = Signal()

    def __init__(self, state, parent=None):
        super().__init__(parent)
        self.state = state
        self.path = QLineEdit()
        self.path.setPlaceholderText("a .jsonl, .json, .csv, .parquet or .txt file, a save_to_disk folder, "
                                     "or a Hub dataset (org/name)")
        self.path.editingFinished.connect(self._on_path_edited)
        self.path.textChanged.connect(lambda text: self.hub_row.setVisible(is_hub_dataset(text.strip())))
        browse = QPushButton("Choose file…")
        browse.clicked.connect(self._browse)
        sample = QPushButton("Use the sample")
        sample.setToolTip("The bundled sample dataset")
        sample.clicked.connect(lambda: self.path_chosen.emit(""))
        file_row = QHBoxLayout()
        file_row.addWidget(self.path, 1)
        file_row.addWidget(browse)
        file_row.addWidget(sample)

        self.split = QLineEdit()
        self.split.setPlaceholderText("train, or its only split")
        self.split.setToolTip("Which split of the Hub dataset to read (train, test, validation, …)")
        self.subset = QLineEdit()
        self.subset.setPlaceholderText("its default")
        self.subset.setToolTip("For a Hub dataset with several configurations (subsets): which one")
        for field in (self.split, self.subset):
            field.setClearButtonEnabled(True)
            field.editingFinished.connect(self._on_hub_fields)
        self.hub_row = QWidget()
        hub = QHBoxLayout(self.hub_row)
        hub.setContentsMargins(0, 0, 0, 0)
        hub.addWidget(QLabel("Hub dataset: split"))
        hub.addWidget(self.split, 1)
        hub.addWidget(QLabel("Configuration"))
        hub.addWidget(self.subset, 1)
        self.hub_row.hide()
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(file_row)
        lay.addWidget(self.hub_row)

    def sync(self, current: str) -> None:
        """Show ``current`` (the dataset in use) and the config's split and configuration."""
        d = self.state.config.data
        for field, value in ((self.path, current), (self.split, d.split), (self.subset, d.subset)):
            field.blockSignals(True)
            field.setText(value)
            field.blockSignals(False)
        self.hub_row.setVisible(is_hub_dataset(current))

    def _on_path_edited(self) -> None:
        text = self.path.text().strip()
        if text == sample_path():
            text = ""
        if text != self.state.config.data.path:
            self.path_chosen.emit(text)

    def _on_hub_fields(self) -> None:
        d = self.state.config.data
        split, subset = self.split.text().strip(), self.subset.text().strip()
        if (split, subset) != (d.split, d.subset):
            d.split, d.subset = split, subset
            self.state.changed("data")
            self.hub_edited.emit()

    def _browse(self) -> None:
        current = self.path.text().strip()
        start = str(Path(current).parent) if current and not is_hub_dataset(current) else ""
        path, _ = QFileDialog.getOpenFileName(
            self, "A dataset", start, "Datasets (*.jsonl *.json *.csv *.parquet *.txt);;All files (*)")
        if path:
            self.path_chosen.emit(path)
