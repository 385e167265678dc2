"""Weighted combination of adapters: exact is exact, svd is the best rank-k and says how far off it is."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, token_batch

from core import adapter, combine, lora, targets
from core.errors import StudioError

ATOL = 1e-5


def _trained(base, spec, rank, alpha, seed, rslora=False):
    """An AdapterFiles with random A and B (a stand-in for a trained adapter)."""
    model = copy.deepcopy(base)
    lora.inject_adapter(model, targets.resolve_targets(model, spec), rank=rank, alpha=alpha, rslora=rslora)
    g = torch.Generator().manual_seed(seed)
    for p in lora.lora_parameters(model).values():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return adapter.adapter_from_model(model)


def _dense_sum(adapters, weights, module):
    return sum(w * ad.delta(module) for ad, w in zip(adapters, weights) if module in ad.tensors)


def _merged_by_hand(base, adapters, weights):
    """W0 + Σ w_i·ΔW_i written straight into a copy of the base weights."""
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    names = {m for ad in adapters for m in ad.targets}
    with torch.no_grad():
        for m in names:
            delta = _dense_sum(adapters, weights, m)
            w = modules[m].weight
            w += delta if isinstance(modules[m], torch.nn.Linear) else delta.t()
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exact_is_the_weighted_sum_of_deltas(arch, tmp_path):
    base = tiny_llama() if arch == "llama" else tiny_gpt2()
    one = _trained(base, "attention", 4, 8, seed=1)
    two = _trained(base, "all-linear", 2, 5, seed=2, rslora=True)  # other targets, rank and scaling
    weights = [0.7, -1.3]  # negative: task negation
    out, report = combine.combine([one, two], weights, mode="exact")
    assert report["rel_error"] == 0.0 and report["mode"] == "exact"
    for m in out.targets:
        torch.testing.assert_close(out.delta(m), _dense_sum([one, two], weights, m), atol=1e-6, rtol=1e-5)
        assert out.module_rank(m) == (6 if m in one.tensors else 2)
    # outputs: the combined adapter on the base = base weights + Σ w_i·ΔW_i
    model = copy.deepcopy(base)
    adapter.load_adapter(model, out)
    x = token_batch()
    torch.testing.assert_close(model(x).logits, _merged_by_hand(base, [one, two], weights)(x).logits,
                               atol=ATOL, rtol=ATOL)
    # it saves as a PEFT adapter (rank_pattern for the modules only one adapter has) and PEFT agrees
    adapter.write_adapter(out, tmp_path / "sum", base_model="tiny", model=base)
    import peft
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "sum"))
    torch.testing.assert_close(theirs(x).logits, model(x).logits, atol=ATOL, rtol=ATOL)


def test_exact_equals_peft_cat(llama, tmp_path):
    import peft
    one = _trained(llama, "attention-qv", 4, 8, seed=1)
    two = _trained(llama, "attention-qv", 2, 6, seed=2)
    for ad, name in ((one, "one"), (two, "two")):
        adapter.write_adapter(ad, tmp_path / name, base_model="tiny", model=llama)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(llama), str(tmp_path / "one"), adapter_name="one")
        theirs.load_adapter(str(tmp_path / "two"), adapter_name="two")
        theirs.add_weighted_adapter(["one", "two"], [1.5, -0.5], "cat", combination_type="cat")
        theirs.set_adapter("cat")
    out, _ = combine.combine([one, two], [1.5, -0.5])
    model = copy.deepcopy(llama)
    adapter.load_adapter(model, out)
    x = token_batch()
    torch.testing.assert_close(model(x).logits, theirs(x).logits, atol=ATOL, rtol=ATOL)


def test_svd_at_full_rank_is_exact_and_lower_rank_reports_the_true_error(llama):
    one = _trained(llama, "all-linear", 4, 8, seed=1)
    two = _trained(llama, "all-linear", 4, 4, seed=2)
    weights = [1.0, 0.5]
    full, report = combine.combine([one, two], weights, mode="svd", rank=8)
    assert report["rel_error"] < 1e-6 and report["max_rel_error"] < 1e-6
    for m in full.targets:
        torch.testing.assert_close(full.delta(m), _dense_sum([one, two], weights, m), atol=1e-5, rtol=1e-4)
    low, report = combine.combine([one, two], weights, mode="svd", rank=3)
    assert low.rank == 3 and all(a.shape[0] == 3 for a, _ in low.tensors.values())
    tails = norms = 0.0
    for m in low.targets:
        dense = _dense_sum([one, two], weights, m).double()
        u, s, vh = torch.linalg.svd(dense)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        err = torch.linalg.norm(dense - low.delta(m).double()) / torch.linalg.norm(dense)
        assert report["modules"][m]["rel_error"] == pytest.approx(float(err), rel=1e-4)
        torch.testing.assert_close(low.delta(m).double(), best, atol=1e-5, rtol=1e-4)  # Eckart–Young optimum
        tails += float((s[3:] ** 2).sum())
        norms += float((s ** 2).sum())
    assert report["rel_error"] == pytest.approx((tails / norms) ** 0.5, rel=1e-4)
    assert 0 < report["rel_error"] < 1


def test_svd_rank_above_the_content_pads_with_zeros(llama):
    one = _trained(llama, "attention-qv", 2, 4, seed=1)
    out, report = combine.combine([one], [2.0], mode="svd", rank=6)
    assert out.rank == 6 and report["rel_error"] < 1e-6
    for m in out.targets:
        torch.testing.assert_close(out.delta(m), 2.0 * one.delta(m), atol=1e-5, rtol=1e-4)


def test_svd_caps_rank_at_the_layer_size():
    base = tiny_llama(num_key_value_heads=1)  # k_proj / v_proj are 8 × 32
    one = _trained(base, "attention-qv", 8, 8, seed=1)
    two = _trained(base, "attention-qv", 8, 8, seed=2)
    out, report = combine.combine([one, two], [1, 1], mode="svd", rank=16)
    v = "model.layers.0.self_attn.v_proj"
    assert out.module_rank(v) == 8 and report["modules"][v]["rel_error"] < 1e-6


def test_combination_refuses_what_does_not_add_up(llama):
    one = _trained(llama, "attention-qv", 2, 4, seed=1)
    wide = _trained(tiny_llama(hidden_size=48), "attention-qv", 2, 4, seed=1)
    with pytest.raises(StudioError, match="--weights: 1 weights for 2 adapters"):
        combine.combine([one, one], [1.0])
    with pytest.raises(StudioError, match="do not fit the same base model: module 'model.layers.0.self_attn.q_proj'"):
        combine.combine([one, wide], [1.0, 1.0])
    with pytest.raises(StudioError, match="--rank only applies"):
        combine.combine([one], [1.0], mode="exact", rank=2)
    with pytest.raises(StudioError, match="unknown"):
        combine.combine([one], [1.0], mode="magic")
    with pytest.raises(StudioError, match="not a finite"):
        combine.combine([one], [float("nan")])


@pytest.mark.parametrize("mode", ["ties", "dare_linear", "dare_ties"])
def test_task_merges_equal_peft_add_weighted_adapter(llama, tmp_path, monkeypatch, mode):
    """TIES and DARE as PEFT's ``<mode>_svd`` computes them: same ΔW per module, same logits."""
    import peft
    from peft.utils import merge_utils

    one = _trained(llama, "attention", 4, 8, seed=1)
    two = _trained(llama, "attention", 4, 4, seed=2)
    for ad, name in ((one, "one"), (two, "two")):
        adapter.write_adapter(ad, tmp_path / name, base_model="tiny", model=llama)
    states = []  # the global RNG state at PEFT's first DARE mask: our generator starts from it
    real = merge_utils.random_pruning

    def spy(tensor, density, rescale):
        if not states:
            states.append(torch.random.get_rng_state())
        return real(tensor, density, rescale)

    monkeypatch.setattr(merge_utils, "random_pruning", spy)
    weights, density = [1.0, 0.6], 0.4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(llama), str(tmp_path / "one"), adapter_name="one")
        theirs.load_adapter(str(tmp_path / "two"), adapter_name="two")
        theirs.add_weighted_adapter(["one", "two"], weights, "mix", combination_type=f"{mode}_svd",
                                    svd_rank=6, density=density)
        theirs.set_adapter("mix")
    generator = None
    if mode != "ties":
        generator = torch.Generator()
        generator.set_state(states[0])
    out, report = combine.combine([one, two], weights, mode=mode, rank=6, density=density, generator=generator)
    assert report["density"] == density and out.rank == 6
    layers = dict(theirs.base_model.model.named_modules())
    for m in out.targets:
        torch.testing.assert_close(out.delta(m), layers[m].get_delta_weight("mix"), atol=1e-5, rtol=1e-4)
    model = copy.deepcopy(llama)
    adapter.load_adapter(model, out)
    x = token_batch()
    torch.testing.assert_close(model(x).logits, theirs(x).logits, atol=ATOL, rtol=ATOL)


