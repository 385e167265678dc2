"""Every popular family end to end, on tiny random models built from each family's own config class.

Per family: the Layers page's roles are read right and the presets select what they say; three
training steps run; PEFT loads the adapter with the same logits; the merged export loads in plain
transformers with the same logits. Per chat template (the Jinja text each family publishes, kept in
tests/data/chat_templates/): the rendered conversation, the trained tokens (the answers, each ending
with that family's end-of-turn token) and the Playground's prompt and stop tokens.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from pathlib import Path

import pytest
import torch
import transformers as hf
from conftest import TOKENIZER_VOCAB, tiny_tokenizer
from test_export import logits

from core import adapter, chat, data, generate, targets
from core.config import RunConfig
from core.errors import StudioError
from core.train import Trainer

import peft

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"


# -- chat templates as the families publish them -------------------------------------------------

# family: (special tokens, bos, eos, the end-of-turn token its template ends an answer with)
CHAT = {
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>", "<|eom_id|>"], "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "mistral": (["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "</s>"),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "<|im_end|>"),
    "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"], None, "<|im_end|>",
              "<|im_end|>"),
    "gemma2": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>"),
    "gemma3": (["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>"),
    "phi3": (["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<s>",
             "<|endoftext|>", "<|end|>"),
    "olmo2": (["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"], "<|endoftext|>",
              "<|endoftext|>", "<|endoftext|>"),
    "granite": (["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"], "<|end_of_text|>",
                "<|end_of_text|>", "<|end_of_text|>"),
}

CONVERSATION = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}]


def _today(fmt: str) -> str:
    return time.strftime(fmt)


# The conversation as each template renders it, written out by hand from the published template.
RENDERED = {
    "llama3": lambda: ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
                       f"December 2023\nToday Date: {_today('%d %b %Y')}\n\n<|eot_id|>"
                       "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
                       "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
                       "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
                       "<|start_header_id|>assistant<|end_header_id|>\n\n6<|eot_id|>"),
    "mistral": lambda: "<s>[INST]What is 2+2?[/INST]4</s>[INST]And 3+3?[/INST]6</s>",
    "qwen2": lambda: ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                      "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
                      "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n6<|im_end|>\n"),
    "qwen3": lambda: ("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
                      "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n6"
                      "<|im_end|>\n"),
    "gemma2": lambda: ("<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"
                       "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n<start_of_turn>model\n6<end_of_turn>\n"),
    "phi3": lambda: ("<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n4<|end|>\n<|user|>\nAnd 3+3?<|end|>\n"
                     "<|assistant|>\n6<|end|>\n<|endoftext|>"),
    "olmo2": lambda: ("<|endoftext|><|user|>\nWhat is 2+2?\n<|assistant|>\n4<|endoftext|>\n<|user|>\nAnd 3+3?\n"
                      "<|assistant|>\n6<|endoftext|>"),
    "granite": lambda: ("<|start_of_role|>system<|end_of_role|>Knowledge Cutoff Date: April 2024. Today's Date: "
                        f"{_today('%B %d, %Y')}. You are Granite, developed by IBM. You are a helpful AI assistant."
                        "<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>What is 2+2?<|end_of_text|>\n"
                        "<|start_of_role|>assistant<|end_of_role|>4<|end_of_text|>\n"
                        "<|start_of_role|>user<|end_of_role|>And 3+3?<|end_of_text|>\n"
                        "<|start_of_role|>assistant<|end_of_role|>6<|end_of_text|>\n"),
}
RENDERED["gemma3"] = RENDERED["gemma2"]

# The trained text of each answer. Qwen3 renders the last answer with an empty reasoning block and an
# earlier one without, so only the last is trained (the earlier stays context, see core.chat).
TRAINED = {name: [f"4{eot}", f"6{eot}"] for name, (_, _, _, eot) in CHAT.items()}
TRAINED["qwen3"] = ["<think>\n\n</think>\n\n6<|im_end|>"]


def family_tokenizer(family: str):
    """A byte-level BPE tokenizer trained here, with ``family``'s special tokens and its real template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials, bos, eos, _ = CHAT[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What is 2+2? And 3+3? 4 6", "system user assistant model"], trainer=trainer)
    fast = hf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=None)
    fast.chat_template = (TEMPLATES / f"{family}.jinja").read_text(encoding="utf-8")
    return fast


def _trained_pieces(enc, tok) -> list[str]:
    pieces, run = [], []
    for i, lab in zip(enc.input_ids, enc.labels):
        if lab != data.IGNORE:
            run.append(i)
        elif run:
            pieces.append(tok.decode(run)), run.clear()
    if run:
        pieces.append(tok.decode(run))
    return pieces


@pytest.mark.parametrize("family", sorted(CHAT))
def test_chat_template_renders_trains_answers_and_stops_as_the_family_writes_it(family):
    tok = family_tokenizer(family)
    eot = CHAT[family][3]
    eot_id = tok.convert_tokens_to_ids(eot)
    assert chat.template_style(tok.chat_template) is not None, "the family's template is recognised"
    enc = data.encode({"messages": CONVERSATION}, tok, "chat", {"messages": "messages"}, max_length=512)
    assert tok.decode(enc.input_ids) == RENDERED[family]()
    assert _trained_pieces(enc, tok) == TRAINED[family]
    trained_ends = [j for j, lab in enumerate(enc.labels)
                    if lab != data.IGNORE and (j + 1 == len(enc.labels) or enc.labels[j + 1] == data.IGNORE)]
    assert [enc.input_ids[j] for j in trained_ends] == [eot_id] * len(TRAINED[family])
    # the Playground: the prompt it sends is the training prompt, and it stops where training ends
    question = [{"role": "user", "content": "What is 2+2?"}]
    prompt = generate.format_prompt(tok, question)
    first_trained = next(j for j, lab in enumerate(enc.labels) if lab != data.IGNORE)
    if family != "qwen3":  # Qwen3 trains only the last turn (see TRAINED)
        assert prompt == enc.input_ids[:first_trained]
    assert prompt == data.prompt_ids(tok, question)
    assert eot_id in generate.stop_token_ids(None, tok)
    assert set(data.end_of_turn_ids(tok)) <= generate.stop_token_ids(None, tok)


def test_a_template_that_refuses_a_conversation_names_why():
    tok = family_tokenizer("gemma2")
    with pytest.raises(data.RowProblem, match="System role not supported"):
        data.encode({"messages": [{"role": "system", "content": "Be brief."}] + CONVERSATION[:2]}, tok, "chat",
                    {"messages": "messages"}, max_length=512)
