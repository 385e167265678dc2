"""Long jobs off the GUI thread: model loads, conversion, tokenising, training, merging, export.

The worker API (for every page)
-------------------------------
A worker has superqt's shape (``superqt/utils/_qthreading.py``): a ``QObject`` carrying the signals

    progress(object)   whatever the job reports (a (message, fraction) pair, a core event, ...)
    finished(object)   the job's return value; never emitted after a cancel
    failed(str)        one clear message: a StudioError's text, "Out of memory: ..." or
                       "Unexpected error: ..." (the traceback goes to the log file, never to the user)
    cancelled()        the job stopped because ``cancel()`` was called
    done()             always last, whichever of the three above came before it

and a ``QThread`` that runs the job. Exactly one of finished / failed / cancelled is emitted, then done.

    from studio.workers import FunctionWorker, start

    def load(spec, *, progress, cancelled):             # runs in the worker thread
        from core import models                          # heavy imports belong here, not at the top
        return models.load_model(spec, progress=lambda m, f: progress((m, f)))

    w = FunctionWorker(load, "default")                  # progress=/cancelled= are passed in for you
    w.progress.connect(lambda p: bar.setValue(int(100 * p[1])))
    w.finished.connect(self._on_loaded)
    w.failed.connect(self.state.show_error)
    start(w, owner=self)                                 # keeps a reference until done; returns w;
                                                         # owner: disconnected when the page goes
    ...
    w.cancel()                                           # cooperative: the job polls cancelled()

Why the signals object stays in the GUI thread and only the job runs in a ``QThread``: a signal
emitted from the worker thread on an object that lives in the GUI thread is queued to the GUI thread
for *every* slot, bound methods and lambdas alike. (With the QObject moved into the thread, as in
Qt's own example, a bare lambda slot would run in the worker thread and touch widgets from there.)
So connect anything you like; every slot runs in the GUI thread. The worker thread never emits the
public signals itself: it queues (name, value) on a private relay, and the GUI thread emits the
public signal unless the worker was detached meanwhile, so a report queued just before its page was
deleted is dropped instead of reaching deleted widgets.

``FunctionWorker(fn, *args, **kwargs)`` calls ``fn(*args, progress=..., cancelled=..., **kwargs)``
when ``fn`` accepts those keywords (each one separately), else plain ``fn(*args, **kwargs)``.
``progress(value)`` emits ``progress``; ``cancelled()`` returns True once ``cancel()`` was called.
Raise ``core.errors.Cancelled`` (or just return after seeing ``cancelled()``) to end early; a
result returned after a cancel is dropped and ``cancelled`` is emitted instead.

``TrainWorker(cfg, resume=False, session=None)`` runs ``core.train.Trainer``, on the session's model
when given one (core.session.model_for_run: the window's model reused, not loaded a second time,
under a "train" ticket): every trainer event (StepEvent, EvalEvent, StatusEvent) arrives through
``progress``; ``stop()`` and ``pause()`` / ``resume()``
map to the trainer's thread-safe flags; a stopped run is *finished* (its adapter was saved), with
the trainer's RunResult.

``cancel_all()`` asks every running worker to stop without waiting (the window's ``closeEvent``,
which then lets the process end by itself once their threads have); ``stop_all(timeout_ms)``
cancels and waits (at the application's exit).
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable

from PySide6.QtCore import QObject, QThread, Signal

from studio import gc_guard, import_guard

import_guard.install()  # every page imports this module, before torch & co.: PySide6 would keep their source

log = logging.getLogger("studio")
_log_handler: logging.FileHandler | None = None


def log_path():
    """The file where unexpected errors are written with their traceback."""
    from core.home import studio_home

    d = studio_home() / "logs"
    d.mkdir(parents=True, exist_ok=True)
    return d / "studio.log"


def _configure_log() -> None:
    """Point the studio's log at the current home's file (again, when the home changed since)."""
    global _log_handler
    try:
        path = log_path()
        if _log_handler is not None and _log_handler.baseFilename == os.path.abspath(path):
            return
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError:  # a read-only home must not break the window; errors still reach the user
        return
    if _log_handler is not None:
        log.removeHandler(_log_handler)
        _log_handler.close()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    _log_handler = handler


def error_message(exc: BaseException) -> str:
    """One line a person can act on, for any exception a job may raise.

    A :class:`core.errors.StudioError` is already written for people: its text is shown with its
    window hint and the command-line options it names renamed to the window's controls.
    Out-of-memory errors get what to change. Anything else is a bug: its traceback goes to the log
    file, and the message says where.
    """
    from core.errors import StudioError

    if isinstance(exc, StudioError):
        from studio.messages import for_window

        return for_window(exc)  # phrased for the window: its controls, not command-line flags
    text = str(exc)
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return ("Out of memory: lower the batch size or the maximum length, turn on gradient "
                "checkpointing, or choose a smaller rank or fewer target modules")
    _configure_log()
    log.error("unexpected error in a worker:\n%s",
              "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    first = text.strip().splitlines()[0] if text.strip() else ""
    where = ""
    try:
        where = f" (details in {log_path()})"
    except OSError:
        pass
    return f"Unexpected error: {type(exc).__name__}{': ' + first if first else ''}{where}"


_imports_lock = threading.Lock()
_imports_done = False


def warm_imports() -> None:
    """Import torch, transformers and datasets once, one thread at a time.

    transformers resolves its names lazily on first attribute access; two threads doing that at the
    same moment can see a half-initialised module (``module 'transformers' has no attribute
    'PreTrainedTokenizerBase'`` from inside ``datasets``). Every worker passes through here before
    its job, so the first one imports everything and the others wait for it, once.
    """
    global _imports_done
    if _imports_done:
        return
    with _imports_lock:
        if _imports_done:
            return
        import torch  # noqa: F401
        import transformers

        for name in ("PreTrainedTokenizerBase", "PreTrainedModel", "AutoConfig", "AutoTokenizer",
                     "AutoModelForCausalLM", "PretrainedConfig"):
            getattr(transformers, name)
        try:
            import datasets  # noqa: F401
        except ImportError:  # only the data pages need it; their own import says what is missing
            pass
        _imports_done = True


class Worker(QObject):
    """Base class: subclasses implement :meth:`work`; see the module docstring for the signals."""

    progress = Signal(object)
    finished = Signal(object)
    failed = Signal(str)
    cancelled = Signal()
    done = Signal()
    _relay = Signal(str, object)  # (public signal's name, value): from the worker thread to _deliver

    heavy = True
    """Import torch/transformers/datasets (once, under a lock) before :meth:`work`; see warm_imports."""

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._cancel = threading.Event()
        self._thread: _Runner | None = None
        self.running = False
        self.started_at = 0.0
        self.ticket = None  # the core.session.Ticket its job holds, if any (released as soon as the job returns, before its report)
        self._detached = False
        self._relay.connect(self._deliver)  # queued: the worker object lives in the GUI thread

    # -- the worker thread's reports reach listeners through the GUI thread -------------------------
    def _send(self, name: str, value: Any = None) -> None:
        """Worker thread: queue a report for the GUI thread."""
        self._relay.emit(name, value)

    def _emit_progress(self, value: Any) -> None:
        self._send("progress", value)

    def _deliver(self, name: str, value: Any) -> None:
        """GUI thread: emit the public signal, unless the listeners went away (detach) since the
        report was queued. Disconnecting alone does not stop a report already queued, which then
        reached a page whose widgets were deleted."""
        if self._detached:
            return
        sig = getattr(self, name)
        if name in ("cancelled", "done"):
            sig.emit()
        else:
            sig.emit(value)

    # -- called from the GUI thread ---------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the job to stop; it ends at its next check (cooperative)."""
        self._cancel.set()

    def is_cancelled(self) -> bool:
        return self._cancel.is_set()

    def detach(self, *_) -> None:
        """Cancel and disconnect every slot (the widget that listened is going away)."""
        import warnings

        self._detached = True
        with warnings.catch_warnings():  # PySide warns when a signal had nothing connected
            warnings.simplefilter("ignore", RuntimeWarning)
            for sig in (self.progress, self.finished, self.failed, self.cancelled, self.done):
                try:
                    sig.disconnect()
                except (RuntimeError, TypeError):
                    pass
        self.cancel()

    def wait(self, timeout_ms: int = -1) -> bool:
        """Block until the job's thread ended (True) or the timeout passed (False)."""
        t = self._thread
        if t is None:
            return True
        return t.wait(timeout_ms) if timeout_ms >= 0 else t.wait()

    # -- runs in the worker thread ----------------------------------------------------------------
    def work(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def _run(self) -> None:
        from core.errors import Cancelled

        self.started_at = time.monotonic()
        try:
            if self.heavy:
                warm_imports()
            try:
                result = self.work()
            finally:
                self._give_back()
        except Cancelled:
            self._send("cancelled")
        except BaseException as e:  # noqa: BLE001 - every failure becomes one message
            if self._cancel.is_set() and not self._reports_after_cancel():
                self._send("cancelled")
            else:
                self._send("failed", error_message(e))
        else:
            if self._cancel.is_set() and not self._reports_after_cancel():
                self._send("cancelled")  # no result after a cancel (superqt's rule)
            else:
                self._send("finished", result)
        finally:
            self.running = False
            self._send("done")

    def _give_back(self) -> None:
        """Worker thread: the job is over, so its ticket goes back before any report does; a page that
        sees the job end (and lets the next one start) then finds the model free. The thread's end
        releases it again, which does nothing the second time."""
        t = self.ticket
        if t is not None:
            try:
                t.release()
            except Exception:  # noqa: BLE001 - giving the model back must not turn a result into a failure
                log.exception("releasing the model after %s", type(self).__name__)

    def _reports_after_cancel(self) -> bool:
        """Whether a result after cancel() still counts (a stopped training run does)."""
        return False


WORKER_NICE = 5
"""How much lower than the window's thread a worker thread runs (Linux nice levels)."""


def _lower_priority() -> None:
    """Give this (worker) thread a nice level WORKER_NICE above the one it has, on Linux.

    Training keeps every core busy with torch's threads, and the window's thread then has to wait
    for a time slice to repaint or answer a click. A nice level is a property of each Linux thread
    and the threads a thread creates inherit it; torch's OpenMP threads are created by the thread
    that first runs a parallel operation, so a job's compute threads run at the lower priority too,
    and the scheduler lets the window's thread run first when it wakes. The job loses almost
    nothing: the window uses little CPU. (Qt's QThread priorities do nothing for ordinary threads on
    Linux.) Elsewhere, or where the call is refused, nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + WORKER_NICE))
    except OSError:
        pass


class _Runner(QThread):
    """The thread of one worker: runs its job once, at a lower priority than the window."""

    def __init__(self, worker: Worker):
        super().__init__()
        self.worker = worker

    def run(self) -> None:  # worker thread
        _lower_priority()
        self.worker._run()


_running: set[Worker] = set()


def start(worker: Worker, owner: QObject | None = None, ticket=None) -> Worker:
    """Run ``worker`` in a new thread; keeps it alive until its thread ends. Returns the worker.

    ``owner`` (usually the page starting it): when the owner is destroyed, the worker is cancelled
    and its signals are disconnected, so a result arriving later never reaches a deleted widget.
    ``ticket`` (a core.session.Ticket the page took for the job): given back as soon as the job
    returns or fails, before the page hears of it (so a page that lets the next job start finds the
    model free), and again, harmlessly, when the thread has ended, whatever the job did.
    """
    gc_guard.install()  # cycles are collected in this (GUI) thread, never in the worker's
    thread = _Runner(worker)
    worker._thread = thread
    worker.running = True
    worker.ticket = ticket
    _running.add(worker)
    if ticket is not None:
        thread.finished.connect(ticket.release)
    thread.finished.connect(lambda: _running.discard(worker))
    thread.finished.connect(thread.deleteLater)
    if owner is not None:
        owner.destroyed.connect(worker.detach)
    thread.start()
    return worker


def running() -> list[Worker]:
    """Workers that have not reported ``done`` yet."""
    return [w for w in _running if w.running]


def cancel_all() -> int:
    """Ask every running worker to stop at its next safe point, without waiting; how many run."""
    workers = [w for w in _running if w.running]
    for w in workers:
        w.cancel()
    return len(workers)


def stop_all(timeout_ms: int = 10_000) -> bool:
    """Cancel every running worker and wait for its thread; True when all ended in time."""
    workers = list(_running)
    for w in workers:
        w.cancel()
    deadline = time.monotonic() + timeout_ms / 1000
    ok = True
    for w in workers:
        left = max(0, int(1000 * (deadline - time.monotonic())))
        ok = w.wait(left) and ok
    return ok


class FunctionWorker(Worker):
    """Run ``fn(*args, **kwargs)`` in a thread, passing ``progress=`` and ``cancelled=`` when it takes them."""

    def __init__(self, fn: Callable, *args, **kwargs):
        super().__init__()
        self.fn, self.args, self.kwargs = fn, args, kwargs
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._pass_progress = accepts_any or "progress" in params
        self._pass_cancelled = accepts_any or "cancelled" in params

    def work(self) -> Any:
        kwargs = dict(self.kwargs)
        if self._pass_progress:
            kwargs.setdefault("progress", self._emit_progress)
        if self._pass_cancelled:
            kwargs.setdefault("cancelled", self.is_cancelled)
        return self.fn(*self.args, **kwargs)


class TrainWorker(Worker):
    """One training run of ``core.train.Trainer`` over a copy of a RunConfig.

    Every trainer event is emitted through ``progress`` as is. ``stop()`` (also ``cancel()``) asks
    the trainer to save and stop at the end of the current step; the stopped run still ends with
    ``finished(result)`` because its adapter and checkpoint were written.
    """

    _collect_request = Signal()  # from the training thread: collect cycles here, in the GUI thread

    COLLECT_WAIT_S = 5.0
    """How long the training thread waits for the GUI thread's collection before going on without it."""

    def __init__(self, cfg, *, resume: bool = False, loaded=None, session=None, label: str = "training"):
        super().__init__()
        self.cfg = cfg.copy()
        self.resume_run = resume
        self.loaded = loaded
        self.session = session
        self.label = label
        self.trainer = None
        self.paused = False
        self._early = threading.Event()  # stop asked before the trainer existed
        self._collected = threading.Event()
        self._abandoned = False  # cancelled because the window closes: its thread may collect no more
        self._collect_request.connect(self._collect_here)  # queued: this object lives in the GUI thread

    def work(self) -> Any:
        if self.session is None:
            return self._train(self.loaded)
        from core.session import model_for_run
        from core.train import StatusEvent

        # queued behind short readers (a check, an analysis); the page refused it if a writer held it
        with self.session.acquire("train", self.label, wait=True) as ticket:
            status = lambda kind, message, fraction: self._emit_progress(StatusEvent(kind, message, fraction))  # noqa: E731
            with model_for_run(ticket, self.cfg.model, status) as loaded:  # the window's model, not a copy
                return self._train(loaded)

    def _train(self, loaded) -> Any:
        from core.train import Trainer

        self.trainer = Trainer(self.cfg, callback=self._emit_progress, loaded=loaded,
                               collect_cycles=self._collect_in_gui_thread)
        if self._early.is_set():
            self.trainer.request_stop()
        return self.trainer.run(resume=self.resume_run)

    def _collect_in_gui_thread(self) -> None:
        """Training thread: have the GUI thread collect cyclic garbage, the only thread that may
        (studio/gc_guard.py), and wait for it, so Pause's "give the memory back" (and the end of a
        run) frees the tensors cycles hold before the accelerator's cache is emptied."""
        if self._abandoned:
            return
        self._collected.clear()
        self._collect_request.emit()
        self._collected.wait(self.COLLECT_WAIT_S)

    def _collect_here(self) -> None:  # GUI thread
        gc_guard.collect_now()
        self._collected.set()

    def _reports_after_cancel(self) -> bool:
        return True

    def cancel(self) -> None:
        """Stop, because the window closes (workers.cancel_all): no GUI-thread collection is waited for."""
        self._abandoned = True
        self._collected.set()
        self.stop()

    def stop(self) -> None:
        self._cancel.set()
        self._early.set()
        t = self.trainer
        if t is not None:
            t.request_stop()

    def pause(self) -> None:
        """The trainer checkpoints after the current step, frees the optimizer state and the
        accelerator's memory, and waits until :meth:`resume` (or :meth:`stop`)."""
        t = self.trainer
        if t is not None:
            t.request_pause()
            self.paused = True

    def resume(self) -> None:
        t = self.trainer
        if t is not None:
            t.request_resume()
        self.paused = False
