"""The studio's session: the RunConfig every page edits, what is known about the chosen model, the
loaded model, and signals when any of it changes. Pages talk to each other only through this.

The loaded model belongs to :attr:`StudioState.session` (a :class:`core.session.ModelSession`):
every job that uses it takes a ticket with :meth:`StudioState.claim` (refused with one message
naming the job that holds the model) and gives it back when its worker's thread ends
(``workers.start(..., ticket=...)``); pages read what is on the model from ``session.view``.

No torch or transformers at import time: the window must show before they load. Facts that need
them (the model summary, its meta-device skeleton and adaptable modules, its tokenizer) are
computed in workers when the model changes and announced with :attr:`StudioState.model_info_changed`
and :attr:`StudioState.tokenizer_changed`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PySide6.QtCore import QObject, Signal

from core.config import RunConfig
from studio import workers


@dataclass
class ModelInfo:
    """What the pages need to know about the chosen base model, without its weights."""

    spec: str
    summary: dict
    """core.models.summary(spec)."""
    config: Any
    """transformers.PretrainedConfig (for the memory estimate)."""
    meta: Any
    """The model built on the meta device (core.models.meta_model): names and shapes only."""
    targets: list = field(default_factory=list)
    """core.targets.list_targets(meta)."""


def _model_info(spec: str, trust_remote_code: bool, *, progress, cancelled) -> ModelInfo:
    import sys

    if "torch" not in sys.modules or "transformers" not in sys.modules:  # seconds, on the first start
        progress(("Loading torch and transformers", 0.05))
    from core import models, targets

    progress(("Reading the model's configuration", 0.1))
    summary = models.summary(spec, trust_remote_code=trust_remote_code)
    if cancelled():
        return None
    config = models.load_config(spec, trust_remote_code=trust_remote_code)
    progress(("Listing the adaptable modules", 0.6))
    meta = models.meta_model(spec, trust_remote_code=trust_remote_code)
    return ModelInfo(spec=spec, summary=summary, config=config, meta=meta,
                     targets=targets.list_targets(meta))


def _tokenizer(spec: str, trust_remote_code: bool, *, progress):
    from core import models

    # A GGUF (the bundled default included) is converted to safetensors once, on first use (about
    # 20 s for the default); doing it here, with progress, is what the first start shows.
    models.checkpoint_folder(spec, progress=lambda m, f: progress((m, f)))
    return models.load_tokenizer(spec, trust_remote_code=trust_remote_code)


class StudioState(QObject):
    """The session shared by all pages.

    Signals:
      config_changed(str)       a part of ``config`` changed: "model", "lora", "data", "train", "all"
      model_info_changed(obj)   ModelInfo for the chosen model, or None while it is being read
      model_info_failed(str)    the chosen model cannot be read (one clear message)
      model_progress(str, float) a model job's stage and fraction: reading the chosen model's facts
                                (a fraction below 0: no measure, a busy bar), then the first-use
                                conversion; fraction 1.0 (message "") when it is over
      tokenizer_changed(obj)    the chosen model's tokenizer, or None while it is being read
      loaded_changed(obj)       core.models.LoadedModel, or None when unloaded
      session_changed()         a job took or gave back the model, or what is on it changed
                                (session.holders(), session.view); always in the GUI thread
      library_changed()         an adapter was added, removed or renamed
      training_changed(bool)    a training run started (True) or ended (False)
      data_summary_changed(obj) the Data page tokenised the dataset (its summary: ``path``,
                                ``max_length``, ``stats`` with the lengths after truncation), or None
      message(str)              a short status line for the status bar
      error(str)                one clear message shown in the window's message bar (core's
                                messages phrased for the window: studio.messages.for_window)
      error_retracted(str)      that message's cause is gone (the file was fixed, ...): the bar
                                hides it if it still shows it
    """

    config_changed = Signal(str)
    model_info_changed = Signal(object)
    model_info_failed = Signal(str)
    model_progress = Signal(str, float)
    tokenizer_changed = Signal(object)
    loaded_changed = Signal(object)
    session_changed = Signal()
    library_changed = Signal()
    training_changed = Signal(bool)
    data_summary_changed = Signal(object)
    message = Signal(str)
    error = Signal(str)
    error_retracted = Signal(str)

    def __init__(self, config: RunConfig | None = None, parent: QObject | None = None):
        super().__init__(parent)
        self.config: RunConfig = config or RunConfig()
        self.model_info: ModelInfo | None = None
        self.model_error: str | None = None
        from core.session import ModelSession

        self.tokenizer = None
        self.session = ModelSession()
        self._announced = None  # the LoadedModel loaded_changed last announced
        # a job may end in a worker thread: the signal is queued to the GUI thread's slots
        self.session.listeners.append(self.session_changed.emit)
        self.session_changed.connect(self._announce_loaded)
        self.training = False
        self.data_summary: dict | None = None
        self._info_worker: workers.Worker | None = None
        self._tok_worker: workers.Worker | None = None

    # -- the config ------------------------------------------------------------------------------
    def changed(self, part: str) -> None:
        """Call after editing ``self.config.<part>`` in place."""
        self.config_changed.emit(part)

    def set_model(self, spec: str, *, refresh: bool = False) -> None:
        """Choose the base model; its facts are read in a worker (see model_info_changed)."""
        if spec == self.config.model.source and not refresh and (self.model_info or self._info_worker):
            return
        if spec != self.config.model.source:
            self.config.model.trust_remote_code = False  # one model's permission, never another's (issue 17)
        self.config.model.source = spec
        self.config_changed.emit("model")
        if self.loaded is not None and getattr(self.loaded, "spec", None) != spec:
            self.set_loaded(None)
        self.refresh_model_info()

    def refresh_model_info(self) -> None:
        """Read the chosen model's summary, skeleton and tokenizer again, in workers."""
        spec = self.config.model.source
        trust = self.config.model.trust_remote_code
        for w in (self._info_worker, self._tok_worker):
            if w is not None:
                w.cancel()
        self.model_info = None
        self.model_error = None
        self.tokenizer = None
        self.model_info_changed.emit(None)
        self.tokenizer_changed.emit(None)

        info = workers.FunctionWorker(_model_info, spec, trust)
        self._info_worker = info
        self._model_stage("Reading the model", -1.0)  # from the first frame, before torch has loaded

        def on_info(result, w=info):
            if w is self._info_worker and result is not None:
                self._info_worker = None
                self.model_info = result
                self.model_info_changed.emit(result)
                self.message.emit(f"{result.summary.get('name', spec)}: "
                                  f"{len(result.targets)} adaptable modules")
                self._start_tokenizer(spec, trust)

        def on_fail(msg, w=info):
            if w is self._info_worker:
                self._info_worker = None
                self.model_progress.emit("", 1.0)
                self.model_error = msg
                self.model_info_failed.emit(msg)
                self.show_error(msg)

        info.finished.connect(on_info)
        info.failed.connect(on_fail)
        info.progress.connect(lambda p, w=info: w is self._info_worker and self._model_stage(p[0], -1.0))
        workers.start(info, owner=self)

    def _start_tokenizer(self, spec: str, trust: bool) -> None:
        tok = workers.FunctionWorker(_tokenizer, spec, trust)
        self._tok_worker = tok
        self.model_progress.emit("Reading the tokenizer", -1.0)

        def on_tok(result, w=tok):
            if w is self._tok_worker:
                self._tok_worker = None
                if self.model_info is not None and self.model_info.summary.get("kind") in ("default", "gguf"):
                    self.model_info.summary["converted"] = True  # the tokenizer job converted it first
                self.tokenizer = result
                self.tokenizer_changed.emit(result)
                self.message.emit("model ready")

        def on_fail(msg, w=tok):
            if w is self._tok_worker:
                self._tok_worker = None
                self.show_error(msg)

        def on_progress(p, w=tok):
            if w is self._tok_worker:
                self.model_progress.emit(str(p[0]), float(p[1]))
                self.message.emit(f"{p[0]} ({100 * float(p[1]):.0f}%)")

        def on_done(w=tok):
            self.model_progress.emit("", 1.0)

        tok.finished.connect(on_tok)
        tok.failed.connect(on_fail)
        tok.progress.connect(on_progress)
        tok.done.connect(on_done)
        workers.start(tok, owner=self)

    def _model_stage(self, message: str, fraction: float) -> None:
        self.model_progress.emit(message, fraction)
        self.message.emit(f"{message}…")

    # -- the loaded model ------------------------------------------------------------------------
    @property
    def loaded(self):
        """The session's LoadedModel (None when none is loaded); use it through a ticket."""
        return self.session.loaded

    def set_loaded(self, loaded, ticket=None) -> bool:
        """Hand a model loaded by a page to the session (None: unload); False, with the message
        shown, when a job holds the model (``ticket``: the caller's own exclusive one)."""
        from core.errors import StudioError

        if loaded is not self.session.loaded:
            try:
                self.session.set_loaded(loaded, ticket=ticket)
            except StudioError as e:
                self.show_error(str(e))
                return False
        self._announce_loaded()
        return True

    def _announce_loaded(self) -> None:
        """loaded_changed once per model the session holds (a job may replace it in its thread:
        training loads the model its settings ask for)."""
        if self.session.loaded is not self._announced:
            self._announced = self.session.loaded
            self.loaded_changed.emit(self._announced)

    def claim(self, job: str, label: str | None = None, *, need_model: bool = True, quiet: bool = False):
        """A ticket for ``job`` on the loaded model (core.session.JOBS), or None after showing why
        not (``quiet``: without a message, for jobs nobody asked for, like a background check)."""
        from core.errors import StudioError

        try:
            return self.session.acquire(job, label, need_model=need_model)
        except StudioError as e:
            if not quiet:
                self.show_error(str(e))
            return None

    # -- messages --------------------------------------------------------------------------------
    def show_error(self, text: str) -> None:
        """Show one clear message in the window's bar; a command-line option it names is renamed
        to the window's control (studio.messages)."""
        from studio.messages import for_window

        self.error.emit(for_window(text))

    def retract_error(self, text: str | None) -> None:
        """The cause of the message ``text`` (as given to :meth:`show_error`) is gone: hide it if it
        is still the one shown. A page calls this once its input is good again."""
        if text:
            from studio.messages import for_window

            self.error_retracted.emit(for_window(text))

    def say(self, text: str) -> None:
        self.message.emit(text)

    def set_data_summary(self, summary: dict | None) -> None:
        """What the Data page learnt by tokenising the dataset (None: nothing, or out of date)."""
        self.data_summary = summary
        self.data_summary_changed.emit(summary)

    def set_training(self, on: bool) -> None:
        self.training = on
        self.training_changed.emit(on)
