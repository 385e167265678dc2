"""Shared fixtures: tiny models built from a config right here, and an isolated studio home."""

from __future__ import annotations

import os
import sys

import pytest
import torch

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# -- no silent skips --------------------------------------------------------------------------------
# A skipped test is a test that did not run, and a suite that skips quietly (a missing `peft`, an
# import error in our own modules turned into a skip, a `skipif` that is always true here) passes
# while testing less. So a skip is a failure unless the test is marked `gpu` and this machine has no
# CUDA device; an `importorskip` or a `skip` at module level fails its module the same way.

TEST_EXTRAS = ("peft", "pytestqt", "hypothesis", "sacrebleu", "rouge_score")
"""What the extras "test" and "eval" install: the tests' oracles and plugins. A missing one fails the
whole session at its start, by name, rather than erroring (or skipping) test by test."""


def pytest_sessionstart(session):
    import importlib.util

    missing = [name for name in TEST_EXTRAS if importlib.util.find_spec(name) is None]
    if missing:
        raise pytest.UsageError(f"the tests need {', '.join(missing)} (install the extras: pip install -e "
                                "'.[test,quant,eval]' -c packaging/constraints.txt); no test skips for a missing package")


def _skip_allowed(item) -> bool:
    return item.get_closest_marker("gpu") is not None and not torch.cuda.is_available()


def _as_failure(report, where: str) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"{where} skipped ({reason}), and only tests marked gpu may skip, on a machine "
                       "without CUDA: make it run here, or mark it gpu (tests/conftest.py)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and not _skip_allowed(item):
        _as_failure(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped:
        _as_failure(report, collector.nodeid or "the test session")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` (tests/test_gpu.py: the CUDA, bf16/fp16 and bitsandbytes-on-CUDA paths)
    are skipped where torch sees no CUDA device, and only there: on a machine with one they run, and a
    missing piece (bitsandbytes, a kernel) fails them instead of hiding them."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


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


@pytest.fixture(autouse=True)
def _collect_garbage_in_the_main_thread():
    """Cycles left by a test (closed windows, pages) are collected here, in the GUI thread, never by
    whichever worker thread of the next test crosses the allocation threshold (see studio/gc_guard.py)."""
    yield
    if "PySide6.QtWidgets" in sys.modules:
        from studio import gc_guard

        gc_guard.install()
        gc_guard.collect_now()


def token_batch(vocab: int = 128, batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Translate to French: cheese, bread, wine. Answer: fromage, pain, vin.",
    "name[The Eagle], eatType[coffee shop], food[French], priceRange[moderate]",
    "Write a haiku about autumn leaves falling on a quiet river at dusk.",
    "0123456789 +-*/=()[]{}<>:;,.!?'\" abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


TOKENIZER_VOCAB = 320  # models that use tiny_tokenizer need at least this many embeddings


def tiny_tokenizer(vocab_size: int = 300, chat_template: bool = True):
    """A byte-level BPE tokenizer trained here on a few sentences (no network), with ChatML special
    tokens like SmolLM2's: ``<|im_start|>`` (id 0), ``<|im_end|>`` (id 1: end of turn, also EOS) and
    ``<pad>`` (id 2). The 256 byte symbols come first, so it has 259 + merges ids, all below
    ``TOKENIZER_VOCAB``: build models that use it with ``vocab_size=TOKENIZER_VOCAB``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|im_start|>", "<|im_end|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<pad>", unk_token=None)
    if chat_template:
        fast.chat_template = CHATML
    return fast


def tiny_checkpoint(folder, arch: str = "llama", seed: int = 0, chat_template: bool = True):
    """Write a complete Hugging Face checkpoint folder (config, model.safetensors, tokenizer) of a
    tiny model, as a user's own model folder would look. Returns the folder as a Path."""
    from pathlib import Path

    folder = Path(folder)
    model = (tiny_llama if arch == "llama" else tiny_gpt2)(
        seed, vocab_size=TOKENIZER_VOCAB, **({} if arch == "llama" else {"bos_token_id": 1, "eos_token_id": 1}))
    tok = tiny_tokenizer(chat_template=chat_template)
    assert len(tok) <= TOKENIZER_VOCAB
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny Llama-style checkpoint folder with a ChatML tokenizer."""
    return tiny_checkpoint(tmp_path / "tiny-llama")


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (training tests compare runs bit for bit)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def sum_assets(root, rows: int):
    """A tiny checkpoint folder and a ``rows``-row instruction dataset ("Add i and i+1.") under root."""
    import json

    ck = tiny_checkpoint(root / "ck")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Add {i} and {i + 1}.", "output": f"The sum is {2 * i + 1}."})
                            + "\n" for i in range(rows)))
    return ck, data


def _recording_trainer():
    from core.train import Trainer

    class RecordingTrainer(Trainer):
        """The trainer, keeping a copy of every batch it feeds the model (training and evaluation) in
        ``seen``, in order."""

        def _batch(self, *args, **kwargs):
            batch = super()._batch(*args, **kwargs)
            self.seen = getattr(self, "seen", [])
            self.seen.append({k: v.detach().clone() for k, v in batch.items()})
            return batch

    return RecordingTrainer


def __getattr__(name):  # RecordingTrainer is built on first use: importing core.train here costs seconds
    if name == "RecordingTrainer":
        return _recording_trainer()
    raise AttributeError(name)


def reference_loss(model, batches) -> tuple[float, int]:
    """transformers' own ``model(..., labels=labels).loss`` over several batches, each weighted by its
    trained tokens, and their count: the outside reference of the trainer's loss (transformers shifts
    the labels itself: token t+1 is predicted from positions up to t; -100 is not trained)."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for b in batches:
            n = int((b["labels"][:, 1:] != -100).sum())
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
            total += float(out.loss) * n
            tokens += n
    return total / tokens, tokens
