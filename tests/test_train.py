"""The training engine: determinism, the schedules, stop, pause, NaN, exact resume after ``kill -9``,
the run folder's files, ``train --config``, and 2-process DDP equal to one process.

Everything runs on a 2-layer Llama of hidden size 32 with one torch thread (on a busy machine a second
OpenMP thread makes each tiny step ~20× slower, not faster) and a few dozen short examples.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import sum_assets
from core import lora, runs
from core.config import RunConfig
from core.errors import StudioError
from core.train import EvalEvent, StatusEvent, StepEvent, Trainer, lr_factor

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny checkpoint folder and a 40-row instruction dataset, shared by the module's tests."""
    return sum_assets(tmp_path_factory.mktemp("train-assets"), 40)


def make_cfg(assets, out, **train) -> RunConfig:
    ck, data = assets
    cfg = RunConfig()
    cfg.model.source, cfg.model.device = str(ck), "cpu"
    cfg.data.path, cfg.data.max_length = str(data), 64
    cfg.lora.rank, cfg.lora.targets = 4, "all-linear"
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr = 8, 4, 5e-3
    cfg.train.save_every, cfg.train.warmup = 0, 2
    cfg.out = str(out)
    for k, v in train.items():
        section = "lora" if k in ("dropout", "rank") else ("data" if k in ("val_split", "max_length") else "train")
        setattr(getattr(cfg, section), k, v)
    return cfg


def adapter_of(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in runs.read_metrics(run_dir) if "loss" in r]


# -- schedules and the optimizer -----------------------------------------------------------------------

