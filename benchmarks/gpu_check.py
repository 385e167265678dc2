"""The GPU check: our engine against PEFT on real model shapes, and the trainer's GPU behaviour.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json]   # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --small                           # anywhere, minutes
    bash benchmarks/gpu_check.sh                        # on the device machine (installs carried wheels)

No model is downloaded: the models are built from the configurations of two real families with random
weights (a step's time and memory do not depend on the values): Llama-3.2-1B (hidden 2048, 16
layers, 32 query / 8 key-value heads, MLP 8192, vocabulary 128256, tied embeddings) and
Llama-3.1-8B (4096, 32 layers, 32/8 heads, MLP 14336, 128256, untied). ``--small`` builds tiny
models of the same two families (same head ratios and MLP ratios, a 1024-word vocabulary).

Sections, each guarded (a failure is recorded in the JSON and the next one runs), in this order:

``gpu_tests``
    ``pytest -m gpu`` over the test files that hold gpu-marked tests (tests/test_gpu.py), in a
    subprocess. On CUDA every one must pass (none may skip); without CUDA they all skip.
``pause``
    :class:`core.train.Trainer` on a loaded 1B-shape model (a :class:`core.models.LoadedModel` built
    here, a small JSONL written to a temporary folder, the tests' tiny tokenizer): a run paused from
    its callback after step 3 and resumed, against the same run uninterrupted. During the pause the
    accelerator memory must fall to at most 5 % of what it held (the model goes to the CPU and
    AdamW's moments are dropped; on the CPU, where nothing moves, AdamW's state must be empty), and
    every step's loss must equal the uninterrupted run's: bit for bit on the CPU; on CUDA within 2e-3
    relative, because attention's backward kernels accumulate with atomics and are not bit-
    reproducible from one run to the next, paused or not.
``oom``
    The same trainer with a batch far too large for the device. It must stop with the studio's own
    message (``core.train.Trainer._oom_error``: "out of memory on ..., lower --batch-size ..."), not a
    traceback, give the memory back, and leave the process usable: a small run on the same model
    then gives the same loss as the same run before the failure (CPU: bit for bit; CUDA: 2e-3). On the CPU the address space is limited (``RLIMIT_AS``, current size + 384 MiB)
    while the steps run, so the allocation really fails as on a machine with less memory, instead of
    pushing a shared machine into swap or the kernel's OOM killer.
``bf16_lora``
    Training steps of our LoRA and PEFT's, all-linear r=16 alpha=32, bf16 base with fp32 adapters on
    both sides, on the 1B shape and on the 8B shape at a few batch × length: tokens per second
    (median step) and peak memory (``torch.cuda.max_memory_allocated`` from a reset after warm-up;
    on the CPU the process's resident high-water mark, VmHWM). Ours is timed exactly as the trainer
    runs it: ``Trainer._loss_sum`` (the chunked loss through the head), backward, gradient clipping
    and ``make_adamw``'s fused AdamW, our layers from ``core.lora.inject_adapter``; PEFT as a PEFT
    user runs it: ``get_peft_model`` on the same modules, ``model(labels=...).loss``, torch's fused
    AdamW, the same clipping. Both run over the same base model object, one after the other.
    Targets (issue 13): tokens/s ≥ 1.15 × PEFT's, peak memory ≤ 0.7 × PEFT's.
``qlora_nf4``
    The same comparison on the 8B shape quantised to NF4 by ``core.quant.quantize_model`` (the
    bf16 model above, quantised in place); PEFT wraps that same quantised model with
    ``get_peft_model`` (no ``prepare_model_for_kbit_training``, which would upcast the norms and the
    head to fp32 and turn on checkpointing: not the same model). Same targets.

A global time budget (``--budget``, 420 s by default on CUDA, so the whole check stays under 8
minutes on one H200 with the imports and the report) skips whatever would overrun it, and says so in the JSON.
One JSON (``--out``) and a table on stdout; the exit status is 1 when any section failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROOT = common.ROOT
SPEED_TARGET = 1.15  # ours ÷ PEFT, tokens per second, at least
MEMORY_TARGET = 0.70  # ours ÷ PEFT, peak memory, at most
SECTIONS = ("gpu_tests", "pause", "oom", "bf16_lora", "qlora_nf4")
ONE_B, EIGHT_B = "llama-3.2-1b", "llama-3.1-8b"

FAMILIES = {  # the published configurations' shapes (config.json of each family)
    ONE_B: dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True),
    EIGHT_B: dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False),
}
SMALL = {  # the same families shrunk: 4 query heads per key-value head, MLP 4× and 3.5× the width
    ONE_B: dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                intermediate_size=256, vocab_size=1024, tie_word_embeddings=True),
    EIGHT_B: dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                  intermediate_size=448, vocab_size=1024, tie_word_embeddings=False),
}
LLAMA3 = dict(rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072, hidden_act="silu",
              attention_bias=False, mlp_bias=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)

# (family, batch, length, seconds) of the speed cases: the seconds are what the case is expected to
# cost on an H200 (both engines, building or quantising the model included), so that the budget
# starts only cases that can end inside it
CASES = {"bf16_lora": [(ONE_B, 4, 2048, 25), (EIGHT_B, 1, 2048, 60), (EIGHT_B, 4, 2048, 45)],
         "qlora_nf4": [(EIGHT_B, 1, 2048, 60), (EIGHT_B, 4, 2048, 60)]}
SMALL_CASES = {"bf16_lora": [(ONE_B, 2, 64, 0), (EIGHT_B, 2, 64, 0)], "qlora_nf4": [(EIGHT_B, 2, 64, 0)]}
SECTION_COST = {"gpu_tests": 90, "pause": 60, "oom": 60, "bf16_lora": 25, "qlora_nf4": 60}  # H200 s


class CheckFailed(Exception):
    """A check that ran and found the engine wrong (as opposed to a crash); ``details`` go to the JSON."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


