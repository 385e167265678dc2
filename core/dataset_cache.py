"""The tokenised dataset on disk, so that memory stays flat whatever the dataset's size, and a second
look at the same data costs no tokenising at all.

core.data.prepare writes every example's token ids and trained-token mask straight to files as it
tokenises (:class:`DiskSetBuilder`, the same ``add``/``build`` as an in-memory builder), and the
result is a core.data.EncodedSet over memory-mapped arrays: the operating system pages them in as
training reads them and can drop them again, so a million-row file never needs its tokens in RAM.
The statistics, the problems found and the first example are kept beside them (``meta.json``).

The folder is named by a key over everything the result depends on: the data (datasets'
fingerprint of the table, plus the file's path, size and modification time), the tokenizer (its
whole definition, chat template and special tokens), the options (format, fields, maximum length,
train-on-prompt, chat template choice, packing, validation split and seed) and the code that
renders, tokenises and packs (the bytes of core/data.py and its parts data_read, data_render,
data_encode, encoded and packing, of core/chat.py and of this file, so a change there is never
answered from an old cache). Nothing changed: the next ``prepare`` maps the files and returns in
well under a second. A folder is written under a temporary name and renamed into place when it
is complete; :data:`KEEP` folders are kept, the least recently used go first.
"""

from __future__ import annotations

from array import array
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from core.encoded import IGNORE, Encoded, EncodedSet, release_pages
from core.home import studio_home

KEEP = 6
"""Tokenised datasets kept in the cache (a 1,000,000-row file is about 0.3-0.5 GB)."""
_SOURCES = ("data.py", "data_read.py", "data_render.py", "data_encode.py", "encoded.py", "packing.py", "chat.py",
            "dataset_cache.py")


def cache_root() -> Path:
    return studio_home() / "cache" / "tokenized"


def _tokenizer_identity(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(type(tokenizer).__name__.encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "model_max_length", None)).encode())
    return h.hexdigest()


def _code_identity() -> str:
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in _SOURCES:
        try:
            h.update((here / name).read_bytes())
        except OSError:
            h.update(name.encode())
    return h.hexdigest()


