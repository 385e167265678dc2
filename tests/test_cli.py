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


def test_generate_answers_side_by_side_as_the_playground_does(tmp_path):
    """`generate` answers with the base model and each adapter: the same texts as generating in-process."""
    from conftest import TOKENIZER_VOCAB, tiny_checkpoint
    from test_library import studio_adapter

    from core import adapter as adapter_io
    from core import lora, models
    from core.generate import generate_with_details

    folder = tiny_checkpoint(tmp_path / "tiny")
    a = studio_adapter(tmp_path / "a", tiny_llama(vocab_size=TOKENIZER_VOCAB), seed=3)
    r = _run("generate", "--model", str(folder), "--adapter", str(a), "--prompt", "Hello there",
             "--max-new-tokens", "6", "--device", "cpu", "--precision", "fp32", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [o["system"] for o in out] == ["base model", f"adapter {a}"]

    lm = models.load_model(str(folder), device="cpu", precision="fp32")
    settings = dict(max_new_tokens=6, greedy=True)
    base = generate_with_details(lm.model, lm.tokenizer, "Hello there", **settings).text
    adapter_io.load_adapter(lm.model, a, "a")
    lora.set_active_adapters(lm.model, ["a"])
    with_adapter = generate_with_details(lm.model, lm.tokenizer, "Hello there", **settings).text
    assert [o["text"] for o in out] == [base, with_adapter]

    r = _run("generate", "--model", str(folder), "--no-base", "--prompt", "hi")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--adapter" in r.stderr


def test_library_combine_adds_an_entry_as_the_window_does(tmp_path):
    from test_library import studio_adapter

    from core.library import Library

    lib = Library()
    lib.import_path(studio_adapter(tmp_path / "a", seed=2), name="one")
    lib.import_path(studio_adapter(tmp_path / "b", seed=5), name="two")
    r = _run("library", "combine", "one", "two", "--weights", "0.5,0.5", "--name", "blend", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["entry"]["name"] == "blend"
    entry = Library().resolve("blend")
    assert entry.rank == 8 and "one × 0.5" in entry.imported_from and "two × 0.5" in entry.imported_from
    r = _run("library", "combine", "one", "two", "--rank", "2", "--name", "x")
    assert r.returncode == 1 and "--rank" in r.stderr and r.stderr.count("\n") == 1
    r = _run("library", "combine", "one", "--name", "x")
    assert r.returncode == 1 and "two or more" in r.stderr