# -- the run as a whole ----------------------------------------------------------------------------

class Check:
    """The options, the clock, the one model kept between sections, and the sections' results."""

    def __init__(self, args):
        import torch

        self.args = args
        self.device = args.device
        self.cuda = args.device.startswith("cuda")
        self.dtype = torch.bfloat16
        self.t0 = time.perf_counter()
        self.sections: dict[str, dict] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self._model = None  # (family, quantised, model): one model at a time, to keep peaks clean
        self._tokenizer = None

    # clock
    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.t0)

    def affords(self, h200_seconds: float) -> bool:
        """Whether a piece estimated at ``h200_seconds`` on the H200 fits the budget (small runs:
        always, they are sized by the caller's timeout)."""
        return self.args.small or self.left() >= h200_seconds

    # models
    def shape(self, family: str) -> dict:
        return dict((SMALL if self.args.small else FAMILIES)[family], **LLAMA3)

    def model(self, family: str, quantised: bool = False):
        """The model of ``family`` with random weights (seed 0) on the device in bf16, built once and
        kept until another family (or the unquantised one after quantising) is asked for; quantised
        to NF4 in place by core.quant when ``quantised``."""
        current = self._model
        if current is None or current[0] != family or (current[1] and not quantised):
            self.free_model()
            current = self._model = (family, False, build_model(self.shape(family), self.device, self.dtype))
        if quantised and not current[1]:
            from core import quant

            if not quant.quantize_model(current[2], "nf4", self.dtype):
                raise CheckFailed("core.quant.quantize_model replaced no layer")
            self._model = (family, True, current[2])
            free_memory(self.cuda)
        return self._model[2]

    def free_model(self) -> None:
        self._model = None
        free_memory(self.cuda)

    def tokenizer(self):
        """The tests' tiny byte-level BPE tokenizer (trained here, no network; ≤ 320 ids, so any
        model here has room for it). Importing tests/conftest.py lowers torch's thread count for the
        tests' sake; it is put back."""
        if self._tokenizer is None:
            import torch

            threads = torch.get_num_threads()
            sys.path.insert(0, str(ROOT / "tests"))
            from conftest import tiny_tokenizer

            torch.set_num_threads(threads)
            self._tokenizer = tiny_tokenizer()
        return self._tokenizer

    def loaded(self, family: str):
        """A :class:`core.models.LoadedModel` over :meth:`model`, as the window hands it to the trainer."""
        import torch

        from core.models import LoadedModel

        return LoadedModel(model=self.model(family), tokenizer=self.tokenizer(), device=torch.device(self.device),
                           dtype=self.dtype, spec=f"gpu-check:{family}", path=self.tmp)

    # sections
    def run(self, name: str, fn) -> None:
        """Run one section under a guard: its result, or its failure, goes into the JSON."""
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {name} ...", flush=True)
        if not self.affords(SECTION_COST[name]):
            self.sections[name] = {"status": "skipped", "reason": f"time budget: {self.left():.0f} s left"}
            return
        t = time.perf_counter()
        try:
            result = {"status": "ok", **(fn(self) or {})}
        except CheckFailed as e:
            result = {"status": "failed", "error": str(e), **e.details}
        except Exception as e:  # recorded, and the next section runs
            result = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                      "traceback": traceback.format_exc()[-4000:]}
        result["seconds"] = round(time.perf_counter() - t, 1)
        self.sections[name] = result
        free_memory(self.cuda)
        print(f"           {name}: {result['status']}" + (f" ({result['error']})" if "error" in result else ""),
              flush=True)


