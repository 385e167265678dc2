"""What a training run reports: the events :class:`core.train.Trainer` hands its ``callback`` and the
result its ``run()`` returns.

Plain dataclasses with no torch in them, so whoever listens (the window's worker, the command line's
progress printer, a sweep) reads numbers, never tensors, and the trainer stays free of Qt (minGPT's
trainer shape). :mod:`core.train` re-exports them: they are the trainer's public face.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


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
