"""The CUDA paths, on a CUDA device: bf16 bases through our own autograd functions, bf16 autocast over
an fp32 base, fp16 with a loss scaler, the trainer end to end, and bitsandbytes 4-bit/8-bit layers on
the GPU, each against PEFT as the oracle where there is one.

Every test is marked ``gpu``: tests/conftest.py skips them where ``torch.cuda.is_available()`` is
False (CI, the development machines), and nowhere else, so on a GPU machine a missing piece
(bitsandbytes, a kernel) fails instead of hiding. ``benchmarks/gpu_check.py`` runs them there.

Tolerances are bf16's, as in tests/test_precision.py and tests/test_qlora.py (which check the same
comparisons on the CPU): bf16 keeps 8 significant bits, each rounding moves a value by up to
2^-9 ≈ 2e-3 of itself, and ours and PEFT's round in different places of the LoRA branch (ours: the
products in bf16 with fp32 accumulation; PEFT: the branch in fp32, rounded once when added), so the
two agree to 3e-2 relative (about eight roundings of the result's scale) on the logits and on every
adapter gradient. Against the same model computed in fp32, ours must be as close as that too: the
check that both are not wrong the same way. cuBLAS may reduce bf16 products in reduced precision
(torch's default), which stays well inside these bounds at these sizes.
"""

from __future__ import annotations

import copy
import json
import math

import peft
import pytest
import torch
from conftest import tiny_checkpoint, tiny_llama, token_batch

from core import adapter, lora, quant, targets
from core.config import RunConfig
from core.loss import loss_sum
from core.train import Trainer, make_adamw

pytestmark = pytest.mark.gpu

BF16, FP16 = torch.bfloat16, torch.float16
CUDA = "cuda"
TOL = 3e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _same_adapters(ours, theirs, seed: int = 7) -> list[torch.Tensor]:
    """Give PEFT's model our A and a common random B (ours too), module by module in model order;
    returns PEFT's LoRA parameters in that order. Both sides keep their adapters in fp32 (ours
    always, PEFT by its autocast_adapter_dtype default)."""
    mine = lora.lora_parameters(ours)
    peft_params = {k: p for k, p in theirs.named_parameters() if ".lora_" in k}
    assert len(mine) == len(peft_params)
    g = torch.Generator().manual_seed(seed)
    for (k, p), q in zip(mine.items(), peft_params.values(), strict=True):
        assert p.dtype == q.dtype == torch.float32
        with torch.no_grad():
            if ".lora_B." in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            q.copy_(p)
    return list(peft_params.values())


def _pair(base, rank=4, alpha=8):
    """Ours and PEFT's all-linear adapters over two copies of ``base`` (same A, same random B)."""
    names = targets.resolve_targets(base, "all-linear")
    ours = copy.deepcopy(base)
    torch.manual_seed(3)
    lora.inject_adapter(ours, names, rank=rank, alpha=alpha)
    leaves = sorted({n.split(".")[-1] for n in names})
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=alpha,
                                                                      target_modules=leaves))
    return ours, theirs, _same_adapters(ours, theirs)


def _loss_and_grads(model, x, params, autocast: torch.dtype | None = None):
    model.zero_grad(set_to_none=True)
    with torch.autocast(CUDA, dtype=autocast, enabled=autocast is not None):
        logits = model(x).logits
    logits.float().log_softmax(-1)[..., 0].mean().backward()
    return logits.detach().float(), [p.grad.detach().clone() for p in params]


def _count_calls(monkeypatch, *classes) -> dict:
    """Count calls of our autograd functions (the textbook path calls none of them)."""
    calls = {"n": 0}
    for cls in classes:
        original = cls.apply

        def counted(*args, _original=original):
            calls["n"] += 1
            return _original(*args)

        monkeypatch.setattr(cls, "apply", counted)
    return calls


def _assert_agree(logits, grads, p_logits, p_grads, r_logits=None):
    assert _rel(logits, p_logits) < TOL
    if r_logits is not None:
        assert _rel(logits, r_logits) < TOL
    for g, pg in zip(grads, p_grads, strict=True):
        assert g.dtype == torch.float32 and g.is_cuda and torch.isfinite(g).all()
        assert _rel(g, pg) < TOL


def test_parameters_gradients_and_outputs_are_really_on_cuda():
    model = tiny_llama().to(CUDA, BF16)
    lora.inject_adapter(model, targets.resolve_targets(model, "all-linear"), rank=4, alpha=8)
    model.train()
    assert torch.cuda.memory_allocated() > 0
    assert all(p.device.type == CUDA for p in model.parameters())
    params = lora.lora_parameters(model)
    assert params and all(p.is_cuda and p.dtype == torch.float32 and p.requires_grad for p in params.values())
    x = token_batch().to(CUDA)
    out = model(x).logits
    assert out.is_cuda and out.dtype == BF16
    out.float().mean().backward()
    assert all(p.grad is not None and p.grad.is_cuda for p in params.values())


def test_bf16_on_cuda_agrees_with_peft_through_our_functions(monkeypatch):
    base = tiny_llama(hidden_size=64, intermediate_size=128).to(CUDA, BF16)
    ours, theirs, peft_params = _pair(base)
    ref = copy.deepcopy(ours).float()  # the same weights, computed in fp32
    for m in (ours, theirs, ref):
        m.train()
    x = token_batch(batch=2, length=16).to(CUDA)
    calls = _count_calls(monkeypatch, lora._LoRAFunction, lora._GroupFunction)
    logits, grads = _loss_and_grads(ours, x, list(lora.lora_parameters(ours).values()))
    assert calls["n"] > 0, "bf16 on CUDA must run through our autograd functions"
    monkeypatch.undo()
    p_logits, p_grads = _loss_and_grads(theirs, x, peft_params)
    r_logits, _ = _loss_and_grads(ref, x, list(lora.lora_parameters(ref).values()))
    _assert_agree(logits, grads, p_logits, p_grads, r_logits)


