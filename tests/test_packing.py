"""Packed examples do not see each other: a packed batch's loss is the sum of its examples' losses
unpacked, for rotary (Llama, Qwen2) and learned absolute (GPT-2) positions, sdpa and eager
attention, through transformers' packed-sequence masks and through our block-diagonal mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TOKENIZER_VOCAB, tiny_gpt2, tiny_llama
from core import loss
from core.config import DataConfig
from core.dataset_cache import trained_per_example
from core.encoded import IGNORE, Encoded, EncodedSet
from core.packing import collate, pack

PAD = 0


def tiny_qwen2(seed: int = 0, **overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()


MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}


def _model(arch: str, attn: str):
    model = MODELS[arch]()
    model.set_attn_implementation(attn)
    return model


def _examples(n: int = 9, seed: int = 0) -> list[Encoded]:
    """Examples of 3-20 tokens: a prompt (not trained) then an answer; every other one trained whole,
    so an example's first token is a trained label (the case packing must not train across)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(3, 21))
        ids = rng.integers(3, 128, length).tolist()
        prompt = 0 if i % 2 else int(rng.integers(1, length - 1))
        out.append(Encoded(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def _unpacked_sum(model, examples) -> float:
    with torch.no_grad():
        return sum(float(loss.plain_loss_sum(model, collate([e], PAD))) for e in examples)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", sorted(MODELS))
def test_a_packed_batch_loses_what_its_examples_lose_unpacked(arch, attn):
    model = _model(arch, attn)
    examples = _examples()
    packed = pack(EncodedSet.from_encoded(examples), 48)
    assert len(packed) < len(examples) and len(set(packed.lengths.tolist())) > 1  # packed, and padded
    inner = np.setdiff1d(packed.starts, packed.offsets[:-1])
    assert packed.trained[inner].any()  # an example inside a sequence whose first token is trained
    batch = collate(list(packed), PAD)
    assert "position_ids" in batch
    expected = _unpacked_sum(model, examples)
    with torch.no_grad():
        for how in loss.PACKED_ATTENTION:
            for got in (loss.loss_sum(model, batch, packed_attention=how),
                        loss.plain_loss_sum(model, batch, packed_attention=how)):
                assert float(got) == pytest.approx(expected, rel=1e-5), how
        # without the position ids the examples see each other: the test can tell
        crossed = loss.loss_sum(model, {k: v for k, v in batch.items() if k != "position_ids"})
    assert abs(float(crossed) - expected) > 1e-3


def test_the_trainers_gradients_are_the_unpacked_ones(llama):
    """Through the trainer's loss (chunked, with a backward): the same loss and the same gradient."""
    examples = _examples(seed=1)
    packed_batch = collate(list(pack(EncodedSet.from_encoded(examples), 64)), PAD)
    plain_batch = collate(examples, PAD)
    grads = []
    for batch in (packed_batch, plain_batch):
        llama.zero_grad()
        total = loss.loss_sum(llama, batch)
        total.backward()
        grads.append((float(total), llama.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)


class OwnForward(torch.nn.Module):
    """A model whose code is not transformers' (as remote code is): it gets the block-diagonal mask."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_llama()
        self.config = self.inner.config

    def forward(self, **kw):
        assert kw["attention_mask"] is None or kw["attention_mask"].dim() == 4
        return self.inner(**kw)


def test_a_model_of_its_own_gets_the_block_mask():
    model = OwnForward()
    examples = _examples(seed=2)
    batch = collate(list(pack(EncodedSet.from_encoded(examples), 40)), PAD)
    assert loss.model_inputs(model, batch)["attention_mask"].shape[-2:] == batch["input_ids"].shape[1:] * 2
    assert loss.model_inputs(model.inner, batch)["attention_mask"] is None  # transformers' own reads positions
    with torch.no_grad():
        assert float(loss.loss_sum(model, batch)) == pytest.approx(_unpacked_sum(model.inner, examples), rel=1e-5)


def test_block_causal_mask():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    allowed = loss.block_causal_mask(positions)[0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                       [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    additive = loss.block_causal_mask(positions, torch.float32)[0, 0]
    assert additive[0, 0] == 0 and additive[0, 1] == torch.finfo(torch.float32).min


def test_packed_items_restart_positions_and_do_not_train_across():
    examples = [Encoded([5, 6, 7], [5, 6, 7]), Encoded([8, 9], [8, 9]), Encoded([10, 11, 12, 13], [-100, 11, 12, 13])]
    packed = pack(EncodedSet.from_encoded(examples), 5)
    assert packed.lengths.tolist() == [5, 4]
    first = packed[0]
    assert first.input_ids == [5, 6, 7, 8, 9] and first.position_ids == [0, 1, 2, 0, 1]
    assert first.labels == [5, 6, 7, IGNORE, 9]  # 8 is not the target of 7: another example's
    assert packed[1].position_ids == [0, 1, 2, 3]
    batch = collate(list(packed), PAD)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]  # the padding from 0 again
    # the trainer's token count (after the one-token shift) is what the packed labels train
    shifted = [sum(1 for x in e.labels[1:] if x != IGNORE) for e in packed]
    assert trained_per_example(packed).tolist() == shifted == [3, 3]
    assert trained_per_example(packed, block=1).tolist() == shifted


def test_prepared_packing_end_to_end(tmp_path, tokenizer):
    """A prepared (and cached) packed dataset of the tiny tokenizer: its batch's loss is the unpacked one."""
    import json

    from core import data

    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": f"row {i} " + "ab" * (i % 7)}) + "\n" for i in range(20)))
    cfg = DataConfig(path=str(f), max_length=64, packing=True)
    packed = data.prepare(cfg, tokenizer).train
    again = data.prepare(cfg, tokenizer).train  # from the cache: starts kept
    assert again.packed and [e.position_ids for e in again] == [e.position_ids for e in packed]
    plain = data.prepare(DataConfig(path=str(f), max_length=64), tokenizer).train
    model = tiny_llama(vocab_size=TOKENIZER_VOCAB)
    with torch.no_grad():
        got = float(loss.loss_sum(model, collate(list(again), tokenizer.pad_token_id)))
    assert got == pytest.approx(_unpacked_sum(model, list(plain)), rel=1e-5)
    assert int(trained_per_example(again).sum()) == int(trained_per_example(plain).sum())