def build_model(shape: dict, device: str, dtype):
    """A LlamaForCausalLM of ``shape``, random weights (seed 0), built directly on ``device`` in
    ``dtype`` (an 8B model initialised on the CPU would take minutes), frozen, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


def free_memory(cuda: bool) -> None:
    """Collect cycles and give cached blocks back: to the CUDA driver, or (CPU) freed heap to the OS
    (glibc's malloc_trim), so the next measurement starts from what is really held."""
    gc.collect()
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    else:
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory_now(cuda: bool) -> int:
    """Bytes held now: CUDA tensors allocated, or the process's resident set on the CPU."""
    if cuda:
        import torch

        return int(torch.cuda.memory_allocated())
    return int(common.PeakMemory._status("VmRSS") or 0)


# -- bf16 LoRA and QLoRA: ours against PEFT --------------------------------------------------------

def _batch(vocab: int, batch: int, length: int, device: str) -> dict:
    """Fixed random tokens (common.token_batch: seed 0), every token trained, no padding."""
    import torch

    ids = common.token_batch(vocab, batch, length, device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _borrowed_trainer(check: Check):
    """A Trainer whose ``_loss_sum`` the benchmark calls: the trainer's own loss, not a copy of it."""
    from core.config import RunConfig
    from core.train import Trainer

    return Trainer(RunConfig(out=str(check.tmp / "borrowed")))


def _ours(check: Check, model, batch: dict):
    """Our adapter on ``model`` and the trainer's step over it; returns (step, trainable, undo)."""
    import torch

    from core import lora, targets
    from core.train import make_adamw

    names = targets.resolve_targets(model, "all-linear")
    torch.manual_seed(0)
    lora.inject_adapter(model, names, "default", rank=check.args.rank, alpha=check.args.alpha)
    model.train()
    params = list(lora.lora_parameters(model).values())
    opt = make_adamw(params, lr=1e-4)
    trainer = _borrowed_trainer(check)
    n_tokens = int((batch["labels"][:, 1:] != -100).sum())

    def step():
        loss = trainer._loss_sum(model, batch) / n_tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def undo():
        opt.state.clear()
        lora.remove_adapter(model, "default")
        model.eval()

    return step, sum(p.numel() for p in params), names, undo


def _peft(check: Check, model, batch: dict, names: list[str]):
    """PEFT's LoRA on the same modules, as a PEFT user trains it; returns (step, trainable, undo)."""
    import torch

    spec = SimpleNamespace(rank=check.args.rank, alpha=check.args.alpha, targets="names")
    torch.manual_seed(0)
    wrapped, params = common.peft_model(model, names, spec)
    wrapped.train()
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step():
        loss = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       labels=batch["labels"], use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def undo():
        opt.state.clear()
        wrapped.unload()  # PEFT's layers out, the base layers back in place (nothing merged)
        model.eval()

    return step, sum(p.numel() for p in params), undo


def _measure(check: Check, step, tokens: int) -> dict:
    """Warm-up steps, then the timed ones from a fresh peak: median step, tokens/s, peak bytes."""
    sync = common.device_sync(check.device)
    for _ in range(check.args.warmup):
        step()
    sync()
    free_memory(check.cuda)
    held = memory_now(check.cuda)
    peak = common.PeakMemory(check.device)
    peak.start()
    wall, _ = common.timed(step, check.args.steps, 0, sync)
    median = common.median(wall)
    return {"step_seconds": round(median, 5), "tokens_per_second": round(tokens / median, 1),
            "peak_bytes": peak.peak(), "held_before_bytes": held, "memory_source": peak.source}


def _case(check: Check, family: str, batch_size: int, length: int, quantised: bool) -> dict:
    model = check.model(family, quantised=quantised)
    batch = _batch(model.config.vocab_size, batch_size, length, check.device)
    tokens = batch_size * length
    row = {"family": family, "batch": batch_size, "length": length, "quantised": "nf4" if quantised else None}
    step, n_ours, names, undo = _ours(check, model, batch)
    try:
        row["ours"] = _measure(check, step, tokens)
    finally:
        undo()
        del step
        free_memory(check.cuda)
    step, n_peft, undo = _peft(check, model, batch, names)
    try:
        row["peft"] = _measure(check, step, tokens)
    finally:
        undo()
        del step
        free_memory(check.cuda)
    if n_ours != n_peft:
        raise CheckFailed(f"ours trains {n_ours:,} parameters, PEFT {n_peft:,}: not the same adapter")
    row["trainable_params"] = n_ours
    speed = row["ours"]["tokens_per_second"] / row["peft"]["tokens_per_second"]
    memory = row["ours"]["peak_bytes"] / row["peft"]["peak_bytes"]
    row.update(speed_ratio=round(speed, 3), memory_ratio=round(memory, 3),
               speed_target_met=speed >= SPEED_TARGET, memory_target_met=memory <= MEMORY_TARGET)
    return row


def _speed_section(check: Check, name: str, quantised: bool) -> dict:
    """Every case of ``name`` that the budget allows, each guarded on its own."""
    cases, failed = [], []
    for family, batch_size, length, cost in (SMALL_CASES if check.args.small else CASES)[name]:
        label = f"{family} {batch_size}x{length}"
        if not check.affords(cost):
            cases.append({"case": label, "status": "skipped", "reason": f"time budget: {check.left():.0f} s left"})
            continue
        print(f"           {label}", flush=True)
        try:
            cases.append({"case": label, "status": "ok", **_case(check, family, batch_size, length, quantised)})
        except Exception as e:
            failed.append(label)
            cases.append({"case": label, "status": "failed", "error": f"{type(e).__name__}: {e}",
                          "traceback": traceback.format_exc()[-3000:]})
            check.free_model()  # it may hold half an adapter: the next case builds a fresh one
    if failed:
        raise CheckFailed(f"{len(failed)} case(s) failed: {', '.join(failed)}", {"cases": cases})
    return {"cases": cases}


def section_bf16(check: Check) -> dict:
    return _speed_section(check, "bf16_lora", quantised=False)


def section_qlora(check: Check) -> dict:
    return _speed_section(check, "qlora_nf4", quantised=True)


# -- the trainer: pause and out-of-memory ------------------------------------------------------------

WORDS = ("order", "latte", "large", "oat", "milk", "extra", "shot", "please", "two", "cold", "brew",
         "vanilla", "syrup", "small", "cup", "with", "and", "no", "sugar", "today")


def _write_rows(path: Path, rows: int, words: int, seed: int) -> Path:
    """A JSONL of plain-text rows (every token trained) of ``words`` pseudo-random words each."""
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")
    return path


def _config(check: Check, out: Path, data: Path, *, steps: int, batch: int, max_length: int):
    from core.config import RunConfig

    cfg = RunConfig(out=str(out))
    cfg.model.source, cfg.model.device, cfg.model.precision = f"gpu-check:{ONE_B}", check.device, "bf16"
    cfg.data.path, cfg.data.max_length = str(data), max_length
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets = check.args.rank, check.args.alpha, "all-linear"
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr = steps, batch, 1e-3
    cfg.train.save_every, cfg.train.warmup, cfg.train.scheduler = 0, 1, "cosine"
    return cfg


def _losses(callback_events: list) -> list[float]:
    from core.train import StepEvent

    return [e.loss for e in callback_events if isinstance(e, StepEvent)]


def section_pause(check: Check) -> dict:
    from core.train import StatusEvent, StepEvent, Trainer

    data = _write_rows(check.tmp / "pause.jsonl", rows=48, words=120, seed=1)
    steps, pause_at = 6, 3
    batch, length = (4, 256) if not check.args.small else (2, 32)
    ref_events: list = []
    Trainer(_config(check, check.tmp / "ref", data, steps=steps, batch=batch, max_length=length),
            callback=ref_events.append, loaded=check.loaded(ONE_B)).run()
    seen: dict = {}
    events: list = []

    def callback(ev):
        events.append(ev)
        if isinstance(ev, StepEvent) and ev.step == pause_at:
            seen["before"] = memory_now(check.cuda)
            trainer.request_pause()
        if isinstance(ev, StatusEvent) and ev.kind == "paused":
            seen["during"] = memory_now(check.cuda)
            seen["optimizer_tensors"] = len(trainer.optimizer.state)
            trainer.request_resume()  # the trainer checks for it right after this event

    trainer = Trainer(_config(check, check.tmp / "paused", data, steps=steps, batch=batch, max_length=length),
                      callback=callback, loaded=check.loaded(ONE_B))
    result = trainer.run()
    ref, got = _losses(ref_events), _losses(events)
    diff = max((abs(a - b) / abs(b) for a, b in zip(got, ref)), default=math.inf)
    out = {"steps": steps, "paused_after": pause_at, "batch": batch, "length": length, "status_of_run": result.status,
           "losses": got, "uninterrupted_losses": ref, "max_relative_loss_difference": diff,
           "memory_before_pause_bytes": seen.get("before"), "memory_during_pause_bytes": seen.get("during"),
           "optimizer_tensors_during_pause": seen.get("optimizer_tensors"),
           "model_device_after": str(next(check.model(ONE_B).parameters()).device)}
    tolerance = 2e-3 if check.cuda else 0.0
    problems = []
    if result.status != "finished" or len(got) != steps or len(ref) != steps:
        problems.append(f"the runs did not both finish {steps} steps ({result.status}, {len(got)}, {len(ref)})")
    if "during" not in seen:
        problems.append("the trainer never reported 'paused'")
    elif seen["optimizer_tensors"]:
        problems.append("AdamW's state was kept during the pause")
    elif check.cuda and seen["during"] > 0.05 * seen["before"]:
        problems.append(f"GPU memory during the pause {seen['during']:,} B is over 5 % of {seen['before']:,} B")
    if not diff <= tolerance:
        problems.append(f"losses after resuming differ from the uninterrupted run's by {diff:.3g} relative "
                        f"(allowed {tolerance:g})")
    if not out["model_device_after"].startswith(check.device.split(":")[0]):
        problems.append(f"the model is on {out['model_device_after']} after the run")
    if problems:
        raise CheckFailed("; ".join(problems), out)
    return out


@contextlib.contextmanager
def _address_space_limit(extra: int):
    """On the CPU only: lower the soft RLIMIT_AS to the current virtual size + ``extra`` bytes while
    the block runs (the hard limit stays, so it can be put back)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    size = common.PeakMemory._status("VmSize")
    if size is None:
        raise CheckFailed("cannot read this process's size (/proc/self/status) to limit it")
    limit = size + extra if hard == resource.RLIM_INFINITY else min(hard, size + extra)
    try:
        yield lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _small_run(check: Check, tag: str):
    """Two short steps on the loaded 1B-shape model: what "the process is still usable" means."""
    from core.train import Trainer

    data = check.tmp / "short.jsonl"
    if not data.is_file():
        _write_rows(data, rows=16, words=40, seed=3)
    cfg = _config(check, check.tmp / f"small-{tag}", data, steps=2, batch=2, max_length=64)
    return Trainer(cfg, loaded=check.loaded(ONE_B)).run()


def _run_out_of_memory(check: Check, batch: int, length: int) -> tuple[str | None, str | None]:
    """One step of ``batch`` × ``length`` tokens; (the exception's type name, its message), or Nones."""
    from core.errors import StudioError
    from core.train import StatusEvent, Trainer

    data = _write_rows(check.tmp / "long.jsonl", rows=batch, words=1400, seed=2)
    with _address_space_limit(384 * 2**20) as limit:
        def callback(ev):  # the limit starts with the steps, after the data is tokenised
            if isinstance(ev, StatusEvent) and ev.kind == "training" and not check.cuda:
                limit()

        trainer = Trainer(_config(check, check.tmp / "oom", data, steps=1, batch=batch, max_length=length),
                          callback=callback, loaded=check.loaded(ONE_B))
        try:
            trainer.run()
        except StudioError as e:
            return "StudioError", str(e)
        except Exception as e:  # what a user would see as a traceback
            return type(e).__name__, str(e)[:500]
    return None, None


def section_oom(check: Check) -> dict:
    # CUDA: 256 × 2048 tokens of a 1B model want terabytes of activations; CPU (small): 64 × 2048
    # want a few GiB against a 384 MiB allowance
    batch, length = (256, 2048) if check.cuda else (64, 2048)
    before = _small_run(check, "before")
    free_memory(check.cuda)
    held = memory_now(check.cuda)
    kind, message = _run_out_of_memory(check, batch, length)
    free_memory(check.cuda)
    after = _small_run(check, "after")
    out = {"batch": batch, "length": length, "raised": kind, "message": message, "memory_before_bytes": held,
           "memory_after_bytes": memory_now(check.cuda), "run_after": after.status,
           "loss_of_a_small_run_before": before.final_loss, "loss_of_the_same_run_after": after.final_loss}
    problems = []
    if kind != "StudioError" or not message.startswith("out of memory on"):
        problems.append(f"the run did not stop with the studio's out-of-memory message (got "
                        f"{kind or 'no error at all'}: {(message or '')[:200]})")
    if check.cuda and out["memory_after_bytes"] > 1.05 * held + 2**26:
        problems.append(f"memory not given back: {held:,} B before, {out['memory_after_bytes']:,} B after")
    tolerance = 2e-3 if check.cuda else 0.0  # see the pause section: CUDA's attention backward
    same = (before.final_loss is not None and after.final_loss is not None
            and abs(after.final_loss - before.final_loss) <= tolerance * abs(before.final_loss))
    if after.status != "finished" or not same:
        problems.append(f"a small run after it did not repeat the same run before it ({before.status} "
                        f"{before.final_loss} → {after.status} {after.final_loss})")
    if problems:
        raise CheckFailed("; ".join(problems), out)
    return out


# -- the tests marked gpu --------------------------------------------------------------------------

def _gpu_test_files() -> list[str]:
    """The test files that hold gpu-marked tests (only those: the GUI's test files need Qt, which a
    GPU machine may lack, and the others have nothing to run under ``-m gpu``)."""
    marked = re.compile(r"(pytest\.)?mark\.gpu\b")
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if marked.search(p.read_text()))


def section_gpu_tests(check: Check) -> dict:
    import torch

    files = _gpu_test_files()
    if not files:
        raise CheckFailed("no test file holds gpu-marked tests")
    junit = check.tmp / "gpu-tests.xml"
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "gpu", "-q", f"--junitxml={junit}", *files]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=max(60.0, check.left()) if not check.args.small else 600)
    tests = _junit_outcomes(junit) if junit.is_file() else []
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped")}
    out = {"files": files, "returncode": proc.returncode, "counts": counts, "tests": tests,
           "output_tail": (proc.stdout + proc.stderr)[-3000:]}
    cuda = torch.cuda.is_available()
    if not tests:
        raise CheckFailed("pytest ran no gpu-marked test", out)
    if counts["failed"] or proc.returncode not in (0, 5):
        raise CheckFailed(f"{counts['failed']} gpu test(s) failed (pytest exit {proc.returncode})", out)
    if cuda and counts["skipped"]:
        raise CheckFailed(f"{counts['skipped']} gpu test(s) skipped on a CUDA machine", out)
    if not cuda and counts["skipped"] != len(tests):
        raise CheckFailed("gpu tests ran without CUDA: the conftest hook did not skip them", out)
    out["note"] = "all skipped: no CUDA device here" if not cuda else "all passed on CUDA"
    return out


