"""What the Train page builds on, without a window: the command line of a configuration (parsed back
by the CLI into the same RunConfig), default run names after the model and the dataset, and which
runs can be resumed."""

from __future__ import annotations

import json
import shlex

from core import runs
from core.config import RunConfig
from core.errors import StudioError
from studio import cli
from studio.commands.train import build_config, command_line


def _parsed(argv: list[str]) -> RunConfig:
    assert argv[:2] == ["lora-studio", "train"]
    return build_config(cli._parser().parse_args(argv[1:]))


def test_command_line_of_the_defaults_parses_back_to_them():
    cfg = RunConfig()
    cfg.out = "/tmp/runs/x"
    argv = command_line(cfg)
    assert argv == ["lora-studio", "train", "--model", "default", "--out", "/tmp/runs/x", "--steps", "100"]
    assert _parsed(argv).to_dict() == cfg.to_dict()


def test_command_line_of_every_option_parses_back_to_the_same_config():
    cfg = RunConfig()
    cfg.model.source, cfg.model.device, cfg.model.precision = "/models/my model", "cpu", "bf16"
    cfg.model.quantize, cfg.model.gradient_checkpointing, cfg.model.trust_remote_code = "nf4", True, True
    cfg.lora.targets, cfg.lora.rank, cfg.lora.alpha = ["model.layers.0.self_attn.q_proj", "v_proj"], 16, 8.5
    cfg.lora.dropout, cfg.lora.rslora, cfg.lora.init = 0.05, True, "gaussian"
    cfg.data.path, cfg.data.format, cfg.data.max_length = "/data/it's mine.jsonl", "instruction", 256
    cfg.data.fields = {"instruction": "question", "output": "answer"}
    cfg.data.packing, cfg.data.train_on_prompt, cfg.data.val_split = True, True, 0.15
    cfg.data.split, cfg.data.subset, cfg.data.chat_template = "train[:90%]", "en", "chatml"
    t = cfg.train
    t.steps, t.epochs, t.batch_size, t.grad_accum, t.lr = None, 2.5, 8, 3, 3.3e-4
    t.scheduler, t.warmup, t.weight_decay, t.max_grad_norm = "linear", 7, 0.01, 0.0
    t.eval_every, t.save_every, t.log_every, t.seed = 5, 0, 2, 1234
    cfg.out, cfg.name = "/tmp/runs/a run", "my run"
    argv = command_line(cfg)
    assert "--steps" not in argv and argv[argv.index("--epochs") + 1] == "2.5"
    assert "--no-rslora" not in argv and "--rslora" in argv
    assert _parsed(argv).to_dict() == cfg.to_dict()
    # the shell line splits back into the same arguments (quoting of spaces and quotes)
    assert shlex.split(shlex.join(argv)) == argv

    cfg.lora.targets = ["q_proj"]  # a one-name list stays a list
    cfg.lora.rslora = False
    assert _parsed(command_line(cfg)).to_dict() == cfg.to_dict()
    cfg.lora.targets = "re:.*\\.(q|v)_proj$"
    assert _parsed(command_line(cfg)).to_dict() == cfg.to_dict()


def test_default_run_names_come_from_the_model_and_the_dataset(tmp_path):
    assert runs.default_run_name("default", "") == "smollm2-sample_dataset"
    assert runs.default_run_name("default", "/home/me/data/coffee orders.jsonl") == "smollm2-coffee-orders"
    assert runs.default_run_name("/models/Qwen2.5-0.5B/", "/d/chats.parquet") == "Qwen2.5-0.5B-chats"
    assert runs.default_run_name("/m/tiny.gguf", "org/alpaca") == "tiny-alpaca"
    first = runs.new_run_folder("smollm2-chats", tmp_path)
    assert first == tmp_path / "smollm2-chats" and not first.exists()
    first.mkdir()
    assert runs.new_run_folder("smollm2-chats", tmp_path) == tmp_path / "smollm2-chats-2"


def _run(folder, status, step, total, checkpoint=True):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(RunConfig().to_dict()))
    (folder / "status.json").write_text(json.dumps({"status": status, "step": step, "total_steps": total,
                                                    "pid": 1 << 30, "host": "elsewhere"}))
    if checkpoint:
        cp = folder / "checkpoints" / f"step-{step}"
        cp.mkdir(parents=True)
        (cp / "state.json").write_text("{}")
    return runs.RunFolder(folder).info()


def test_only_runs_that_can_go_on_are_resumable(tmp_path):
    assert runs.resumable(_run(tmp_path / "a", "stopped", 4, 200))
    assert runs.resumable(_run(tmp_path / "b", "interrupted", 4, 200))
    assert not runs.resumable(_run(tmp_path / "c", "finished", 200, 200))
    assert not runs.resumable(_run(tmp_path / "d", "stopped", 0, 200, checkpoint=False))
    assert not runs.resumable(_run(tmp_path / "e", "stopped", 200, 200))


