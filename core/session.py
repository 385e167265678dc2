"""The one owner of the loaded model: what is loaded, and who may use it now.

A window holds one base model (a :class:`core.models.LoadedModel`) and many jobs want it: training,
a Playground generation, the Library's apply / swap / merge / unmerge / remove, evaluation, the
compatibility check, the ΔW analysis. Two jobs that change the model at once corrupt each other's
results (a swap in the middle of a generation answers half with one adapter, half with the other),
so every job goes through a :class:`ModelSession`:

* a job asks for the model with :meth:`ModelSession.acquire` (or the :meth:`ModelSession.job`
  context manager) and gets a :class:`Ticket`; it runs on ``ticket.loaded`` and releases the ticket
  when it ends (from any thread: a window takes the ticket on the click, in its own thread, and the
  worker that runs the job gives it back when its thread ends);
* jobs that change the model or depend on which adapters are active are *exclusive*: training,
  loading, apply, swap, merge, unmerge, remove, and generation and evaluation (they switch the
  active adapter per answer); jobs that only read weights (the compatibility check, the ΔW
  analysis, an export, which merges into its own fresh copy) are *shared* and run together;
* a job that cannot start now is refused with one message naming the job that holds the model
  (:class:`ModelBusy`, a StudioError), or, asked with ``wait=True``, queued: the queue is first come
  first served, so a writer is never starved by a stream of readers.

What is on the model (adapters, which are active and which merged, device, dtype, quantisation) is
kept as a :class:`ModelView`, taken again after every exclusive job, so a view can show it without
touching a model another thread is changing.

No Qt here; the window's studio.state wraps a session and turns its ``listeners`` into a signal.
"""

from __future__ import annotations

import inspect
import itertools
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from core.errors import StudioError

JOBS: dict[str, tuple[str, bool]] = {
    # name: (what a message calls it, exclusive)
    "load": ("loading the model", True),
    "train": ("training", True),
    "apply": ("applying an adapter", True),
    "swap": ("swapping adapters", True),
    "merge": ("merging an adapter", True),
    "unmerge": ("unmerging an adapter", True),
    "remove": ("removing an adapter", True),
    "generate": ("a Playground generation", True),
    "evaluate": ("an evaluation", True),
    "check": ("checking adapters against the model", False),
    "analyse": ("a ΔW analysis", False),
    "export": ("an export", False),
}
"""Every job that uses the loaded model. Generation and evaluation are exclusive although they
write no weight: they switch the active adapter for each answer, which another job would see."""


class ModelBusy(StudioError):
    """The model is held by another job; ``holder`` is that job's :class:`Ticket`."""

    def __init__(self, job: str, holder: "Ticket"):
        self.job, self.holder = job, holder
        super().__init__(f"The model is busy: {holder.label} is running; wait for it to end or stop it")


class NoModel(StudioError):
    def __init__(self, job: str):
        super().__init__(f"No model is loaded: load one on the Model page before {JOBS[job][0]}")


@dataclass(frozen=True)
class ModelView:
    """What is on the loaded model, as of the end of the last exclusive job."""

    spec: str = ""
    device: str = ""
    dtype: str = ""
    quantize: str = "none"
    adapters: tuple[str, ...] = ()
    active: tuple[str, ...] = ()
    merged: tuple[str, ...] = ()

    def state_of(self, name: str) -> str | None:
        """``merged``, ``active``, ``loaded`` (on the model, not taking part) or None."""
        if name in self.merged:
            return "merged"
        if name in self.active:
            return "active"
        return "loaded" if name in self.adapters else None


def view_of(loaded) -> ModelView | None:
    if loaded is None:
        return None
    from core import lora

    model = loaded.model
    return ModelView(spec=str(loaded.spec), device=str(loaded.device),
                     dtype=str(loaded.dtype).replace("torch.", ""), quantize=getattr(loaded, "quantize", "none"),
                     adapters=tuple(lora.adapter_names(model)), active=tuple(lora.active_adapters(model)),
                     merged=tuple(lora.merged_adapters(model)))


