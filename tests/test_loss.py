"""The chunked cross-entropy through the output head (core.loss) against transformers' own loss and
the plain full-logits path: values, LoRA gradients, every family it accepts, and where it declines."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2, tiny_llama

from core import lora, loss, targets
from core.data import IGNORE

CHUNK = 7  # tokens per chunk in these tests: several chunks per batch, the last one partial

# A tiny config for every class core.loss knows, with the transform made strong enough to matter:
# a soft-cap of 30 or a scale near 1 would leave tiny random logits almost unchanged, so a test
# with the transform dropped would still pass.
_SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, head_dim=8, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
_FAMILIES = {
    "LlamaForCausalLM": ("llama", {}),
    "MistralForCausalLM": ("mistral", {}),
    "Qwen2ForCausalLM": ("qwen2", {}),
    "Qwen3ForCausalLM": ("qwen3", {}),
    "Phi3ForCausalLM": ("phi3", {}),
    "PhiForCausalLM": ("phi", {}),
    "GPT2LMHeadModel": ("gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128}),
    "GPTNeoXForCausalLM": ("gpt_neox", {}),
    "GemmaForCausalLM": ("gemma", {}),
    "Olmo2ForCausalLM": ("olmo2", {}),
    "StableLmForCausalLM": ("stablelm", {}),
    "Starcoder2ForCausalLM": ("starcoder2", {}),
    "SmolLM3ForCausalLM": ("smollm3", {}),
    "Gemma2ForCausalLM": ("gemma2", {"final_logit_softcapping": 0.5}),
    "Gemma3ForCausalLM": ("gemma3_text", {"final_logit_softcapping": 0.5}),
    "GraniteForCausalLM": ("granite", {"logits_scaling": 0.25}),
    "CohereForCausalLM": ("cohere", {"logit_scale": 4.0}),
    "Cohere2ForCausalLM": ("cohere2", {"logit_scale": 4.0}),
}


def tiny_family(name: str, seed: int = 0):
    """A 2-layer model of the class ``name`` with random weights, eval mode (no dropout)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = _FAMILIES[name]
    cfg = AutoConfig.for_model(model_type, **{**_SMALL, **extra})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    assert type(model).__name__ == name
    return model.eval()


