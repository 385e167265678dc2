"""The command line: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import tiny_llama


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "studio", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_version_and_help():
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.startswith("lora-studio ")
    r = _run("--help")
    assert r.returncode == 0 and "targets" in r.stdout


def test_targets_on_a_checkpoint_folder(tmp_path):
    folder = tmp_path / "tiny"
    tiny_llama().config.save_pretrained(folder)
    r = _run("targets", "--model", str(folder), "--targets", "attention-qv", "--rank", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    selected = [m["name"] for m in out["modules"] if m["selected"]]
    assert [s.split(".")[-1] for s in selected] == ["q_proj", "v_proj"] * 2
    assert out["budget"]["trainable"] == 2 * 2 * ((32 + 32) + (32 + 16))


def test_errors_are_one_line_with_exit_1(tmp_path):
    r = _run("targets", "--model", str(tmp_path / "missing"))
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "missing" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "empty").mkdir()
    r = _run("targets", "--model", str(tmp_path / "empty"))
    assert r.returncode == 1 and "no config.json" in r.stderr
    folder = tmp_path / "tiny"
    tiny_llama().config.save_pretrained(folder)
    r = _run("targets", "--model", str(folder), "--targets", "nothing_here")
    assert r.returncode == 1 and "q_proj" in r.stderr and "Traceback" not in r.stderr
