"""Downloading by name, against a small Hub on 127.0.0.1 (tests/hub_server.py): the real
huggingface_hub code runs, only the address is ours. No test here touches the internet.

Each test gets its own HF_HOME, HF_ENDPOINT pointing at its own server, no token, and online mode
(tests/conftest.py sets HF_HUB_OFFLINE=1 for everything else); monkeypatch puts all of it back.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from conftest import tiny_checkpoint
from core import hub, hub_download, models
from core.errors import Cancelled, StudioError
from hub_server import HubRepo, HubServer


@pytest.fixture
def server(tmp_path, monkeypatch):
    from huggingface_hub import constants

    s = HubServer().start()
    monkeypatch.setenv("HF_ENDPOINT", s.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read once at import; conftest set it
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))  # no login leaks in
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    yield s
    s.stop()


def checkpoint_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def tiny_files(tmp_path) -> dict[str, bytes]:
    """A tiny Llama checkpoint's files; its weights are about 1.4 MB, so a throttled transfer of them
    takes long enough to cancel in the middle."""
    folder = tiny_checkpoint(tmp_path / "ckpt")
    from conftest import TOKENIZER_VOCAB, tiny_llama

    model = tiny_llama(0, vocab_size=TOKENIZER_VOCAB, hidden_size=128, intermediate_size=256)
    model.config.eos_token_id, model.config.pad_token_id = 1, 2
    model.save_pretrained(folder, safe_serialization=True)
    return checkpoint_files(folder)


def test_download_reports_progress_and_gives_a_loadable_snapshot(server, tiny_files):
    server.add(HubRepo("acme/tiny", tiny_files))
    events = []
    snap = hub.download("acme/tiny", progress=events.append)
    wanted = set(hub.TOKENIZER_AND_CONFIG) | {"model.safetensors"}
    total = sum(len(b) for n, b in tiny_files.items() if n in wanted)
    assert events[-1].done == events[-1].total == total
    assert [e.done for e in events] == sorted(e.done for e in events)
    assert events[-1].files_done == events[-1].files
    assert any(e.file == "model.safetensors" for e in events)
    assert (snap / "model.safetensors").read_bytes() == tiny_files["model.safetensors"]
    # the standard cache layout, so transformers and `hf` find it too; refs/main names the commit
    repo = snap.parent.parent
    assert repo.name == "models--acme--tiny" and (repo / "refs" / "main").read_text() == snap.name
    assert not list((repo / "blobs").glob("*.incomplete"))
    ref = models.resolve("acme/tiny")
    assert (ref.kind, ref.path) == ("hub", snap)
    loaded = models.load_model("acme/tiny", device="cpu", precision="fp32")
    assert loaded.model.config.hidden_size == 128
    # only the files a checkpoint needs were asked for
    assert {r.path.rsplit("/", 1)[-1] for r in server.log if r.method == "GET" and "/resolve/" in r.path} \
        <= set(hub.TOKENIZER_AND_CONFIG) | {"model.safetensors"}


def test_cancel_stops_within_a_second_and_the_next_download_fetches_only_the_rest(server, tiny_files):
    server.add(HubRepo("acme/tiny", tiny_files))
    size = len(tiny_files["model.safetensors"])
    server.rate = 400_000  # bytes/s: the weights take about 3.5 s
    asked = {}

    def should_stop():
        return "at" in asked

    def progress(e):
        if e.file == "model.safetensors" and e.file_done >= 300_000 and "at" not in asked:
            asked["at"] = time.monotonic()

    with pytest.raises(Cancelled):
        hub.download("acme/tiny", progress=progress, should_stop=should_stop)
    assert time.monotonic() - asked["at"] < 1.0
    partial = list((hub.repo_folder("acme/tiny") / "blobs").glob("*.incomplete"))
    assert len(partial) == 1 and 300_000 <= partial[0].stat().st_size < size
    kept = partial[0].stat().st_size
    assert hub.local_snapshot("acme/tiny") is None
    with pytest.raises(StudioError, match="models download acme/tiny"):
        models.resolve("acme/tiny")  # never a half-downloaded model

    server.rate = None
    events = []
    snap = hub.download("acme/tiny", progress=events.append)
    gets = [r for r in server.log if r.method == "GET" and r.path.endswith("/model.safetensors")]
    assert gets[-1].range == f"bytes={kept}-" and gets[-1].sent == size - kept
    assert (snap / "model.safetensors").read_bytes() == tiny_files["model.safetensors"]
    assert events[-1].done == events[-1].total


def test_a_dropped_connection_is_one_clear_line_and_nothing_half_written_is_loaded(server, tiny_files):
    server.add(HubRepo("acme/tiny", tiny_files))
    server.drop_after["model.safetensors"] = 600_000  # every try of the file stops there
    with pytest.raises(StudioError, match="broke while downloading model.safetensors") as e:
        hub.download("acme/tiny")
    assert "continues where it stopped" in str(e.value) and "\n" not in str(e.value)
    assert hub.local_snapshot("acme/tiny") is None
    partial = next((hub.repo_folder("acme/tiny") / "blobs").glob("*.incomplete"))
    kept = partial.stat().st_size  # the whole chunks that arrived before the drop
    assert kept and kept % hub_download.CHUNK == 0 and kept <= 600_000
    with pytest.raises(StudioError):
        models.checkpoint_folder("acme/tiny")
    server.drop_after.clear()
    snap = hub.download("acme/tiny")
    assert (snap / "model.safetensors").read_bytes() == tiny_files["model.safetensors"]
    gets = [r for r in server.log if r.method == "GET" and r.path.endswith("/model.safetensors")]
    assert gets[-1].range == f"bytes={kept}-" and gets[-1].sent == len(tiny_files["model.safetensors"]) - kept


def test_a_gated_model_needs_a_token_and_says_what_to_do(server, tiny_files, monkeypatch):
    server.add(HubRepo("acme/gated", tiny_files, gated=True))
    with pytest.raises(StudioError) as e:
        hub.download("acme/gated")
    text = str(e.value)
    assert "gated" in text and "HF_TOKEN" in text and "hf auth login" in text and f"{server.url}/acme/gated" in text
    assert not any(r.sent for r in server.log)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(StudioError, match="the token in use has no access"):
        hub.download("acme/gated")
    monkeypatch.setenv("HF_TOKEN", server.token)
    snap = hub.download("acme/gated")
    assert (snap / "model.safetensors").is_file()
    assert server.log[-1].authorization == f"Bearer {server.token}"


def test_pickle_only_repos_missing_repos_and_revisions_are_refused(server, tiny_files):
    files = {n: b for n, b in tiny_files.items() if n != "model.safetensors"}
    server.add(HubRepo("acme/pickled", dict(files, **{"pytorch_model.bin": b"\x80\x04" + b"x" * 1000})))
    with pytest.raises(StudioError, match="pickle") as e:
        hub.download("acme/pickled")
    assert "pytorch_model.bin" in str(e.value)
    assert not any(r.path.endswith(".bin") for r in server.log)  # not one byte of it
    with pytest.raises(StudioError, match="no model acme/absent"):
        hub.download("acme/absent")
    server.add(HubRepo("acme/tiny", tiny_files))
    with pytest.raises(StudioError, match="no revision"):
        hub.download("acme/tiny", revision="v9")


def test_sharded_repo_takes_the_index_shards_only(server, tiny_files):
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                           "b": "model-00002-of-00002.safetensors"}}
    files = {"config.json": tiny_files["config.json"], hub.INDEX: json.dumps(index).encode(),
             "model-00001-of-00002.safetensors": b"1" * 10, "model-00002-of-00002.safetensors": b"2" * 10,
             "consolidated.safetensors": b"c" * 20, "original/consolidated.00.pth": b"p" * 5,
             "README.md": b"# hi"}
    server.add(HubRepo("acme/sharded", files))
    remote = hub.remote_model("acme/sharded")
    assert remote.files == ["config.json", hub.INDEX, "model-00001-of-00002.safetensors",
                            "model-00002-of-00002.safetensors"]
    assert remote.weight_bytes == 20 and remote.download_bytes == 20 + len(files["config.json"]) + len(files[hub.INDEX])


def test_offline_uses_the_cache_and_a_download_says_the_machine_is_offline(server, tiny_files, monkeypatch):
    server.add(HubRepo("acme/tiny", tiny_files))
    hub.download("acme/tiny")
    server.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.ensure_model("acme/tiny") == "acme/tiny"  # cached: no network needed
    assert models.load_config("acme/tiny").hidden_size == 128
    with pytest.raises(StudioError, match="offline") as e:
        hub.download("acme/other")
    assert "\n" not in str(e.value)
    with pytest.raises(StudioError, match="offline"):
        hub.ensure_model("acme/other")


def test_fit_report_reads_config_alone_and_says_when_a_model_cannot_fit(server, tiny_files, monkeypatch):
    server.add(HubRepo("acme/tiny", tiny_files))
    huge = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16384,
            "intermediate_size": 53248, "num_hidden_layers": 126, "num_attention_heads": 128,
            "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072}
    server.add(HubRepo("acme/huge", {"config.json": json.dumps(huge).encode(), "model.safetensors": b"w" * 4096}))
    settings = dict(batch_size=1, seq_len=512, rank=8, targets="all-linear", precision="fp32")
    remote = hub.remote_model("acme/tiny")
    report = hub.fit_report(remote, hub.fetch_config(remote), settings, device="cpu")
    assert report["fits_memory"] and report["fits_disk"] and not report["problems"]
    assert report["summary"]["layers"] == 2
    assert report["download"] == remote.download_bytes - len(tiny_files["config.json"])  # that one is here
    assert not any(r.path.endswith(".safetensors") for r in server.log)  # the config alone
    remote = hub.remote_model("acme/huge")
    report = hub.fit_report(remote, hub.fetch_config(remote), settings, device="cpu")
    assert report["summary"]["parameters"] > 400e9
    assert not report["fits_memory"] and "does not fit" in report["problems"][0]
    monkeypatch.setattr(hub, "free_disk", lambda path: 100)
    report = hub.fit_report(hub.remote_model("acme/tiny"), hub.fetch_config(remote), settings, device="cpu")
    assert not report["fits_disk"] and "of disk" in report["problems"][-1]
    with pytest.raises(StudioError, match="only 0.00 GiB is free"):
        hub.download("acme/tiny")


def test_cancel_from_another_thread(server, tiny_files):
    """What the window's Cancel does: a flag set from another thread while bytes are arriving."""
    server.add(HubRepo("acme/tiny", tiny_files))
    server.rate = 300_000
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    began = time.monotonic()
    with pytest.raises(Cancelled):
        hub.download("acme/tiny", should_stop=stop.is_set)
    assert time.monotonic() - began < 2.0