@dataclass(eq=False)
class Ticket:
    """The right to use the model for one job, until :meth:`release` (idempotent, any thread)."""

    session: "ModelSession"
    job: str
    label: str
    exclusive: bool
    number: int = 0
    granted: bool = False
    released: bool = False
    started: float = field(default_factory=time.monotonic)

    @property
    def loaded(self):
        """The LoadedModel this ticket lets its job use (None while none is loaded)."""
        return self.session.loaded

    def release(self) -> None:
        self.session._release(self)

    def run(self, fn: Callable, *args, **kwargs) -> Any:
        """``fn(loaded, *args, **kwargs)`` under this ticket (a worker's job); ``progress=`` and
        ``cancelled=`` are passed on only when ``fn`` takes them."""
        if not self.granted or self.released:
            raise RuntimeError(f"{self.job}: the ticket is not held")
        if self.loaded is None:
            raise NoModel(self.job)
        params = inspect.signature(fn).parameters
        kwargs = {k: v for k, v in kwargs.items() if k not in ("progress", "cancelled") or k in params}
        return fn(self.loaded, *args, **kwargs)

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class ModelSession:
    """Owns the loaded model and decides which job may use it; thread-safe.

    ``listeners``: callables run (in whichever thread made the change) after the loaded model, the
    holders or the view changed; a window turns them into a queued signal.
    """

    def __init__(self, loaded=None):
        self._cond = threading.Condition()
        self._loaded = loaded
        self._view = view_of(loaded)
        self._holders: list[Ticket] = []
        self._queue: list[Ticket] = []
        self._numbers = itertools.count(1)
        self.history: list[str] = []
        """The jobs in the order they got the model (the last 200): what a test replays."""
        self.listeners: list[Callable[[], None]] = []

    # -- what is loaded ----------------------------------------------------------------------------
    @property
    def loaded(self):
        return self._loaded

    @property
    def view(self) -> ModelView | None:
        return self._view

    def set_loaded(self, loaded, ticket: Ticket | None = None) -> None:
        """Replace the loaded model (None: unload). With ``ticket`` (an exclusive one held by the
        caller, e.g. training that loads the model it trains) no other job is asked; without, this
        is a "load" job of its own and refused while any job holds the model."""
        if ticket is not None:
            if not (ticket.granted and ticket.exclusive and not ticket.released):
                raise RuntimeError("set_loaded needs an exclusive ticket that is held")
            self._replace(loaded)
            return
        with self.acquire("load"):
            self._replace(loaded)

    def _replace(self, loaded) -> None:
        with self._cond:
            self._loaded = loaded
            self._view = view_of(loaded)
        self._notify()

    def refresh_view(self) -> None:
        """Take the view again (after a job changed the model in a way its release did not see)."""
        with self._cond:
            self._view = view_of(self._loaded)
        self._notify()

    # -- who holds it ------------------------------------------------------------------------------
    def holders(self) -> list[Ticket]:
        with self._cond:
            return list(self._holders)

    def busy_message(self, job: str) -> str | None:
        """What :meth:`acquire` would refuse ``job`` with now; None when it would start."""
        with self._cond:
            blocker = self._blocker(JOBS[job][1], ahead=self._queue)
        return None if blocker is None else str(ModelBusy(job, blocker))

    def _blocker(self, exclusive: bool, ahead: list[Ticket]) -> Ticket | None:
        """The ticket (held, or queued before) that keeps a new job of this kind from starting."""
        for t in self._holders + ahead:
            if exclusive or t.exclusive:
                return t
        return None

    def acquire(self, job: str, label: str | None = None, *, wait: bool | float = False,
                need_model: bool = False) -> Ticket:
        """A ticket for ``job`` (a key of :data:`JOBS`); ``label`` is what a refusal calls it.

        ``wait``: False refuses at once with :class:`ModelBusy`; True queues until the model is
        free; a number of seconds queues that long, then refuses. ``need_model``: refuse with
        :class:`NoModel` when none is loaded."""
        name, exclusive = JOBS[job]
        t = Ticket(self, job, label or name, exclusive, number=next(self._numbers))
        with self._cond:
            if need_model and self._loaded is None:
                raise NoModel(job)
            blocker = self._blocker(exclusive, ahead=self._queue)
            if blocker is not None and wait is False:
                raise ModelBusy(job, blocker)
            self._queue.append(t)
            deadline = None if wait is True or wait is False else time.monotonic() + float(wait)
            while self._blocker(exclusive, ahead=self._queue[:self._queue.index(t)]) is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    blocker = self._blocker(exclusive, ahead=self._queue[:self._queue.index(t)])
                    self._queue.remove(t)
                    self._cond.notify_all()
                    raise ModelBusy(job, blocker)
                self._cond.wait(left)
            self._queue.remove(t)
            t.granted = True
            self._holders.append(t)
            self.history = (self.history + [job])[-200:]
            self._cond.notify_all()  # readers behind this one may start with it
        self._notify()
        return t

    @contextmanager
    def job(self, job: str, label: str | None = None, *, wait: bool | float = True) -> Iterator[Any]:
        """``with session.job("merge") as loaded: ...``: the LoadedModel under a ticket (queued by
        default); refuses with NoModel when none is loaded."""
        ticket = self.acquire(job, label, wait=wait, need_model=True)
        try:
            yield ticket.loaded
        finally:
            ticket.release()

    def _release(self, t: Ticket) -> None:
        with self._cond:
            if t.released or not t.granted:
                t.released = True
                return
            t.released = True
            self._holders.remove(t)
            if t.exclusive:  # it may have changed what is on the model
                try:
                    self._view = view_of(self._loaded)
                except Exception:  # noqa: BLE001 - a half-built model must not keep the ticket
                    pass
            self._cond.notify_all()
        self._notify()

    def _notify(self) -> None:
        for fn in list(self.listeners):
            try:
                fn()
            except Exception:  # noqa: BLE001 - a listener's failure is not the job's
                pass


