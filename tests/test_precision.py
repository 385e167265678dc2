"""bf16 bases with fp32 adapters, through our own autograd functions, against PEFT as the oracle;
and merge/unmerge on a bf16 base that never drifts it.

Tolerances. bf16 keeps 8 significant bits: each rounding moves a value by up to 2^-9 ≈ 2e-3 of
itself. Ours and PEFT round at different places (PEFT computes the LoRA branch in fp32 from a
bf16 input and rounds once when adding it to the bf16 base output; we compute it in bf16 with fp32
accumulation inside the GEMM and round once when accumulating it into the base output), so through
a 2-block model the two differ by a few such roundings. Rather than a bare threshold, each is
compared with the same computation in fp32 (same weights, upcast). Logits: ours must be as close to
it as PEFT is (within 1.5× its error, plus 1e-3). Adapter gradients: averaged over the matrices,
within 1.6× PEFT's error, because ours are products in bf16 (the r-wide Bᵀ·gᵀ and the gradient itself
are rounded to bf16 before the fp32 master copy takes them: two roundings PEFT's fp32 LoRA branch
does not make; measured on hidden sizes 64 and 256: mean 8-9e-3 vs PEFT's 6-7e-3, worst matrix
1.6e-2 vs 1.2e-2). Every result of ours and PEFT's must also agree to 3e-2 relative (about eight
bf16 roundings of the result's scale).
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import tiny_llama, token_batch

from core import lora, targets
from core.errors import StudioError

BF16 = torch.bfloat16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _pair(base, rank=4, alpha=8, seed=3):
    """Ours and PEFT's all-linear adapters over copies of ``base``, with the same A and a random B
    (copied into PEFT's), adapters in fp32 on both sides (PEFT's autocast_adapter_dtype default)."""
    names = targets.resolve_targets(base, "all-linear")
    ours = copy.deepcopy(base)
    torch.manual_seed(seed)
    lora.inject_adapter(ours, names, rank=rank, alpha=alpha)
    leaves = sorted({n.split(".")[-1] for n in names})
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=alpha,
                                                                      target_modules=leaves))
    g = torch.Generator().manual_seed(7)
    mine = lora.lora_parameters(ours)
    peft_params = {k: p for k, p in theirs.named_parameters() if ".lora_" in k}
    assert len(mine) == len(peft_params)
    for (k, p), (k2, q) in zip(mine.items(), peft_params.items(), strict=True):
        assert p.dtype == q.dtype == torch.float32, (k, p.dtype, k2, q.dtype)
        with torch.no_grad():
            if ".lora_B." in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            q.copy_(p)
    return ours, theirs


def _loss_and_grads(model, x, params):
    model.zero_grad(set_to_none=True)
    logits = model(x).logits
    loss = logits.float().log_softmax(-1)[..., 0].mean()
    loss.backward()
    return logits.detach(), [p.grad.detach().clone() for p in params]


def _count_fused(monkeypatch):
    """Count calls of our autograd functions (the textbook path calls neither)."""
    calls = {"n": 0}
    for cls in (lora._LoRAFunction, lora._GroupFunction):
        original = cls.apply

        def counted(*args, _original=original):
            calls["n"] += 1
            return _original(*args)

        monkeypatch.setattr(cls, "apply", counted)
    return calls


def test_bf16_forward_and_gradients_agree_with_peft_through_our_functions(monkeypatch):
    base = tiny_llama(hidden_size=64, intermediate_size=128)
    ours, theirs = _pair(base.to(BF16))
    ours_ref, theirs_ref = copy.deepcopy(ours).float(), None  # the same weights, computed in fp32
    ours.train(), theirs.train(), ours_ref.train()
    x = token_batch(batch=2, length=16)
    calls = _count_fused(monkeypatch)
    logits, grads = _loss_and_grads(ours, x, list(lora.lora_parameters(ours).values()))
    n_layers = len(list(lora.lora_layers(ours)))
    assert 0 < calls["n"] < n_layers, "bf16 must run through our grouped autograd functions"
    monkeypatch.undo()
    p_logits, p_grads = _loss_and_grads(theirs, x, [p for k, p in theirs.named_parameters() if ".lora_" in k])
    r_logits, r_grads = _loss_and_grads(ours_ref, x, list(lora.lora_parameters(ours_ref).values()))
    assert logits.dtype == BF16 and all(g.dtype == torch.float32 for g in grads)
    assert _rel(logits, p_logits) < 3e-2
    assert _rel(logits, r_logits) <= 1.5 * _rel(p_logits, r_logits) + 1e-3
    for g, pg in zip(grads, p_grads, strict=True):
        assert _rel(g, pg) < 3e-2
    ours_err = sum(_rel(g, rg) for g, rg in zip(grads, r_grads, strict=True)) / len(grads)
    peft_err = sum(_rel(pg, rg) for pg, rg in zip(p_grads, r_grads, strict=True)) / len(grads)
    assert ours_err <= 1.6 * peft_err, (ours_err, peft_err)


def test_bf16_thirty_steps_follow_peft_within_two_percent():
    base = tiny_llama(hidden_size=64, intermediate_size=128).to(BF16)
    ours, theirs = _pair(base)
    curves = []
    for model in (ours, theirs):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=3e-3)
        curve = []
        for step in range(30):
            x = token_batch(batch=4, length=16, seed=100 + step % 5)  # five batches, six passes each
            loss = torch.nn.functional.cross_entropy(model(x).logits[:, :-1].float().reshape(-1, 128),
                                                     x[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            curve.append(loss.item())
        curves.append(curve)
    mine, theirs_curve = curves
    assert mine[-1] < mine[0] - 0.05, "the bf16 run must learn"
    worst = max(abs(a - b) / b for a, b in zip(mine, theirs_curve))
    assert worst <= 0.02, f"loss curves differ by {worst:.2%}"


def _bf16_with_two_adapters():
    model = tiny_llama(hidden_size=64, intermediate_size=128).to(BF16)
    names = targets.resolve_targets(model, "all-linear")
    for i, name in enumerate(("one", "two")):
        torch.manual_seed(i)
        lora.inject_adapter(model, names, name, rank=4, alpha=8)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for k, p in lora.lora_parameters(model).items():
            if ".lora_B." in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_a_hundred_merged_swaps_leave_a_bf16_base_bit_identical():
    model = _bf16_with_two_adapters()
    loaded = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    lora.set_active_adapters(model, ["one"])
    lora.merge_adapter(model, "one")
    merged_once = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    current = "one"
    for _ in range(100):
        other = "two" if current == "one" else "one"
        lora.swap_adapter(model, current, other, merged=True)
        current = other
    assert current == "one"
    after = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(after[k], merged_once[k]) for k in after), "a merged adapter must merge the same way"
    lora.unmerge_adapter(model, "one")
    changed = [k for k, v in model.state_dict().items() if ".lora_" not in k and not torch.equal(v, loaded[k])]
    assert changed == [], f"the base drifted in {changed[:3]}"
    assert all(layer._pristine is None for _, layer in lora.lora_layers(model)), "nothing kept once unmerged"


def test_two_merged_adapters_on_bf16_unmerge_in_any_order():
    model = _bf16_with_two_adapters()
    loaded = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    lora.merge_adapter(model, "one")
    lora.merge_adapter(model, "two")
    _, layer = next(iter(lora.lora_layers(model)))
    w0 = loaded[next(k for k in loaded if k.endswith("q_proj.base_layer.weight"))]
    want = (w0.float() + layer.delta_weight("one") + layer.delta_weight("two")).to(BF16)
    assert torch.equal(layer.base_layer.weight, want), "merged weights are rounded once, from W0"
    assert torch.equal(layer.base_weight(), w0)
    lora.unmerge_adapter(model, "one")
    assert torch.equal(layer.base_layer.weight, (w0.float() + layer.delta_weight("two")).to(BF16))
    lora.unmerge_adapter(model, "two")
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items() if ".lora_" not in k)


def test_fp32_merge_keeps_no_copy():
    model = tiny_llama()
    names = targets.resolve_targets(model, "attention-qv")
    lora.inject_adapter(model, names, rank=2)
    lora.merge_adapter(model)
    assert all(layer._pristine is None for _, layer in lora.lora_layers(model))
    assert not any("_pristine" in k for k in model.state_dict())
