"""Tokenising every row of a dataset into the cache's files, in one process or, for a large dataset,
in several.

A row's rendering (the chat template, the answer spans, the labels) is Python and takes about half
of the time; the Rust tokenizer the rest. So a large dataset can be cut into contiguous ranges (as
many as :func:`default_workers` says), each tokenised by a forked worker into files of its
own (core.dataset_cache.DiskSetBuilder), which are then appended in order: the result is the same
bytes as one process writes, with the same problems and first example. Progress is a shared counter
and cancel stops the workers. Forking needs Linux (elsewhere, and below :data:`PARALLEL_ROWS` rows,
where starting the workers costs more than it saves, one process does it all).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from core.errors import Cancelled, StudioError

PARALLEL_ROWS = 50_000
"""Rows from which tokenising is shared between processes (when the machine has several cores)."""
MAX_WORKERS = 4

EncodeChunk = Callable[[int, int], list]
"""``encode(start, stop)``: rows start..stop-1 as a list of core.encoded.Encoded or core.data.RowProblem."""


def default_workers(rows: int) -> int:
    """One process below :data:`PARALLEL_ROWS` rows, off Linux, and on machines of 1-2 cores: on the
    2-core machine the figures come from, two workers tokenised 100,000 rows in 33.7 s against one's
    31.0 s (the Rust tokenizer already takes the second core for part of the time, and the machine
    was busy). With more cores, all but one, at most :data:`MAX_WORKERS`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if rows < PARALLEL_ROWS or not sys.platform.startswith("linux") or cores < 3:
        return 1
    return min(MAX_WORKERS, cores - 1)


def _encode_range(encode: EncodeChunk, start: int, stop: int, chunk: int, is_val: np.ndarray, train_b, val_b,
                  tick: Callable[[int], None], cancel) -> tuple[dict[str, list[int]], object]:
    """Rows start..stop-1, chunk by chunk, into the builders; the problems met and the first example."""
    from core.data import RowProblem

    problems: dict[str, list[int]] = {}
    first = None
    for a in range(start, stop, chunk):
        if cancel is not None and cancel():
            raise Cancelled("tokenising cancelled")
        b = min(stop, a + chunk)
        for r, result in enumerate(encode(a, b), start=a):
            if isinstance(result, RowProblem):
                problems.setdefault(result.message, []).append(r)
                continue
            if first is None:
                first = result
            (val_b if is_val[r] else train_b).add(result, r)
        tick(b - a)
    return problems, first


def encode_rows(encode: EncodeChunk, n: int, chunk: int, is_val: np.ndarray, staged, *, workers: int = 1,
                progress=None, cancel=None) -> tuple[object, object, dict[str, list[int]], object]:
    """Every row into ``staged``'s ``train`` and ``val`` sets: (train, val, problems, first example)."""
    if progress:
        progress(0, n)
    if workers <= 1 or n < 2 * chunk:
        done = [0]

        def tick(k: int) -> None:
            done[0] += k
            if progress:
                progress(done[0], n)

        train_b, val_b = staged.builder("train"), staged.builder("val")
        problems, first = _encode_range(encode, 0, n, chunk, is_val, train_b, val_b, tick, cancel)
        return train_b.build(), val_b.build(), problems, first
    return _encode_forked(encode, n, chunk, is_val, staged, workers, progress, cancel)


def _worker(folder: Path, k: int, encode, start, stop, chunk, is_val, counter) -> None:
    """A forked worker: its range into part files, then its problems and first example as JSON."""
    from core.dataset_cache import DiskSetBuilder

    def tick(m: int) -> None:
        with counter.get_lock():
            counter.value += m

    out: dict = {}
    try:
        train_b, val_b = DiskSetBuilder(folder, f"train-{k}"), DiskSetBuilder(folder, f"val-{k}")
        problems, first = _encode_range(encode, start, stop, chunk, is_val, train_b, val_b, tick, None)
        train_b.finish(), val_b.finish()
        out = {"problems": problems, "first": None if first is None else
               [list(map(int, first.input_ids)), list(map(int, first.labels)), bool(first.truncated)]}
    except StudioError as e:
        out = {"error": [e.message, e.hint]}
    except Exception as e:  # noqa: BLE001 — the parent says what failed, with the type
        out = {"error": [f"tokenising failed ({type(e).__name__}: {e})", None]}
    (folder / f"part-{k}.json").write_text(json.dumps(out), encoding="utf-8")


def _encode_forked(encode, n, chunk, is_val, staged, workers, progress, cancel):
    import multiprocessing

    from core.encoded import Encoded

    ctx = multiprocessing.get_context("fork")
    folder = staged.part_folder()
    counter = ctx.Value("q", 0)
    bounds = np.linspace(0, n, workers + 1).astype(int)
    # each worker's tokenizer on one thread: the workers are the parallelism (and no fork warning)
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(folder, k, encode, int(bounds[k]), int(bounds[k + 1]), chunk, is_val, counter))
                 for k in range(workers)]
        for p in procs:
            p.start()
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
    try:
        while any(p.is_alive() for p in procs):
            if cancel is not None and cancel():
                raise Cancelled("tokenising cancelled")
            if progress:
                progress(min(n, counter.value), n)
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    problems: dict[str, list[int]] = {}
    first = None
    for k in range(workers):
        try:
            part = json.loads((folder / f"part-{k}.json").read_text(encoding="utf-8"))
            (folder / f"part-{k}.json").unlink()
        except (OSError, ValueError):
            raise StudioError(f"tokenising failed: worker {k + 1} of {workers} ended without a result "
                              f"(exit code {procs[k].exitcode})") from None
        if "error" in part:
            raise StudioError(part["error"][0], hint=part["error"][1])
        for msg, rows in part["problems"].items():
            problems.setdefault(msg, []).extend(rows)
        if first is None and part["first"] is not None:
            first = Encoded(*part["first"])
    sets = []
    for name in ("train", "val"):
        b = staged.builder(name)
        for k in range(workers):
            b.append_part(folder, f"{name}-{k}")
        sets.append(b.build())
    if progress:
        progress(n, n)
    return sets[0], sets[1], problems, first
