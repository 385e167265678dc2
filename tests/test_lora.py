"""LoRALinear and injection against PEFT as the oracle, on tiny Llama- and GPT-2-style models."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, token_batch

from core import lora, targets
from core.errors import StudioError

import peft


def _models():
    return {
        "llama": tiny_llama(),
        # no dropout inside GPT-2 itself, so train-mode outputs are deterministic
        "gpt2": tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    }


def _pair(base, rank=4, alpha=8, rslora=False, seed=3):
    names = targets.resolve_targets(base, "all-linear")
    ours = copy.deepcopy(base)
    torch.manual_seed(seed)
    lora.inject_adapter(ours, names, rank=rank, alpha=alpha, rslora=rslora)
    leaves = sorted({n.split(".")[-1] for n in names})
    transposed = any(layer.transposed for _, layer in lora.lora_layers(ours))
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=leaves, fan_in_fan_out=transposed))
    return ours, theirs, names


def _ours(model, which):
    return [p for k, p in lora.lora_parameters(model).items() if f".{which}." in k]


def _peft(model, which):
    return [p for k, p in model.named_parameters() if f".{which}." in k]


def _randomise_b(ours, theirs):
    g = torch.Generator().manual_seed(7)
    for p, q in zip(_ours(ours, "lora_B"), _peft(theirs, "lora_B")):
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            q.copy_(p)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_step_zero_is_the_base_model_bit_for_bit(arch):
    base = _models()[arch]
    x = token_batch()
    ref = base(x).logits
    ours, _, _ = _pair(base)
    assert torch.equal(ours(x).logits, ref)
    ours.train()
    assert torch.equal(ours(x).logits, ref)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_init_and_parameter_count_equal_peft(arch):
    base = _models()[arch]
    ours, theirs, names = _pair(base)
    for a, b in zip(_ours(ours, "lora_A"), _peft(theirs, "lora_A"), strict=True):
        assert torch.equal(a, b)
    trainable, _total = theirs.get_nb_trainable_parameters()
    assert targets.budget(base, names, 4).trainable == trainable
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == trainable


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("rslora", [False, True])
def test_logits_and_gradients_equal_peft(arch, rslora):
    base = _models()[arch]
    ours, theirs, _ = _pair(base, rslora=rslora)
    _randomise_b(ours, theirs)
    ours.train(), theirs.train()
    x = token_batch()
    lo, lp = ours(x).logits, theirs(x).logits
    torch.testing.assert_close(lo, lp, atol=1e-5, rtol=1e-5)
    lo.square().mean().backward()
    lp.square().mean().backward()
    for which in ("lora_A", "lora_B"):
        for a, b in zip(_ours(ours, which), _peft(theirs, which), strict=True):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_unmerge_and_merge_and_unload_agree(arch):
    base = _models()[arch]
    ours, theirs, names = _pair(base)
    _randomise_b(ours, theirs)
    x = token_batch()
    unmerged = ours(x).logits
    w_before = {k: v.clone() for k, v in ours.state_dict().items()}
    lora.merge_adapter(ours)
    merged = ours(x).logits
    assert ((merged - unmerged).abs().max() / unmerged.abs().max()) < 1e-5
    lora.merge_adapter(ours)  # idempotent
    torch.testing.assert_close(ours(x).logits, merged, atol=0, rtol=0)
    lora.unmerge_adapter(ours)
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, w_before[k], atol=1e-6, rtol=0)
    plain = theirs.merge_and_unload()
    torch.testing.assert_close(lora.unload(copy.deepcopy(ours), merge=True)(x).logits, plain(x).logits,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lora.unload(ours)(x).logits, base(x).logits, atol=1e-5, rtol=0)


def test_several_adapters_switch_and_swap(llama):
    x = token_batch()
    names = targets.resolve_targets(llama, "attention")
    model = copy.deepcopy(llama)
    lora.inject_adapter(model, names, "one", rank=2, alpha=4)
    lora.inject_adapter(model, names, "two", rank=4, alpha=4)
    g = torch.Generator().manual_seed(0)
    for p in lora.lora_parameters(model).values():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lora.set_active_adapters(model, ["one"])
    y1 = model(x).logits
    lora.set_active_adapters(model, ["two"])
    y2 = model(x).logits
    assert not torch.allclose(y1, y2)
    lora.set_active_adapters(model, ["one"])
    lora.merge_adapter(model, "one")
    lora.swap_adapter(model, "one", "two")  # task switch: subtract one B·A, add the other
    assert lora.merged_adapters(model) == ["two"]
    torch.testing.assert_close(model(x).logits, y2, atol=1e-5, rtol=1e-5)
    lora.set_active_adapters(model, [])
    lora.unmerge_adapter(model, "two")
    torch.testing.assert_close(model(x).logits, llama(x).logits, atol=1e-6, rtol=0)
    with pytest.raises(StudioError, match="no adapter named 'three'"):
        lora.set_active_adapters(model, ["three"])


def test_any_adapter_name_works_library_ids_and_method_names_included(llama, tmp_path):
    """Library ids may hold dots ("coffee-v1.2") and a user may call an adapter "train"; a plain
    ParameterDict can hold neither. Both train, save, load and merge like any other name."""
    from core import adapter as adapter_io

    x = token_batch()
    names = targets.resolve_targets(llama, "attention-qv")
    model = copy.deepcopy(llama)
    for n in ("coffee-v1.2", "train", "to"):
        lora.inject_adapter(model, names, n, rank=2, alpha=4)
    layer = dict(lora.lora_layers(model))[names[0]]
    assert list(layer.lora_A.keys()) == ["coffee-v1.2", "train", "to"]
    assert callable(layer.lora_A.train) and callable(layer.lora_A.to)  # the methods are still methods
    g = torch.Generator().manual_seed(0)
    for p in lora.lora_parameters(model).values():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    lora.set_active_adapters(model, ["coffee-v1.2"])
    y = model(x).logits
    adapter_io.save_adapter(model, tmp_path / "a", name="coffee-v1.2", base_model="tiny-llama")
    other = copy.deepcopy(llama)
    adapter_io.load_adapter(other, tmp_path / "a", name="other.v2")
    torch.testing.assert_close(other(x).logits, y, atol=1e-6, rtol=0)
    lora.merge_adapter(other, "other.v2")
    torch.testing.assert_close(other(x).logits, y, atol=1e-5, rtol=1e-5)
    with pytest.raises(StudioError, match="must not be empty"):
        lora.inject_adapter(model, names, "", rank=2, alpha=4)


def test_merge_refuses_non_finite(llama):
    model = copy.deepcopy(llama)
    names = targets.resolve_targets(model, "attention-qv")
    lora.inject_adapter(model, names, rank=2, alpha=4)
    layer = dict(lora.lora_layers(model))[names[-1]]
    with torch.no_grad():
        layer.lora_B["default"].fill_(float("inf"))
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    with pytest.raises(StudioError, match="non-finite"):
        lora.merge_adapter(model)
    assert lora.merged_adapters(model) == []
    for k, v in model.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k])


def test_only_adapter_parameters_train(llama):
    model = copy.deepcopy(llama)
    lora.inject_adapter(model, targets.resolve_targets(model, "mlp"), rank=2, alpha=2)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in k or ".lora_B." in k for k in trainable)


def test_refuses_unsupported_module(llama):
    with pytest.raises(StudioError, match="Embedding"):
        lora.inject_adapter(llama, ["model.embed_tokens"])


@pytest.mark.parametrize("mixed_scaling", [False, True], ids=["one-scaling", "mixed-scaling"])
def test_shared_input_fusion_equals_the_per_layer_path(llama, monkeypatch, mixed_scaling):
    """q/k/v (and gate/up) as one group: same logits, LoRA gradients and input gradient as one per
    layer; also when the members' scalings differ (an adapter with an alpha_pattern)."""
    model = copy.deepcopy(llama)
    lora.inject_adapter(model, targets.resolve_targets(model, "all-linear"), rank=4, alpha=8)
    if mixed_scaling:
        for name, layer in lora.lora_layers(model):
            if name.endswith(("k_proj", "up_proj")):
                layer.scaling["default"] *= 3.0
    g = torch.Generator().manual_seed(0)
    for p in lora.lora_parameters(model).values():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.train()
    x = token_batch()
    calls = []
    fused_apply = lora._GroupFunction.apply
    monkeypatch.setattr(lora._GroupFunction, "apply", lambda *a: calls.append(1) or fused_apply(*a))

    def run():
        for p in model.parameters():
            p.grad = None
        emb = model.get_input_embeddings()(x).detach().requires_grad_()
        logits = model(inputs_embeds=emb).logits
        logits.square().mean().backward()
        grads = {k: p.grad.clone() for k, p in lora.lora_parameters(model).items()}
        grads["input"] = emb.grad
        return logits.detach(), grads

    fused_logits, fused_grads = run()
    assert len(calls) == 2 * llama.config.num_hidden_layers  # q/k/v and gate/up in every block
    monkeypatch.setattr(lora, "FUSE_SHARED_INPUT", False)
    plain_logits, plain_grads = run()
    assert len(calls) == 2 * llama.config.num_hidden_layers
    torch.testing.assert_close(fused_logits, plain_logits, atol=1e-6, rtol=1e-6)
    for k, v in plain_grads.items():
        torch.testing.assert_close(fused_grads[k], v, atol=1e-6 * v.abs().max().item(), rtol=0, msg=k)


