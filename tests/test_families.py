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
import math
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
    style = {"qwen2": "chatml", "qwen3": "chatml", "gemma2": "gemma", "gemma3": "gemma", "olmo2": "tulu"}
    assert chat.template_style(tok.chat_template) == style.get(family, family)
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


# -- the model matrix -----------------------------------------------------------------------------

ATTN = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o"}
SWIGLU = {"mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}
LLAMA_LIKE = {**ATTN, **SWIGLU}
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)

# family: (config class, model class, config settings beside SIZES that make it that family,
#          each adaptable module of a block (its name inside the block) -> the role it plays)
MODELS = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=500000.0, tie_word_embeddings=False), LLAMA_LIKE),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=32), LLAMA_LIKE),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True), LLAMA_LIKE),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=True), LLAMA_LIKE),  # q/k norms
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=16, attn_logit_softcapping=50.0,
                                                         final_logit_softcapping=30.0, sliding_window=16,
                                                         query_pre_attn_scalar=16), LLAMA_LIKE),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, sliding_window=16,
                                                             query_pre_attn_scalar=16), LLAMA_LIKE),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(), {"self_attn.qkv_proj": "qkv", "self_attn.o_proj": "o",
                                                       "mlp.gate_up_proj": "gate_up", "mlp.down_proj": "down"}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(), LLAMA_LIKE),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(embedding_multiplier=12.0, residual_multiplier=0.22,
                                                            attention_multiplier=0.015625, logits_scaling=8.0),
                LLAMA_LIKE),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(no_rope_layer_interval=2), LLAMA_LIKE),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=64, n_layer=2, n_head=4, n_positions=128),
             {"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "up", "mlp.c_proj": "down"}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(rotary_pct=0.25, use_parallel_residual=True),
                 {"attention.query_key_value": "qkv", "attention.dense": "o", "mlp.dense_h_to_4h": "up",
                  "mlp.dense_4h_to_h": "down"}),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(partial_rotary_factor=0.5),
            {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.dense": "o",
             "mlp.fc1": "up", "mlp.fc2": "down"}),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(new_decoder_architecture=True, num_kv_heads=2,
                                                         ffn_hidden_size=128),
               {"self_attention.query_key_value": "qkv", "self_attention.dense": "o", "mlp.dense_h_to_4h": "up",
                "mlp.dense_4h_to_h": "down"}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(), {**ATTN, "mlp.c_fc": "up", "mlp.c_proj": "down"}),
    # mixtures of experts: transformers keeps the experts as fused 3-D weights, so only attention adapts
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2), ATTN),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2, head_dim=16,
                                                               moe_intermediate_size=32), ATTN),
}
MIXTURES = {"mixtral", "qwen3_moe"}
NOT_SIZED = {"gpt2"}  # GPT-2's config names its sizes differently
PRESET_ROLES = {"attention-qv": {"q", "v", "qkv"}, "attention": {"q", "k", "v", "qkv", "o"},
                "mlp": {"gate", "up", "gate_up", "down"}}


def build(family: str, seed: int = 0):
    config_cls, model_cls, settings, _ = MODELS[family]
    sizes = {} if family in NOT_SIZED else dict(SIZES)
    if family == "gpt_neox" or family == "falcon":
        sizes.pop("num_key_value_heads")
    cfg = getattr(hf, config_cls)(vocab_size=TOKENIZER_VOCAB, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                                  **sizes, **settings)
    torch.manual_seed(seed)
    return getattr(hf, model_cls)(cfg).eval()


@pytest.mark.parametrize("family", list(MODELS))
def test_roles_are_read_and_presets_select_what_they_say(family):
    model = build(family)
    roles = MODELS[family][3]
    found = targets.list_targets(model)
    blocks = sorted({t.block for t in found if t.block})
    assert len(blocks) == 2
    for block in blocks:
        inside = {t.name[len(block) + 1:]: t.role for t in found if t.block == block}
        assert inside == roles, f"{block}: {inside}"
    heads = [t for t in found if t.is_head]
    assert len(heads) == 1 and heads[0].role == "head"
    for preset, wanted in PRESET_ROLES.items():
        if preset == "mlp" and family in MIXTURES:
            with pytest.raises(StudioError, match="mixture of experts .*Experts.*cannot adapt") as e:
                targets.resolve_targets(model, preset)
            assert "\n" not in str(e.value) and "--targets attention" in e.value.hint
            continue
        chosen = targets.resolve_targets(model, preset)
        assert sorted(chosen) == sorted(f"{b}.{n}" for b in blocks for n, r in roles.items() if r in wanted), preset
    assert sorted(targets.resolve_targets(model, "all-linear")) == sorted(f"{b}.{n}" for b in blocks for n in roles)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("family-data") / "data.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Add {i} and {i + 1}.", "output": f"It is {2 * i + 1}."}) + "\n"
                            for i in range(8)))
    return path


def _peft(base, folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()


@pytest.mark.parametrize("family", list(MODELS))
def test_three_steps_then_peft_and_the_merged_export_agree(family, rows, tmp_path):
    from core import export

    ckpt = tmp_path / "base"
    model = build(family)
    model.save_pretrained(ckpt, safe_serialization=True)
    tiny_tokenizer().save_pretrained(ckpt)
    cfg = RunConfig()
    cfg.model.source, cfg.model.device, cfg.model.precision = str(ckpt), "cpu", "fp32"
    cfg.data.path, cfg.data.max_length = str(rows), 48
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets = 4, 8, "all-linear"
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr, cfg.train.save_every = 3, 4, 5e-2, 0
    cfg.out = str(tmp_path / "run")
    result = Trainer(cfg).run()
    assert (result.status, result.step) == ("finished", 3) and math.isfinite(result.final_loss)
    folder = result.adapter

    base = hf.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ours = copy.deepcopy(base)
    adapter.load_adapter(ours, folder)
    want = logits(_peft(base, folder))  # the oracle: PEFT running our adapter unmerged
    got = logits(ours)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - logits(base)).abs().max() > 1e-4, "three steps at lr 5e-2 change the logits"

    export.export_merged(str(ckpt), [folder], out=tmp_path / "merged")
    plain = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # transformers alone
    assert not any("lora" in k for k in plain.state_dict())
    torch.testing.assert_close(logits(plain), want, atol=1e-5, rtol=0)