def _junit_outcomes(path: Path) -> list[dict]:
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "skipped" if child.tag == "skipped" else "failed"
                message = (child.get("message") or "").splitlines()[0][:300] if child.get("message") else ""
        out.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "message": message})
    return out


# -- report ----------------------------------------------------------------------------------------

def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def table(sections: dict) -> str:
    """The figures and verdicts, one line each."""
    lines = [f"{'section':<11} {'case':<24} {'what':<10} {'ours':>14} {'PEFT':>14} {'ratio':>6} {'target':>7}  verdict"]
    for name in ("bf16_lora", "qlora_nf4"):
        for c in sections.get(name, {}).get("cases", []):
            if c["status"] != "ok":
                lines.append(f"{name:<11} {c['case']:<24} {c['status']}: {c.get('error') or c.get('reason')}")
                continue
            o, p = c["ours"], c["peft"]
            lines.append(f"{name:<11} {c['case']:<24} {'tokens/s':<10} {o['tokens_per_second']:>14,.0f} "
                         f"{p['tokens_per_second']:>14,.0f} {c['speed_ratio']:>6.3f} {'≥' + str(SPEED_TARGET):>7}  "
                         f"{'met' if c['speed_target_met'] else 'missed'}")
            lines.append(f"{'':<11} {'':<24} {'peak':<10} {_gib(o['peak_bytes']):>14} {_gib(p['peak_bytes']):>14} "
                         f"{c['memory_ratio']:>6.3f} {'≤' + str(MEMORY_TARGET):>7}  "
                         f"{'met' if c['memory_target_met'] else 'missed'}")
    for name in SECTIONS:
        s = sections.get(name)
        if s is None:
            continue
        detail = s.get("error") or s.get("reason") or s.get("note") or ""
        if name == "pause" and s["status"] == "ok":
            detail = (f"loss Δ {s['max_relative_loss_difference']:.2g} relative; memory "
                      f"{_gib(s['memory_before_pause_bytes'])} → {_gib(s['memory_during_pause_bytes'])} in the pause")
        if name == "oom" and s["status"] == "ok":
            detail = f"'{s['message'][:70]}...'; then a small run {s['run_after']}"
        lines.append(f"{name:<11} {s['status']:<8} {s.get('seconds', 0):>6} s  {detail}")
    return "\n".join(lines)