def test_shared_input_group_turns_itself_off_when_siblings_read_different_inputs():
    """q and k named as siblings but fed different tensors: the group's guess is wrong, it must
    notice, turn itself off and give the per-layer results (values and gradients)."""

    class CrossAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(6, 4)
            self.k_proj = torch.nn.Linear(6, 4)

        def forward(self, x, y):
            return self.q_proj(x) * self.k_proj(y)

    torch.manual_seed(0)
    model = CrossAttention()
    lora.inject_adapter(model, ["q_proj", "k_proj"], rank=2, alpha=4)
    for p in lora.lora_parameters(model).values():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape))
    x, y = torch.randn(3, 6, requires_grad=True), torch.randn(3, 6, requires_grad=True)
    reference = copy.deepcopy(model)
    reference.q_proj._shared = reference.k_proj._shared = None
    expected = reference(x, y)
    expected.sum().backward()
    want = [x.grad.clone(), y.grad.clone()] + [p.grad for p in lora.lora_parameters(reference).values()]
    for _ in range(2):  # the first call computes k's output from x and wastes it; the second knows
        x.grad = y.grad = None
        for p in model.parameters():
            p.grad = None
        got = model(x, y)
        got.sum().backward()
        torch.testing.assert_close(got, expected)
        grads = [x.grad, y.grad] + [p.grad for p in lora.lora_parameters(model).values()]
        for g, w in zip(grads, want):
            torch.testing.assert_close(g, w)
    assert model.q_proj._shared is model.k_proj._shared and not model.q_proj._shared.enabled