def key(source, tokenizer, cfg, seed: int) -> str:
    """The cache key of ``prepare(cfg, tokenizer, seed=seed, source=source)``."""
    where: Any = str(source.path)
    try:
        st = Path(source.path).stat()
        where = [str(Path(source.path).resolve()), st.st_size, st.st_mtime_ns]
    except OSError:
        pass  # a Hub dataset: datasets' fingerprint names its files and revision
    parts = {
        "data": [getattr(source.dataset, "_fingerprint", None), where, source.rows, source.format,
                 sorted(source.fields.items())],
        "tokenizer": _tokenizer_identity(tokenizer),
        "options": [cfg.max_length, bool(cfg.train_on_prompt), str(getattr(cfg, "chat_template", "auto")),
                    bool(cfg.packing), float(cfg.val_split or 0.0), int(seed)],
        "code": _code_identity(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class DiskSetBuilder:
    """Builds a core.data.EncodedSet by appending each example's ids and mask to files."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = folder, name
        self._ids = open(folder / f"{name}.ids.i32", "wb")
        self._trained = open(folder / f"{name}.trained.u8", "wb")
        self.lengths = array("q")  # 8 bytes an example, not a Python int's 28 plus a pointer
        self.truncated = array("b")
        self.rows = array("q")

    def add(self, e, row: int) -> None:
        ids = np.asarray(e.input_ids, dtype=np.int32)
        self._ids.write(ids.tobytes())
        self._trained.write((np.asarray(e.labels) != IGNORE).astype(np.uint8).tobytes())
        self.lengths.append(len(ids))
        self.truncated.append(bool(e.truncated))
        self.rows.append(int(row))

    def append_part(self, folder: Path, name: str) -> None:
        """Append a set another builder finished (a worker's part, core.data_encode), then delete its files."""
        for suffix, out in ((".ids.i32", self._ids), (".trained.u8", self._trained)):
            with open(folder / f"{name}{suffix}", "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
        self.lengths.extend(array("q", np.diff(np.load(folder / f"{name}.offsets.npy")).tobytes()))
        self.truncated.extend(array("b", np.load(folder / f"{name}.truncated.npy").astype(np.int8).tobytes()))
        self.rows.extend(array("q", np.load(folder / f"{name}.rows.npy").astype(np.int64).tobytes()))
        for suffix in (".ids.i32", ".trained.u8", ".offsets.npy", ".truncated.npy", ".rows.npy"):
            (folder / f"{name}{suffix}").unlink()

    def finish(self) -> None:
        """Close the files and write the index (offsets, truncated, rows) beside them."""
        self._ids.close()
        self._trained.close()
        offsets = np.zeros(len(self.lengths) + 1, np.int64)
        np.cumsum(np.frombuffer(self.lengths, np.int64), out=offsets[1:])
        np.save(self.folder / f"{self.name}.offsets.npy", offsets)
        np.save(self.folder / f"{self.name}.truncated.npy", np.frombuffer(self.truncated, np.int8).astype(bool))
        np.save(self.folder / f"{self.name}.rows.npy", np.frombuffer(self.rows, np.int64))
        self.lengths, self.truncated, self.rows = array("q"), array("b"), array("q")

    def build(self) -> EncodedSet:
        self.finish()
        return load_set(self.folder, self.name)

    def abandon(self) -> None:
        self._ids.close()
        self._trained.close()


def _memmap(path: Path, dtype) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def load_set(folder: Path, name: str) -> EncodedSet:
    starts = folder / f"{name}.starts.npy"  # a packed set's
    return EncodedSet(_memmap(folder / f"{name}.ids.i32", np.int32),
                      _memmap(folder / f"{name}.trained.u8", np.uint8).view(bool),
                      np.load(folder / f"{name}.offsets.npy"), np.load(folder / f"{name}.truncated.npy"),
                      np.load(folder / f"{name}.rows.npy"), np.load(starts) if starts.exists() else None)


def save_index(folder: Path, name: str, s: EncodedSet) -> None:
    """Write a packed set's index (its ids and mask are the unpacked set's files, shared)."""
    np.save(folder / f"{name}.offsets.npy", np.asarray(s.offsets, np.int64))
    np.save(folder / f"{name}.truncated.npy", np.asarray(s.truncated, bool))
    np.save(folder / f"{name}.rows.npy", np.asarray(s.rows, np.int64))
    np.save(folder / f"{name}.starts.npy", np.asarray(s.starts, np.int64))


class Staged:
    """One ``prepare``'s place in the cache: a hit to return, or a temporary folder to fill."""

    def __init__(self, k: str):
        self.key = k
        self.folder = cache_root() / k
        self.tmp: Path | None = None

    def load(self) -> dict | None:
        """The cached result as core.data.Prepared's fields (without ``source``), or None."""
        meta_path = self.folder / "meta.json"
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            train, val = load_set(self.folder, "train"), load_set(self.folder, "val")
        except (OSError, ValueError, KeyError):
            return None
        os.utime(self.folder)  # recently used: kept longest
        ex = meta["example"]
        return {"train": train, "val": val, "format": meta["format"], "fields": meta["fields"],
                "stats": meta["stats"], "truncated": meta["truncated"], "problems": meta["problems"],
                "example": None if ex is None else Encoded(ex["input_ids"], ex["labels"], ex["truncated"])}

    def part_folder(self) -> Path:
        """The temporary folder the result is written in (created on first use)."""
        if self.tmp is None:
            cache_root().mkdir(parents=True, exist_ok=True)
            self.tmp = cache_root() / f".{self.key}.{os.getpid()}.{time.monotonic_ns()}.tmp"
            self.tmp.mkdir()
        return self.tmp

    def builder(self, name: str) -> DiskSetBuilder:
        return DiskSetBuilder(self.part_folder(), name)

    def store(self, prepared) -> None:
        """Write meta.json (and a packed train set) and rename the folder into place; then the
        returned sets are re-mapped from their final place."""
        ex = prepared.example
        meta = {"format": prepared.format, "fields": prepared.fields, "stats": prepared.stats,
                "truncated": prepared.truncated, "problems": prepared.problems,
                "example": None if ex is None else {"input_ids": list(map(int, ex.input_ids)),
                                                    "labels": list(map(int, ex.labels)),
                                                    "truncated": bool(ex.truncated)}}
        if prepared.stats.get("packed"):
            save_index(self.tmp, "train", prepared.train)
        (self.tmp / "meta.json").write_text(json.dumps(meta, default=int), encoding="utf-8")
        try:
            os.replace(self.tmp, self.folder)
        except OSError:  # another process stored the same key first: theirs is as good
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp = None
        prepared.train, prepared.val = load_set(self.folder, "train"), load_set(self.folder, "val")
        _trim()

    def discard(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def _trim() -> None:
    root = cache_root()
    done = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    for old in done[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)


def trained_per_example(s: EncodedSet, block: int = 65536) -> np.ndarray:
    """Trained tokens of each example of an EncodedSet after the one-token shift (``labels[1:]``),
    computed block by block: a running sum over the whole set would widen its mask to 8 bytes a
    token at once (800 MB for 100 million tokens), and the mapped pages each block read are let go. A packed sequence's examples each lose their
    first token too (see core.encoded.EncodedSet)."""
    n = len(s)
    out = np.zeros(n, np.int64)
    for a in range(0, n, block):
        b = min(n, a + block)
        lo, hi = int(s.offsets[a]), int(s.offsets[b])
        cs = np.concatenate([[0], np.cumsum(s.trained[lo:hi], dtype=np.int64)])
        starts, ends = s.offsets[a:b] - lo, s.offsets[a + 1:b + 1] - lo
        out[a:b] = np.where(ends > starts, cs[ends] - cs[np.minimum(starts + 1, ends)], 0)
        release_pages(s.trained)  # the pages this block read: the whole mask never stays resident
    if s.starts is not None:
        inner = np.setdiff1d(s.starts, s.offsets[:-1], assume_unique=True)  # not a sequence's first token
        out -= np.bincount(np.searchsorted(s.offsets, inner, side="right") - 1,
                           weights=s.trained[inner], minlength=n).astype(np.int64)
    return out