def test_ties_trims_elects_and_averages():
    a = torch.tensor([[3.0, -1.0, 0.5, 2.0]])
    b = torch.tensor([[1.0, 2.0, -4.0, -0.1]])
    merged = combine.task_merge("ties", [a, b], [1.0, 1.0], density=0.5)
    # trimmed: a → [3, 0, 0, 2], b → [0, 2, -4, 0]; every entry has one voter, so it is kept as is
    assert torch.equal(merged, torch.tensor([[3.0, 2.0, -4.0, 2.0]]))
    # a tie in the vote goes to +: each entry keeps the positive one of a and -a
    merged = combine.task_merge("ties", [a, -a], [1.0, 1.0], density=1.0)
    assert torch.equal(merged, torch.tensor([[3.0, 1.0, 0.5, 2.0]]))
    # agreeing entries are averaged, weights applied after the vote
    merged = combine.task_merge("ties", [torch.tensor([2.0, 2.0]), torch.tensor([4.0, -1.0])], [1.0, 0.5], density=1.0)
    assert torch.equal(merged, torch.tensor([(2.0 + 2.0) / 2, 2.0]))
    # DARE keeps the expectation: the mean over many masks approaches the weighted sum
    g = torch.Generator().manual_seed(0)
    big = torch.ones(200, 200)
    merged = combine.task_merge("dare_linear", [big], [2.0], density=0.25, generator=g)
    assert set(merged.unique().tolist()) <= {0.0, 8.0} and merged.mean().item() == pytest.approx(2.0, rel=0.05)
