"""Merged export: the folder loads with transformers alone and computes base + adapter unmerged;
a corrupted export is caught and leaves nothing behind. Tiny checkpoints only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import tiny_checkpoint
from core import export
from core.errors import StudioError

import peft
import core.adapter as adapter_io

PROMPT = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 1]])


def base_of(ckpt: Path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()


def peft_adapter(folder: Path, ckpt: Path, *, targets=("q_proj", "v_proj", "down_proj"), r=4, alpha=8, seed=1,
                 **extra) -> Path:
    torch.manual_seed(seed)
    pm = peft.get_peft_model(base_of(ckpt), peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, **extra))
    pm.save_pretrained(folder)
    return folder


@torch.no_grad()
def logits(model, ids=PROMPT):
    return model(input_ids=ids).logits.float()


@pytest.fixture
def ckpt(tmp_path):
    return tiny_checkpoint(tmp_path / "base")


def test_merged_export_equals_base_plus_adapter_unmerged(ckpt, tmp_path):
    adapter = peft_adapter(tmp_path / "adapter", ckpt)
    out = tmp_path / "merged"
    report = export.export_merged(str(ckpt), [adapter], out=out)
    names = set(report["files"])
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert report["dtype"] == "fp32" and report["size_bytes"] == sum(report["files"].values())
    v = report["verify"]
    assert v["export"]["relative"] <= 1e-4 and v["merge"]["relative"] <= 1e-4 and v["adapter_effect"] > 1e-3
    assert report["seconds"]["total"] > 0
    # the oracle: PEFT running the same adapter unmerged on the original checkpoint
    want = logits(peft.PeftModel.from_pretrained(base_of(ckpt), str(adapter)).eval())
    plain = AutoModelForCausalLM.from_pretrained(out)  # transformers alone
    assert not any("lora" in k for k in plain.state_dict())
    got = logits(plain)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert not torch.allclose(logits(base_of(ckpt)), want, atol=1e-3)  # the adapter does change something
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_weighted_sum_of_two_adapters_is_exact(ckpt, tmp_path):
    a = peft_adapter(tmp_path / "a", ckpt, seed=1)
    b = peft_adapter(tmp_path / "b", ckpt, targets=("q_proj", "o_proj"), r=2, alpha=4, seed=2, use_rslora=True)
    out = tmp_path / "merged"
    export.export_merged(str(ckpt), [a, b], [0.5, -1.0], out=out)
    merged = load_file(str(out / "model.safetensors"))
    base = load_file(str(ckpt / "model.safetensors"))
    expected = {k: v.clone() for k, v in base.items()}
    for folder, w in ((a, 0.5), (b, -1.0)):
        ad = adapter_io.read_adapter(folder)
        for module in ad.targets:
            expected[f"{module}.weight"] += w * ad.delta(module)
    for k in expected:
        assert torch.allclose(merged[k], expected[k], atol=1e-6), k


def test_bf16_checkpoint_is_merged_in_fp32_and_saved_in_bf16(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "base")
    model = base_of(ckpt).to(torch.bfloat16)
    model.save_pretrained(ckpt)
    adapter = peft_adapter(tmp_path / "adapter", ckpt)
    report = export.export_merged(str(ckpt), [adapter], out=tmp_path / "bf16")
    assert report["dtype"] == "bf16"
    assert {t.dtype for t in load_file(str(tmp_path / "bf16" / "model.safetensors")).values()} == {torch.bfloat16}
    v = report["verify"]
    assert v["file"]["relative"] <= 1e-5 and v["export"]["relative"] <= export.TOLERANCE[torch.bfloat16]
    # what was saved is round_bf16(W0 + ΔW) with the sum done in fp32, not W0 + ΔW summed in bf16
    ad = adapter_io.read_adapter(adapter)
    module = ad.targets[0]
    w0 = load_file(str(ckpt / "model.safetensors"))[f"{module}.weight"].float()
    saved = load_file(str(tmp_path / "bf16" / "model.safetensors"))[f"{module}.weight"]
    assert torch.equal(saved, (w0 + ad.delta(module)).to(torch.bfloat16))
    report = export.export_merged(str(ckpt), [adapter], out=tmp_path / "fp32", dtype="fp32")
    assert report["dtype"] == "fp32"
    assert {t.dtype for t in load_file(str(tmp_path / "fp32" / "model.safetensors")).values()} == {torch.float32}


def test_a_model_loaded_in_bf16_is_merged_from_its_full_precision_checkpoint(ckpt, tmp_path):
    from core import models

    loaded = models.load_model(str(ckpt), device="cpu", precision="bf16")  # as the window may hold it
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    adapter = peft_adapter(tmp_path / "adapter", ckpt)
    report = export.export_merged(loaded, [adapter], out=tmp_path / "merged")
    assert report["dtype"] == "fp32"  # the checkpoint's dtype, not the loaded copy's
    want = logits(peft.PeftModel.from_pretrained(base_of(ckpt), str(adapter)).eval())
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")), want, atol=1e-5, rtol=0)
    after = loaded.model.state_dict()  # the window's model is left exactly as it was
    assert all(torch.equal(before[k], after[k]) for k in before) and after[next(iter(after))].dtype == torch.bfloat16


def test_gpt2_conv1d_export(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "gpt2", arch="gpt2")
    adapter = peft_adapter(tmp_path / "adapter", ckpt, targets=("c_attn", "c_proj"), fan_in_fan_out=True)
    out = tmp_path / "merged"
    export.export_merged(str(ckpt), [adapter], out=out)
    want = logits(peft.PeftModel.from_pretrained(base_of(ckpt), str(adapter)).eval())
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(out)), want, atol=1e-5, rtol=0)


def test_a_corrupted_export_is_caught_and_nothing_is_left(ckpt, tmp_path, monkeypatch):
    adapter = peft_adapter(tmp_path / "adapter", ckpt)
    original = export._save_model

    def corrupting_save(model, tokenizer, folder, dtype):
        original(model, tokenizer, folder, dtype)
        path = Path(folder) / "model.safetensors"
        tensors = load_file(str(path))
        key = "model.layers.1.self_attn.q_proj.weight"
        tensors[key] = tensors[key] + 0.05 * torch.randn_like(tensors[key])  # a plausible-looking mistake
        save_file(tensors, str(path), metadata={"format": "pt"})

    monkeypatch.setattr(export, "_save_model", corrupting_save)
    out = tmp_path / "merged"
    with pytest.raises(StudioError, match="verification failed") as info:
        export.export_merged(str(ckpt), [adapter], out=out)
    message = str(info.value)
    assert "max |Δlogit|" in message and "relative" in message and "tolerance" in message
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # with --no-verify the same corruption goes unnoticed: that is what the check is for
    export.export_merged(str(ckpt), [adapter], out=out, verify=False)
    assert out.is_dir()


def test_a_wrong_merge_is_caught_before_anything_is_written(ckpt, tmp_path, monkeypatch):
    from core import lora

    adapter = peft_adapter(tmp_path / "adapter", ckpt)
    real = lora.LoRALinear.delta_weight
    monkeypatch.setattr(lora.LoRALinear, "delta_weight", lambda self, name: 2 * real(self, name))  # scaling twice
    with pytest.raises(StudioError, match="merged weights against base"):
        export.export_merged(str(ckpt), [adapter], out=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_incompatible_and_bad_requests_are_refused(ckpt, tmp_path):
    other = tiny_checkpoint(tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    wide = AutoModelForCausalLM.from_config(type(base_of(other).config)(**{**cfg, "hidden_size": 48}))
    wide.save_pretrained(tmp_path / "wide")
    adapter = peft_adapter(tmp_path / "adapter", tmp_path / "wide")
    out = tmp_path / "merged"
    with pytest.raises(StudioError, match="does not fit") as info:
        export.export_merged(str(ckpt), [adapter], out=out)
    assert "48" in str(info.value) and not out.exists()
    good = peft_adapter(tmp_path / "good", ckpt)
    with pytest.raises(StudioError, match="--weights"):
        export.export_merged(str(ckpt), [good], [1.0, 2.0], out=out)
    with pytest.raises(StudioError, match="--combine"):
        export.export_merged(str(ckpt), [good], combine="magic", out=out)
    with pytest.raises(StudioError, match="--dtype"):
        export.export_merged(str(ckpt), [good], dtype="int4", out=out)
    out.mkdir()
    with pytest.raises(StudioError, match="already exists"):
        export.export_merged(str(ckpt), [good], out=out)


def test_tied_lm_head_adapter_is_refused(tmp_path):
    from conftest import tiny_llama, tiny_tokenizer, TOKENIZER_VOCAB

    ckpt = tmp_path / "tied"
    model = tiny_llama(vocab_size=TOKENIZER_VOCAB, tie_word_embeddings=True)
    model.save_pretrained(ckpt)
    tiny_tokenizer().save_pretrained(ckpt)
    adapter = peft_adapter(tmp_path / "adapter", ckpt, targets=("lm_head",))
    with pytest.raises(StudioError, match="tied"):
        export.export_merged(str(ckpt), [adapter], out=tmp_path / "merged")


def test_svd_combination_when_core_combine_has_it(ckpt, tmp_path):
    import core.combine as combine
    a = peft_adapter(tmp_path / "a", ckpt, seed=1)
    b = peft_adapter(tmp_path / "b", ckpt, seed=2)
    out = tmp_path / "svd"
    report = export.export_merged(str(ckpt), [a, b], [0.5, 0.5], combine="svd", rank=8, out=out)
    assert report["combine"] == "svd" and report["verify"]["export"]["relative"] <= 1e-4
    assert report["verify"]["combination_gap"] < 1e-3  # rank 8 holds two rank-4 adapters exactly
    assert "combine_report" in report and combine is not None


def test_adapter_made_over_the_bare_transformer_is_aligned(ckpt, tmp_path):
    """PEFT over AutoModel names modules ``layers.0...``; the causal LM has ``model.layers.0...``.
    The export moves the names onto the model, exactly as loading the adapter does."""
    a = peft_adapter(tmp_path / "a", ckpt, seed=3)
    bare = tmp_path / "bare"
    bare.mkdir()
    tensors = load_file(a / "adapter_model.safetensors")
    save_file({k.replace("base_model.model.model.", "base_model.model."): v for k, v in tensors.items()},
              bare / "adapter_model.safetensors")
    (bare / "adapter_config.json").write_text((a / "adapter_config.json").read_text())
    ra = export.export_merged(str(ckpt), [a], out=tmp_path / "ma")
    rb = export.export_merged(str(ckpt), [bare], out=tmp_path / "mb")
    assert ra["verify"]["export"]["relative"] <= 1e-4 and rb["verify"]["export"]["relative"] <= 1e-4
    wa, wb = load_file(tmp_path / "ma" / "model.safetensors"), load_file(tmp_path / "mb" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["model.layers.0.self_attn.q_proj.weight"],
                           load_file(ckpt / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"])


def test_task_merges_are_offered_and_verified(ckpt, tmp_path, capsys):
    from core import combine
    from studio.commands.merge import COMBINE_MODES

    assert set(COMBINE_MODES) == set(combine.MODES)  # the parser's list is kept by hand: keep it whole
    a = peft_adapter(tmp_path / "a", ckpt, seed=1)
    b = peft_adapter(tmp_path / "b", ckpt, seed=2)
    out = tmp_path / "ties"
    assert _cli("merge", "--model", str(ckpt), "--adapter", str(a), "--adapter", str(b), "--weights", "1,1",
                "--combine", "ties", "--rank", "8", "--out", str(out), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["combine"] == "ties" and report["verify"]["export"]["relative"] <= 1e-4
    assert report["combine_report"]["mode"] == "ties"


# -- command line ----------------------------------------------------------------------------------

def _cli(*args):
    from studio.cli import run

    return run(list(args))


def test_merge_command(ckpt, tmp_path, capsys):
    from core.library import Library

    adapter = peft_adapter(tmp_path / "adapter", ckpt)
    Library().import_path(adapter, name="In The Library")
    out = tmp_path / "merged"
    assert _cli("merge", "--model", str(ckpt), "--adapter", "In The Library", "--out", str(out), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verify"]["export"]["relative"] <= 1e-4 and (out / "config.json").is_file()
    assert _cli("merge", "--model", str(ckpt), "--adapter", str(adapter), "--adapter", str(adapter),
                "--weights", "0.5", "--out", str(tmp_path / "x")) == 1
    assert "--weights: 1 weight(s) for 2" in capsys.readouterr().err
    assert _cli("merge", "--model", str(ckpt), "--adapter", "nowhere", "--out", str(tmp_path / "x")) == 1
    assert "--adapter nowhere" in capsys.readouterr().err
    assert _cli("merge", "--model", str(ckpt), "--adapter", str(adapter), "--out", str(out)) == 1
    assert "already exists" in capsys.readouterr().err


def test_merge_in_a_real_process(ckpt, tmp_path):
    adapter = peft_adapter(tmp_path / "adapter", ckpt)
    out = tmp_path / "merged"
    r = subprocess.run([sys.executable, "-m", "studio", "merge", "--model", str(ckpt), "--adapter", str(adapter),
                        "--out", str(out), "--dtype", "bf16"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "verified: max |Δlogit|" in r.stdout and "bf16" in r.stdout
    r = subprocess.run([sys.executable, "-m", "studio", "merge", "--model", str(tmp_path / "nope"),
                        "--adapter", str(adapter), "--out", str(tmp_path / "y")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
