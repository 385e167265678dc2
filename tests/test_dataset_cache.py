"""The tokenised dataset on disk (core/dataset_cache.py): tokens go to memory-mapped files, a second
prepare of the same data with the same tokenizer and options reads them back without tokenising,
and anything that changes the result (the file, an option, the tokenizer) is tokenised again."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core import data, dataset_cache
from core.config import DataConfig
from core.errors import Cancelled


def _write(path, n: int, start: int = 0) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for i in range(start, start + n):
            f.write(json.dumps({"instruction": f"Add {i} and {i}.", "output": f"It is {2 * i}."}) + "\n")


def _prepare(cfg, tokenizer, **kw):
    calls = []
    p = data.prepare(cfg, tokenizer, progress=lambda done, total: calls.append(done), **kw)
    return p, calls


def _same(a, b) -> None:
    assert len(a) == len(b)
    for name in ("ids", "trained", "offsets", "truncated", "rows"):
        assert np.array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name))), name


def test_second_prepare_reads_the_tokens_back_without_tokenising(tmp_path, tokenizer):
    f = tmp_path / "d.jsonl"
    _write(f, 300)
    cfg = DataConfig(path=str(f), max_length=64, val_split=0.1)
    first, calls = _prepare(cfg, tokenizer)
    assert calls and calls[-1] == 300
    assert isinstance(first.train.ids, np.memmap)  # on disk, not in RAM
    second, calls = _prepare(cfg, tokenizer)
    assert calls == []  # not one row tokenised again
    _same(first.train, second.train)
    _same(first.val, second.val)
    assert second.stats == first.stats and second.problems == first.problems
    assert second.example.input_ids == first.example.input_ids and second.example.labels == first.example.labels
    assert second.train[5].labels == first.train[5].labels
    # and the same as an in-memory encoding of the rows
    src = data.read(f)
    enc = data.encode(src.row(int(first.train.rows[3])), tokenizer, src.format, src.fields, max_length=64)
    assert first.train[3].input_ids == enc.input_ids and first.train[3].labels == enc.labels


def test_anything_that_changes_the_result_tokenises_again(tmp_path, tokenizer):
    f = tmp_path / "d.jsonl"
    _write(f, 100)
    cfg = DataConfig(path=str(f), max_length=64)
    _prepare(cfg, tokenizer)
    _write(f, 5, start=100)  # the file changed
    p, calls = _prepare(cfg, tokenizer)
    assert calls and p.stats["examples"] == 105
    p, calls = _prepare(DataConfig(path=str(f), max_length=64, train_on_prompt=True), tokenizer)  # an option
    assert calls and p.stats["trained_tokens"] == p.stats["tokens"]
    from conftest import tiny_tokenizer

    other = tiny_tokenizer(vocab_size=290)  # another tokenizer
    p, calls = _prepare(cfg, other)
    assert calls
    p, calls = _prepare(cfg, tokenizer, seed=7)  # another seed holds out other rows: another entry
    assert calls
    assert len(list(dataset_cache.cache_root().iterdir())) <= dataset_cache.KEEP


def test_packing_from_the_cache_equals_packing_fresh(tmp_path, tokenizer):
    f = tmp_path / "d.jsonl"
    _write(f, 200)
    cfg = DataConfig(path=str(f), max_length=128, packing=True)
    first, _ = _prepare(cfg, tokenizer)
    second, calls = _prepare(cfg, tokenizer)
    assert calls == [] and first.stats["train_sequences"] < 200
    _same(first.train, second.train)
    assert second.train[0].input_ids == first.train[0].input_ids


def test_a_cancelled_prepare_leaves_nothing_in_the_cache(tmp_path, tokenizer):
    f = tmp_path / "d.jsonl"
    _write(f, 3000)  # more than one chunk
    cfg = DataConfig(path=str(f), max_length=64)
    with pytest.raises(Cancelled):
        data.prepare(cfg, tokenizer, cancel=lambda: True)
    root = dataset_cache.cache_root()
    assert not root.exists() or not list(root.iterdir())
    p, calls = _prepare(cfg, tokenizer)
    assert calls[-1] == 3000 and len([d for d in root.iterdir()]) == 1


def test_trained_per_example_block_by_block_equals_the_whole_sum(tmp_path, tokenizer):
    f = tmp_path / "d.jsonl"
    _write(f, 150)
    p, _ = _prepare(DataConfig(path=str(f), max_length=64), tokenizer)
    s = p.train
    cs = np.concatenate([[0], np.cumsum(s.trained, dtype=np.int64)])
    starts, ends = s.offsets[:-1], s.offsets[1:]
    whole = np.where(ends > starts, cs[ends] - cs[np.minimum(starts + 1, ends)], 0)
    for block in (1, 7, 64, 10_000):
        assert np.array_equal(dataset_cache.trained_per_example(s, block=block), whole)
    assert whole.sum() == sum(sum(1 for x in s[i].labels[1:] if x != data.IGNORE) for i in range(len(s)))


def _mixed(path, n: int) -> None:
    """n rows with an empty answer here and there, in both halves (problems found by both workers)."""
    rows = [{"instruction": f"Add {i} and {i}.", "output": "" if i % 97 == 5 else f"It is {2 * i}."}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_tokenising_in_two_processes_gives_what_one_gives(tmp_path, tokenizer):
    f = tmp_path / "d.jsonl"
    _mixed(f, 700)  # three chunks of 256 rows: each worker gets more than one
    cfg = DataConfig(path=str(f), max_length=64, val_split=0.1)
    one = data.prepare(cfg, tokenizer, workers=1)
    for entry in dataset_cache.cache_root().iterdir():
        import shutil

        shutil.rmtree(entry)
    calls = []
    two = data.prepare(cfg, tokenizer, workers=2, progress=lambda d, t: calls.append(d))
    _same(one.train, two.train)
    _same(one.val, two.val)
    assert two.stats == one.stats and two.problems == one.problems and two.stats["skipped"] == 8
    assert two.example == one.example and calls[0] == 0 and calls[-1] == 700
    assert sorted(p.name for p in dataset_cache.cache_root().iterdir() if not p.name.startswith(".")) \
        and not list(dataset_cache.cache_root().glob(".*.tmp"))  # the parts were appended and removed
    folder = next(dataset_cache.cache_root().iterdir())
    assert not list(folder.glob("*-[0-9].*")) and not list(folder.glob("part-*"))


def test_a_cancelled_parallel_prepare_stops_its_workers_and_leaves_nothing(tmp_path, tokenizer):
    f = tmp_path / "d.jsonl"
    _mixed(f, 3000)
    asked = []

    def cancel() -> bool:
        asked.append(1)
        return len(asked) > 1  # let the workers start, then stop them

    with pytest.raises(Cancelled):
        data.prepare(DataConfig(path=str(f), max_length=64), tokenizer, workers=2, cancel=cancel)
    root = dataset_cache.cache_root()
    assert not root.exists() or not list(root.iterdir())
    import multiprocessing

    assert not multiprocessing.active_children()


def test_passes_over_a_mapped_mask_do_not_keep_it_resident(tmp_path):
    """Counting a memory-mapped set's trained tokens reads the whole mask; its pages are let go as
    each block is done, so a 1,000,000-row dataset's mask (170 MB) is not added to the first
    training step's memory. Measured in a fresh process, on a 64 MiB mask."""
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    n = 64 << 20
    (tmp_path / "m.trained.u8").write_bytes(b"\x01" * n)
    np.save(tmp_path / "offsets.npy", np.arange(0, n + 1, 256, dtype=np.int64))
    code = textwrap.dedent(f"""
        import numpy as np
        from core import dataset_cache
        from core.encoded import EncodedSet

        def rss():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024

        mask = np.memmap({str(tmp_path / "m.trained.u8")!r}, dtype=np.uint8, mode="r").view(bool)
        offsets = np.load({str(tmp_path / "offsets.npy")!r})
        s = EncodedSet(np.zeros(0, np.int32), mask, offsets, np.zeros(len(offsets) - 1, bool),
                       np.zeros(len(offsets) - 1, np.int64))
        before = rss()
        assert s.trained_tokens == {n}
        after_count = rss()
        per = dataset_cache.trained_per_example(s)
        assert int(per.sum()) == {n} - (len(offsets) - 1)  # each example's first token is not a target
        print((after_count - before) >> 20, (rss() - before - per.nbytes) >> 20)
    """)
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    grew_count, grew_per_example = (int(x) for x in p.stdout.split())
    assert grew_count < 24 and grew_per_example < 24, p.stdout  # MiB; the mask is 64
