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
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import math
import os
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from core import lora, runs
from core.config import RunConfig
from core.errors import Cancelled, StudioError
from core.loss import loss_sum as head_loss_sum

IGNORE = -100
ADAPTER_NAME = "default"
CURVE_POINTS = 500  # the loss curve kept in studio.json is thinned to at most this many points


# -- events ----------------------------------------------------------------------------------------

@dataclass
class StepEvent:
    """One optimizer step."""

    step: int
    total_steps: int
    epoch: float
    """Passes over the training split so far (fractional)."""
    loss: float | None
    """Mean next-token loss over the step's global batch; None between log points (no device sync)."""
    lr: float
    """The learning rate this step used."""
    grad_norm: float | None
    """Global gradient norm before clipping; None between log points."""
    tokens: int
    """Non-padding tokens of this step, all ranks."""
    tokens_per_second: float
    elapsed: float
    """Seconds of training in this run, earlier sessions of a resumed run included."""
    eta: float
    """Seconds to the last step at this session's pace."""
    memory_bytes: int | None
    """Accelerator memory allocated (CUDA, MPS) or the process's resident memory (CPU); log points only."""


@dataclass
class EvalEvent:
    step: int
    eval_loss: float


@dataclass
class StatusEvent:
    kind: str
    """``loading``, ``tokenizing``, ``training``, ``evaluating``, ``checkpoint``, ``paused``,
    ``stopped``, ``finished`` or ``failed``."""
    message: str = ""
    fraction: float | None = None


@dataclass
class RunResult:
    status: str
    """``finished``, ``stopped`` or ``failed``."""
    out: Path
    step: int
    total_steps: int
    final_loss: float | None = None
    best_eval_loss: float | None = None
    adapter: Path | None = None
    checkpoint: Path | None = None
    duration: float = 0.0
    message: str = ""
    metrics: dict = field(default_factory=dict)


# -- schedules -------------------------------------------------------------------------------------

