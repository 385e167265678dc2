"""Token ids and labels as the trainer reads them: one example (:class:`Encoded`) and many in flat
numpy arrays (:class:`EncodedSet`), packed or not. No torch here: ``lora-studio data`` never needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IGNORE = -100
"""The label of a token the loss skips (PyTorch's cross-entropy ``ignore_index``)."""

SCAN_BLOCK = 1 << 24
"""Tokens a whole-set pass over a memory-mapped array reads at a time (16 Mi: 16 MB of the mask)."""


def release_pages(arr: np.ndarray) -> None:
    """Let go of the pages of the file mapped under ``arr`` (a ``np.memmap`` or a view of one) that
    this process has read; the next read maps them again from the page cache. A pass over a whole
    memory-mapped set (counting its trained tokens) otherwise leaves every page it touched counted
    in the process's resident memory: 170 MB for the mask of a 1,000,000-row dataset, at the first
    training step. In-memory arrays and systems without ``madvise`` are left as they are."""
    import mmap

    base = arr
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    if base is not None and hasattr(base, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            base.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


@dataclass
class Encoded:
    """One example (or, packed, one sequence of whole examples) as the model is trained on it."""

    input_ids: list[int]
    labels: list[int]
    """``input_ids`` where the loss is computed, :data:`IGNORE` (-100) elsewhere."""
    truncated: bool = False
    """The rendered example was longer than ``max_length`` and was cut."""
    position_ids: list[int] | None = None
    """Packed sequences only: each example's positions, restarting at 0 where it starts (None: 0, 1, ...)."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


class EncodedSet(Sequence):
    """Many :class:`Encoded` examples in three flat numpy arrays (ids, a trained mask, offsets).

    A list of ``Encoded`` would hold every token as a Python int (28 bytes each, plus the list's
    pointer); here a token costs 5 bytes, so a large dataset's tokens fit in memory. Indexing gives
    an :class:`Encoded`; ``lengths`` gives every example's length without building any.

    A packed set (``starts`` given) shares the unpacked set's ids and mask; its offsets bound the
    sequences and ``starts`` the examples inside them. Its items carry ``position_ids`` restarting at
    each example, and the first token of every example but a sequence's first is not trained: it is
    the target of the previous example's last token, a prediction the unpacked example never makes.
    """

    def __init__(self, ids: np.ndarray, trained: np.ndarray, offsets: np.ndarray, truncated: np.ndarray,
                 rows: np.ndarray, starts: np.ndarray | None = None):
        self.ids = ids                # (total_tokens,) int32
        self.trained = trained        # (total_tokens,) bool
        self.offsets = offsets        # (n + 1,) int64: example i is ids[offsets[i]:offsets[i+1]]
        self.truncated = truncated    # (n,) bool
        self.rows = rows              # (n,) int64: the source row (0-based) or, packed, the first one's
        self.starts = starts          # packed only: (examples,) int64, where each example starts in ids

    @classmethod
    def empty(cls) -> "EncodedSet":
        return cls(np.zeros(0, np.int32), np.zeros(0, bool), np.zeros(1, np.int64), np.zeros(0, bool),
                   np.zeros(0, np.int64))

    @classmethod
    def from_encoded(cls, examples: Sequence[Encoded], rows: Sequence[int] | None = None) -> "EncodedSet":
        b = SetBuilder()
        for i, e in enumerate(examples):
            b.add(e, rows[i] if rows is not None else i)
        return b.build()

    @property
    def packed(self) -> bool:
        return self.starts is not None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.ids[a:b].astype(np.int64)
        trained = np.array(self.trained[a:b], dtype=bool)
        positions = None
        if self.starts is not None:
            inner = self.example_starts(i) - a  # each example's first token, relative to the sequence
            trained[inner[1:]] = False
            positions = np.arange(b - a) - np.repeat(inner, np.diff(np.append(inner, b - a)))
            positions = positions.tolist()
        labels = np.where(trained, ids, IGNORE)
        return Encoded(ids.tolist(), labels.tolist(), bool(self.truncated[i]), positions)

    def example_starts(self, i: int) -> np.ndarray:
        """Packed: where the examples of sequence ``i`` start in the token arrays (the first is its start)."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        lo, hi = np.searchsorted(self.starts, [a, b], side="left")
        return np.asarray(self.starts[lo:hi], np.int64)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def trained_tokens(self) -> int:
        total = 0
        for a in range(0, len(self.trained), SCAN_BLOCK):
            total += int(self.trained[a:a + SCAN_BLOCK].sum())
            release_pages(self.trained)
        return total


class SetBuilder:
    """Collects :class:`Encoded` examples in memory and builds an :class:`EncodedSet`
    (core.dataset_cache.DiskSetBuilder has the same ``add``/``build`` on files)."""

    def __init__(self):
        self.ids: list[np.ndarray] = []
        self.trained: list[np.ndarray] = []
        self.lengths: list[int] = []
        self.truncated: list[bool] = []
        self.rows: list[int] = []

    def add(self, e: Encoded, row: int) -> None:
        ids = np.asarray(e.input_ids, dtype=np.int32)
        self.ids.append(ids)
        self.trained.append(np.asarray(e.labels) != IGNORE)
        self.lengths.append(len(ids))
        self.truncated.append(bool(e.truncated))
        self.rows.append(int(row))

    def build(self) -> EncodedSet:
        if not self.ids:
            return EncodedSet.empty()
        offsets = np.zeros(len(self.lengths) + 1, np.int64)
        np.cumsum(self.lengths, out=offsets[1:])
        return EncodedSet(np.concatenate(self.ids), np.concatenate(self.trained), offsets,
                          np.asarray(self.truncated, bool), np.asarray(self.rows, np.int64))
