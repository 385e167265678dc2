"""The trainer's optimizer and learning-rate schedule, shared with the benchmarks that must train
exactly as it does.

Only the adapter's matrices reach AdamW (:func:`make_adamw`, fused where torch has it); LambdaLR
multiplies the peak rate by :func:`lr_factor` each step: a linear warmup, then constant, linear or
cosine decay. The schedule's state is its configuration, so a checkpoint saves the scheduler's
counters and never the function.
"""

from __future__ import annotations

import math

import torch

from core.errors import StudioError


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


def make_adamw(params: list[torch.Tensor], *, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """torch's AdamW, fused (one kernel over every tensor) where this torch has it for the params'
    device, else the default implementation. The update is the same algorithm; over the 420 adapter
    tensors of an all-linear SmolLM2 the fused step is several times faster on CPU (the
    optimizer step is otherwise a few percent of the whole training step)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype the fused kernel lacks
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
