"""Packing short examples into full sequences, and batches for the model.

**Packing** (optional, training split only) fills sequences of at most ``max_length`` tokens with
whole examples in order (an example is never split), so little compute is spent on padding. The
examples of a sequence do not see each other: each one's positions restart at 0 (``position_ids``),
attention stays inside its example (core.loss.model_inputs: transformers' packed-sequence masks
where the model builds its mask with transformers' masking_utils, else a block-diagonal causal mask
of our own), and the first token of each example is not a target of the one before it. A packed
sequence's loss is therefore the sum of its examples' losses unpacked (tests/test_packing.py).

**Batches** (:func:`collate`) are right-padded. A packed batch's padding gets positions of its own,
restarting at 0, so it is a segment apart: no real token ever attends to it, with or without a
padding mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from core.encoded import IGNORE, Encoded, EncodedSet


def pack(data: EncodedSet, max_length: int) -> EncodedSet:
    """Greedy packing in order: whole examples into sequences of at most ``max_length`` tokens.
    The result shares ``data``'s ids and mask; ``starts`` keeps where each example begins."""
    lengths = data.lengths
    bounds = [0]
    rows = []
    total = 0
    start = 0
    for i, n in enumerate(lengths):
        if total and total + n > max_length:
            bounds.append(int(data.offsets[i]))
            rows.append(int(data.rows[start]))
            start, total = i, 0
        total += int(n)
    if len(lengths):
        bounds.append(int(data.offsets[-1]))
        rows.append(int(data.rows[start]))
    offsets = np.asarray(bounds, np.int64)
    trunc = np.zeros(len(offsets) - 1, bool)
    # a sequence is "truncated" if any example in it was
    ex_block = np.searchsorted(offsets, data.offsets[:-1], side="right") - 1
    np.logical_or.at(trunc, ex_block, data.truncated)
    return EncodedSet(data.ids, data.trained, offsets, trunc, np.asarray(rows, np.int64),
                      starts=np.asarray(data.offsets[:-1], np.int64))


def collate(examples: Sequence[Encoded | Mapping[str, Sequence[int]]], pad_id: int) -> dict:
    """A batch: ``input_ids``, ``labels``, ``attention_mask``, each a LongTensor ``(batch, longest)``,
    right-padded with ``pad_id`` (labels -100 and attention 0 on padding); packed sequences add
    ``position_ids`` (each example from 0, the padding from 0 again)."""
    import torch

    def get(e, key):
        return getattr(e, key, None) if isinstance(e, Encoded) else e.get(key)

    longest = max(len(get(e, "input_ids")) for e in examples)
    packed = any(get(e, "position_ids") is not None for e in examples)
    ids = torch.full((len(examples), longest), int(pad_id), dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    positions = torch.arange(longest, dtype=torch.long).repeat(len(examples), 1) if packed else None
    for i, e in enumerate(examples):
        x, y = get(e, "input_ids"), get(e, "labels")
        n = len(x)
        ids[i, :n] = torch.as_tensor(list(x), dtype=torch.long)
        labels[i, :n] = torch.as_tensor(list(y), dtype=torch.long)
        mask[i, :n] = 1
        if packed:
            p = get(e, "position_ids")
            positions[i, :n] = torch.as_tensor(list(p) if p is not None else range(n), dtype=torch.long)
            positions[i, n:] -= n  # the padding is a segment of its own
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if packed:
        batch["position_ids"] = positions
    return batch
