"""What the Data page shows before training, computed without Qt: the first rows of a dataset with its
detected format and fields and its first example as it will be trained (:func:`preview`, fast), and
the whole file's token lengths, truncation and problems (:func:`analyse`, tokenises every row).

A dataset is a file, a ``save_to_disk`` folder or a Hub dataset ``org/name`` (with its split and
configuration), read through :func:`core.data.read`. When its format or fields cannot be worked out,
:func:`preview` still returns its columns and first rows, so the window can offer the field mapping
that fixes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from core.errors import StudioError

PREVIEW_ROWS = 200
"""How many of the first rows the preview carries."""


def raw_rows(path: str, split: str = "", subset: str = "", limit: int = PREVIEW_ROWS) -> tuple[list[str], list[dict]]:
    """A dataset's columns and first rows when its format cannot be worked out (([], []) when the
    dataset itself cannot be read: :func:`core.data.read`'s message says why)."""
    from core import data, hub_datasets

    try:
        local = Path(path).expanduser()
        if not local.exists() and hub_datasets.is_hub_dataset(path):
            ds, _ = hub_datasets.load(path, split or None, subset or None)
        else:
            ds, _ = data._load(local, None)  # the reading half of data.read
        return list(ds.column_names), ds.select(range(min(limit, len(ds)))).to_list()
    except Exception:  # noqa: BLE001 - unreadable: read's message says why
        return [], []


def preview(path: str, *, format: str = "auto", fields: dict | None = None, split: str = "", subset: str = "",
            tokenizer=None, max_length: int = 512, train_on_prompt: bool = False,
            chat_template: str = "auto") -> dict[str, Any]:
    """Read the dataset, detect its format, and render its first example (no full tokenising).

    Returns ``source`` (core.data.Source), ``columns``, ``rows`` (the first :data:`PREVIEW_ROWS`),
    ``format``, ``fields``, ``count``, ``notes``, ``pieces`` (core.data.render_marked of the first
    example, None without a tokenizer), ``example_tokens``, ``example_trained`` and
    ``example_error`` (the exception that row raised, or None). When the dataset cannot be used as
    it is: ``error`` (the StudioError) with its ``columns`` and ``rows`` where it could be read.
    """
    from core import data

    try:
        src = data.read(path, format=format, fields=fields or None, split=split or None, subset=subset or None)
    except StudioError as e:
        columns, rows = raw_rows(path, split, subset)
        return {"error": e, "columns": columns, "rows": rows}
    rows = src.dataset.select(range(min(PREVIEW_ROWS, src.rows))).to_list()
    out = {"source": src, "columns": list(src.columns), "rows": rows, "format": src.format,
           "fields": dict(src.fields), "count": src.rows, "notes": list(src.notes), "pieces": None,
           "example_error": None}
    if tokenizer is not None and rows:
        try:
            enc = data.encode(rows[0], tokenizer, src.format, src.fields, max_length=max_length,
                              train_on_prompt=train_on_prompt, chat_template=chat_template)
            out["pieces"] = data.render_marked(enc, tokenizer)
            out["example_tokens"] = len(enc.input_ids)
            out["example_trained"] = sum(1 for x in enc.labels if x != data.IGNORE)
        except Exception as e:  # noqa: BLE001 - shown beside the example, the rest still works
            out["example_error"] = e
    return out


def analyse(cfg, tokenizer, seed: int, source=None, *, progress: Callable[[int, int], None] | None = None,
            cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Tokenise every row of ``cfg`` (a DataConfig; ``source`` already read skips reading again):
    ``stats`` (token lengths, with the histogram), ``truncated``, ``problems``, ``train`` and ``val``
    counts, ``format``, ``tokens``, ``trained_tokens``, ``skipped``, ``max_length`` and ``path``."""
    from core import data

    prepared = data.prepare(cfg, tokenizer, seed=seed, progress=progress, cancel=cancel, source=source)
    stats = prepared.stats.get("lengths") if isinstance(prepared.stats, dict) else None
    if not stats:
        import numpy as np

        stats = data.token_stats(np.concatenate([prepared.train.lengths, prepared.val.lengths]))
    return {"stats": stats, "truncated": prepared.truncated, "problems": list(prepared.problems),
            "train": prepared.stats.get("train_examples", len(prepared.train)),
            "val": len(prepared.val), "format": prepared.format,
            "trained_tokens": prepared.stats.get("trained_tokens"), "tokens": prepared.stats.get("tokens"),
            "skipped": prepared.stats.get("skipped", 0), "max_length": cfg.max_length, "path": str(cfg.path)}
