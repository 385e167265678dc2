"""What the Train page builds on, without a window: the command line of a configuration (parsed back
by the CLI into the same RunConfig), default run names after the model and the dataset, and which
runs can be resumed."""

from __future__ import annotations

import json
import shlex

from core import runs
from core.config import RunConfig
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