def parse_args(argv=None):
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny shapes of the same families (minutes on a CPU)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole check (420; small: 1800)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per engine and case (5; small: 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (2; small: 1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (small runs on the CPU: 1, as the tests use: on a busy machine a "
                         "second thread makes a tiny step many times slower)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ", ".join(SECTIONS))
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch sees no CUDA device here; use --device cpu --small")
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        ap.error(f"--sections: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    args.budget = args.budget or (420.0 if not args.small else 1800.0)
    args.steps = args.steps or (2 if args.small else 5)
    args.warmup = args.warmup or (1 if args.small else 2)
    if args.threads or (args.small and not args.device.startswith("cuda")):
        torch.set_num_threads(args.threads or 1)
    return args


RUNNERS = {"gpu_tests": section_gpu_tests, "pause": section_pause, "oom": section_oom,
           "bf16_lora": section_bf16, "qlora_nf4": section_qlora}


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    home = tempfile.mkdtemp(prefix="gpu-check-home-")
    os.environ["LORA_STUDIO_HOME"] = home  # the check's runs and caches never touch the user's studio
    args = parse_args(argv)
    check = Check(args)
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    wanted = args.sections.split(",")
    for name in SECTIONS:
        if name in wanted:
            check.run(name, RUNNERS[name])
    check.free_model()
    info = common.machine()
    for mod in ("bitsandbytes", "datasets"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    report = {"script": "benchmarks/gpu_check.py", "started": started,
              "seconds": round(time.perf_counter() - check.t0, 1), "machine": info,
              "args": vars(args), "targets": {"tokens_per_second_ratio_at_least": SPEED_TARGET,
                                              "peak_memory_ratio_at_most": MEMORY_TARGET},
              "sections": check.sections}
    from core import atomic

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(args.out, report)
    print(table(check.sections))
    print(f"machine: {common.describe(info)}; bitsandbytes {info['bitsandbytes']}")
    print(f"wrote {args.out} ({report['seconds']} s)")
    return 1 if any(s["status"] == "failed" for s in check.sections.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
