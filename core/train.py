"""The training loop: one engine for the window, the command line and ``torchrun``.

:class:`Trainer` trains one LoRA adapter as a :class:`core.config.RunConfig` says and writes the run
folder described in :mod:`core.runs`. It knows nothing of Qt (minGPT's trainer shape): it reports
every optimizer step as a :class:`StepEvent`, every evaluation as an :class:`EvalEvent` and every
change of state as a :class:`StatusEvent` through one ``callback(event)``, and it reads three
thread-safe flags: :meth:`Trainer.request_stop`, :meth:`Trainer.request_pause` and
:meth:`Trainer.request_resume`.

The step
    Each optimizer step consumes one *global batch* of ``batch_size × world_size × grad_accum``
    examples, taken in order from a per-epoch permutation of the training split (seeded by
    ``seed`` and the epoch, so the data position is just "examples consumed"). Micro-batch ``k`` of
    rank ``r`` is slice ``(k·world + r)·batch_size`` of it. The loss is the sum of next-token
    cross-entropies over the global batch divided by the number of trained tokens *in the whole
    global batch* (known on the CPU before the forward pass, so no sync), which makes gradient
    accumulation and data parallelism give exactly the gradient of one big batch (a mean over
    micro-batch means would weight short examples more).
    Only the adapter's matrices reach AdamW (checked); LambdaLR gives constant, linear or cosine decay
    after a linear warmup; gradients are clipped to ``max_grad_norm``. Precision: the base model is held
    in the run's dtype (fp32, bf16, fp16, or 4/8-bit with that compute dtype) and computes in it, with
    no autocast (it would only re-cast weights that already are in the compute dtype); the adapter's
    matrices, their gradients and AdamW's state stay fp32 (master weights, see core.lora); fp16 scales
    the loss with a :class:`torch.amp.GradScaler`. Gradient checkpointing is transformers' own, with
    ``enable_input_require_grads``.

Syncs
    ``loss.item()`` is a device sync point, so the loss (and grad norm, and memory) are read back
    only at log points (every ``log_every`` steps, and at checkpoints, evaluations and the end); a
    StepEvent between them carries ``loss=None``.

Nothing is lost
    Checkpoints (every ``save_every`` steps, at stop, pause and the end) hold the adapter, AdamW's
    state (safetensors for tensors, JSON for numbers: no pickle), the scheduler, every RNG state
    (torch CPU and CUDA, numpy, Python), the loss scaler and the data position, written with
    :func:`core.atomic.staged_folder`, the last :data:`core.runs.KEEP_CHECKPOINTS` kept. ``run(resume=
    True)`` continues from the newest complete one, bit for bit on the CPU. A checkpoint is written
    only after the loss of its step was read back finite, so a NaN never reaches one.

Data parallel
    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is gloo on the CPU and NCCL on CUDA, the
    model is wrapped in DistributedDataParallel, each rank takes its slice of every global batch, and
    only rank 0 writes files. Stop requests travel with the loss all-reduce at log points, so every
    rank stops at the same step. Not supported yet: pause under DDP, FSDP (a model too large for one
    device), and exact resume of per-rank dropout streams (ranks other than 0 reseed from the seed).

Where the parts are
    This module is the trainer's public face: :class:`Trainer` (its state, the flags, the events, the
    entry point), built from :mod:`core.train_setup` (from the environment to step 0, and undoing it),
    :mod:`core.train_loop` (the steps, log points, evaluation, pause, the errors a step ends in) and
    :mod:`core.train_checkpoints` (what a run keeps: its checkpoints and the adapter at the end). The
    events are :mod:`core.train_events`, the optimizer and schedule :mod:`core.train_optimizer`; the
    names callers use are importable from here.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from core import runs
from core.config import RunConfig
from core.errors import StudioError
from core.train_checkpoints import RunCheckpoints
from core.train_events import EvalEvent, RunResult, StatusEvent, StepEvent
from core.train_loop import TrainLoop, _collect_cycles
from core.train_optimizer import lr_factor, make_adamw
from core.train_setup import ADAPTER_NAME, TrainSetup, file_sha256

__all__ = ["Trainer", "StepEvent", "EvalEvent", "StatusEvent", "RunResult", "lr_factor", "make_adamw",
           "file_sha256"]


class Trainer(TrainSetup, TrainLoop, RunCheckpoints):
    """Train one adapter as ``cfg`` says; see the module docstring for what a step is.

    ``callback(event)`` receives every StepEvent, EvalEvent and StatusEvent, in the training thread.
    ``loaded`` (a :class:`core.models.LoadedModel`) reuses a model the window already holds; the
    adapter is taken out of it again when the run ends, leaving it as it was.
    ``collect_cycles``: how this process frees tensors held in reference cycles, where the run gives
    memory back (pause, out of memory, the end). By default Python's collector, from the main
    thread only; a window, whose collections must happen in its GUI thread (studio/gc_guard.py),
    passes a function that has that thread collect and waits for it.
    """

    def __init__(self, cfg: RunConfig, *, callback: Callable[[Any], None] | None = None, loaded=None,
                 collect_cycles: Callable[[], None] | None = None):
        cfg = cfg.copy()
        problems = cfg.problems()
        if not cfg.out:
            problems.append("--out: choose a run folder")
        if problems:
            from core.errors import ConfigError

            raise ConfigError(problems)
        if not cfg.name:
            cfg.name = Path(cfg.out).name
        self.cfg = cfg
        self.callback = callback
        self.loaded = loaded
        self.collect_cycles = collect_cycles or _collect_cycles
        self.run_folder = runs.RunFolder(cfg.out)
        self._stop = threading.Event()
        self._pause = threading.Event()
        self._resume = threading.Event()
        # set in run()
        self.model = None  # the raw model (never the DDP wrapper)
        self.optimizer = None
        self.world, self.rank, self.local_rank = 1, 0, 0
        self.device = torch.device("cpu")
        self.ddp = None
        self._gc_enabled = False
        self._injected = False
        self._adapter = ADAPTER_NAME
        self._owns_group = False
        self._saved_step = -1
        self._eval_pending = False
        self._device_spec: str | None = None  # the device this rank uses under torchrun (config.json keeps the user's)

    # -- flags (any thread) ------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Stop after the current step, writing a checkpoint and the adapter so far."""
        self._stop.set()
        self._resume.set()  # a paused run wakes up to stop

    def request_pause(self) -> None:
        """After the current step: checkpoint, free the optimizer state and the accelerator's memory,
        and wait for :meth:`request_resume` (or :meth:`request_stop`)."""
        self._resume.clear()
        self._pause.set()

    def request_resume(self) -> None:
        self._pause.clear()
        self._resume.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    # -- events ------------------------------------------------------------------------------------
    def _emit(self, event) -> None:
        if self.callback is not None and self.rank == 0:
            self.callback(event)

    def _status(self, kind: str, message: str = "", fraction: float | None = None) -> None:
        self._emit(StatusEvent(kind, message, fraction))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- entry point -------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> RunResult:
        """Train to the end (or until stopped); return what happened. Raises StudioError on a problem
        the user can fix (bad data, NaN loss, out of memory), after recording ``failed``."""
        self._t_start = time.perf_counter()
        self._init_distributed()
        existed = self.run_folder.path.exists()
        try:
            return self._run(resume)
        except (StudioError, Exception) as e:
            if self.is_main and self.run_folder.path.exists() and not isinstance(e, KeyboardInterrupt):
                self.run_folder.close()
                if not resume and not existed and not self.run_folder.checkpoints():
                    # a new run that failed before its first checkpoint leaves nothing to resume or read
                    shutil.rmtree(self.run_folder.path, ignore_errors=True)
                with contextlib.suppress(Exception):
                    if self.run_folder.path.exists():
                        self.run_folder.write_status("failed", message=str(e))
            if isinstance(e, StudioError):
                self._status("failed", str(e))
            raise
        finally:
            self.run_folder.close()
            self._cleanup()

    def _run(self, resume: bool) -> RunResult:
        cfg = self.cfg
        checkpoint = self._prepare_folder(resume)
        if resume and checkpoint is None:
            self._status("loading", "no checkpoint to resume from: starting from the first step")
        seed = cfg.train.seed
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

        lm = self._load_base()
        model, tokenizer = lm.model, lm.tokenizer
        self.device, self.dtype = torch.device(lm.device), lm.dtype
        if self._stop.is_set():
            return self._stopped_early()

        if not self._prepare_data(tokenizer, seed):
            return self._stopped_early()
        self._inject(model, seed)
        self._make_optimizer()
        self._restore_position(checkpoint, seed)
        return self._loop()
