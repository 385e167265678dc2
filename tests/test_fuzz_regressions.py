"""Every failure the fuzz suite found (issue 19), kept as an explicit case: each one ended in a traceback
(RecursionError, OverflowError, TypeError, KeyError, OSError, ...) before its fix, and must end in our
one line (exit 1, ``error: ...`` naming the file) or in success.

The cases are written out here rather than replayed from a seed, so that they keep testing the same
input when the mutator changes."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

import fuzz_targets as ft
from studio.cli import run as cli

DEEP = "[" * 5000 + "]" * 5000


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return ft.Seeds(tmp_path_factory.mktemp("fuzz-regression-seeds"))


def one_line(capsys, argv, *expect) -> str:
    """Run the command; it must exit 1 with one ``error:`` line and no traceback; return that line."""
    capsys.readouterr()
    code = cli([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err
    for word in expect:
        assert word in errors[0], errors[0]
    return errors[0]


# -- deep nesting: the issue's RecursionError ------------------------------------------------------

def test_deeply_nested_json_in_data_and_train(seeds, tmp_path, capsys):
    jsonl = tmp_path / "deep.jsonl"
    jsonl.write_text('{"text": ' + DEEP + "}\n")
    js = tmp_path / "deep.json"
    js.write_text(DEEP)
    for f in (jsonl, js):
        one_line(capsys, ["data", f, "--model", seeds.checkpoint], str(f), "nested more than 100 levels")
    one_line(capsys, ["train", "--model", seeds.checkpoint, "--data", jsonl, "--out", tmp_path / "run",
                      *ft.TRAIN_FLAGS], "deep.jsonl:1:", "nested")
    config = tmp_path / "config.json"
    config.write_text('{"name": ' + DEEP + "}")
    one_line(capsys, ["train", "--config", config, "--out", tmp_path / "run2"], str(config), "nested")


def test_a_csv_cell_of_deeply_nested_json_is_a_skipped_row(seeds, tmp_path, capsys):
    csv = tmp_path / "chat.csv"
    good = json.dumps(ft.ROWS[0]["messages"]).replace('"', '""')
    csv.write_text(f'messages\n"{good}"\n"{DEEP}"\n')
    capsys.readouterr()
    assert cli(["data", str(csv), "--model", str(seeds.checkpoint), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["skipped"] == 1 and "row 2" in out["problems"][0]


def test_deeply_nested_adapter_config_in_a_zip(seeds, tmp_path, capsys):
    z = ft.build_zip(seeds, tmp_path / "a.zip", [("a/adapter_config.json", "json-deep", False),
                                                 ("a/adapter_model.safetensors", "weights", False)])
    one_line(capsys, ["library", "import", z], "adapter_config.json", "nested")


# -- datasets ---------------------------------------------------------------------------------------

def _saved(seeds, tmp_path):
    d = tmp_path / "saved"
    shutil.copytree(seeds.data["disk"], d)
    return d, next(d.glob("*.arrow"))


def test_save_to_disk_folder_with_a_damaged_arrow_file(seeds, tmp_path, capsys):
    d, arrow = _saved(seeds, tmp_path)
    raw = bytearray(arrow.read_bytes())
    raw[8:40] = b"\xff" * 32  # the schema message: pyarrow's "Invalid flatbuffers message" (OSError)
    arrow.write_bytes(bytes(raw))
    one_line(capsys, ["data", d, "--model", seeds.checkpoint], str(d), "not a dataset written by")


def test_save_to_disk_folder_whose_strings_are_not_utf8(seeds, tmp_path, capsys):
    d, arrow = _saved(seeds, tmp_path)
    raw = arrow.read_bytes()
    at = raw.index(b"Two lattes")
    arrow.write_bytes(raw[:at] + b"\x9c" + raw[at + 1:])  # UnicodeDecodeError when the rows were read
    one_line(capsys, ["data", d, "--model", seeds.checkpoint], str(d), "arrow file is damaged")


# -- GGUF -------------------------------------------------------------------------------------------

def _gguf_string(text: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(text) if length is None else length) + text


def test_gguf_whose_string_length_is_past_the_file(tmp_path, capsys):
    g = tmp_path / "lie.gguf"
    # v3, no tensors, 3 metadata entries; the second is a string declaring 2**63 - 1 bytes where the
    # file ends, so the third is looked for past any offset a C ssize_t holds (OverflowError before)
    g.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 3)
                  + _gguf_string(b"general.architecture") + struct.pack("<I", 8) + _gguf_string(b"llama")
                  + _gguf_string(b"x") + struct.pack("<I", 8) + _gguf_string(b"", 2**63 - 1))
    one_line(capsys, ["models", "show", g], "not a readable GGUF file")


# -- adapters ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, words", [
    ({"target_modules": ["q_proj", 1.5]}, ["target_modules"]),
    ({"target_modules": "("}, ["target_modules"]),
    ({"rank_pattern": {"(": 4}}, ["rank_pattern"]),
    ({"alpha_pattern": {"q_proj": "x"}}, ["alpha_pattern"]),
    ({"lora_dropout": "0.1"}, ["lora_dropout"]),
    ({"modules_to_save": 5}, ["modules_to_save"]),
])
def test_adapter_config_fields_of_the_wrong_type(seeds, tmp_path, capsys, fields, words):
    a = shutil.copytree(seeds.adapter, tmp_path / "adapter")
    cfg = json.loads((a / "adapter_config.json").read_text())
    (a / "adapter_config.json").write_text(json.dumps({**cfg, **fields}))
    one_line(capsys, ["inspect", a, "--model", seeds.checkpoint], str(a), *words)
    one_line(capsys, ["library", "import", a], *words)


def test_studio_json_of_the_wrong_types(seeds, tmp_path, capsys):
    a = shutil.copytree(seeds.adapter, tmp_path / "adapter")
    studio = json.loads((a / "studio.json").read_text())
    (a / "studio.json").write_text(json.dumps({**studio, "format_version": "x"}))
    one_line(capsys, ["inspect", a], "format_version")
    (a / "studio.json").write_text(json.dumps({**studio, "training": 5}))
    assert cli(["library", "import", str(a)]) == 0  # the rest of studio.json is used, 'training' ignored


def test_zip_whose_directory_lies_about_offsets(seeds, tmp_path, capsys):
    z = tmp_path / "lie.zip"
    raw = bytearray(seeds.zip.read_bytes())
    end = raw.rindex(b"PK\x05\x06")
    offset = struct.unpack_from("<I", raw, end + 16)[0]
    struct.pack_into("<I", raw, end + 16, offset + 1000)  # members seek before the file (OSError EINVAL)
    z.write_bytes(bytes(raw))
    one_line(capsys, ["library", "import", z], str(z))


# -- model folders ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, change, command", [
    ("tokenizer.json", lambda t: t[:4000] + '"post_processor": 7}', "data"),
    ("tokenizer_config.json", lambda t: json.dumps({**json.loads(t), "model_max_length": {}}), "data"),
    ("config.json", lambda t: json.dumps({**json.loads(t), "head_dim": "a" * 50}), "targets"),
    ("config.json", lambda t: json.dumps({**json.loads(t), "rope_parameters": {"rope_type": "-1"}}), "targets"),
])
def test_model_folder_files_that_transformers_rejects(seeds, tmp_path, capsys, name, change, command):
    m = shutil.copytree(seeds.checkpoint, tmp_path / "model")
    (m / name).write_text(change((m / name).read_text()))
    argv = (["data", seeds.data["jsonl"], "--model", m] if command == "data" else ["targets", "--model", m])
    capsys.readouterr()
    code = cli([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code in (0, 1) and "Traceback" not in err and len([ln for ln in err.splitlines()
                                                               if ln.startswith("error:")]) == code, err


# -- the studio's own files -------------------------------------------------------------------------------

def test_library_index_row_torn_inside_its_json(seeds, studio_home, capsys):
    import sqlite3

    from core.library import Library

    lib = Library()
    lib.import_path(seeds.adapter, name="seed")
    con = sqlite3.connect(lib.index_path)
    with con:
        con.execute("UPDATE entries SET data = substr(data, 1, 20)")
    con.close()
    capsys.readouterr()
    assert cli(["library", "list", "--json"]) == 0  # the index is a cache: rebuilt from the folders
    assert [e["name"] for e in json.loads(capsys.readouterr().out)] == ["seed"]


def test_run_config_fields_of_the_wrong_type(seeds, tmp_path, capsys):
    cfg = json.loads(seeds.run_config.read_text())
    cfg["data"]["fields"] = ["a"]
    cfg["train"]["lr"] = "fast"
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    one_line(capsys, ["train", "--config", path, "--out", tmp_path / "out"], "data.fields", "train.lr")
    cfg = json.loads(seeds.run_config.read_text())
    cfg["data"]["path"] = "/tmp/" + "[" * 5000  # the system refuses the name: one line naming it
    path.write_text(json.dumps(cfg))
    one_line(capsys, ["train", "--config", path, "--out", tmp_path / "out"], "File name too long")


def _run_copy(seeds, tmp_path):
    return shutil.copytree(seeds.run, tmp_path / "run")


def test_resume_from_a_checkpoint_with_a_damaged_header_or_state(seeds, tmp_path, capsys):
    run = _run_copy(seeds, tmp_path)
    ck = run / "checkpoints" / "step-2"
    raw = (ck / "adapter.safetensors").read_bytes()
    (ck / "adapter.safetensors").write_bytes(raw[:8] + b"\xff" + raw[9:])  # SafetensorError before
    one_line(capsys, ["train", "--resume", "--out", run, "--steps", "3", "--no-progress"], "step-2", "unreadable")
    shutil.rmtree(run)
    run = _run_copy(seeds, tmp_path)
    state = json.loads((run / "checkpoints" / "step-2" / "state.json").read_text())
    del state["param_names"]  # KeyError before
    (run / "checkpoints" / "step-2" / "state.json").write_text(json.dumps(state))
    one_line(capsys, ["train", "--resume", "--out", run, "--steps", "3", "--no-progress"], "step-2", "damaged")


def test_resume_with_a_damaged_metrics_file_and_listing_a_damaged_status(seeds, tmp_path, capsys):
    from core import runs

    run = _run_copy(seeds, tmp_path)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"loss": 1.0}\n{"step": 9, "tokens": "many"}\n')  # KeyError 'step' at the end before
    assert cli(["train", "--resume", "--out", str(run), "--steps", "3", "--no-progress"]) == 0
    assert [r["step"] for r in runs.read_metrics(run)] == [1, 2, 3]
    (run / "status.json").write_bytes(b'{"status": "\x82"}')  # UnicodeDecodeError when listed before
    assert [r["status"] for r in runs.list_runs(tmp_path)] == ["finished"]


def test_resume_from_a_checkpoint_whose_optimizer_groups_lack_a_setting(seeds, tmp_path, capsys):
    run = _run_copy(seeds, tmp_path)
    path = run / "checkpoints" / "step-2" / "state.json"
    state = json.loads(path.read_text())
    del state["param_groups"][0]["lr"]  # KeyError 'lr' at the first step after the load before
    path.write_text(json.dumps(state))
    one_line(capsys, ["train", "--resume", "--out", run, "--steps", "3", "--no-progress"], "damaged", "'lr'")


def test_entry_json_without_an_id_or_with_values_of_the_wrong_type(seeds, studio_home, capsys):
    from core.library import Library

    lib = Library()
    e = lib.import_path(seeds.adapter, name="seed")
    entry = json.loads((e.path / "entry.json").read_text())
    del entry["id"]  # TypeError in Entry() before
    entry.update(rank="eight", targets=[1], notes=None)
    (e.path / "entry.json").write_text(json.dumps(entry))
    capsys.readouterr()
    assert cli(["library", "show", e.id, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "seed" and shown["id"] == e.id and shown["rank"] is None and shown["targets"] == []


def test_gguf_whose_architecture_is_not_text(tmp_path, capsys):
    g = ft.write_gguf(tmp_path / "bool.gguf", {"general.architecture": False})  # found by hypothesis
    one_line(capsys, ["models", "show", g], "general.architecture")


def test_save_to_disk_folder_with_deeply_nested_dataset_info(seeds, tmp_path, capsys):
    d, _ = _saved(seeds, tmp_path)
    (d / "dataset_info.json").write_text(DEEP)  # RecursionError inside datasets before
    one_line(capsys, ["data", d, "--model", seeds.checkpoint], str(d))


def test_a_config_batch_size_of_a_billion_is_refused_not_built(seeds, tmp_path, capsys):
    cfg = json.loads(seeds.run_config.read_text())
    cfg["train"]["batch_size"] = 10**9  # built index lists for minutes before (a hang, by the suite's bound)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    one_line(capsys, ["train", "--config", path, "--out", tmp_path / "out"], "--batch-size", "65536")


def test_save_to_disk_arrow_file_whose_offsets_lie_does_not_crash_the_process(seeds, tmp_path):
    """The long run's last find: this damaged arrow file made pyarrow segfault when a row was read
    (the whole process died, no message at all). Run in a subprocess so a crash fails this test."""
    import os
    import random
    import subprocess
    import sys

    d, _ = _saved(seeds, tmp_path)
    ft._mutate_one_of(d, random.Random(1000896))  # the case benchmarks/fuzz.py found: data-disk seed 1000896
    env = dict(os.environ, LORA_STUDIO_HOME=str(tmp_path / "home"))
    r = subprocess.run([sys.executable, "-m", "studio", "data", str(d), "--model", str(seeds.checkpoint)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "arrow file is damaged" in r.stderr and "Traceback" not in r.stderr
