"""What a training step of *this* run will need: the memory estimate of :func:`core.models.estimate_memory`
fed with the sequence length the run really pads its batches to.

A batch is padded to its longest example (``core.data.collate``), so the step that needs the most
memory is the one whose batch holds the longest example after truncation; with packing every
sequence is filled up to the maximum length. Before the dataset has been tokenised only the maximum
length is known, and the estimate says that it used it.

Nothing here imports torch until an estimate is asked for.
"""

from __future__ import annotations

from typing import Any


def sequence_length(data_cfg, summary: dict | None = None) -> tuple[int, str]:
    """``(tokens, what they are)``: the sequence length the memory estimate should use.

    ``data_cfg`` is the run's :class:`core.config.DataConfig`; ``summary`` what tokenising the dataset
    gave (``max_length`` it was tokenised with, ``path``, and ``stats`` with the ``max`` length after
    truncation, as the Data page computes it), or None. A summary made for another file or another
    maximum length is ignored.
    """
    limit = int(data_cfg.max_length)
    if data_cfg.packing:
        return limit, f"packing: sequences of {limit} tokens"
    longest = _longest(data_cfg, summary)
    if longest is None:
        return limit, "the maximum length (tokenise the dataset to estimate from its lengths)"
    longest = min(longest, limit)
    cut = " after truncation" if longest == limit else ""
    return longest, f"the longest example{cut}"


def _longest(data_cfg, summary: dict | None) -> int | None:
    if not summary or int(summary.get("max_length") or 0) != int(data_cfg.max_length):
        return None
    if data_cfg.path and summary.get("path") and str(summary["path"]) != str(data_cfg.path):
        return None
    stats = summary.get("stats") or {}
    longest = stats.get("max")
    return int(longest) if isinstance(longest, int) and longest > 0 else None


def estimate_for_run(model_config, cfg, summary: dict | None = None, **overrides: Any) -> dict:
    """:func:`core.models.estimate_memory` for the RunConfig ``cfg`` at :func:`sequence_length`;
    the result also carries ``seq_len`` and ``seq_basis`` (what the length is)."""
    from core import models

    seq_len, basis = sequence_length(cfg.data, summary)
    kwargs = dict(batch_size=cfg.train.batch_size, seq_len=seq_len, rank=cfg.lora.rank,
                  targets=cfg.lora.targets, precision=cfg.model.precision, quantize=cfg.model.quantize,
                  gradient_checkpointing=cfg.model.gradient_checkpointing)
    kwargs.update(overrides)
    mem = dict(models.estimate_memory(model_config, **kwargs))
    mem["seq_len"], mem["seq_basis"] = seq_len, basis
    return mem
