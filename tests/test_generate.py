"""core.generate: the playground's token-by-token generation, checked against transformers' own greedy
decoding on a tiny Llama with a ChatML tokenizer."""

from __future__ import annotations

import pytest
import torch

from conftest import TOKENIZER_VOCAB, tiny_llama, tiny_tokenizer
from core import lora
from core.errors import StudioError
from core.generate import format_prompt, generate, generate_with_details, stop_token_ids


@pytest.fixture
def model_tok():
    model = tiny_llama(vocab_size=TOKENIZER_VOCAB)
    tok = tiny_tokenizer()
    # a random tiny model rarely says <|im_end|>; make sure the only stop ids are the tokenizer's
    model.generation_config.eos_token_id = tok.eos_token_id
    model.config.eos_token_id = tok.eos_token_id
    return model, tok


def test_chat_prompt_ends_with_generation_prompt(model_tok):
    _, tok = model_tok
    ids = format_prompt(tok, "Write a haiku")
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>user\nWrite a haiku<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    plain = format_prompt(tiny_tokenizer(chat_template=False), "Write a haiku")
    assert tok.decode(plain) == "Write a haiku"
    with_system = tok.decode(format_prompt(tok, [{"role": "user", "content": "hi"}], system="Be brief."))
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_greedy_matches_transformers_generate_and_is_deterministic(model_tok):
    model, tok = model_tok
    ids = format_prompt(tok, "The quick brown fox")
    ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    ref = [t for t in ref if t != tok.eos_token_id]
    got = generate_with_details(model, tok, "The quick brown fox", max_new_tokens=12, greedy=True)
    assert got.token_ids == ref[:len(got.token_ids)]
    assert got.token_ids == ref
    again = generate(model, tok, "The quick brown fox", max_new_tokens=12, temperature=0.0)
    assert again == got.text
    assert got.prompt_tokens == len(ids)


def test_streamed_pieces_add_up_to_the_answer(model_tok):
    model, tok = model_tok
    pieces: list[str] = []
    got = generate_with_details(model, tok, "Translate to French", max_new_tokens=20, greedy=True,
                                on_token=pieces.append)
    assert pieces and "".join(pieces) == got.text
    assert got.stop_reason in ("length", "eos")


def test_stops_at_end_of_turn(model_tok):
    model, tok = model_tok
    free = generate_with_details(model, tok, "Write a haiku", max_new_tokens=10, greedy=True)
    assert len(free.token_ids) >= 3
    # declare the third greedy token an end-of-turn id: the answer must end just before it
    model.generation_config.eos_token_id = [tok.eos_token_id, free.token_ids[2]]
    assert free.token_ids[2] in stop_token_ids(model, tok)
    cut = generate_with_details(model, tok, "Write a haiku", max_new_tokens=10, greedy=True)
    assert cut.stop_reason == "eos"
    assert cut.token_ids == free.token_ids[:2]


def test_end_of_turn_markers_are_stop_ids():
    tok = tiny_tokenizer()
    assert tok.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(None, tok)


def test_cancel_returns_partial_answer(model_tok):
    model, tok = model_tok
    count = {"n": 0}

    def on_token(piece):
        count["n"] += 1

    got = generate_with_details(model, tok, "Write a haiku", max_new_tokens=50, greedy=True,
                                on_token=on_token, stop=lambda: count["n"] >= 3)
    assert got.stop_reason == "cancelled"
    assert 3 <= len(got.token_ids) < 50


def test_sampling_is_reproducible_with_a_seed(model_tok):
    model, tok = model_tok
    kw = dict(max_new_tokens=15, temperature=1.5, top_p=0.95)
    a = generate_with_details(model, tok, "abc", seed=1, **kw).token_ids
    b = generate_with_details(model, tok, "abc", seed=1, **kw).token_ids
    c = generate_with_details(model, tok, "abc", seed=2, **kw).token_ids
    assert a == b
    assert a != c


def test_adapter_changes_the_answer_and_mode_is_restored(model_tok):
    model, tok = model_tok
    base = generate_with_details(model, tok, "Write a haiku", max_new_tokens=8, greedy=True).token_ids
    lora.inject_adapter(model, ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"], rank=4)
    torch.manual_seed(3)
    for _, layer in lora.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B["default"], std=2.0)
    model.train()
    tuned = generate_with_details(model, tok, "Write a haiku", max_new_tokens=8, greedy=True).token_ids
    assert model.training  # the caller's mode comes back
    lora.set_active_adapters(model, [])
    assert generate_with_details(model, tok, "Write a haiku", max_new_tokens=8, greedy=True).token_ids == base
    assert tuned != base


def test_bad_settings_are_user_errors(model_tok):
    model, tok = model_tok
    with pytest.raises(StudioError):
        generate(model, tok, "x", max_new_tokens=0)
    with pytest.raises(StudioError):
        generate(model, tok, "x", top_p=0.0)
    with pytest.raises(StudioError, match="at most 128"):
        generate(model, tok, "fox " * 200)


def test_context_window_caps_the_answer(model_tok):
    model, tok = model_tok
    n = len(format_prompt(tok, "fox " * 20))
    got = generate_with_details(model, tok, "fox " * 20, max_new_tokens=1000, greedy=True)
    assert len(got.token_ids) <= 128 - n


def test_adapters_on_sibling_layers_generate(model_tok):
    """q, k and v read the same input (core.lora may fuse their A's and keep the call's input)."""
    model, tok = model_tok
    lora.inject_adapter(model, [f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in "qkv"], rank=4)
    for _, layer in lora.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B["default"], std=1.0)
    a = generate_with_details(model, tok, "Write a haiku", max_new_tokens=6, greedy=True)
    b = generate_with_details(model, tok, "Write a haiku", max_new_tokens=6, greedy=True)
    assert a.token_ids == b.token_ids and len(a.token_ids) >= 1
