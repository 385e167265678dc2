"""Evaluate: metrics equal the libraries' own functions, answers equal the playground's greedy ones,
runs are deterministic, Cancel stops within one batch, bad references get one line naming the rows."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_checkpoint
from core import evaluate, metrics
from core.errors import Cancelled, StudioError

PREDS = ['{"drink": "latte", "size": "large"}', "the cat sat on the mat", "not json at all", '{"a": 1}', ""]
REFS = ['{"drink": "latte", "size": "small"}', "the cat sat on a mat", '{"x": 2}', '{"a": 1}', "empty"]


def test_text_metrics_equal_the_libraries_own_functions():
    import sacrebleu
    from rouge_score import rouge_scorer

    assert metrics.score("bleu", PREDS, REFS).corpus == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score)
    assert metrics.score("chrf", PREDS, REFS).corpus == pytest.approx(sacrebleu.corpus_chrf(PREDS, [REFS]).score)
    per = metrics.score("bleu", PREDS, REFS).per_example
    assert per[1] == pytest.approx(sacrebleu.sentence_bleu(PREDS[1], [REFS[1]]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    expected = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(PREDS, REFS)]
    rouge = metrics.score("rougeL", PREDS, REFS)
    assert rouge.per_example == pytest.approx(expected)
    assert rouge.corpus == pytest.approx(sum(expected) / len(expected))
    assert metrics.score("exact_match", PREDS, [" " + r for r in REFS]).per_example == [0, 0, 0, 1, 0]


def test_json_metrics_count_parses_and_equal_fields():
    valid = metrics.score("json_valid", PREDS, REFS)
    # references that are JSON: rows 0, 2, 3; their answers parse in rows 0 and 3
    assert valid.per_example == [1.0, None, 0.0, 1.0, None]
    assert valid.corpus == pytest.approx(2 / 3)
    fields = metrics.score("json_fields", PREDS, REFS)
    # row 0: drink equal, size not (1 of 2); row 2: 0 of 1; row 3: 1 of 1 -> 2 of 4 fields
    assert fields.per_example == [0.5, None, 0.0, 1.0, None]
    assert fields.corpus == pytest.approx(2 / 4)
    assert metrics.score("json_fields", ["a"], ["plain text"]).corpus is None


def test_metric_names_and_bootstrap():
    assert metrics.parse_metrics("rougeL,bleu") == ["bleu", "rougeL"]
    with pytest.raises(StudioError, match="unknown metric.*bleurt.*choose from"):
        metrics.parse_metrics("bleu,bleurt")
    lo, hi = metrics.bootstrap("chrf", PREDS, REFS, samples=50)
    assert lo <= metrics.score("chrf", PREDS, REFS).corpus <= hi and lo < hi
    assert metrics.bootstrap("chrf", PREDS, REFS, samples=50) == (lo, hi)  # seeded


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_missing_or_empty_references_are_one_message_naming_the_rows(tmp_path):
    f = _write(tmp_path / "held.jsonl", [{"prompt": "a", "completion": "x"}, {"prompt": "b", "completion": ""},
                                         {"prompt": "c", "completion": "y"}, {"prompt": "d", "completion": "  "},
                                         {"prompt": "e"}])
    with pytest.raises(StudioError) as e:
        evaluate.read_examples(f)
    msg = str(e.value)
    assert "held.jsonl: rows 2, 4, 5 have no reference answer" in msg and "\n" not in msg
    ok = evaluate.read_examples(f, limit=1)
    assert [(x.row, x.prompt, x.reference) for x in ok] == [(1, "a", "x")]


def test_validation_rows_are_the_ones_training_holds_out(tmp_path, tokenizer):
    from core import data
    from core.config import DataConfig

    f = _write(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)])
    prepared = data.prepare(DataConfig(path=str(f), val_split=0.25), tokenizer, seed=7)
    assert evaluate.validation_rows(20, 0.25, 7) == sorted(prepared.val.rows.tolist())


@pytest.fixture
def setup(tmp_path):
    """A tiny checkpoint, an adapter for it with non-zero B, and six held-out examples."""
    from core import adapter, lora, models, targets

    ck = tiny_checkpoint(tmp_path / "tiny")
    loaded = models.load_model(str(ck), device="cpu")
    torch.manual_seed(3)
    names = targets.resolve_targets(loaded.model, "attention-qv")
    lora.inject_adapter(loaded.model, names, "x", rank=4)
    for _, layer in lora.lora_layers(loaded.model):
        torch.nn.init.normal_(layer.lora_B["x"], std=0.5)
    folder = adapter.save_adapter(loaded.model, tmp_path / "adapters" / "qv4", "x", base_model=str(ck))
    lora.remove_adapter(loaded.model, "x")
    f = _write(tmp_path / "held.jsonl", [{"prompt": f"what is {i} + {i}?", "completion": json.dumps({"sum": 2 * i})}
                                         for i in range(6)])
    return ck, loaded, folder, f


def test_batched_answers_equal_the_playground_greedy_and_runs_are_deterministic(setup):
    from core import adapter, generate, lora

    ck, loaded, folder, f = setup
    examples = evaluate.read_examples(f)
    systems = evaluate.systems_for([folder])
    names = ["exact_match", "bleu", "chrf", "rougeL", "json_valid", "json_fields", "loss"]
    first = evaluate.evaluate(loaded, examples, systems, metric_names=names, max_new_tokens=6, batch_size=4)
    assert lora.adapter_names(loaded.model) == []  # the model is left as it was
    second = evaluate.evaluate(loaded, examples, systems, metric_names=names, max_new_tokens=6, batch_size=4)
    timeless = [{k: v for k, v in r.to_dict().items() if k != "seconds"} for r in (first, second)]
    assert timeless[0] == timeless[1] and first.prediction_rows() == second.prediction_rows()
    base, adapted = first.systems
    assert base.predictions != adapted.predictions
    # each answer equals core.generate's greedy answer (one prompt at a time, its own loop)
    adapter.load_adapter(loaded.model, folder, "check")
    for ex, answer in zip(examples, adapted.predictions):
        assert answer == generate.generate(loaded.model, loaded.tokenizer, ex.messages, max_new_tokens=6,
                                           greedy=True).strip()
    lora.remove_adapter(loaded.model, "check")
    # the scores are the metrics of the answers, and the loss is the trained tokens' mean loss
    refs = [ex.reference for ex in examples]
    assert adapted.scores["chrf"] == pytest.approx(metrics.score("chrf", adapted.predictions, refs).corpus)
    losses = evaluate.example_losses(loaded.model, loaded.tokenizer, examples)
    assert base.scores["loss"] == pytest.approx(sum(s for s, _ in losses) / sum(c for _, c in losses))
    assert base.scores["perplexity"] == pytest.approx(math.exp(base.scores["loss"]))
    lo, hi = base.intervals["loss"]
    assert lo <= base.scores["loss"] <= hi


def test_cancel_stops_within_one_batch(setup):
    ck, loaded, folder, f = setup
    examples = evaluate.read_examples(f)
    seen, flag = [], {"stop": False}

    def progress(system, done, total):
        seen.append((system, done))
        flag["stop"] = True  # cancel as soon as the first batch is in

    with pytest.raises(Cancelled):
        evaluate.evaluate(loaded, examples, evaluate.systems_for([folder]), max_new_tokens=4, batch_size=2,
                          progress=progress, cancel=lambda: flag["stop"])
    assert seen == [("base", 2)]
    # a cancel during a batch stops it after the current token
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Cancelled):
        evaluate.evaluate(loaded, examples, evaluate.systems_for([folder]), max_new_tokens=50, batch_size=6,
                          cancel=cancel)
    assert calls["n"] < 10


def test_cli_writes_the_contract_files(setup, tmp_path, capsys):
    from studio import cli

    ck, loaded, folder, f = setup
    out = tmp_path / "eval"
    rc = cli.run(["evaluate", "--model", str(ck), "--adapter", str(folder), "--data", str(f), "--out", str(out),
                  "--metrics", "exact_match,bleu,json_valid,loss", "--max-new-tokens", "4", "--limit", "3",
                  "--json", "--no-progress"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert json.loads(capsys.readouterr().out) == results
    assert set(results["systems"]) == {"base", "qv4"}
    assert set(results["systems"]["qv4"]) == {"exact_match", "bleu", "json_valid", "loss", "perplexity"}
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"system", "prompt", "reference", "prediction"} <= set(rows[0])
    assert (out / "results.csv").read_text().startswith("system,exact_match,")
    rc = cli.run(["evaluate", "--model", str(ck), "--data", str(f), "--out", str(out), "--metrics", "bleu,meteor"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: --metrics: unknown metric meteor") and err.count("\n") == 1


def test_multi_reference_bleu_is_sacrebleus_with_padded_streams():
    import sacrebleu

    preds = ["the cat sat on the mat", "a dog ran", "birds sing"]
    refs = [["the cat sat on a mat", "a cat was on the mat"], ["the dog ran"], ["birds sing at dawn", "birds sing"]]
    assert metrics.multi_reference("bleu", preds, refs) == pytest.approx(sacrebleu.corpus_bleu(
        preds, [[r[0] for r in refs], [r[1 % len(r)] for r in refs]]).score)
    # repeating a reference changes nothing: two streams with the single reference repeated
    single = [[r[0]] for r in refs]
    assert metrics.multi_reference("bleu", preds, single) == pytest.approx(
        sacrebleu.corpus_bleu(preds, [[r[0] for r in refs]] * 2).score)
    assert metrics.multi_reference("bleu", preds, single) == pytest.approx(metrics.score("bleu", preds,
                                                                                           [r[0] for r in refs]).corpus)


def test_a_runs_validation_split_is_evaluated(setup, tmp_path, capsys):
    from core.config import RunConfig
    from core.train import Trainer
    from studio import cli

    ck, loaded, folder, f = setup
    data = _write(tmp_path / "train.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(12)])
    cfg = RunConfig()
    cfg.model.source, cfg.model.device, cfg.out = str(ck), "cpu", str(tmp_path / "run")
    cfg.data.path, cfg.data.val_split, cfg.train.steps, cfg.train.seed = str(data), 0.25, 1, 5
    Trainer(cfg).run()
    examples = evaluate.run_examples(tmp_path / "run")
    assert [ex.row - 1 for ex in examples] == evaluate.validation_rows(12, 0.25, 5)
    assert [ex.reference for ex in examples] == [f"a{ex.row - 1}" for ex in examples]
    rc = cli.run(["evaluate", "--model", str(ck), "--adapter", str(tmp_path / "run" / "adapter"), "--data",
                  str(tmp_path / "run"), "--out", str(tmp_path / "ev"), "--metrics", "chrf", "--max-new-tokens", "3",
                  "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and out.splitlines()[0].split() == ["system", "chrf"] and out.splitlines()[2].startswith("run ")
    cfg.data.val_split, cfg.out = 0.0, str(tmp_path / "run2")
    Trainer(cfg).run()
    with pytest.raises(StudioError, match="held out no validation split"):
        evaluate.run_examples(tmp_path / "run2")