def test_schedules_warm_up_then_decay():
    assert [lr_factor(s, 10, 4, "constant") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    lin = [lr_factor(s, 10, 0, "linear") for s in range(10)]
    assert lin[0] == 1.0 and all(a > b for a, b in zip(lin, lin[1:])) and lin[-1] == pytest.approx(0.1)
    cos = [lr_factor(s, 10, 2, "cosine") for s in range(10)]
    assert cos[:3] == [0.5, 1.0, 1.0] and cos[-1] > 0
    assert cos[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_optimizer_holds_only_the_adapter_and_lr_follows_schedule(assets, tmp_path):
    seen = {}

    def cb(ev):
        if isinstance(ev, StepEvent) and ev.step == 1:
            t = trainer
            held = [p for g in t.optimizer.param_groups for p in g["params"]]
            seen["held"] = {id(p) for p in held}
            seen["lora"] = {id(p) for p in lora.lora_parameters(t.model).values()}
            seen["trainable"] = {id(p) for p in t.model.parameters() if p.requires_grad}
            seen["count"] = sum(p.numel() for p in held)

    cfg = make_cfg(assets, tmp_path / "run", scheduler="linear", steps=6, log_every=2)
    trainer = Trainer(cfg, callback=cb)
    trainer.run()
    # the loss is read back from the device only at log points
    assert [r["loss"] is not None for r in runs.read_metrics(tmp_path / "run")] == [False, True] * 3
    assert seen["held"] == seen["lora"] == seen["trainable"]
    # r·(d_in + d_out) over 2 layers × (q 32→32, k 32→16, v 32→16, o, gate, up 32→64, down 64→32)
    per_layer = 4 * ((32 + 32) + (32 + 16) * 2 + (32 + 32) + (32 + 64) * 3)
    assert seen["count"] == 2 * per_layer
    lrs = [r["lr"] for r in runs.read_metrics(tmp_path / "run")]
    expected = [5e-3 * lr_factor(s, 6, 2, "linear") for s in range(6)]
    assert lrs == pytest.approx(expected)


# -- determinism, accumulation ------------------------------------------------------------------------

def test_same_seed_same_curve_and_adapter_other_seed_differs(assets, tmp_path):
    results = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        cfg = make_cfg(assets, tmp_path / name, seed=seed, steps=6)
        cfg.lora.dropout = 0.1  # dropout draws from the seeded generator too
        Trainer(cfg).run()
        results.append((losses(tmp_path / name), adapter_of(tmp_path / name)))
    (la, aa), (lb, ab), (lc, ac) = results
    assert la == lb
    assert_same_adapter(aa, ab, atol=0)
    assert la != lc


def test_grad_accumulation_equals_one_big_batch(assets, tmp_path):
    """Loss normalised by the trained tokens of the whole step: 2×2 accumulated == 4 at once."""
    Trainer(make_cfg(assets, tmp_path / "big", batch_size=4, grad_accum=1, steps=4)).run()
    acc = make_cfg(assets, tmp_path / "acc", batch_size=2, grad_accum=2, steps=None, epochs=0.4)
    assert Trainer(acc).run().total_steps == 4  # ceil(0.4 × 40 examples / 4 per step)
    assert losses(tmp_path / "big") == pytest.approx(losses(tmp_path / "acc"), abs=1e-5)
    assert runs.read_metrics(tmp_path / "acc")[-1]["epoch"] == pytest.approx(0.4)
    assert_same_adapter(adapter_of(tmp_path / "big"), adapter_of(tmp_path / "acc"), atol=1e-5)


def test_gradient_checkpointing_changes_memory_not_results(assets, tmp_path):
    Trainer(make_cfg(assets, tmp_path / "plain", steps=3)).run()
    cfg = make_cfg(assets, tmp_path / "gc", steps=3)
    cfg.model.gradient_checkpointing = True
    trainer = Trainer(cfg)
    trainer.run()
    assert losses(tmp_path / "gc") == pytest.approx(losses(tmp_path / "plain"), abs=1e-6)
    assert_same_adapter(adapter_of(tmp_path / "gc"), adapter_of(tmp_path / "plain"), atol=1e-6)


def test_a_model_the_window_holds_is_trained_then_given_back_unchanged(assets, tmp_path):
    from core import models

    lm = models.load_model(str(assets[0]), device="cpu", precision="fp32")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    cfg = make_cfg(assets, tmp_path / "run", steps=3)
    cfg.model.gradient_checkpointing = True
    Trainer(cfg, loaded=lm).run()
    assert not list(lora.lora_layers(lm.model)) and not lm.model.training
    assert not any(p.requires_grad for p in lm.model.parameters())
    after = lm.model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    Trainer(make_cfg(assets, tmp_path / "fresh", steps=3)).run()  # same numbers as loading it anew
    assert_same_adapter(adapter_of(tmp_path / "run"), adapter_of(tmp_path / "fresh"), atol=1e-6)


# -- stop, pause, NaN ----------------------------------------------------------------------------------

def test_stop_takes_effect_within_one_step_and_leaves_a_checkpoint(assets, tmp_path):
    def cb(ev):
        if isinstance(ev, StepEvent) and ev.step == 3:
            trainer.request_stop()

    trainer = Trainer(make_cfg(assets, tmp_path / "run", steps=50), callback=cb)
    result = trainer.run()
    assert result.status == "stopped" and result.step == 3
    assert runs.latest_checkpoint(tmp_path / "run").name == "step-3"
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert runs.RunFolder(tmp_path / "run").status()["status"] == "stopped"
    assert max(r["step"] for r in runs.read_metrics(tmp_path / "run")) == 3


def test_pause_then_resume_equals_an_uninterrupted_run(assets, tmp_path):
    ref = make_cfg(assets, tmp_path / "ref", steps=10)
    ref.lora.dropout = 0.1
    Trainer(ref).run()

    paused = threading.Event()
    events = []

    def cb(ev):
        events.append(ev)
        if isinstance(ev, StepEvent) and ev.step == 4:
            trainer.request_pause()
        if isinstance(ev, StatusEvent) and ev.kind == "paused":
            paused.set()

    cfg = make_cfg(assets, tmp_path / "run", steps=10)
    cfg.lora.dropout = 0.1
    trainer = Trainer(cfg, callback=cb)
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("r", trainer.run()))
    th.start()
    assert paused.wait(60)
    time.sleep(0.3)
    assert th.is_alive()  # really waiting
    assert len(trainer.optimizer.state) == 0  # AdamW's moments were released
    assert runs.RunFolder(tmp_path / "run").status()["status"] == "paused"
    assert runs.latest_checkpoint(tmp_path / "run").name == "step-4"
    trainer.request_resume()
    th.join(60)
    assert box["r"].status == "finished" and box["r"].step == 10
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")
    assert_same_adapter(adapter_of(tmp_path / "run"), adapter_of(tmp_path / "ref"), atol=0)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(assets, tmp_path):
    def cb(ev):
        if isinstance(ev, StepEvent) and ev.step == 3:
            with torch.no_grad():  # what a diverging run does to the weights
                next(iter(lora.lora_parameters(trainer.model).values())).fill_(float("nan"))

    trainer = Trainer(make_cfg(assets, tmp_path / "run", steps=20, save_every=2), callback=cb)
    with pytest.raises(StudioError, match=r"step 4: the loss became NaN.*step-2"):
        trainer.run()
    assert runs.latest_checkpoint(tmp_path / "run").name == "step-2"
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-2" / "state.json").read_text())
    assert math.isfinite(state["last_loss"])
    assert runs.RunFolder(tmp_path / "run").status()["status"] == "failed"


def test_out_of_memory_says_what_to_change(assets, tmp_path):
    trainer = Trainer(make_cfg(assets, tmp_path / "run", steps=5))

    def no_memory(model, batch):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    trainer._loss_sum = no_memory
    with pytest.raises(StudioError) as e:
        trainer.run()
    text = str(e.value)
    assert "out of memory" in text and "--batch-size 4" in text and "--max-length 64" in text
    assert "--gradient-checkpointing" in text and "Traceback" not in text


# -- the run folder --------------------------------------------------------------------------------------

def test_run_folder_holds_config_metrics_checkpoints_and_adapter(assets, tmp_path):
    cfg = make_cfg(assets, tmp_path / "run", steps=6, save_every=2, eval_every=3, val_split=0.1)
    events = []
    result = Trainer(cfg, callback=events.append).run()
    run = tmp_path / "run"
    assert result.status == "finished" and result.adapter == run / "adapter"
    saved = RunConfig.load(run / "config.json")
    assert saved.to_dict() == dict(cfg.to_dict(), name="run")
    rows = runs.read_metrics(run)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        assert {"step", "loss", "lr", "tokens", "step_seconds", "grad_norm", "epoch", "elapsed"} <= set(r)
        assert r["loss"] > 0 and r["tokens"] > 0
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert [e.step for e in events if isinstance(e, EvalEvent)] == [3, 6]
    assert [s for s, _ in runs.checkpoints(run)] == [2, 4, 6]
    studio = json.loads((run / "adapter" / "studio.json").read_text())
    assert studio["training"]["steps"] == 6 and studio["training"]["final_loss"] == steps[-1]["loss"]
    assert studio["training"]["best_eval_loss"] == min(r["eval_loss"] for r in evals)
    assert [p[0] for p in studio["loss_curve"]] == [1, 2, 3, 4, 5, 6]
    assert len(studio["dataset"]["sha256"]) == 64 and studio["dataset"]["path"] == cfg.data.path
    assert studio["base_model"]["spec"] == cfg.model.source and studio["fingerprint"]["shapes"]
    listed = runs.list_runs(tmp_path)
    assert [(r["name"], r["status"], r["step"]) for r in listed] == [("run", "finished", 6)]
    # a used folder is not overwritten by accident
    with pytest.raises(StudioError, match="already holds a run"):
        Trainer(cfg).run()


def test_train_config_repeats_a_run_and_flags_beside_it_win(assets, tmp_path, capsys):
    from studio.cli import run as cli

    ck, data = assets
    base = ["train", "--model", str(ck), "--data", str(data), "--device", "cpu", "--max-length", "64",
            "--rank", "4", "--steps", "5", "--lr", "3e-3", "--seed", "3", "--no-progress", "--save-every", "0"]
    assert cli(base + ["--out", str(tmp_path / "one")]) == 0
    assert cli(["train", "--config", str(tmp_path / "one" / "config.json"), "--out", str(tmp_path / "two"),
                "--no-progress"]) == 0
    keys = ("step", "loss", "lr", "tokens", "trained_tokens", "grad_norm", "epoch")

    def rows(d):
        return [{k: r.get(k) for k in keys} for r in runs.read_metrics(tmp_path / d)]

    assert rows("one") == rows("two") and len(rows("one")) == 5
    assert RunConfig.load(tmp_path / "two" / "config.json").name == "two"
    assert cli(["train", "--config", str(tmp_path / "one" / "config.json"), "--out", str(tmp_path / "three"),
                "--steps", "2", "--no-progress"]) == 0
    three = rows("three")  # two steps; the schedule over 2 steps differs from step 2 on, the losses not yet
    assert [r["loss"] for r in three] == [r["loss"] for r in rows("one")[:2]] and three[0] == rows("one")[0]
    # every configuration problem in one line, exit 1
    capsys.readouterr()
    assert cli(base + ["--out", str(tmp_path / "bad"), "--rank", "0", "--lr", "5", "--val-split", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--rank" in err and "--lr" in err and "--val-split" in err


def test_ctrl_c_saves_a_checkpoint_and_exits_130(assets, tmp_path, capsys):
    from studio.cli import run as cli

    ck, data = assets
    out = tmp_path / "run"

    def interrupt():
        while not runs.read_metrics(out):
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)  # what the terminal sends on Ctrl-C

    threading.Thread(target=interrupt, daemon=True).start()
    code = cli(["train", "--model", str(ck), "--data", str(data), "--device", "cpu", "--max-length", "64",
                "--rank", "4", "--steps", "500", "--save-every", "0", "--no-progress", "--out", str(out)])
    assert code == 130
    step = runs.RunFolder(out).status()["step"]
    assert 1 <= step < 500 and runs.latest_checkpoint(out).name == f"step-{step}"
    assert "--resume" in capsys.readouterr().err


# -- real processes: kill -9 and resume; torchrun ------------------------------------------------------

def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1")
    return env


def test_sigkill_then_resume_ends_with_the_uninterrupted_adapter(assets, tmp_path):
    ck, data = assets
    args = ["--model", str(ck), "--data", str(data), "--device", "cpu", "--max-length", "64", "--rank", "4",
            "--steps", "60", "--lr", "3e-3", "--save-every", "3", "--dropout", "0.1", "--no-progress"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "studio", "train", *args, "--out", str(out)], cwd=ROOT,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if runs.latest_checkpoint(out) is not None:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    killed_at = max((s for s, _ in runs.checkpoints(out)), default=0)
    assert 0 < killed_at < 60 and not (out / "adapter").exists()
    assert runs.RunFolder(out).status()["status"] == "interrupted"
    done = subprocess.run([sys.executable, "-m", "studio", "train", "--resume", "--out", str(out), "--no-progress"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    ref = make_cfg(assets, tmp_path / "ref", steps=60, lr=3e-3, save_every=0, warmup=0, seed=42)
    ref.lora.dropout = 0.1
    ref.train.scheduler = "cosine"
    Trainer(ref).run()
    assert_same_adapter(adapter_of(out), adapter_of(tmp_path / "ref"), atol=1e-6)
    assert [r["step"] for r in runs.read_metrics(out)] == list(range(1, 61))
    assert losses(out) == pytest.approx(losses(tmp_path / "ref"), abs=1e-6)


def test_two_process_ddp_equals_one_process_with_the_same_global_batch(assets, tmp_path):
    ck, data = assets
    common = ["--model", str(ck), "--data", str(data), "--device", "cpu", "--max-length", "64", "--rank", "4",
              "--steps", "5", "--lr", "3e-3", "--save-every", "2", "--no-progress", "--grad-accum", "2"]
    env = _env()
    env.pop("WORLD_SIZE", None)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(29500 + os.getpid() % 1000), "-m", "studio", "train", *common,
                          "--batch-size", "1", "--out", str(tmp_path / "ddp")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    cfg = make_cfg(assets, tmp_path / "one", steps=5, lr=3e-3, batch_size=2, grad_accum=2, save_every=2, warmup=0)
    Trainer(cfg).run()
    assert_same_adapter(adapter_of(tmp_path / "ddp"), adapter_of(tmp_path / "one"), atol=1e-5)
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "step-4" / "state.json").read_text())
    assert state["world_size"] == 2 and state["global_batch"] == 4
