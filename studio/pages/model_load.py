"""The Model page's Load row: Load model / Cancel, a progress bar, and a line saying what is going on,
for the page's own load (``core.library_jobs.load_into_session`` in a worker, under a "load" ticket
taken on the click, so no job uses the model while it is replaced) and, from the first frame, for the
state's model jobs (reading the chosen model: a busy bar; converting a GGUF once: a measured one).
"""

from __future__ import annotations

from PySide6.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from studio import workers


class LoadPanel(QWidget):
    """Loads the chosen model with the current settings into the state's session."""

    def __init__(self, state, parent=None):
        super().__init__(parent)
        self.state = state
        self.worker = None
        self.load_button = QPushButton("Load model")
        self.load_button.setToolTip("Load the weights now: the Playground, the Library, Evaluate and "
                                    "training all use the loaded model (a run whose settings differ "
                                    "replaces it)")
        self.load_button.clicked.connect(self.load)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.cancel_button.hide()
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.hide()
        self.label = QLabel()
        self.label.setWordWrap(True)
        row = QHBoxLayout()
        row.addWidget(self.load_button)
        row.addWidget(self.cancel_button)
        row.addWidget(self.progress, 1)
        row.addStretch(0)  # with the bar hidden, the button keeps its own width
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(row)
        lay.addWidget(self.label)
        state.model_progress.connect(self._on_model_progress)
        state.loaded_changed.connect(self._on_loaded)

    def load(self) -> None:
        from core.library_jobs import load_into_session

        if self.worker is not None:
            return
        ticket = self.state.claim("load", need_model=False)  # before reading: refused, naming the job, when one holds the model
        if ticket is None:
            return
        m = self.state.config.model
        w = workers.FunctionWorker(load_into_session, ticket, m.source, m.device, m.precision, m.trust_remote_code,
                                   m.quantize)
        self.worker = w
        self.load_button.setEnabled(False)
        self.cancel_button.show()
        self.progress.setRange(0, 1000)  # the model jobs' busy bar may have left it without a measure
        self.progress.show()
        self.progress.setValue(0)
        self.label.setText("Loading the model…")
        w.progress.connect(self._on_progress)
        w.failed.connect(self._on_failed)
        w.cancelled.connect(lambda: self.label.setText("Loading cancelled"))
        w.done.connect(self._done)
        workers.start(w, owner=self, ticket=ticket)

    def cancel(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            self.label.setText("Cancelling…")

    def _on_progress(self, p) -> None:
        message, fraction = p
        self.progress.setValue(int(1000 * fraction))
        self.label.setText(f"{message[:1].upper()}{message[1:]}…")  # the bar keeps to its %

    def _on_failed(self, message: str) -> None:
        self.label.setText("Loading failed")
        self.state.show_error(message)

    def _done(self) -> None:
        self.worker = None
        self.load_button.setEnabled(True)
        self.cancel_button.hide()
        self.progress.hide()

    def _on_loaded(self, loaded) -> None:
        """Whichever job loaded it (this page, the Playground, a run): what the window now holds."""
        self.load_button.setText("Reload model" if loaded is not None else "Load model")
        if loaded is None:
            self.label.setText("")
            return
        held = "" if loaded.quantize == "none" else f", linear layers in {loaded.quantize}"
        self.label.setText(f"Loaded on {loaded.device} in {str(loaded.dtype).replace('torch.', '')}{held}")

    def _on_model_progress(self, message: str, fraction: float) -> None:
        """What the state's model jobs are doing, from the first frame: loading torch, reading the
        model (a busy bar: fraction < 0), converting a GGUF (the default) once (a measured bar)."""
        if self.worker is not None:
            return
        if fraction >= 1.0 or not message:
            self.progress.hide()
            self.progress.setRange(0, 1000)
            self.label.setText("")
            return
        self.progress.show()
        if fraction < 0:
            self.progress.setRange(0, 0)  # busy: no measure of how far
            self.label.setText(f"{message}…")
            return
        self.progress.setRange(0, 1000)
        self.progress.setValue(int(1000 * fraction))
        self.label.setText(f"Converting the model to safetensors, once (later starts take seconds): {message}")
