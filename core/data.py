"""Datasets: from a file on disk to token ids and labels ready to train on.

The path of one example::

    file ──read()──▶ Source (a memory-mapped datasets.Dataset + format + field mapping)
         ──encode()─▶ Encoded(input_ids, labels)   one row, rendered and tokenised
         ──prepare()▶ Prepared(train, val, stats, problems)   all rows, split, optionally packed
         ──collate()▶ {"input_ids", "labels", "attention_mask"}   one padded batch

**Reading** (core.data_read): files and ``save_to_disk`` folders through ``datasets`` into
memory-mapped Arrow files, a Hub dataset through core.hub_datasets; bad files named by line.

**Formats** (``detect_format``; overridable with ``format`` and a ``fields`` mapping from a format's
fields to the file's columns):

=================  =====================================================  ========================
format             fields (synonyms detected automatically)               becomes
=================  =====================================================  ========================
chat               messages (or conversations: ShareGPT's from/value,      the conversation
                   human/gpt/system mapped to user/assistant/system)
instruction        instruction; input (context); output (response);        user: instruction +
                   system                                                  input; assistant: output
prompt-completion  prompt (question, query); completion (answer,           user: prompt;
                   response); system                                       assistant: completion
text               text                                                    all of it is trained
=================  =====================================================  ========================

**Rendering, end of turn and labels** (core.data_render): each conversation with the model's chat
template (or a plain one), the answers and their end-of-turn token trained, everything else -100.

**The whole dataset** (here, :func:`prepare`): every row tokenised into the on-disk cache
(core.dataset_cache; in several processes for a large file, core.data_encode), the split, the
statistics, and packing (optional, training split only): whole examples in sequences of at most
``max_length`` tokens, each example's positions and attention its own (core.packing). The
validation split is never packed, so its loss compares across runs with and without packing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from core import chat, data_encode, dataset_cache, safeio
from core.errors import StudioError
from core.home import sample_dataset

# core.data's public names, wherever they live (callers import them from here)
from core.chat import END_OF_TURN, end_of_turn_ids  # noqa: F401  (the one list lives in core.chat)
from core.data_read import (  # noqa: F401
    FIELDS, FORMATS, REQUIRED, SUFFIXES, Source, _load, _quiet_datasets, detect_format, parse_fields, read,
    resolve_fields, train_split)
from core.data_render import (  # noqa: F401
    BRACKETS, PLAIN_TEMPLATE, ROLES, UNDERLINE, RowProblem, _conversation, _encode_many, encode, format_prompt,
    prompt_ids, render_marked, render_text)
from core.encoded import IGNORE, Encoded, EncodedSet, SetBuilder  # noqa: F401
from core.packing import collate, pack  # noqa: F401

CHUNK = 256
"""Rows tokenised per batch in :func:`prepare`: progress and cancel are checked between chunks."""

Progress = Callable[[int, int], None]


@dataclass
class Prepared:
    """A dataset tokenised, split and (optionally) packed: what the trainer consumes."""

    train: EncodedSet
    """Training examples (or, with packing, packed sequences); ``train[i]`` is an :class:`Encoded`."""
    val: EncodedSet
    """Validation examples (empty without ``val_split``); never packed."""
    format: str
    fields: dict[str, str]
    stats: dict
    """``examples``, ``train_examples``, ``val_examples``, ``train_sequences`` (after packing),
    ``tokens``, ``trained_tokens``, ``truncated``, ``skipped``, ``lengths`` (:func:`token_stats` of the
    examples' lengths, before packing) and ``max_length``."""
    truncated: int
    problems: list[str]
    """Rows skipped and why, grouped, with row numbers; and warnings about the options."""
    source: Source | None = None
    example: Encoded | None = None
    """The first usable row in file order, encoded (what ``lora-studio data`` shows)."""


# -- the whole dataset ----------------------------------------------------------------------------

def _rows_text(rows: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(r + 1) for r in rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def prepare(cfg, tokenizer, *, seed: int = 42, progress: Progress | None = None,
            cancel: Callable[[], bool] | None = None, source: Source | None = None,
            workers: int | None = None) -> Prepared:
    """Read ``cfg.path`` (the sample dataset when empty), split it by ``seed``, tokenise every row and
    pack if asked.

    ``cfg`` is a :class:`core.config.DataConfig`. ``progress(done, total)`` is called with rows done
    after each chunk of :data:`CHUNK` rows; ``cancel()`` is asked before each and a true answer raises
    :class:`core.errors.Cancelled`. A ``source`` already read can be passed to skip reading again.
    The split is by row (``round(rows * val_split)`` held out, chosen by ``seed``), independent of the
    tokenizer, so the same file and seed hold out the same rows for every model. ``workers``:
    processes that tokenise (default: core.data_encode.default_workers, one below 50,000 rows).
    """
    if source is None:
        source = read(cfg.path or sample_dataset(), format=cfg.format, fields=cfg.fields,
                      split=getattr(cfg, "split", "") or None, subset=getattr(cfg, "subset", "") or None)
    tokenizer = chat.with_template(tokenizer, getattr(cfg, "chat_template", "auto"))
    staged = dataset_cache.Staged(dataset_cache.key(source, tokenizer, cfg, seed))
    cached = staged.load()  # the same data, tokenizer and options seen before: no tokenising at all
    if cached is not None:
        return Prepared(source=source, **cached)
    try:
        result = _prepare_into(staged, cfg, tokenizer, seed, progress, cancel, source, workers)
    except BaseException:
        staged.discard()
        raise
    staged.store(result)
    return result


def _prepare_into(staged, cfg, tokenizer, seed, progress, cancel, source, workers) -> Prepared:
    """prepare's work when nothing is cached: every row tokenised into ``staged``'s files."""
    n = source.rows
    val_split = float(cfg.val_split or 0.0)
    n_val = int(round(n * val_split)) if val_split > 0 else 0
    if val_split > 0 and n_val == 0:
        raise StudioError(f"--val-split {val_split:g}: {source.path} has {n} examples, so the validation split "
                          "would be empty", hint=f"use at least {1.5 / n:.2g}, or more data")
    if n_val >= n:
        raise StudioError(f"--val-split {val_split:g}: {source.path} has {n} examples, so the training split "
                          "would be empty", hint="use a smaller fraction")
    is_val = np.zeros(n, bool)
    if n_val:
        is_val[np.random.default_rng(seed).permutation(n)[:n_val]] = True

    end_ids = set(end_of_turn_ids(tokenizer))  # once, not per chunk: it reads the whole vocabulary

    def encode(start: int, stop: int) -> list[Encoded | RowProblem]:
        try:
            batch = source.dataset[start:stop]  # columns -> lists, only for this chunk
        except (ValueError, OSError) as e:  # a damaged arrow file (save_to_disk): bad UTF-8, torn buffers
            raise StudioError(f"{source.path}: rows {start + 1}-{stop} cannot be read ({safeio.first_line(e)})",
                              hint="write the dataset again") from None
        rows = [{c: batch[c][i] for c in batch} for i in range(stop - start)]
        return _encode_many(rows, tokenizer, source.format, source.fields, end_ids=end_ids,
                            max_length=cfg.max_length, train_on_prompt=cfg.train_on_prompt)

    # on disk as it goes (memory stays flat); a large dataset in several processes
    train, val, problems, first = data_encode.encode_rows(
        encode, n, CHUNK, is_val, staged, progress=progress, cancel=cancel,
        workers=data_encode.default_workers(n) if workers is None else workers)
    notes = []
    for msg, rows in list(problems.items())[:20]:
        notes.append(f"{len(rows)} row{'s' if len(rows) != 1 else ''} skipped ({msg}): row{'s' if len(rows) != 1 else ''} "
                     f"{_rows_text(rows)}")
    if len(problems) > 20:
        notes.append(f"... and {len(problems) - 20} more kinds of problem")
    skipped = sum(len(v) for v in problems.values())
    if len(train) == 0:
        raise StudioError(f"{source.path}: no example left to train on"
                          + (f": {'; '.join(notes)}" if notes else ""))
    if n_val and len(val) == 0:
        raise StudioError(f"--val-split {val_split:g}: every validation row of {source.path} was skipped"
                          + (f": {'; '.join(notes)}" if notes else ""))
    ctx = getattr(tokenizer, "model_max_length", None)
    if isinstance(ctx, int) and 0 < ctx < cfg.max_length:
        notes.append(f"--max-length {cfg.max_length} is beyond the model's context length ({ctx})")

    lengths = np.concatenate([train.lengths, val.lengths])
    truncated = int(train.truncated.sum() + val.truncated.sum())
    stats = {
        "examples": len(train) + len(val), "train_examples": len(train), "val_examples": len(val),
        "tokens": train.tokens + val.tokens, "trained_tokens": train.trained_tokens + val.trained_tokens,
        "truncated": truncated, "skipped": skipped, "max_length": cfg.max_length,
        "lengths": token_stats(lengths),
    }
    if cfg.packing:
        train = pack(train, cfg.max_length)
    stats["train_sequences"] = len(train)
    stats["packed"] = bool(cfg.packing)
    return Prepared(train=train, val=val, format=source.format, fields=dict(source.fields), stats=stats,
                    truncated=truncated, problems=notes, source=source, example=first)


# -- batches and statistics -----------------------------------------------------------------------

def token_stats(lengths, bins: int = 20) -> dict:
    """count, min, max, mean, p50, p90, p99 of example lengths, and a histogram's ``edges`` (bins + 1)
    and ``counts`` (bins) for the window to draw."""
    a = np.asarray(lengths, dtype=np.int64).ravel()
    if a.size == 0:
        return {"count": 0, "min": 0, "max": 0, "mean": 0.0, "p50": 0, "p90": 0, "p99": 0,
                "histogram": {"edges": [], "counts": []}}
    lo, hi = int(a.min()), int(a.max())
    width = -(-(hi - lo + 1) // bins)  # whole tokens per bin, so every bin is "from n to m tokens"
    edges = lo + width * np.arange(-(-(hi - lo + 1) // width) + 1)
    counts, _ = np.histogram(a, bins=edges)
    pct = lambda q: int(np.percentile(a, q, method="nearest"))  # noqa: E731 — a length, not between two
    return {"count": int(a.size), "min": lo, "max": hi, "mean": round(float(a.mean()), 2),
            "p50": pct(50), "p90": pct(90), "p99": pct(99),
            "histogram": {"edges": [int(e) for e in edges], "counts": [int(c) for c in counts]}}