def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """The multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Warmup rises linearly to 1 over ``warmup`` steps ((step+1)/warmup, so the first step already
    learns); then ``constant`` stays at 1, ``linear`` and ``cosine`` fall towards 0 over the remaining
    steps (progress (step−warmup)/(total−warmup), so the last step still has a small, non-zero rate).
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise StudioError(f"--scheduler: '{kind}' is not one of constant, linear, cosine")


class _Factor:
    """A picklable-free, JSON-free callable for LambdaLR (its state is the config, not saved)."""

    def __init__(self, total: int, warmup: int, kind: str):
        self.total, self.warmup, self.kind = total, warmup, kind

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total, self.warmup, self.kind)


# -- small helpers ---------------------------------------------------------------------------------

def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's files (sorted relative names and contents)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _is_oom(e: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(e, oom):
        return True
    # CUDA/MPS say "out of memory"; the CPU allocator says "DefaultCPUAllocator: can't allocate memory"
    text = str(e) if isinstance(e, (RuntimeError, MemoryError)) else ""
    return isinstance(e, MemoryError) or any(m in text for m in ("out of memory", "can't allocate memory",
                                                                   "not enough memory"))


def _memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    if device.type == "mps":
        with contextlib.suppress(Exception):
            return int(torch.mps.current_allocated_memory())
        return None
    global _PROCESS
    try:
        if _PROCESS is None:
            import psutil

            _PROCESS = psutil.Process()
        return int(_PROCESS.memory_info().rss)
    except Exception:
        return None


_PROCESS = None  # psutil's handle on this process, made once


def _thin(points: list, limit: int = CURVE_POINTS) -> list:
    if len(points) <= limit:
        return points
    stride = len(points) / limit
    picked = [points[int(i * stride)] for i in range(limit - 1)]
    return picked + [points[-1]]


# -- the trainer -----------------------------------------------------------------------------------

def _collect_cycles() -> None:
    """Free tensors held in reference cycles, but only from the main thread. In the window the
    trainer runs in a worker thread, and a collection there could also destroy the GUI's own
    objects from the wrong thread (a crash); the window collects from its own thread instead
    (studio/gc_guard.py)."""
    if threading.current_thread() is threading.main_thread():
        gc.collect()


def make_adamw(params: list[torch.Tensor], *, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """torch's AdamW, fused (one kernel over every tensor) where this torch has it for the params'
    device, else the default implementation. The update is the same algorithm; over the 420 adapter
    tensors of an all-linear SmolLM2 the fused step is several times faster on CPU (the
    optimizer step is otherwise a few percent of the whole training step)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype the fused kernel lacks
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class Trainer:
    """Train one adapter as ``cfg`` says; see the module docstring for what a step is.

    ``callback(event)`` receives every StepEvent, EvalEvent and StatusEvent, in the training thread.
    ``loaded`` (a :class:`core.models.LoadedModel`) reuses a model the window already holds; the
    adapter is taken out of it again when the run ends, leaving it as it was.
    """

    def __init__(self, cfg: RunConfig, *, callback: Callable[[Any], None] | None = None, loaded=None):
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

    def _init_distributed(self) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        self._owns_group = False
        if world <= 1:
            return
        import torch.distributed as dist

        self.world = world
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", str(self.rank)))
        dev = (self.cfg.model.device or "auto").lower()
        use_cuda = torch.cuda.is_available() and dev in ("auto", "cuda") or dev.startswith("cuda:")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
            self._owns_group = True
        if use_cuda:
            torch.cuda.set_device(self.local_rank)
            self._device_spec = f"cuda:{self.local_rank}"
        elif dev == "auto":
            self._device_spec = "cpu"

    def _cleanup(self) -> None:
        model = self.model
        if self.loaded is not None and not isinstance(self.loaded, _Owned) and model is not None:
            # give the window its model back as it was
            with contextlib.suppress(Exception):
                if self._gc_enabled:
                    off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
                    off()
                    model.disable_input_require_grads()
                if self._injected and self._adapter in lora.adapter_names(model):
                    lora.remove_adapter(model, self._adapter)
                model.requires_grad_(False)
                model.eval()
        self.optimizer = None
        self.ddp = None
        if self._owns_group:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        _collect_cycles()

    # -- set-up ------------------------------------------------------------------------------------
    def _prepare_folder(self, resume: bool) -> Path | None:
        rf = self.run_folder
        checkpoint = rf.latest_checkpoint() if resume else None
        if not resume and self.is_main:
            used = [p.name for p in (rf.metrics_path, rf.checkpoints_dir, rf.adapter_dir) if p.exists()]
            if used:
                raise StudioError(f"--out {rf.path}: this folder already holds a run ({', '.join(used)})",
                                  hint="continue it with --resume, or choose another --out folder")
        return checkpoint

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

    def _load_base(self):
        """The base model: the one the trainer was given, or loaded now (and owned: freed at the end)."""
        cfg = self.cfg
        if self.loaded is None:
            from core import models

            self._status("loading", f"loading {cfg.model.source}", 0.0)
            self.loaded = _Owned(models.load_model(
                cfg.model.source, device=self._device_spec or cfg.model.device, precision=cfg.model.precision,
                trust_remote_code=cfg.model.trust_remote_code, quantize=cfg.model.quantize,
                progress=lambda m, f: self._status("loading", m, f)))
        return self.loaded.inner if isinstance(self.loaded, _Owned) else self.loaded

    def _prepare_data(self, tokenizer, seed: int) -> bool:
        """Tokenise the dataset, record where it came from, and size the run; False if stopped meanwhile."""
        from core import chat, data

        cfg = self.cfg
        self._status("tokenizing", "reading and tokenising the dataset", 0.0)
        try:
            prepared = data.prepare(cfg.data, tokenizer, seed=seed, cancel=self._stop.is_set,
                                    progress=lambda d, t: self._status("tokenizing", f"tokenising {d}/{t}",
                                                                       d / t if t else 1.0))
        except Cancelled:
            return False
        self.prepared = prepared
        self.train_set, self.val_set = prepared.train, prepared.val
        n = len(self.train_set)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        data_path = Path(cfg.data.path) if cfg.data.path else (prepared.source.path if prepared.source else None)
        self.dataset_info = {
            "path": str(data_path) if data_path else "",
            "sha256": file_sha256(data_path) if data_path and data_path.exists() else None,
            "format": prepared.format, "fields": prepared.fields,
            "examples": prepared.stats.get("examples"), "train_examples": prepared.stats.get("train_examples"),
            "val_examples": prepared.stats.get("val_examples"), "truncated": prepared.truncated,
            **chat.rendering_record(tokenizer, cfg.data.chat_template),  # how prompts must be rendered
        }
        # trained tokens per example after the one-token shift (labels[1:]), from the (mapped) arrays
        from core.dataset_cache import trained_per_example

        self._trained = trained_per_example(self.train_set)
        self._lengths = self.train_set.lengths

        self.global_batch = cfg.train.batch_size * self.world * cfg.train.grad_accum
        if cfg.train.steps is not None:
            self.total_steps = int(cfg.train.steps)
        else:
            self.total_steps = max(1, math.ceil(float(cfg.train.epochs) * n / self.global_batch))
        return True

    def _inject(self, model, seed: int) -> None:
        """Put a fresh adapter on the model (named ``default``, or ``training`` if that is taken), with
        gradients for its matrices only, gradient checkpointing if asked, and DDP across processes."""
        from core import targets as targets_mod

        cfg = self.cfg
        names = targets_mod.resolve_targets(model, cfg.lora.targets)
        if ADAPTER_NAME in lora.adapter_names(model):
            self._adapter = "training"
            i = 2
            while self._adapter in lora.adapter_names(model):
                self._adapter = f"training-{i}"
                i += 1
        torch.manual_seed(seed)  # A's initialisation depends on the seed alone
        lora.inject_adapter(model, names, self._adapter, rank=cfg.lora.rank, alpha=cfg.lora.alpha,
                            dropout=cfg.lora.dropout, rslora=cfg.lora.rslora, init=cfg.lora.init)
        self._injected = True
        self.model = model
        self.target_names = names
        self.params = lora.lora_parameters(model, [self._adapter])
        self.param_names = list(self.params)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if {id(p) for p in trainable} != {id(p) for p in self.params.values()}:
            raise RuntimeError("parameters other than the adapter's require gradients")
        if cfg.model.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise StudioError(f"--gradient-checkpointing: {type(model).__name__} does not support it")
            # non-reentrant checkpointing: works with frozen inputs, DDP and the fused LoRA function
            if hasattr(model, "activation_checkpointing_enable"):  # the newer name (not in transformers 5.17)
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
            self._gc_enabled = True
        model.train()

        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           broadcast_buffers=False, gradient_as_bucket_view=True)
        self.forward_model = self.ddp if self.ddp is not None else model

    def _make_optimizer(self) -> None:
        """AdamW over the adapter's matrices, the learning-rate schedule, and fp16's loss scaler."""
        tr = self.cfg.train
        self.optimizer = make_adamw(list(self.params.values()), lr=tr.lr, weight_decay=tr.weight_decay)
        held = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        assert held == {id(p) for p in self.params.values()}, "the optimizer must hold the adapter's matrices and nothing else"
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _Factor(self.total_steps, tr.warmup, tr.scheduler))
        use_cuda = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_cuda and self.dtype == torch.float16 else None

    def _restore_position(self, checkpoint: Path | None, seed: int) -> None:
        """Step 0, or the checkpoint's step, optimizer and random states; then the run folder's files."""
        cfg = self.cfg
        self.step = 0
        self.consumed = 0
        self.elapsed_before = 0.0
        self.best_eval: float | None = None
        self.last_loss: float | None = None
        self._perm_epoch, self._perm = -1, None
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)
            if self.world > 1:  # ranks other than 0 keep their own dropout streams
                torch.manual_seed(seed + self.rank + 1000003 * self.step)
            self._status("loading", f"resuming from {checkpoint.name}")
        elif self.world > 1:
            torch.manual_seed(seed + self.rank)

        if self.is_main:
            self.run_folder.write_config(cfg)
            if checkpoint is not None:
                self.run_folder.truncate_metrics(self.step)
            else:
                self.run_folder.reset_metrics()
            self.run_folder.write_status("running", step=self.step, total_steps=self.total_steps,
                                         name=cfg.name, message="", world_size=self.world)

    def _stopped_early(self) -> RunResult:
        self._status("stopped", "stopped before training began")
        if self.is_main and self.run_folder.path.exists():
            self.run_folder.write_status("stopped", step=0, message="stopped before training began")
        return RunResult(status="stopped", out=self.run_folder.path, step=0, total_steps=0,
                         duration=time.perf_counter() - self._t_start, message="stopped before training began")

    # -- data order --------------------------------------------------------------------------------
    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(len(self.train_set), generator=g).numpy()
            self._perm_epoch = epoch
        return self._perm

    def _take(self, count: int) -> np.ndarray:
        """The next ``count`` example indices of the shuffled stream (crossing epochs as needed)."""
        n = len(self.train_set)
        out = []
        pos = self.consumed
        while count > 0:
            epoch, index = divmod(pos, n)
            perm = self._permutation(epoch)
            k = min(count, n - index)
            out.append(perm[index:index + k])
            pos += k
            count -= k
        self.consumed = pos
        return np.concatenate(out)

    def _micro_batches(self, chunk: np.ndarray) -> list[np.ndarray]:
        bs, w = self.cfg.train.batch_size, self.world
        return [chunk[(k * w + self.rank) * bs:(k * w + self.rank + 1) * bs] for k in range(self.cfg.train.grad_accum)]

    def _batch(self, indices: np.ndarray, dataset=None) -> dict:
        from core import data

        ds = self.train_set if dataset is None else dataset
        b = data.collate([ds[int(i)] for i in indices], self.pad_id)
        return {k: v.to(self.device, non_blocking=True) for k, v in b.items()}

    # -- one forward ------------------------------------------------------------------------------
    def _loss_sum(self, model, batch: dict) -> torch.Tensor:
        """Σ of next-token cross-entropies over the batch's trained tokens (fp32), chunk by chunk
        through the output head so the tokens × vocabulary logits never exist (core.loss; the plain
        path where the model's head or wrapper is not one it knows, e.g. under DDP)."""
        return head_loss_sum(model, batch)

    # -- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> RunResult:
        tr = self.cfg.train
        n = len(self.train_set)
        session_t0 = time.perf_counter()
        session_steps = 0
        session_tokens = 0
        params = list(self.params.values())
        self._status("training", f"training: {self.total_steps} steps of {self.global_batch} examples")
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            chunk = self._take(self.global_batch)
            n_tokens = int(self._trained[chunk].sum())
            step_tokens = int(self._lengths[chunk].sum())
            step_loss, grad_norm = self._train_step(chunk, n_tokens, params)
            self.step += 1
            session_steps += 1
            session_tokens += step_tokens
            step_no = self.step

            save_now = tr.save_every > 0 and step_no % tr.save_every == 0
            eval_now = len(self.val_set) > 0 and tr.eval_every > 0 and step_no % tr.eval_every == 0
            last = step_no >= self.total_steps
            # Under DDP every rank must take the same branches, so only the step number (never a
            # local flag) decides a log point there, and a stop counts once all ranks agreed on it.
            single = self.world == 1
            wants = single and (self._stop.is_set() or self._pause.is_set())
            log_now = step_no % tr.log_every == 0 or save_now or eval_now or last or wants
            stop_now = single and self._stop.is_set()
            pause_now = single and self._pause.is_set()
            loss_val = norm_val = mem = None
            if log_now:
                if not single:  # one all-reduce carries the loss and every rank's stop flag
                    import torch.distributed as dist

                    flags = torch.stack([step_loss, torch.tensor(float(self._stop.is_set()), device=self.device)])
                    dist.all_reduce(flags)
                    step_loss = flags[0]
                    stop_now = bool(flags[1].item() > 0)
                loss_val = float(step_loss.item())  # the sync point: only here
                norm_val = float(grad_norm.item())
                mem = _memory_bytes(self.device)
                if not math.isfinite(loss_val):
                    raise self._nan_error(step_no, loss_val)
                self.last_loss = loss_val
            now = time.perf_counter()
            step_seconds = now - t0
            session = now - session_t0
            elapsed = self.elapsed_before + session
            eta = (self.total_steps - step_no) * session / max(1, session_steps)
            tps = session_tokens / session if session > 0 else 0.0
            epoch = self.consumed / n
            if self.is_main:
                row = {"step": step_no, "loss": loss_val, "lr": lr, "tokens": step_tokens,
                       "trained_tokens": n_tokens, "step_seconds": round(step_seconds, 6),
                       "grad_norm": norm_val, "epoch": round(epoch, 6), "elapsed": round(elapsed, 3)}
                self.run_folder.append_metric(row)
            self._emit(StepEvent(step=step_no, total_steps=self.total_steps, epoch=epoch, loss=loss_val, lr=lr,
                                 grad_norm=norm_val, tokens=step_tokens, tokens_per_second=tps, elapsed=elapsed,
                                 eta=eta, memory_bytes=mem))
            if single:  # a request made by the callback of this very step counts now
                stop_now, pause_now = self._stop.is_set(), self._pause.is_set()
            if eval_now or (last and len(self.val_set) > 0):
                self._evaluate_interruptible(single and not last)
                if single:  # asked during the evaluation, which then stopped where it was
                    stop_now, pause_now = self._stop.is_set(), self._pause.is_set()
            self._elapsed_now = elapsed
            if last:
                break
            if save_now:
                self._save_checkpoint()
            if stop_now:
                return self._finish("stopped")
            if pause_now:
                if self._pause_until_resumed():
                    return self._finish("stopped")
                session_t0, session_steps, session_tokens = time.perf_counter(), 0, 0
                self.elapsed_before = self._elapsed_now
        return self._finish("finished")

    def _train_step(self, chunk: np.ndarray, n_tokens: int, params: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over the global batch's micro-batches, clip, step the optimizer and the
        schedule. Returns the batch's mean loss and the gradient norm, both still on the device."""
        scale = self.world / max(1, n_tokens)  # DDP averages over ranks; undo it, divide by all tokens
        step_loss = torch.zeros((), device=self.device)
        try:
            micro = self._micro_batches(chunk)
            for k, idx in enumerate(micro):
                batch = self._batch(idx)
                sync = self.ddp is None or k == len(micro) - 1
                ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
                with ctx:
                    loss_sum = self._loss_sum(self.forward_model, batch)
                    loss = loss_sum * scale
                    if self.scaler is not None:
                        self.scaler.scale(loss).backward()
                    else:
                        loss.backward()
                step_loss += loss_sum.detach() / max(1, n_tokens)
                del batch, loss_sum, loss
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            # a tensor on the device: read back only at log points
            max_norm = self.cfg.train.max_grad_norm
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        except Exception as e:
            if _is_oom(e):
                raise self._oom_error(e) from None
            raise
        return step_loss, grad_norm

    def _pause_until_resumed(self) -> bool:
        """Pause (and again while asked), running an evaluation the pause interrupted; True if stopped."""
        pause_now = True
        while pause_now:
            self._do_pause()
            if self._stop.is_set():
                return True
            pause_now = False
            if self._eval_pending:  # the evaluation the pause interrupted, done now
                self._evaluate_interruptible(True)
                if self._stop.is_set():
                    return True
                pause_now = self._pause.is_set()
        return False

    # -- evaluation --------------------------------------------------------------------------------
    def _evaluate_interruptible(self, interruptible: bool) -> None:
        """:meth:`_evaluate`; with ``interruptible`` a stop or pause asked meanwhile ends it between
        batches (no eval row), and ``_eval_pending`` says a pause should run it again afterwards."""
        interrupt = (lambda: self._stop.is_set() or self._pause.is_set()) if interruptible else None
        try:
            self._eval_pending = self._evaluate(interrupt) is None
        except Exception as e:
            if _is_oom(e):
                raise self._oom_error(e) from None
            raise

    def _evaluate(self, interrupt: Callable[[], bool] | None = None) -> float | None:
        """Token-weighted mean loss over the validation split (each rank its share, then summed);
        None when ``interrupt()`` turned true before it was done."""
        self._status("evaluating", f"evaluating at step {self.step}")
        model = self.model
        model.eval()
        bs = self.cfg.train.batch_size
        idx = np.arange(self.rank, len(self.val_set), self.world)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for i in range(0, len(idx), bs):
                if interrupt is not None and interrupt():
                    model.train()
                    return None
                batch = self._batch(idx[i:i + bs], self.val_set)
                total[0] += self._loss_sum(model, batch).double()
                total[1] += (batch["labels"][:, 1:] != IGNORE).sum()
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(total)
        model.train()
        value = float(total[0].item() / max(1.0, total[1].item()))
        if self.best_eval is None or value < self.best_eval:
            self.best_eval = value
        if self.is_main:
            self.run_folder.append_metric({"step": self.step, "eval_loss": value})
        self._emit(EvalEvent(step=self.step, eval_loss=value))
        self._status("training", f"training: step {self.step} of {self.total_steps}")
        return value

    # -- errors ------------------------------------------------------------------------------------
    def _last_good(self) -> str:
        latest = self.run_folder.latest_checkpoint()
        return f"the last good checkpoint is {latest}" if latest else "no checkpoint had been written yet"

    def _nan_error(self, step: int, value: float) -> StudioError:
        what = "NaN" if math.isnan(value) else "infinite"
        return StudioError(
            f"step {step}: the loss became {what}, so training stopped; {self._last_good()}",
            hint=f"lower --lr (now {self.cfg.train.lr:g}), add --warmup steps, or use --precision fp32/bf16 "
                 "instead of fp16; continue from the checkpoint with --resume")

    def _oom_error(self, e: BaseException) -> StudioError:
        self.optimizer.zero_grad(set_to_none=True)
        _collect_cycles()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        tr, d = self.cfg.train, self.cfg.data
        return StudioError(
            f"out of memory on {self.device} at step {self.step + 1} (--batch-size {tr.batch_size}, "
            f"--max-length {d.max_length}, gradient checkpointing "
            f"{'on' if self.cfg.model.gradient_checkpointing else 'off'}); {self._last_good()}",
            hint="lower --batch-size (and raise --grad-accum to keep the same effective batch), lower "
                 "--max-length" + ("" if self.cfg.model.gradient_checkpointing else
                                   ", or add --gradient-checkpointing"))

    # -- checkpoints -------------------------------------------------------------------------------
    def _save_checkpoint(self) -> Path | None:
        """Write checkpoints/step-N (rank 0 only) and keep the newest few. Returns its folder."""
        if not self.is_main:
            return None
        if self._saved_step == self.step and self.run_folder.checkpoint_dir(self.step).is_dir():
            return self.run_folder.checkpoint_dir(self.step)
        from core import checkpoints

        self._status("checkpoint", f"saving checkpoint at step {self.step}")
        folder = self.run_folder.checkpoint_dir(self.step)
        adapter = {k: p.detach().to("cpu").contiguous() for k, p in self.params.items()}
        bad = next((k for k, t in adapter.items() if not torch.isfinite(t).all()), None)
        if bad is not None:  # never let a diverged adapter replace a good checkpoint
            raise StudioError(f"step {self.step}: the adapter's weights ({bad}) are no longer finite, so "
                              f"training stopped; {self._last_good()}",
                              hint=f"lower --lr (now {self.cfg.train.lr:g}) or add --warmup steps")
        opt_tensors, opt_scalars, groups = checkpoints.optimizer_state(self.optimizer, list(self.params.values()))
        rng, random_state = checkpoints.rng_state()
        state = {
            "step": self.step, "total_steps": self.total_steps, "consumed": self.consumed,
            "epoch": self.consumed // len(self.train_set), "index": self.consumed % len(self.train_set),
            "seed": self.cfg.train.seed, "world_size": self.world, "global_batch": self.global_batch,
            "param_names": self.param_names, "param_groups": groups, "optimizer_scalars": opt_scalars,
            "scheduler": {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            **random_state,
            "best_eval_loss": self.best_eval, "last_loss": self.last_loss,
            "elapsed": getattr(self, "_elapsed_now", self.elapsed_before),
            "dataset_sha256": self.dataset_info.get("sha256"), "train_examples": len(self.train_set),
        }
        checkpoints.write(folder, adapter, opt_tensors, rng, state)
        self._saved_step = self.step
        self.run_folder.prune_checkpoints()
        self.run_folder.write_status("running", step=self.step, total_steps=self.total_steps,
                                     checkpoint=str(folder), final_loss=self.last_loss)
        return folder

    def _load_checkpoint(self, folder: Path) -> None:
        from core import checkpoints, safeio

        state, adapter, opt_tensors, rng = checkpoints.read(folder)
        try:
            self._apply_checkpoint(folder, state, adapter, opt_tensors, rng)
        except StudioError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, OverflowError) as e:
            # state.json or a tensor file that parses but does not hold what this trainer wrote
            raise StudioError(f"checkpoint {folder}: damaged ({type(e).__name__}: {safeio.first_line(e)})",
                              hint="delete it to resume from an older one") from None

    def _apply_checkpoint(self, folder: Path, state, adapter, opt_tensors, rng) -> None:
        """Put a checkpoint's adapter, optimizer, schedule and random states in place."""
        from core import checkpoints

        if not isinstance(state, dict):
            raise TypeError("state.json does not hold an object")
        if state["param_names"] != self.param_names:
            raise StudioError(f"checkpoint {folder}: its adapter has different modules than this configuration",
                              hint="resume with the run's own config.json")
        if state.get("global_batch") != self.global_batch:
            raise StudioError(f"checkpoint {folder}: written with a global batch of {state.get('global_batch')} "
                              f"examples, this run has {self.global_batch} (batch size × processes × grad-accum)",
                              hint="resume with the same --batch-size, --grad-accum and number of processes")
        sha = self.dataset_info.get("sha256")
        if state.get("dataset_sha256") and sha and state["dataset_sha256"] != sha:
            raise StudioError(f"checkpoint {folder}: the dataset {self.dataset_info['path']} changed since it was "
                              "written", hint="resume with the same data, or start a new run")
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(adapter[k].to(p.device, p.dtype))
        checkpoints.restore_optimizer(self.optimizer, len(self.params), opt_tensors, state)
        self.scheduler.load_state_dict(dict(state["scheduler"], lr_lambdas=[None] * len(self.optimizer.param_groups)))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        checkpoints.restore_rng(rng, state)
        self.step = int(state["step"])
        self.consumed = int(state["consumed"])
        self.best_eval = state.get("best_eval_loss")
        self.last_loss = state.get("last_loss")
        self.elapsed_before = float(state.get("elapsed") or 0.0)
        self._elapsed_now = self.elapsed_before

    # -- pause -------------------------------------------------------------------------------------
    def _do_pause(self) -> None:
        """Checkpoint, give back the memory the optimizer and the accelerator hold, wait, restore."""
        if self.world > 1:  # every rank would have to pause together; not supported yet
            self._pause.clear()
            return
        folder = self._save_checkpoint()
        self.optimizer.state.clear()  # AdamW's moments: 2× the adapter; reloaded from the checkpoint
        moved = self.device.type != "cpu"
        if moved:
            self.model.to("cpu")
        _collect_cycles()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps":
            with contextlib.suppress(Exception):
                torch.mps.empty_cache()
        self.run_folder.write_status("paused", step=self.step)
        self._status("paused", f"paused at step {self.step}; checkpoint saved")
        while not self._resume.wait(0.2):
            pass
        if moved:
            self.model.to(self.device)
        self._load_checkpoint(folder)  # optimizer state, RNG and position exactly as they were
        self._pause.clear()
        if not self._stop.is_set():
            self.run_folder.write_status("running", step=self.step)
            self._status("training", f"training: step {self.step} of {self.total_steps}")

    # -- the end -----------------------------------------------------------------------------------
    def _finish(self, status: str) -> RunResult:
        """Final checkpoint, the adapter with its studio.json, status.json; the result."""
        checkpoint = self._save_checkpoint()
        adapter = None
        duration = getattr(self, "_elapsed_now", 0.0)
        if self.is_main:
            from core import adapter as adapter_mod, bundled

            rows = self.run_folder.read_metrics()
            curve = [[r["step"], r["loss"]] for r in rows if r.get("loss") is not None]
            evals = [[r["step"], r["eval_loss"]] for r in rows if r.get("eval_loss") is not None]
            summary = {
                "status": status, "steps": self.step, "total_steps": self.total_steps,
                "epochs": round(self.consumed / len(self.train_set), 6), "final_loss": self.last_loss,
                "best_eval_loss": self.best_eval, "duration_seconds": round(duration, 3),
                "tokens": int(sum(r.get("tokens", 0) for r in rows if "loss" in r)),
                "global_batch": self.global_batch, "world_size": self.world,
                "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "run_folder": str(self.run_folder.path), "config": self.cfg.to_dict(),
            }
            lm = self.loaded.inner if isinstance(self.loaded, _Owned) else self.loaded
            self._status("checkpoint", "saving the adapter")
            adapter = adapter_mod.save_adapter(
                self.model, self.run_folder.adapter_dir, self._adapter, base_model=self.cfg.model.source,
                studio={"name": self.cfg.name, "training": summary, "loss_curve": _thin(curve),
                        "eval_curve": _thin(evals), "dataset": self.dataset_info,
                        "base_model": {"spec": self.cfg.model.source, "path": str(getattr(lm, "path", "")),
                                       **bundled.source_file(self.cfg.model.source, getattr(lm, "path", None))},
                        "targets_spec": self.cfg.lora.targets})
            self.run_folder.write_status(status, step=self.step, total_steps=self.total_steps,
                                         final_loss=self.last_loss, best_eval_loss=self.best_eval,
                                         duration=round(duration, 3), adapter=str(adapter),
                                         message="" if status == "finished" else f"stopped at step {self.step}")
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
        msg = (f"finished {self.step} steps" if status == "finished"
               else f"stopped at step {self.step} of {self.total_steps}; continue with --resume")
        self._status(status, msg, 1.0 if status == "finished" else None)
        return RunResult(status=status, out=self.run_folder.path, step=self.step, total_steps=self.total_steps,
                         final_loss=self.last_loss, best_eval_loss=self.best_eval, adapter=adapter,
                         checkpoint=checkpoint, duration=duration, message=msg)


class _Owned:
    """A LoadedModel this trainer loaded itself (so it need not be restored at the end)."""

    def __init__(self, inner):
        self.inner = inner
