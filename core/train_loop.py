"""The training loop (a mixin of :class:`core.train.Trainer`, whose state it shares): which examples
each step takes, the forward and backward over its micro-batches, the log points (the only device
syncs), evaluation, pause, and the two ways a step fails (a loss that is no longer finite, out of
memory) in words that say what to change.

What one step is, and why the loss is divided by the global batch's trained tokens, is in
:mod:`core.train`'s docstring; the set-up that precedes the loop is :mod:`core.train_setup`, the
checkpoints it writes :mod:`core.train_checkpoints`.
"""

from __future__ import annotations

import contextlib
import gc
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from core.encoded import IGNORE
from core.errors import StudioError
from core.loss import loss_sum as head_loss_sum
from core.train_events import EvalEvent, RunResult, StepEvent


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


def _collect_cycles() -> None:
    """Free tensors held in reference cycles, but only from the main thread. In the window the
    trainer runs in a worker thread, and a collection there could also destroy the GUI's own
    objects from the wrong thread (a crash); the window collects from its own thread instead
    (studio/gc_guard.py)."""
    if threading.current_thread() is threading.main_thread():
        gc.collect()


@dataclass
class _Session:
    """The steps and tokens of this session (since the run started, resumed or left a pause) and when it
    began: what the ETA and tokens per second are measured on."""

    t0: float = field(default_factory=time.perf_counter)
    steps: int = 0
    tokens: int = 0


class TrainLoop:
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
        session = _Session()
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
            session.steps += 1
            session.tokens += step_tokens
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
                loss_val, norm_val, mem, stop_now = self._read_back(step_no, step_loss, grad_norm, stop_now)
            elapsed = self._report_step(step_no, t0, session, lr=lr, tokens=step_tokens, trained=n_tokens,
                                        loss=loss_val, grad_norm=norm_val, memory=mem)
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
                session = _Session()
                self.elapsed_before = self._elapsed_now
        return self._finish("finished")

    def _read_back(self, step_no: int, step_loss: torch.Tensor, grad_norm: torch.Tensor,
                   stop_now: bool) -> tuple[float, float, int | None, bool]:
        """A log point: the step's loss and gradient norm read back and the memory in use; a loss that
        is no longer finite ends the run here, before a checkpoint could hold it. Returns them and
        whether to stop: ``stop_now`` as given, or under DDP the flag the ranks agreed on."""
        if self.world != 1:  # one all-reduce carries the loss and every rank's stop flag
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
        return loss_val, norm_val, mem, stop_now

    def _report_step(self, step_no: int, t0: float, session: _Session, *, lr: float, tokens: int, trained: int,
                     loss: float | None, grad_norm: float | None, memory: int | None) -> float:
        """The step's row in metrics.jsonl (rank 0) and its StepEvent, timed from ``t0``; returns the
        run's elapsed seconds, earlier sessions of a resumed run included."""
        now = time.perf_counter()
        step_seconds = now - t0
        seconds = now - session.t0
        elapsed = self.elapsed_before + seconds
        eta = (self.total_steps - step_no) * seconds / max(1, session.steps)
        tps = session.tokens / seconds if seconds > 0 else 0.0
        epoch = self.consumed / len(self.train_set)
        if self.is_main:
            row = {"step": step_no, "loss": loss, "lr": lr, "tokens": tokens,
                   "trained_tokens": trained, "step_seconds": round(step_seconds, 6),
                   "grad_norm": grad_norm, "epoch": round(epoch, 6), "elapsed": round(elapsed, 3)}
            self.run_folder.append_metric(row)
        self._emit(StepEvent(step=step_no, total_steps=self.total_steps, epoch=epoch, loss=loss, lr=lr,
                             grad_norm=grad_norm, tokens=tokens, tokens_per_second=tps, elapsed=elapsed,
                             eta=eta, memory_bytes=memory))
        return elapsed

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

    # -- pause -------------------------------------------------------------------------------------
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
        self.collect_cycles()
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
        self.collect_cycles()
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