def test_bf16_autocast_over_an_fp32_base_agrees_with_peft():
    """The trainer no longer autocasts, but a caller may: an fp32 model on CUDA under bf16 autocast
    must give PEFT's results (our layer declines its fused path there and lets autocast cast)."""
    base = tiny_llama(hidden_size=64, intermediate_size=128).to(CUDA)
    ours, theirs, peft_params = _pair(base)
    ours.train(), theirs.train()
    x = token_batch(batch=2, length=16).to(CUDA)
    logits, grads = _loss_and_grads(ours, x, list(lora.lora_parameters(ours).values()), autocast=BF16)
    p_logits, p_grads = _loss_and_grads(theirs, x, peft_params, autocast=BF16)
    _assert_agree(logits, grads, p_logits, p_grads)


def test_fp16_with_a_grad_scaler_trains_three_finite_steps():
    model = tiny_llama(hidden_size=64, intermediate_size=128).to(CUDA, FP16)
    torch.manual_seed(0)
    lora.inject_adapter(model, targets.resolve_targets(model, "all-linear"), rank=4, alpha=8)
    model.train()
    params = lora.lora_parameters(model)
    opt = make_adamw(list(params.values()), lr=1e-2)
    scaler = torch.amp.GradScaler(CUDA)
    x = token_batch(batch=4, length=16).to(CUDA)
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
    tokens = x.shape[0] * (x.shape[1] - 1)
    losses = []
    for _ in range(3):  # as the trainer does it for fp16
        loss = loss_sum(model, batch) / tokens
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    assert all(math.isfinite(v) for v in losses), losses
    assert math.isfinite(scaler.get_scale()) and scaler.get_scale() > 0
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params.values())
    assert any(p.abs().max() > 0 for k, p in params.items() if ".lora_B." in k), "no step was taken"
    assert losses[-1] < losses[0]


def test_trainer_on_cuda_in_bf16_finishes_and_its_adapter_loads_back(tmp_path):
    ck = tiny_checkpoint(tmp_path / "ck")
    rows = [{"instruction": f"Add {i} and {i + 1}.", "output": f"The sum is {2 * i + 1}."} for i in range(24)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RunConfig(out=str(tmp_path / "run"))
    cfg.model.source, cfg.model.device, cfg.model.precision = str(ck), CUDA, "bf16"
    cfg.data.path, cfg.data.max_length = str(data), 64
    cfg.lora.rank, cfg.lora.targets = 4, "all-linear"
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr, cfg.train.save_every = 6, 4, 5e-3, 0
    result = Trainer(cfg).run()
    assert result.status == "finished" and result.step == 6
    assert result.final_loss is not None and math.isfinite(result.final_loss)
    studio = json.loads((result.adapter / "studio.json").read_text())
    assert studio["training"]["device"].startswith(CUDA) and studio["training"]["dtype"] == "bfloat16"

    from core import models

    lm = models.load_model(str(ck), device=CUDA, precision="bf16")
    x = token_batch(vocab=200).to(CUDA)
    with torch.no_grad():
        base_logits = lm.model(x).logits.float()
    files = adapter.load_adapter(lm.model, result.adapter)  # its tensors named as in lm.model
    for q, layer in lora.lora_layers(lm.model):
        a, b = files.tensors[q]
        assert layer.lora_A["default"].is_cuda
        assert torch.equal(layer.lora_A["default"].cpu(), a.float())
        assert torch.equal(layer.lora_B["default"].cpu(), b.float())
    assert files.targets
    with torch.no_grad():
        tuned = lm.model(x).logits.float()
    assert torch.isfinite(tuned).all() and not torch.equal(tuned, base_logits), "the adapter changes nothing"


def _quantised_pair(method: str, rank=4, alpha=8):
    """Two copies of one bf16 tiny model on CUDA, each quantised by core.quant (bitsandbytes'
    kernels: deterministic, so the two bases hold the same bytes, checked), ours over one, PEFT's
    over the other, with the same A and B."""
    base = tiny_llama(hidden_size=128, intermediate_size=256).to(CUDA, BF16)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    replaced = quant.quantize_model(ours, method, BF16)
    assert quant.quantize_model(theirs, method, BF16) == replaced and replaced
    for name in replaced:
        w, w2 = ours.get_submodule(name).weight, theirs.get_submodule(name).weight
        assert w.is_cuda and torch.equal(w.data, w2.data), name
    names = targets.resolve_targets(ours, "all-linear")
    torch.manual_seed(0)
    lora.inject_adapter(ours, names, rank=rank, alpha=alpha)
    leaves = sorted({n.split(".")[-1] for n in names})
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=leaves))
    return ours, theirs, _same_adapters(ours, theirs)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_bitsandbytes_on_cuda_through_our_lora_agrees_with_peft(method, monkeypatch):
    ours, theirs, peft_params = _quantised_pair(method)
    ours.train(), theirs.train()
    x = token_batch(batch=2, length=16).to(CUDA)
    calls = _count_calls(monkeypatch, lora._LoRAAddFunction)
    logits, grads = _loss_and_grads(ours, x, list(lora.lora_parameters(ours).values()))
    assert calls["n"] == len(list(lora.lora_layers(ours))), "every quantised layer runs our LoRA function"
    monkeypatch.undo()
    p_logits, p_grads = _loss_and_grads(theirs, x, peft_params)
    _assert_agree(logits, grads, p_logits, p_grads)
