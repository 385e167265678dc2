"""The memory estimate from the lengths a run will really train on (issue 18, item 5): once the
dataset is tokenised, the longest example after truncation (or the packing length), and the window
says which it used."""

from __future__ import annotations

import pytest

import pytestqt  # noqa: F401  (a missing module fails, never skips)
from core.config import DataConfig, RunConfig
from core.estimate import estimate_for_run, sequence_length
from test_gui_train import LONG, dataset, window  # noqa: F401  (fixtures)


def test_sequence_length_uses_the_longest_example_once_known():
    cfg = DataConfig(path="/d/a.jsonl", max_length=512)
    assert sequence_length(cfg, None)[0] == 512 and "maximum length" in sequence_length(cfg, None)[1]
    summary = {"path": "/d/a.jsonl", "max_length": 512, "stats": {"max": 88}}
    assert sequence_length(cfg, summary) == (88, "the longest example")
    # a summary of another file, or made with another maximum length, is out of date
    assert sequence_length(DataConfig(path="/d/b.jsonl", max_length=512), summary)[0] == 512
    assert sequence_length(DataConfig(path="/d/a.jsonl", max_length=256), summary)[0] == 256
    cut = {"path": "/d/a.jsonl", "max_length": 64, "stats": {"max": 64}}
    assert sequence_length(DataConfig(path="/d/a.jsonl", max_length=64), cut) == (64, "the longest example after truncation")
    packed = DataConfig(path="/d/a.jsonl", max_length=512, packing=True)
    assert sequence_length(packed, summary) == (512, "packing: sequences of 512 tokens")


def test_estimate_for_run_is_smaller_for_short_examples(llama):
    cfg = RunConfig()
    cfg.data.path, cfg.data.max_length, cfg.model.precision = "/d/a.jsonl", 512, "fp32"
    full = estimate_for_run(llama.config, cfg)
    short = estimate_for_run(llama.config, cfg, {"path": "/d/a.jsonl", "max_length": 512, "stats": {"max": 88}})
    assert full["seq_len"] == 512 and short["seq_len"] == 88 and short["seq_basis"] == "the longest example"
    assert short["activations"] < full["activations"]  # (a tiny model: the loss chunk dominates)
    assert short["weights"] == full["weights"]


def test_model_page_estimates_from_the_dataset_lengths(window, qtbot):
    state = window.state
    model = window.page("model")
    data = window.page("data")
    assert state.data_summary is not None and state.data_summary["max_length"] == 64
    longest = data.prepared["stats"]["max"]
    assert longest < 64
    qtbot.waitUntil(lambda: f"× {longest} tokens (the longest example)" in model.memory_note.text(), timeout=LONG)
    short_total = model.memory["total"]
    state.config.data.packing = True  # packing fills every sequence: the maximum length again
    state.changed("data")
    qtbot.waitUntil(lambda: "× 64 tokens (packing" in model.memory_note.text(), timeout=LONG)
    assert model.memory["total"] > short_total
    model.grab().save("/tmp/estimate-model-page.png")