# -- training on the session's model -------------------------------------------------------------------

def fits_run(loaded, model_cfg) -> bool:
    """Whether ``loaded`` is the model a run of ``model_cfg`` (core.config.ModelConfig) would load:
    the same spec, device, dtype and quantisation."""
    if loaded is None or str(loaded.spec) != str(model_cfg.source):
        return False
    from core import models

    device = models.pick_device(model_cfg.device)
    have = loaded.device if not isinstance(loaded.device, str) else models.pick_device(loaded.device)
    if have.type != device.type or (device.index is not None and have.index != device.index):
        return False
    return (loaded.dtype == models.pick_dtype(device, model_cfg.precision)
            and (getattr(loaded, "quantize", "none") or "none") == (model_cfg.quantize or "none"))


@contextmanager
def model_for_run(ticket: Ticket, model_cfg, status: Callable[[str, str, float | None], None], *,
                  merged_means: str = "a run would train on top of it") -> Iterator[Any]:
    """The session's model, ready for a run of ``model_cfg`` under ``ticket`` (an exclusive one):
    training, or an evaluation, which answers with the base model and adapters of its own.

    The model the session holds is reused when it fits the run (one copy in memory, as on the
    command line); otherwise it is let go first and the run's model loaded into the session, where
    it stays after the run. Adapters active on it are switched off for the run and back on after;
    one merged into the weights refuses the run (``merged_means``: what it would do to the job).
    ``status(kind, message, fraction)`` reports the loading."""
    from core import lora, models

    loaded = ticket.loaded
    if not fits_run(loaded, model_cfg):
        ticket.session.set_loaded(None, ticket=ticket)  # the old weights go before the new ones come
        loaded = None
        status("loading", f"loading {model_cfg.source}", 0.0)
        loaded = models.load_model(model_cfg.source, device=model_cfg.device, precision=model_cfg.precision,
                                   trust_remote_code=model_cfg.trust_remote_code, quantize=model_cfg.quantize,
                                   progress=lambda m, f: status("loading", m, f))
        ticket.session.set_loaded(loaded, ticket=ticket)
    merged = lora.merged_adapters(loaded.model)
    if merged:
        raise StudioError(f"{', '.join(merged)} is merged into the loaded model's weights, so {merged_means}",
                          hint="unmerge it first (Library → Unmerge)")
    saved = lora.active_adapters(loaded.model)
    lora.set_active_adapters(loaded.model, [])
    try:
        yield loaded
    finally:
        names = lora.adapter_names(loaded.model)
        lora.set_active_adapters(loaded.model, [n for n in saved if n in names])