# -- the command line's run goes into the library, as the window's does ------------------------------

def _train(tmp_path, *extra) -> int:
    from conftest import sum_assets

    assets = tmp_path / "assets"
    if not assets.is_dir():
        assets.mkdir()
        sum_assets(assets, 8)
    return cli.run(["train", "--model", str(assets / "ck"), "--data", str(assets / "data.jsonl"), "--device", "cpu",
                    "--max-length", "32", "--rank", "2", "--steps", "2", "--batch-size", "2", "--save-every", "0",
                    "--no-progress", *extra])


def test_train_puts_the_adapter_in_the_library_the_window_shows(tmp_path, capsys, qtbot, one_torch_thread):
    from core.library import Library
    from studio.pages.library import COLUMN, LibraryPage
    from studio.state import StudioState

    assert _train(tmp_path, "--out", str(tmp_path / "kept"), "--name", "kept run") == 0
    assert "added to the library as 'kept run'" in capsys.readouterr().err
    assert _train(tmp_path, "--out", str(tmp_path / "left out"), "--no-library") == 0
    assert "to the library" not in capsys.readouterr().err
    (entry,) = Library().entries()
    assert entry.name == "kept run" and entry.imported_from == str((tmp_path / "kept").resolve())
    assert (entry.path / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "kept" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert cli.run(["library", "list", "--json"]) == 0
    assert [e["name"] for e in json.loads(capsys.readouterr().out)] == ["kept run"]
    page = LibraryPage(StudioState())
    qtbot.addWidget(page)
    try:
        assert [page.proxy.index(r, COLUMN["name"]).data() for r in range(page.proxy.rowCount())] == ["kept run"]
    finally:
        page.shutdown()
        for w in (page.job, page.check_worker, page.analysis_worker):
            if w is not None:
                w.wait(20_000)


def test_a_library_that_refuses_the_adapter_costs_one_line_and_the_run_stays(tmp_path, capsys, monkeypatch,
                                                                             one_torch_thread):
    from core.library import Library

    def refuse(self, run_dir, **kw):
        raise StudioError(f"{run_dir}: disk full\nsecond line")

    monkeypatch.setattr(Library, "adopt_run", refuse)
    assert _train(tmp_path, "--out", str(tmp_path / "run")) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "to the library" in line]
    assert len(err) == 1 and "disk full" in err[0] and "second line" not in err[0]
    assert f"lora-studio library import {tmp_path / 'run'}" in err[0]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


# -- trust_remote_code comes from the command line, never from a file ---------------------------------

def test_a_config_file_never_turns_on_remote_code(tmp_path, capsys):
    cfg = RunConfig()
    cfg.model.source, cfg.model.trust_remote_code, cfg.out = "/models/custom", True, str(tmp_path / "one")
    (tmp_path / "one").mkdir()
    cfg.save(tmp_path / "one" / "config.json")
    parse = cli._parser().parse_args
    again = build_config(parse(["train", "--config", str(tmp_path / "one" / "config.json")]))
    assert again.model.source == "/models/custom" and again.model.trust_remote_code is False
    assert "stays off unless --trust-remote-code is given" in capsys.readouterr().err
    resumed = build_config(parse(["train", "--resume", "--out", str(tmp_path / "one")]))
    assert resumed.model.trust_remote_code is False
    asked = build_config(parse(["train", "--config", str(tmp_path / "one" / "config.json"), "--trust-remote-code"]))
    assert asked.model.trust_remote_code is True
    assert capsys.readouterr().err.count("stays off") == 1  # the resume said it; the explicit flag did not
    plain = build_config(parse(["train", "--model", "/models/custom"]))
    assert plain.model.trust_remote_code is False


def test_train_config_of_a_remote_code_model_is_refused_until_the_flag_is_given(tmp_path, capsys):
    """End to end: a run folder whose config.json turned remote code on, repeated with --config, reaches
    the model's auto_map and is refused there (exit 1, one line), because the file alone turned nothing on."""
    from conftest import sum_assets

    ck, data = sum_assets(tmp_path, 4)
    raw = json.loads((ck / "config.json").read_text())
    raw.update(model_type="my-custom-llama", auto_map={"AutoConfig": "modeling_custom.CustomConfig"})
    (ck / "config.json").write_text(json.dumps(raw))
    cfg = RunConfig()
    cfg.model.source, cfg.model.device, cfg.model.trust_remote_code = str(ck), "cpu", True
    cfg.data.path, cfg.train.steps = str(data), 1
    cfg.save(tmp_path / "config.json")
    assert cli.run(["train", "--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "run"),
                    "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "needs its own Python code" in err and "Traceback" not in err
