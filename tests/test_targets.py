"""Target listing, presets per architecture, selection errors and the exact parameter budget."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from core import targets
from core.errors import StudioError


def test_list_targets_llama_groups_by_block(llama):
    found = targets.list_targets(llama)
    tree = targets.group_by_block(found)
    assert list(tree) == ["model.layers.0", "model.layers.1", ""]
    assert [t.role for t in tree["model.layers.0"]["attention"]] == ["q", "k", "v", "o"]
    assert [t.role for t in tree["model.layers.0"]["mlp"]] == ["gate", "up", "down"]
    head = tree[""]["other"][0]
    assert head.is_head and head.name == "lm_head"
    k = next(t for t in found if t.name.endswith("layers.0.self_attn.k_proj"))
    assert (k.d_in, k.d_out, k.params) == (32, 16, 32 * 16)


@pytest.mark.parametrize("preset,llama_leaves,gpt2_leaves", [
    ("attention-qv", {"q_proj", "v_proj"}, {"c_attn"}),
    ("attention", {"q_proj", "k_proj", "v_proj", "o_proj"}, {"c_attn", "c_proj"}),
    ("mlp", {"gate_proj", "up_proj", "down_proj"}, {"c_fc", "c_proj"}),
    ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
     {"c_attn", "c_proj", "c_fc"}),
])
def test_presets_resolve_per_architecture(preset, llama_leaves, gpt2_leaves):
    for model, leaves, per_block in ((tiny_llama(), llama_leaves, len(llama_leaves)),
                                     (tiny_gpt2(), gpt2_leaves, None)):
        names = targets.resolve_targets(model, preset)
        assert {n.split(".")[-1] for n in names} == leaves
        assert "lm_head" not in names
        if per_block:
            assert len(names) == 2 * per_block
    gpt2_mlp = targets.resolve_targets(tiny_gpt2(), "mlp")
    assert all(".mlp." in n for n in gpt2_mlp)


def test_suffixes_and_regex(llama):
    assert targets.resolve_targets(llama, "q_proj,v_proj") == targets.resolve_targets(llama, "attention-qv")
    assert targets.resolve_targets(llama, ["layers.1.mlp.down_proj"]) == ["model.layers.1.mlp.down_proj"]
    assert targets.resolve_targets(llama, r"re:.*layers\.0\..*_proj") == [
        t.name for t in targets.list_targets(llama) if t.block == "model.layers.0"]


def test_no_match_lists_existing_names(llama):
    with pytest.raises(StudioError) as e:
        targets.resolve_targets(llama, "c_attn")
    assert "q_proj" in str(e.value) and "down_proj" in str(e.value)
    with pytest.raises(StudioError, match="regular expression"):
        targets.resolve_targets(llama, "re:(")


def test_budget_is_exact_before_injection(llama):
    names = targets.resolve_targets(llama, "all-linear")
    b = targets.budget(llama, names, rank=8)
    expected = sum(8 * (t.d_in + t.d_out) for t in targets.list_targets(llama) if t.name in names)
    assert b.trainable == expected
    assert b.total == sum(p.numel() for p in llama.parameters())
    assert b.share == pytest.approx(expected / b.total)


def test_works_on_meta_device():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                             num_attention_heads=4, vocab_size=100))
    assert len(targets.resolve_targets(model, "all-linear")) == 21