def _batch(vocab: int = 128, seed: int = 1) -> dict:
    """3 × 16 tokens, right-padded (rows of 16, 10 and 5 tokens); the first 3 tokens of every row are
    a prompt (not trained), as are the padding positions."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    mask[2, 5:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE)
    labels[:, :3] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _trained(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def _with_lora(model, seed: int = 3):
    """All-linear LoRA (r=4), B random so the adapter's gradients are not trivially A's zeros."""
    torch.manual_seed(seed)
    lora.inject_adapter(model, targets.resolve_targets(model, "all-linear"), rank=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lora.lora_parameters(model).items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def _grads(model, fn, batch) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    value = fn(model, batch)
    (value / 3).backward()  # as the trainer does (÷ trained tokens): the incoming gradient is not 1
    return value.detach(), {k: p.grad.clone() for k, p in lora.lora_parameters(model).items()}


def _assert_matches_transformers(model, batch):
    """The chunked sum equals transformers' mean × trained tokens (1e-6), its LoRA gradients equal the
    plain path's, and it really was the chunked path (the model's own forward is never called)."""
    assert loss.head_plan(model) is not None
    ref = model(**batch, use_cache=False).loss.detach() * _trained(batch)
    plain_value, plain_grads = _grads(model, loss.plain_loss_sum, batch)
    forward = type(model).forward
    type(model).forward = None  # a call of the full forward would fail: it must not happen
    try:
        for select in (True, False):  # only the trained rows through the head (CPU), or all, masked
            value, grads = _grads(model, lambda m, b: loss.loss_sum(m, b, chunk=CHUNK, select_rows=select), batch)
            assert value.dtype == torch.float32
            torch.testing.assert_close(value, ref, rtol=1e-6, atol=0)
            torch.testing.assert_close(value, plain_value, rtol=1e-6, atol=0)
            assert grads.keys() == plain_grads.keys() and grads
            for k in grads:  # fp32 sums in another order: a few ulps of the largest entries
                torch.testing.assert_close(grads[k], plain_grads[k], rtol=1e-5, atol=1e-6, msg=k)
    finally:
        type(model).forward = forward
    assert any(g.abs().max() > 1e-3 for g in grads.values())


# -- the function itself -----------------------------------------------------------------------------
@pytest.mark.parametrize("scale,softcap", [(1.0, None), (0.25, None), (1.0, 0.5)])
def test_function_equals_cross_entropy_and_its_gradient(scale, softcap):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=g, requires_grad=True)
    weight, bias = torch.randn(50, 16, generator=g), torch.randn(50, generator=g)
    labels = torch.randint(0, 50, (23,), generator=g)
    labels[[0, 5, 6, 22]] = IGNORE

    logits = F.linear(hidden, weight, bias) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    ref = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    (ref * 0.3).backward()
    ref_grad, hidden.grad = hidden.grad, None

    got = loss.chunked_cross_entropy(hidden, weight, labels, bias=bias, scale=scale, softcap=softcap, chunk=CHUNK)
    (got * 0.3).backward()
    torch.testing.assert_close(got, ref.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(hidden.grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert hidden.grad[[0, 5, 6, 22]].abs().max() == 0  # ignored tokens get no gradient

    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(loss.chunked_cross_entropy(hidden, weight, labels, bias=bias, scale=scale,
                                                              softcap=softcap, chunk=CHUNK), ref.detach(),
                                   rtol=1e-6, atol=0)


def test_function_refuses_a_trained_head():
    w = torch.randn(10, 4, requires_grad=True)
    with pytest.raises(ValueError, match="plain loss"):
        loss.chunked_cross_entropy(torch.randn(3, 4), w, torch.tensor([1, 2, 3]))


def test_chunk_rows_keeps_a_chunk_near_the_budget():
    assert loss.chunk_rows(49152) == 512  # SmolLM2: 512 × 49 152 × 4 B = 96 MiB
    assert loss.chunk_rows(128256) * 128256 * 4 <= loss.CHUNK_BYTES
    assert loss.chunk_rows(10**9) == 1


# -- on models -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_llama_tied_and_untied_head(tied):
    model = _with_lora(tiny_llama(tie_word_embeddings=tied))
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    _assert_matches_transformers(model, _batch())


def test_gpt2():
    _assert_matches_transformers(_with_lora(tiny_gpt2()), _batch())


@pytest.mark.parametrize("name", sorted(loss._LOGIT_TRANSFORMS))
def test_every_known_family(name):
    """Every class core.loss accepts, with its logit transform (soft-cap, divisor, multiplier)."""
    model = _with_lora(tiny_family(name))
    _assert_matches_transformers(model, _batch())


def test_gradient_checkpointing_and_train_mode():
    model = _with_lora(tiny_llama())
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    _assert_matches_transformers(model, _batch())


def test_evaluation_without_grad():
    model = _with_lora(tiny_family("Gemma2ForCausalLM"))
    batch = _batch()
    with torch.no_grad():
        ref = model(**batch, use_cache=False).loss * _trained(batch)
        torch.testing.assert_close(loss.loss_sum(model, batch, chunk=CHUNK), ref, rtol=1e-6, atol=0)


def _grad_error(grads: dict, ref: dict) -> float:
    """The largest difference of any adapter gradient, relative to that tensor's largest entry."""
    return max(((grads[k] - ref[k]).abs().max() / ref[k].abs().max()).item() for k in ref)


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "Gemma2ForCausalLM", "CohereForCausalLM"])
def test_bf16_agrees_with_the_plain_path(name):
    """bf16 base, fp32 adapter, both paths against fp32 arithmetic on the same (bf16-rounded) weights.

    bf16 keeps 8 significant bits (a rounding is up to 2^-9 ≈ 2e-3 relative). The loss is an fp32
    sum over tokens of logsumexp − target logit, where those roundings mostly average out: 1e-3
    relative to the plain path and to fp32. The gradients run backward through the whole model in
    bf16, so the plain path itself is 2-7 % of the largest entry away from fp32 (measured on these
    models); the two paths round in different places (the chunked one upcasts before the soft-cap
    and scales by the incoming gradient after the head's product), so they may differ by that much
    again: each adapter gradient of the chunked path is within twice the plain path's own bf16
    error of both the plain path and fp32 (measured: at most 1.3 times)."""
    model = _with_lora(tiny_family(name).to(torch.bfloat16))
    reference = copy.deepcopy(model).float()
    batch = _batch()
    assert loss.head_plan(model) is not None
    plain_value, plain_grads = _grads(model, loss.plain_loss_sum, batch)
    value, grads = _grads(model, lambda m, b: loss.loss_sum(m, b, chunk=CHUNK), batch)
    ref_value, ref_grads = _grads(reference, loss.plain_loss_sum, batch)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, plain_value, rtol=1e-3, atol=0)
    torch.testing.assert_close(value, ref_value, rtol=1e-3, atol=0)
    bf16_error = _grad_error(plain_grads, ref_grads)
    assert 0 < bf16_error < 0.1
    assert _grad_error(grads, ref_grads) <= 2 * bf16_error
    assert _grad_error(grads, plain_grads) <= 2 * bf16_error


# -- where it declines -----------------------------------------------------------------------------------
def _declines(model, batch):
    assert loss.head_plan(model) is None
    torch.testing.assert_close(loss.loss_sum(model, batch, chunk=CHUNK), loss.plain_loss_sum(model, batch))


def test_declines_an_unknown_class():
    """A class it does not know, or a known name from outside transformers (remote code often reuses
    the names): its forward may do anything after the head."""
    from transformers import LlamaForCausalLM

    model = _with_lora(tiny_llama())
    assert loss.head_plan(model) is not None
    for name in ("Custom", "LlamaForCausalLM"):
        model.__class__ = type(name, (LlamaForCausalLM,), {"__module__": "transformers_modules.someone.modeling"})
        _declines(model, _batch())


def test_declines_a_head_under_lora_or_trained():
    with_head = tiny_llama()
    lora.inject_adapter(with_head, ["lm_head"], rank=2, alpha=4)
    assert not any(p.requires_grad for n, p in with_head.named_parameters() if "lora_" not in n)
    _declines(with_head, _batch())
    model = _with_lora(tiny_llama())
    assert loss.head_plan(model) is not None
    model.lm_head.weight.requires_grad_(True)
    _declines(model, _batch())


def test_declines_a_ddp_wrapper(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DDP(_with_lora(tiny_llama()))
        assert loss.head_plan(ddp) is None
        ref = loss.plain_loss_sum(ddp.module, _batch())
        torch.testing.assert_close(loss.loss_sum(ddp, _batch()), ref)
    finally:
        dist.destroy_process_group()
