"""Run configuration: JSON round trip, unknown keys refused, every problem collected at once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from core.config import RunConfig
from core.errors import ConfigError, StudioError


def test_round_trip(tmp_path):
    cfg = RunConfig()
    cfg.lora.rank = 16
    cfg.data.fields = {"instruction": "q"}
    cfg.save(tmp_path / "config.json")
    again = RunConfig.load(tmp_path / "config.json")
    assert again == cfg
    assert again.lora.scaling == 1.0


def test_validate_collects_every_problem():
    cfg = RunConfig()
    cfg.lora.rank = 0
    cfg.train.lr = -1
    cfg.train.scheduler = "step"
    cfg.train.epochs = 2  # with steps also set
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    text = str(e.value)
    for option in ("--rank", "--lr", "--scheduler", "--steps/--epochs"):
        assert option in text
    assert len(e.value.problems) == 4


def test_unknown_keys_and_bad_json_are_named(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"lora": {"rnak": 4}}))
    with pytest.raises(ConfigError, match="lora.rnak"):
        RunConfig.load(bad)
    bad.write_text('{\n  "lora": ,\n}')
    with pytest.raises(StudioError, match=r"c.json: line 2"):
        RunConfig.load(bad)


def test_core_never_imports_qt():
    code = ("import sys, core.config, core.lora, core.targets, core.atomic, core.home;"
            "assert not any(m.startswith(('PySide6', 'studio')) for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
