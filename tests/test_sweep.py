"""Sweep: target sets by role, the fixed-budget rank equals the trained parameter count, a sweep killed
mid-cell continues where it stopped (the resumed cell equal to an uninterrupted one), stop and continue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_checkpoint, tiny_gpt2, tiny_llama
from core import sweep
from core.adapter import read_adapter
from core.config import RunConfig
from core.errors import StudioError

ROOT = Path(__file__).resolve().parent.parent


def _data(tmp_path, n=24):
    f = tmp_path / "orders.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"what is {i} + {i}?", "completion": str(2 * i)}) + "\n"
                         for i in range(n)))
    return f


def _base(ck, data, steps=3, **train):
    cfg = RunConfig()
    cfg.model.source, cfg.model.device = str(ck), "cpu"
    cfg.data.path, cfg.data.val_split = str(data), 0.25
    cfg.train.steps, cfg.train.batch_size, cfg.train.save_every = steps, 2, 1
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_target_sets_by_role_and_the_budget_rank():
    model = tiny_llama()
    q = sweep.target_names(model, "q")
    assert q and all(n.endswith(".self_attn.q_proj") for n in q)
    qkvo = sweep.target_names(model, "q+k+v+o")
    assert len(qkvo) == 4 * len(q)
    assert sweep.target_names(model, "attention-qv") == sweep.target_names(model, "q+v")
    with pytest.raises(StudioError, match=r"--target-set q: this model has no separate q matrix \(its matrices' roles"):
        sweep.target_names(tiny_gpt2(), "q")
    # Table 5: at a fixed budget more matrices get a smaller rank, and each cell's count is exact
    cells = sweep.plan(model, ranks=[], target_sets=["q", "q+v", "q+k+v+o"], budget=4096)
    assert [c.rank for c in cells] == sorted([c.rank for c in cells], reverse=True)
    from core.targets import budget

    for c in cells:
        per_rank = budget(model, sweep.target_names(model, c.targets), 1).trainable
        assert c.trainable_params == c.rank * per_rank and abs(c.trainable_params - 4096) <= per_rank / 2 + 1
    with pytest.raises(StudioError, match="--ranks: a rank must be at least 1"):
        sweep.plan(model, ranks=[0, 2], target_sets=["q"])


def test_budget_sweep_trains_exactly_the_counted_parameters(tmp_path):
    ck = tiny_checkpoint(tmp_path / "tiny")
    job = sweep.Sweep(_base(ck, _data(tmp_path), steps=2), tmp_path / "sw", ranks=[], target_sets=["q", "q+k+v+o"],
                      budget=2000)
    cells = job.run()
    assert [c.status for c in cells] == ["finished", "finished"]
    for c in cells:
        adapter = read_adapter(tmp_path / "sw" / c.run / "adapter")
        trained = sum(a.numel() + b.numel() for a, b in adapter.tensors.values())
        assert trained == c.trainable_params and adapter.rank == c.rank
    results = json.loads((tmp_path / "sw" / "results.json").read_text())
    assert {"rank", "targets", "trainable_params", "final_loss", "best_eval_loss", "seconds", "run"} <= set(
        results["cells"][0])
    assert sum(c["best"] for c in results["cells"]) == 1


def _sweep_args(ck, data, out, steps):
    return ["sweep", "--model", str(ck), "--data", str(data), "--out", str(out), "--ranks", "1,2",
            "--target-set", "q+v", "--steps", str(steps), "--batch-size", "2", "--val-split", "0.25",
            "--save-every", "1", "--device", "cpu", "--no-progress", "--no-library"]


def test_a_killed_sweep_continues_where_it_stopped(tmp_path):
    from studio import cli

    ck, data = tiny_checkpoint(tmp_path / "tiny"), _data(tmp_path)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "studio"] + _sweep_args(ck, data, out, 12), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    second = out / "runs" / "q+v-r2" / "checkpoints"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if second.is_dir() and len(list(second.glob("step-*"))) >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup of any kind: a crash or a power cut
    proc.wait()
    proc.stderr.close()
    before = json.loads((out / "results.json").read_text())["cells"]
    assert [c["status"] for c in before] == ["finished", "pending"]
    first_adapter = (out / "runs" / "q+v-r1" / "adapter" / "adapter_model.safetensors").read_bytes()

    assert cli.run(_sweep_args(ck, data, out, 12)) == 0
    after = json.loads((out / "results.json").read_text())["cells"]
    assert [c["status"] for c in after] == ["finished", "finished"]
    assert after[0] == {**before[0], "best": after[0]["best"]}  # the finished cell was not trained again
    assert (out / "runs" / "q+v-r1" / "adapter" / "adapter_model.safetensors").read_bytes() == first_adapter
    # the cell that was killed resumed from its checkpoint: its adapter equals an uninterrupted run's
    fresh = tmp_path / "fresh"
    assert cli.run(_sweep_args(ck, data, fresh, 12)) == 0
    for cell in ("q+v-r1", "q+v-r2"):
        a = read_adapter(out / "runs" / cell / "adapter").tensors
        b = read_adapter(fresh / "runs" / cell / "adapter").tensors
        assert all((a[k][0] == b[k][0]).all() and (a[k][1] == b[k][1]).all() for k in a)


def test_stop_then_continue_and_options_must_match(tmp_path, capsys):
    from studio import cli

    ck, data = tiny_checkpoint(tmp_path / "tiny"), _data(tmp_path)
    out = tmp_path / "sw"
    seen = []

    def callback(kind, cell, event):
        seen.append((kind, cell.key))
        if kind == "event" and type(event).__name__ == "StepEvent" and event.step == 2:
            job.request_stop()

    job = sweep.Sweep(_base(ck, data, steps=4), out, ranks=[1, 2], target_sets=["q+v"], callback=callback)
    cells = job.run()
    assert [c.status for c in cells] == ["stopped", "pending"]
    assert ("cell", "q+v-r2") not in seen
    cells = sweep.Sweep(_base(ck, data, steps=4), out, ranks=[1, 2], target_sets=["q+v"]).run()
    assert [c.status for c in cells] == ["finished", "finished"]
    rows = [json.loads(x) for x in (out / "runs" / "q+v-r1" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert sweep.step_seconds(out / "runs" / "q+v-r1") > 0
    from core.sweep_report import measured_step_seconds

    listed = [{"path": str(out / "runs" / "q+v-r1")}]
    assert measured_step_seconds(None, listed, model=str(ck))[0] == sweep.step_seconds(out / "runs" / "q+v-r1")
    assert measured_step_seconds(None, listed, model="another-model") == (None, "no step time measured yet on "
                                                                                "this machine")
    assert sweep.cost(cells, 4, 0.5) == {"cells": 2, "to_train": 0, "steps": 0, "seconds": 0.0}
    # the same folder with other training options is refused in one line
    rc = cli.run(_sweep_args(ck, data, out, 5))
    err = capsys.readouterr().err
    assert rc == 1 and "holds a sweep trained with other options" in err and "train.steps" in err
    rc = cli.run(_sweep_args(ck, data, tmp_path / "other", 5) + ["--budget", "100"])
    assert rc == 1 and "--budget picks each target set's rank; leave out --ranks" in capsys.readouterr().err


def test_the_e2e_study_splits_by_meaning_representation(tmp_path):
    """benchmarks/e2e_study.py holds out whole MRs: no sentence of a held-out MR is trained on."""
    import csv
    import importlib.util

    spec = importlib.util.spec_from_file_location("e2e_study", ROOT / "benchmarks" / "e2e_study.py")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    f = tmp_path / "devset.csv"
    with open(f, "w", newline="", encoding="utf-8") as out:
        w = csv.writer(out)
        w.writerow(["mr", "ref"])
        for i in range(10):
            for k in range(1 + i % 3):
                w.writerow([f"name[Place {i}], area[riverside]", f"Place {i} is by the river ({k})."])
    train, held = study.split_by_mr(f, 3, seed=1)
    assert len(held) == 3 and sum(len(v) for v in held.values()) + len(train) == sum(1 + i % 3 for i in range(10))
    trained_mrs = {r["prompt"].split(": ", 1)[1] for r in train}
    assert not trained_mrs & set(held) and len(trained_mrs) == 7
    assert study.split_by_mr(f, 3, seed=1) == (train, held)  # seeded
