"""Shared fixtures: tiny models built from a config right here, and an isolated studio home."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_llama(seed: int = 0, **overrides):
    """A 2-layer Llama-style causal LM (GQA, SwiGLU MLP), fp32, small enough to run in milliseconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_gpt2(seed: int = 0, **overrides):
    """A 2-layer GPT-2-style causal LM (Conv1D layers with transposed weights), fp32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request):
    return tiny_llama() if request.param == "llama" else tiny_gpt2()


@pytest.fixture(autouse=True)
def studio_home(tmp_path, monkeypatch):
    """Every test gets its own LORA_STUDIO_HOME: no test touches the user's library or cache."""
    home = tmp_path / "studio-home"
    monkeypatch.setenv("LORA_STUDIO_HOME", str(home))
    return home


def token_batch(vocab: int = 128, batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)