# -- the command line ------------------------------------------------------------------------------

def test_models_download_command_checks_fit_first_then_downloads(server, tiny_files, capsys):
    from studio import cli

    server.add(HubRepo("acme/tiny", tiny_files))
    assert cli.run(["models", "download", "acme/tiny"]) == 0
    out, err = capsys.readouterr()
    assert "downloaded acme/tiny" in out and "--model acme/tiny" in out
    assert "LlamaForCausalLM" in err and "a training step needs about" in err and "free" in err
    assert hub.local_snapshot("acme/tiny") is not None
    server.add(HubRepo("acme/gated", tiny_files, gated=True))
    assert cli.run(["models", "download", "acme/gated"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --model acme/gated: acme/gated is a gated model") and err.count("\n") == 1


def test_model_option_downloads_a_repo_id_that_is_not_cached(server, tiny_files, capsys, monkeypatch):
    from studio import cli

    server.add(HubRepo("acme/tiny", tiny_files))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.run(["targets", "--model", "acme/tiny", "--json"]) == 1
    err = capsys.readouterr().err
    assert "offline" in err and err.count("\n") == 1
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert cli.run(["targets", "--model", "acme/tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)
    assert hub.local_snapshot("acme/tiny") is not None
    gets = len([r for r in server.log if r.method == "GET"])
    assert cli.run(["targets", "--model", "acme/tiny", "--json"]) == 0  # cached now: no request at all
    assert len([r for r in server.log if r.method == "GET"]) == gets


# -- datasets on the Hub ---------------------------------------------------------------------------

def _parquet(rows: list[dict]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def _studio(args: list[str], env: dict, tmp_path: Path):
    """``python -m studio ARGS`` in a fresh process: datasets reads HF_ENDPOINT once, at import."""
    import os
    import subprocess
    import sys

    full = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    full.update(env)
    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-m", "studio", *args], env=full, cwd=root, capture_output=True,
                          text=True, timeout=300)


def test_data_takes_a_hub_dataset_with_split_and_config_and_reads_it_offline_from_the_cache(
        server, tmp_path, checkpoint):
    import os

    rows = [{"instruction": f"Add {i} and {i}.", "output": str(2 * i)} for i in range(30)]
    server.add(HubRepo("acme/sums", {"README.md": b"# sums\n",
                                     "data/train-00000-of-00001.parquet": _parquet(rows),
                                     "data/test-00000-of-00001.parquet": _parquet(rows[:7])},
                       repo_type="dataset"))
    env = {"HF_ENDPOINT": server.url, "HF_HOME": os.environ["HF_HOME"],
           "LORA_STUDIO_HOME": os.environ["LORA_STUDIO_HOME"]}
    r = _studio(["data", "acme/sums", "--data-split", "test", "--model", str(checkpoint), "--json"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["rows"] == 7 and report["format"] == "instruction"
    assert any("acme/sums" in n for n in report["notes"])
    assert (Path(os.environ["HF_HOME"]) / "datasets").is_dir()  # datasets' own cache, shared with other tools

    r = _studio(["data", "acme/sums", "--data-split", "validation", "--model", str(checkpoint)], env, tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("error: --data-split validation:") and r.stderr.count("\n") == 1
    r = _studio(["data", "acme/nothing", "--model", str(checkpoint)], env, tmp_path)
    assert r.returncode == 1 and "no dataset acme/nothing" in r.stderr and r.stderr.count("\n") == 1

    server.stop()  # no network from here: what is cached still works
    r = _studio(["data", "acme/sums", "--data-split", "test", "--model", str(checkpoint), "--json"],
                dict(env, HF_HUB_OFFLINE="1"), tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rows"] == 7


def test_data_split_on_a_local_file_is_refused(checkpoint, tmp_path):
    from core import data

    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "hello"}\n')
    with pytest.raises(StudioError, match="--data-split: only for a dataset on the Hub"):
        data.read(f, split="test")


# -- the window ------------------------------------------------------------------------------------

def _panel(qtbot):
    from studio.state import StudioState
    from studio.widgets.hub_panel import HubPanel

    state = StudioState()
    settings = dict(batch_size=1, seq_len=256, rank=8, targets="all-linear", precision="fp32")
    panel = HubPanel(state, lambda: (settings, "cpu"))
    qtbot.addWidget(panel)
    return panel


def test_panel_checks_fit_then_downloads_with_progress(server, tiny_files, qtbot):
    server.add(HubRepo("acme/tiny", tiny_files))
    panel = _panel(qtbot)
    ids = [panel.repo.itemText(i) for i in range(panel.repo.count())]
    assert "Qwen/Qwen2.5-0.5B-Instruct" in ids and "— 7-9B —" in ids  # the curated list, by size class
    panel.repo.setEditText("acme/tiny")
    panel.check()
    qtbot.waitUntil(lambda: panel.worker is None and panel.report is not None, timeout=30000)
    assert "LlamaForCausalLM" in panel.info.text() and "It fits" in panel.info.text()
    assert not any(r.path.endswith(".safetensors") for r in server.log)
    seen = []
    with qtbot.waitSignal(panel.downloaded, timeout=30000) as got:
        panel.download()
        panel.worker.progress.connect(seen.append)
    assert got.args == ["acme/tiny"] and seen and seen[-1].done == seen[-1].total
    assert "Downloaded acme/tiny" in panel.status.text()
    assert hub.local_snapshot("acme/tiny") is not None


def test_panel_cancel_keeps_the_partial_file_and_says_a_model_does_not_fit(server, tiny_files, qtbot):
    server.add(HubRepo("acme/tiny", tiny_files))
    server.rate = 300_000
    panel = _panel(qtbot)
    panel.repo.setEditText("acme/tiny")
    panel.download()
    qtbot.waitUntil(lambda: "model.safetensors" in panel.status.text(), timeout=20000)
    began = time.monotonic()
    with qtbot.waitSignal(panel.worker.cancelled, timeout=3000):
        panel.cancel()
    assert time.monotonic() - began < 1.0
    qtbot.waitUntil(lambda: panel.worker is None, timeout=3000)
    assert "What arrived is kept" in panel.status.text()
    assert list((hub.repo_folder("acme/tiny") / "blobs").glob("*.incomplete"))
    huge = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16384,
            "intermediate_size": 53248, "num_hidden_layers": 126, "num_attention_heads": 128,
            "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072}
    server.add(HubRepo("acme/huge", {"config.json": json.dumps(huge).encode(), "model.safetensors": b"w" * 64}))
    panel.repo.setEditText("acme/huge")
    panel.check()
    qtbot.waitUntil(lambda: panel.worker is None and panel.report is not None, timeout=60000)
    assert "acme/huge does not fit" in panel.info.text() and "C0392B" in panel.info.text()
