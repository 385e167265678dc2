"""Run folders on disk: what a crash leaves must still read, list and resume correctly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from core import runs
from core.config import RunConfig


def _run(tmp_path, name="r1"):
    rf = runs.RunFolder(tmp_path / name)
    cfg = RunConfig(out=str(rf.path), name=name)
    rf.write_config(cfg)
    return rf


def test_metrics_survive_a_partial_last_line(tmp_path):
    rf = _run(tmp_path)
    for s in (1, 2, 3):
        rf.append_metric({"step": s, "loss": 1.0 / s})
    rf.close()
    with open(rf.metrics_path, "a") as f:
        f.write('{"step": 4, "lo')  # the writer was killed mid-line
    rows = runs.read_metrics(rf.path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert runs.read_metrics(rf.metrics_path) == rows
    rf.truncate_metrics(2)
    assert [r["step"] for r in runs.read_metrics(rf.path)] == [1, 2]
    assert rf.metrics_path.read_text().endswith("\n")
    assert runs.read_metrics(tmp_path / "missing") == []


def test_only_complete_checkpoints_count_and_the_newest_few_are_kept(tmp_path):
    rf = _run(tmp_path)
    for s in (2, 4, 6, 8, 10):
        d = rf.checkpoint_dir(s)
        d.mkdir(parents=True)
        (d / runs.CHECKPOINT_DONE).write_text("{}")
    (rf.checkpoints_dir / ".step-12.partial-abc").mkdir()  # a staged folder a kill left behind
    (rf.checkpoints_dir / "step-14").mkdir()  # no state.json: not complete
    assert runs.latest_checkpoint(rf.path).name == "step-10"
    rf.prune_checkpoints(keep=3)
    assert [s for s, _ in rf.checkpoints()] == [6, 8, 10]
    assert (rf.checkpoints_dir / ".step-12.partial-abc").exists()  # young: maybe still being written
    assert runs.latest_checkpoint(tmp_path / "nothing") is None


def test_status_of_a_dead_process_reads_interrupted(tmp_path):
    rf = _run(tmp_path)
    rf.write_status("running", step=3, total_steps=10)
    assert rf.status()["status"] == "running"  # this process is alive
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    d = json.loads(rf.status_path.read_text())
    d["pid"] = int(dead.stdout)
    rf.status_path.write_text(json.dumps(d))
    assert rf.status()["status"] == "interrupted"
    info = rf.info()
    assert info["status"] == "interrupted" and info["step"] == 3 and info["total_steps"] == 10
    rf.write_status("finished", step=10, final_loss=0.5)
    assert rf.status()["status"] == "finished" and rf.status()["started"] == d["started"]


def test_list_runs_finds_runs_under_home_and_given_roots(tmp_path, studio_home):
    from core.home import runs_dir

    a = runs.RunFolder(runs_dir() / "a")
    a.write_config(RunConfig(out=str(a.path), name="first"))
    a.write_status("finished", step=5, total_steps=5)
    b = _run(tmp_path / "elsewhere", "b")
    b.write_status("stopped", step=2)
    (runs_dir() / "not-a-run").mkdir()
    listed = runs.list_runs()
    assert [r["name"] for r in listed] == ["first"]
    both = runs.list_runs(roots=[tmp_path / "elsewhere", b.path])
    assert sorted(r["name"] for r in both) == ["b", "first"]
    assert {r["name"]: r["status"] for r in both} == {"first": "finished", "b": "stopped"}
    assert all(os.path.isabs(r["path"]) for r in both)


def test_core_runs_imports_neither_torch_nor_qt():
    code = "import sys, core.runs; print('torch' in sys.modules, 'PySide6' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.split() == ["False", "False"]
