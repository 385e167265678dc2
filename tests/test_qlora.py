"""LoRA over a bitsandbytes 4-bit (nf4) or 8-bit base (QLoRA), against PEFT over the same base.

The base layers are bitsandbytes' own on both sides, so the base outputs and their input gradients
are identical; the LoRA branch differs only in where it rounds (ours: products in the compute
dtype, bf16; PEFT: in fp32, rounded once when added), so the comparison tolerance is bf16's, as in
tests/test_precision.py: 3e-2 relative on logits and on every adapter gradient (about eight
roundings of 2^-9 of the result's scale; measured below 1.5e-2).
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import tiny_llama, token_batch

from core import adapter, lora, quant, targets
from core.errors import StudioError

BF16 = torch.bfloat16


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _quantized(method: str):
    model = tiny_llama(hidden_size=128, intermediate_size=256).to(BF16)
    replaced = quant.quantize_model(model, method, BF16)
    assert replaced and all(lora.is_quantized(model.get_submodule(n)) for n in replaced)
    return model


def _pair(base, rank=4, alpha=8):
    names = targets.resolve_targets(base, "all-linear")
    ours = copy.deepcopy(base)
    torch.manual_seed(0)
    lora.inject_adapter(ours, names, rank=rank, alpha=alpha)
    leaves = sorted({n.split(".")[-1] for n in names})
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=leaves))
    peft_params = {k: p for k, p in theirs.named_parameters() if ".lora_" in k}
    g = torch.Generator().manual_seed(7)
    for (k, p), q in zip(lora.lora_parameters(ours).items(), peft_params.values(), strict=True):
        with torch.no_grad():
            if ".lora_B." in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            q.copy_(p)
    return ours, theirs, list(peft_params.values())


def _run(model, x, params):
    model.zero_grad(set_to_none=True)
    logits = model(x).logits
    logits.float().log_softmax(-1)[..., 0].mean().backward()
    return logits.detach().float(), [p.grad.detach().clone() for p in params]


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_logits_and_gradients_equal_peft_over_the_same_quantised_base(method, monkeypatch):
    ours, theirs, peft_params = _pair(_quantized(method))
    ours.train(), theirs.train()
    calls = {"n": 0}
    original = lora._LoRAAddFunction.apply

    def counted(*args):
        calls["n"] += 1
        return original(*args)

    monkeypatch.setattr(lora._LoRAAddFunction, "apply", counted)
    x = token_batch(batch=2, length=16)
    logits, grads = _run(ours, x, list(lora.lora_parameters(ours).values()))
    assert calls["n"] == len(list(lora.lora_layers(ours))), "every quantised layer runs our LoRA function"
    monkeypatch.undo()
    p_logits, p_grads = _run(theirs, x, peft_params)
    assert _rel(logits, p_logits) < 3e-2
    for g, pg in zip(grads, p_grads, strict=True):
        assert g.dtype == torch.float32 and torch.isfinite(g).all()
        assert _rel(g, pg) < 3e-2


def test_an_adapter_trained_on_nf4_loads_in_peft_over_that_base(tmp_path):
    base = _quantized("nf4")
    ours = copy.deepcopy(base)
    lora.inject_adapter(ours, targets.resolve_targets(ours, "all-linear"), rank=4, alpha=8)
    ours.train()
    params = list(lora.lora_parameters(ours).values())
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = token_batch(batch=2, length=16)
    for _ in range(3):
        loss = ours(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(p.abs().max() > 0 for k, p in lora.lora_parameters(ours).items() if ".lora_B." in k)
    adapter.save_adapter(ours, tmp_path / "ad", "default", base_model="tiny-nf4")
    ours.eval()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad").eval()
    with torch.no_grad():
        assert _rel(ours(x).logits.float(), theirs(x).logits.float()) < 3e-2


def test_merging_into_a_quantised_layer_is_refused_and_leaves_it_running_unmerged():
    model = _quantized("nf4")
    lora.inject_adapter(model, targets.resolve_targets(model, "attention-qv"), rank=2)
    x = token_batch()
    with torch.no_grad():
        before = model(x).logits
    with pytest.raises(StudioError, match="quantised"):
        lora.merge_adapter(model)
    assert lora.merged_adapters(model) == []
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)


def test_merge_of_an_nf4_run_writes_the_dequantised_base_plus_the_adapter(tmp_path):
    """`merge` of an adapter trained on a 4-bit base: merged into that base de-quantised (what the
    adapter learned against), written in bf16 and verified; the provenance decides by default."""
    from conftest import TOKENIZER_VOCAB, tiny_tokenizer
    from transformers import AutoModelForCausalLM

    from core import export, models

    folder = tmp_path / "tiny64"
    full = tiny_llama(hidden_size=64, intermediate_size=128, vocab_size=TOKENIZER_VOCAB)
    tok = tiny_tokenizer()
    full.config.eos_token_id, full.config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    full.save_pretrained(folder)
    tok.save_pretrained(folder)
    loaded = models.load_model(str(folder), device="cpu", precision="bf16", quantize="nf4")
    qmodel = loaded.model
    lora.inject_adapter(qmodel, targets.resolve_targets(qmodel, "all-linear"), rank=4, alpha=8)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for k, p in lora.lora_parameters(qmodel).items():
            if ".lora_B." in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    adapter.save_adapter(qmodel, tmp_path / "ad", "default", base_model=str(folder))
    assert adapter.read_adapter(tmp_path / "ad").studio["base_model"]["quantization"] == "nf4"

    report = export.export_merged(str(folder), [tmp_path / "ad"], out=tmp_path / "merged", dtype="bf16")
    assert report["base_quantization"] == "nf4"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    x = token_batch(vocab=TOKENIZER_VOCAB, batch=2, length=16)
    with torch.no_grad():
        trained_on = qmodel.eval()(x).logits.float()
        got = merged(x).logits
    assert _rel(got, trained_on) < 3e-2, "the merged model computes what the QLoRA model computed"
    plain = export.export_merged(str(folder), [tmp_path / "ad"], out=tmp_path / "plain", dtype="bf16",
                                 quantize="none")
    assert plain["base_quantization"] == "none"
    on_full = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32).eval()
    with torch.no_grad():
        assert _rel(on_full(x).logits, trained_on) > 2 * _rel(got, trained_on)
