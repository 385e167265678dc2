"""The Model page's "Download from the Hugging Face Hub" box: a repo id typed in or picked from the
curated list (``resources/hub_models.json``, by size class), a fit check from ``config.json`` alone
before any weight is fetched, and the download with bytes, speed and time left, Cancel within a
second, and resume on the next Download. A thin view over core.hub; the jobs run in workers.
"""

from __future__ import annotations

from typing import Callable

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QStandardItem, QStandardItemModel
from PySide6.QtWidgets import (QComboBox, QGroupBox, QHBoxLayout, QLabel, QProgressBar, QPushButton,
                               QVBoxLayout)

from studio import workers
from studio.widgets import format_bytes, format_count

Settings = Callable[[], tuple[dict, str]]
"""What the memory estimate uses now: (core.models.estimate_memory's keywords, device)."""


def _check(repo_id: str, settings: dict, device: str):
    from core import hub

    remote = hub.remote_model(repo_id)
    return remote, hub.fit_report(remote, hub.fetch_config(remote), settings, device)


def _download(repo_id: str, *, progress, cancelled):
    from core import hub

    return hub.download(repo_id, progress=progress, should_stop=cancelled)


def _curated() -> list[dict]:
    from core import hub

    return hub.curated_models()


def fit_html(repo_id: str, report: dict) -> str:
    """The fit check in a few lines of rich text (red where it does not fit)."""
    s, gib = report["summary"], 2**30
    context = f", context {s['context_length']:,}" if s.get("context_length") else ""
    lines = [f"<b>{repo_id}</b>: {s['architecture']}, {format_count(s['parameters'])} parameters, "
             f"{s['layers']} layers{context}"]
    mem = f"Training step: about {report['memory'] / gib:.1f} GiB"
    if report.get("memory_nf4"):
        mem += f" ({report['memory_nf4'] / gib:.1f} GiB with a 4-bit base)"
    if report.get("capacity"):
        mem += f" of {report['capacity'] / gib:.1f} GiB {report['capacity_name']}"
    lines.append(mem)
    lines.append(f"Download: {format_bytes(report['download'])}, {format_bytes(report['free_disk'])} free")
    for p in report["problems"]:
        lines.append(f"<span style='color:#C0392B'><b>{p}</b></span>")
    if not report["problems"]:
        lines.append("<span style='color:#1E8449'>It fits.</span>")
    return "<br>".join(lines)


class HubPanel(QGroupBox):
    """Emits ``downloaded(repo_id)`` once a download is complete in the Hugging Face cache."""

    downloaded = Signal(str)

    def __init__(self, state, settings: Settings, parent=None):
        super().__init__("Download from the Hugging Face Hub", parent)
        self.state, self.settings = state, settings
        self.worker = None
        self.report: dict | None = None
        self.repo = QComboBox()
        self.repo.setEditable(True)
        self.repo.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.repo.lineEdit().setPlaceholderText("org/name, e.g. Qwen/Qwen2.5-0.5B-Instruct")
        self.repo.lineEdit().returnPressed.connect(self.check)
        self.repo.activated.connect(lambda *_: self.check())
        self.check_button = QPushButton("Check")
        self.check_button.setToolTip("Fetch config.json alone: what the model is, the memory training needs "
                                     "with the current settings, and the disk the download needs")
        self.check_button.clicked.connect(self.check)
        self.download_button = QPushButton("Download")
        self.download_button.setToolTip("Safetensors weights, tokenizer and config into the Hugging Face "
                                        "cache; Cancel keeps what arrived, and Download continues from there")
        self.download_button.clicked.connect(self.download)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.cancel_button.hide()
        self.info = QLabel()
        self.info.setWordWrap(True)
        self.info.setTextFormat(Qt.TextFormat.RichText)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.hide()
        self.status = QLabel()
        self.status.setWordWrap(True)
        row = QHBoxLayout()
        row.addWidget(self.repo, 1)
        row.addWidget(self.check_button)
        row.addWidget(self.download_button)
        row.addWidget(self.cancel_button)
        lay = QVBoxLayout(self)
        lay.addLayout(row)
        lay.addWidget(self.info)
        lay.addWidget(self.progress)
        lay.addWidget(self.status)
        self._fill_list()

    def _fill_list(self) -> None:
        model = QStandardItemModel(self.repo)
        try:
            entries = _curated()
        except Exception as e:  # a damaged resources file: the field still takes any id
            self.status.setText(str(e))
            entries = []
        current = None
        for e in entries:
            if e["size_class"] != current:
                current = e["size_class"]
                header = QStandardItem(f"— {current} —")
                header.setEnabled(False)
                model.appendRow(header)
            item = QStandardItem(e["id"])
            item.setToolTip(f"{e['parameters']} parameters" + (", gated: accept its terms on the Hub and log "
                                                                "in first" if e.get("gated") else ""))
            model.appendRow(item)
        self.repo.setModel(model)
        self.repo.setCurrentIndex(-1)
        self.repo.setEditText("")

    def repo_id(self) -> str:
        return self.repo.currentText().strip()

    def _busy(self, busy: bool) -> None:
        for w in (self.repo, self.check_button, self.download_button):
            w.setEnabled(not busy)

    # -- check ------------------------------------------------------------------------------------
    def check(self) -> None:
        repo_id = self.repo_id()
        if not repo_id or self.worker is not None:
            return
        settings, device = self.settings()
        self._busy(True)
        self.report = None
        self.info.setText(f"Reading {repo_id}'s config.json…")
        w = workers.FunctionWorker(_check, repo_id, settings, device)
        w.finished.connect(lambda result: self._checked(repo_id, result))
        w.failed.connect(self._failed)
        w.done.connect(self._done)
        self.worker = workers.start(w, owner=self)

    def _checked(self, repo_id: str, result) -> None:
        _, self.report = result
        self.info.setText(fit_html(repo_id, self.report))

    # -- download ---------------------------------------------------------------------------------
    def download(self) -> None:
        repo_id = self.repo_id()
        if not repo_id or self.worker is not None:
            return
        self._busy(True)
        self.cancel_button.show()
        self.progress.setValue(0)
        self.progress.show()
        self.status.setText(f"Asking the Hub for {repo_id}…")
        w = workers.FunctionWorker(_download, repo_id)
        w.progress.connect(self._on_progress)
        w.finished.connect(lambda snap: self._downloaded(repo_id, snap))
        w.cancelled.connect(lambda: self.status.setText(
            f"Cancelled. What arrived is kept: Download continues {repo_id} from there."))
        w.failed.connect(self._failed)
        w.done.connect(self._done)
        self.worker = workers.start(w, owner=self)

    def _on_progress(self, p) -> None:
        from core.hub_download import describe

        self.progress.setValue(int(1000 * p.fraction))
        self.status.setText(f"File {min(p.files_done + 1, p.files)} of {p.files}, " + describe(p))

    def _downloaded(self, repo_id: str, snap) -> None:
        self.progress.setValue(1000)
        self.status.setText(f"Downloaded {repo_id} to {snap}")
        self.downloaded.emit(repo_id)

    def cancel(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            self.status.setText("Cancelling…")

    def _failed(self, message: str) -> None:
        self.status.setText("")
        self.info.setText(f"<span style='color:#C0392B'>{message}</span>" if self.report is None
                          else self.info.text())
        self.state.show_error(message)

    def _done(self) -> None:
        self.worker = None
        self._busy(False)
        self.cancel_button.hide()
        if self.progress.value() in (0, 1000):
            self.progress.hide()