@pytest.mark.parametrize("reentrant", [False, True])
def test_shared_input_groups_under_gradient_checkpointing(llama, reentrant):
    """Checkpointing recomputes each block in the backward pass: the groups must give the same
    gradients as without it, and stay on (every member takes its output in the recomputation too)."""
    model = copy.deepcopy(llama)
    lora.inject_adapter(model, targets.resolve_targets(model, "all-linear"), rank=4, alpha=8)
    for p in lora.lora_parameters(model).values():
        with torch.no_grad():
            p.add_(0.05)
    model.train()
    x = token_batch()

    def grads():
        for p in model.parameters():
            p.grad = None
        model(x, labels=x).loss.backward()
        return {k: p.grad.clone() for k, p in lora.lora_parameters(model).items()}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    for _ in range(2):
        checkpointed = grads()
        for k, v in plain.items():
            torch.testing.assert_close(checkpointed[k], v, msg=k)
    groups = {id(layer._shared): layer._shared for _, layer in lora.lora_layers(model) if layer._shared}
    assert groups and all(g.enabled and not g.outs for g in groups.values())


def test_shared_input_fusion_under_inference_mode(llama):
    """Inference tensors carry no version counter; the fused path must still run (and agree)."""
    model = copy.deepcopy(llama)
    lora.inject_adapter(model, targets.resolve_targets(model, "all-linear"), rank=4, alpha=8)
    for p in lora.lora_parameters(model).values():
        with torch.no_grad():
            p.add_(0.05)
    x = token_batch()
    with torch.no_grad():
        expected = model(x).logits
    with torch.inference_mode():
        got = model(x).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
