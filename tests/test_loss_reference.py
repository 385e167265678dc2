"""The trainer's logged loss against outside references, end to end: the batches the trainer really
builds (rendering, answer-only labels, padding, micro-batches), scored by transformers' own
``model(input_ids, attention_mask, labels=labels).loss`` on a freshly loaded base model (step 1, where
LoRA's B is zero) and through PEFT loading the adapter the trainer wrote (step 2).

tests/test_loss.py checks core.loss's function against transformers for every family it knows; this
checks what the trainer *reports*: the mean over the step's trained tokens, the labels it trains on,
and the batches it feeds, for a Llama-style and a GPT-2-style model.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TOKENIZER_VOCAB, RecordingTrainer, reference_loss, sum_assets, tiny_checkpoint, tiny_gpt2, tiny_tokenizer

from core import runs
from core.config import RunConfig
from core.data import IGNORE


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    yield


def _gpt2_checkpoint(folder):
    """A tiny GPT-2 checkpoint without dropout: the trainer runs in train mode and the reference in
    eval mode, which only agree when no dropout is drawn."""
    model = tiny_gpt2(vocab_size=TOKENIZER_VOCAB, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    tok = tiny_tokenizer()
    model.config.eos_token_id = model.config.bos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def _run(ck, data, out, steps: int):
    cfg = RunConfig()
    cfg.model.source, cfg.model.device, cfg.model.precision = str(ck), "cpu", "fp32"
    cfg.data.path, cfg.data.max_length = str(data), 48
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets = 4, 8, "all-linear"
    t = cfg.train
    t.steps, t.batch_size, t.grad_accum, t.lr, t.scheduler = steps, 3, 2, 2e-2, "constant"
    t.save_every, t.warmup, t.seed = 0, 0, 7
    cfg.out = str(out)
    trainer = RecordingTrainer(cfg)
    assert trainer.run().status == "finished"
    return trainer


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logged_loss_equals_transformers_and_peft_on_the_same_batches(arch, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    ck, data = sum_assets(tmp_path, 12)
    if arch == "gpt2":
        ck = _gpt2_checkpoint(tmp_path / "gpt2")
    else:
        ck = tiny_checkpoint(tmp_path / "llama", seed=3)
    two = _run(ck, data, tmp_path / "two", steps=2)
    rows = [r for r in runs.read_metrics(tmp_path / "two") if r.get("loss") is not None]
    assert [r["step"] for r in rows] == [1, 2] and len(two.seen) == 4  # 2 steps × 2 micro-batches

    # the labels: exactly each example's answer and its end-of-turn token, nothing of the prompt or padding
    tok = tiny_tokenizer()
    for b in two.seen:
        for ids, labels, mask in zip(b["input_ids"], b["labels"], b["attention_mask"]):
            trained = labels != IGNORE
            assert torch.equal(labels[trained], ids[trained]) and bool(mask[trained].all())
            text = tok.decode(ids[trained])
            assert text.startswith("The sum is ") and text.rstrip().endswith(tok.eos_token), text

    # step 1: the adapter's B is zero, so the model is the base exactly as transformers loads it
    base = AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()
    ref1, n1 = reference_loss(base, two.seen[:2])
    assert rows[0]["trained_tokens"] == n1
    assert rows[0]["loss"] == pytest.approx(ref1, rel=1e-5)

    # step 2: the adapter after one step (a one-step run of the same seed), loaded by PEFT
    _run(ck, data, tmp_path / "one", steps=1)
    tuned = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32),
                                           str(tmp_path / "one" / "adapter")).eval()
    ref2, n2 = reference_loss(tuned, two.seen[2:])
    assert rows[1]["trained_tokens"] == n2
    assert rows[1]["loss"] == pytest.approx(ref2, rel=1e-5)
    # the step moved the loss (lr 2e-2), so the step-2 check is not the base's loss again
    assert abs(ref2 - reference_loss(base, two.seen[2:])[0]) > 1e-3
