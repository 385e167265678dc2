"""The trainer's answers to a person: a pause or stop asked during an evaluation ends it between
batches (and a pause runs it again afterwards), and a new run that fails before its first checkpoint
leaves no folder behind."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from conftest import sum_assets
from core import runs
from core.config import RunConfig
from core.errors import StudioError
from core.train import EvalEvent, StatusEvent, StepEvent, Trainer


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return sum_assets(tmp_path_factory.mktemp("interrupt-assets"), 80)


def make_cfg(assets, out, **train) -> RunConfig:
    ck, data = assets
    cfg = RunConfig()
    cfg.model.source, cfg.model.device = str(ck), "cpu"
    cfg.data.path, cfg.data.max_length, cfg.data.val_split = str(data), 64, 0.5
    cfg.lora.rank = 4
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr = 6, 2, 5e-3
    cfg.train.save_every, cfg.train.eval_every = 0, 2
    cfg.out = str(out)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_pause_during_an_evaluation_interrupts_it_and_evaluates_after_resume(assets, tmp_path):
    events = []
    trainer = None

    def on_event(ev):
        events.append(ev)
        first_eval = [e for e in events if getattr(e, "kind", None) == "evaluating"]
        if isinstance(ev, StatusEvent) and ev.kind == "evaluating" and len(first_eval) == 1:
            trainer.request_pause()  # in the middle of the first evaluation (not of its second try)
        if isinstance(ev, StatusEvent) and ev.kind == "paused":
            threading.Timer(0.3, trainer.request_resume).start()

    trainer = Trainer(make_cfg(assets, tmp_path / "run"), callback=on_event)
    result = trainer.run()
    assert result.status == "finished" and result.step == 6
    kinds = [(type(e).__name__, getattr(e, "kind", None), getattr(e, "step", None)) for e in events]
    paused_at = kinds.index(("StatusEvent", "paused", None))
    # the evaluation at step 2 was cut short: no EvalEvent before the pause, one right after it
    assert not any(k[0] == "EvalEvent" for k in kinds[:paused_at])
    after = [e for e in events[paused_at:] if isinstance(e, (EvalEvent, StepEvent))]
    assert isinstance(after[0], EvalEvent) and after[0].step == 2
    assert [e.step for e in events if isinstance(e, EvalEvent)] == [2, 4, 6]
    evals = [r["step"] for r in runs.read_metrics(tmp_path / "run") if "eval_loss" in r]
    assert evals == [2, 4, 6]
    assert "paused at step 2" in next(e.message for e in events if getattr(e, "kind", "") == "paused")


def test_stop_during_an_evaluation_stops_without_finishing_it(assets, tmp_path):
    trainer = None
    evals = []

    def on_event(ev):
        if isinstance(ev, StatusEvent) and ev.kind == "evaluating" and ev.message.endswith("step 2"):
            trainer.request_stop()
        if isinstance(ev, EvalEvent):
            evals.append(ev.step)

    trainer = Trainer(make_cfg(assets, tmp_path / "run", steps=50), callback=on_event)
    result = trainer.run()
    assert result.status == "stopped" and result.step == 2
    assert evals == []  # the evaluation was cut short, not run to its end first
    assert runs.latest_checkpoint(tmp_path / "run") is not None


def test_a_new_run_that_fails_before_a_checkpoint_leaves_no_folder(assets, tmp_path):
    def fail_on_first_step(ev):
        if isinstance(ev, StepEvent):
            raise StudioError("step 1: something went wrong")

    out = tmp_path / "runs" / "new"
    with pytest.raises(StudioError):
        Trainer(make_cfg(assets, out), callback=fail_on_first_step).run()
    assert not out.exists()

    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    cfg = make_cfg(assets, out)
    cfg.data.path = str(bad)
    with pytest.raises(StudioError):
        Trainer(cfg).run()
    assert not out.exists() and list((tmp_path / "runs").iterdir()) == []


def test_a_failure_after_a_checkpoint_keeps_the_run(assets, tmp_path):
    def fail_at_step_3(ev):
        if isinstance(ev, StepEvent) and ev.step == 3:
            raise StudioError("step 3: something went wrong")

    out = tmp_path / "run"
    with pytest.raises(StudioError):
        Trainer(make_cfg(assets, out, save_every=2, eval_every=0), callback=fail_at_step_3).run()
    assert runs.latest_checkpoint(out) is not None
    assert json.loads((Path(out) / "status.json").read_text())["status"] == "failed"
