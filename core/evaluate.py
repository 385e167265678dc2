"""Held-out evaluation: answer every example with the base model and with each adapter, then score.

The path::

    file (or a run's validation split) ──read_examples()──▶ [Example(row, messages, reference)]
        ──Evaluation.run()──▶ per system: batched greedy answers (+ the held-out loss)
        ──core.metrics──▶ EvalResult(systems × metrics, bootstrap intervals, per-example scores)
        ──write_results()──▶ DIR/results.json, DIR/predictions.jsonl, DIR/results.csv

A *system* is the base model alone (``base``) or the base with one adapter active. Every system
answers the same prompts, rendered exactly as in training (:func:`core.data.prompt_ids`), greedily
(argmax: deterministic, no random numbers), in batches of left-padded prompts through transformers'
``generate``; with ``batch_size=1`` the answers equal :func:`core.generate.generate` greedy, which the
tests check. A cancel is honoured within the current batch (a stopping criterion asks it after every
token). The model is shared: adapters are loaded one at a time and removed again, leaving the model
as it was.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from core import atomic, metrics
from core.errors import Cancelled, StudioError

BASE = "base"
"""The name of the base model's system in results."""


@dataclass
class Example:
    """One held-out example."""

    row: int
    """1-based row of the file it came from."""
    messages: list[dict]
    """The conversation up to the answer (system and user turns, earlier turns included)."""
    reference: str
    """The reference answer (the last assistant turn)."""

    @property
    def prompt(self) -> str:
        """The last user turn, as a person reads the example."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


def _rows_text(rows: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def read_examples(path: str | Path, *, format: str = "auto", fields: dict | None = None,
                  limit: int | None = None, rows: Sequence[int] | None = None) -> list[Example]:
    """The examples of a file with reference answers (any format :func:`core.data.read` knows).

    ``rows`` (0-based) picks some rows only (a run's validation split); ``limit`` keeps the first N.
    Rows without a reference answer (missing or empty) are one :class:`StudioError` naming them."""
    from core import data

    source = data.read(path, format=format, fields=fields)
    if source.format == "text":
        raise StudioError(f"{path}: plain text has no reference answers to compare with",
                          hint="use prompt/completion, instruction/output or chat rows")
    chosen = list(range(source.rows)) if rows is None else sorted(int(r) for r in rows)
    if limit is not None and limit > 0:
        chosen = chosen[:limit]
    out, missing, bad = [], [], {}
    for r in chosen:
        row = source.row(r)
        try:
            msgs = data._conversation(row, source.format, source.fields)  # noqa: SLF001 (the one reader of rows)
        except data.RowProblem as e:
            if e.message in ("empty answer", "no assistant turn"):
                missing.append(r + 1)
            else:
                bad.setdefault(e.message, []).append(r + 1)
            continue
        out.append(Example(row=r + 1, messages=msgs[:-1], reference=msgs[-1]["content"].strip()))
    if missing:
        raise StudioError(f"{path}: row{'s' if len(missing) > 1 else ''} {_rows_text(missing)} "
                          f"{'have' if len(missing) > 1 else 'has'} no reference answer (missing or empty)",
                          hint="fill the answers in or remove those rows")
    if bad:
        msg, where = next(iter(bad.items()))
        raise StudioError(f"{path}: row{'s' if len(where) > 1 else ''} {_rows_text(where)}: {msg}")
    if not out:
        raise StudioError(f"{path}: no example to evaluate")
    return out


def validation_rows(rows: int, val_split: float, seed: int) -> list[int]:
    """The 0-based rows :func:`core.data.prepare` holds out for ``val_split`` and ``seed`` (the same
    seeded permutation; the split is by row, independent of the tokenizer)."""
    n_val = int(round(rows * val_split)) if val_split > 0 else 0
    if n_val == 0:
        return []
    return sorted(int(i) for i in np.random.default_rng(seed).permutation(rows)[:n_val])


def run_examples(run_dir: str | Path, *, limit: int | None = None) -> list[Example]:
    """The validation split of a run folder (its config.json's data, val_split and seed)."""
    from core import data
    from core.config import RunConfig

    cfg_path = Path(run_dir) / "config.json"
    if not cfg_path.is_file():
        raise StudioError(f"{run_dir}: not a run folder (no config.json)")
    cfg = RunConfig.load(cfg_path)
    if not cfg.data.val_split:
        raise StudioError(f"{run_dir}: this run held out no validation split (val_split 0)",
                          hint="choose a file with reference answers")
    path = cfg.data.path or str(data.sample_dataset())
    source = data.read(path, format=cfg.data.format, fields=cfg.data.fields)
    return read_examples(path, format=cfg.data.format, fields=cfg.data.fields, limit=limit,
                         rows=validation_rows(source.rows, cfg.data.val_split, cfg.train.seed))


# -- answers ---------------------------------------------------------------------------------------

def _prompt_ids(tokenizer, examples: Sequence[Example]) -> list[list[int]]:
    from core import data

    return [data.prompt_ids(tokenizer, ex.messages) for ex in examples]


def generate_batch(model, tokenizer, examples: Sequence[Example], *, max_new_tokens: int,
                   cancel: Callable[[], bool] | None = None) -> list[str]:
    """Greedy answers to a batch of examples (left-padded; transformers' ``generate``), each cut at its
    first end-of-turn or end-of-sequence token. Raises :class:`Cancelled` when ``cancel()`` turns true."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from core.generate import _context_length, _model_device, stop_token_ids

    prompts = _prompt_ids(tokenizer, examples)
    limit = _context_length(model)
    longest = max(len(p) for p in prompts)
    if limit is not None and longest >= limit:
        i = max(range(len(prompts)), key=lambda k: len(prompts[k]))
        raise StudioError(f"row {examples[i].row}: the prompt has {longest} tokens; this model reads at most {limit}",
                          hint="shorten it or leave the row out")
    new = max_new_tokens if limit is None else min(max_new_tokens, limit - longest)
    stops = sorted(stop_token_ids(model, tokenizer))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    device = _model_device(model)
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1

    class _Cancel(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), bool(cancel and cancel()), dtype=torch.bool,
                              device=input_ids.device)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=new, eos_token_id=stops or None, pad_token_id=pad,
                                 stopping_criteria=StoppingCriteriaList([_Cancel()]), num_beams=1,
                                 temperature=None, top_p=None, top_k=None)
    finally:
        if was_training:
            model.train()
    if cancel is not None and cancel():
        raise Cancelled("evaluation cancelled")
    answers = []
    for row in out[:, longest:].tolist():
        cut = next((k for k, t in enumerate(row) if t in stops), len(row))
        answers.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return answers


def example_losses(model, tokenizer, examples: Sequence[Example], *, max_length: int = 2048,
                   batch_size: int = 8) -> list[tuple[float, int]]:
    """Per example: (Σ next-token cross-entropy over the reference answer's tokens, their count), the
    answer tokenised exactly as training trains it (its end-of-turn token included)."""
    import torch
    import torch.nn.functional as F

    from core import data
    from core.loss import IGNORE, shifted_labels

    encoded = [data.encode({"messages": ex.messages + [{"role": "assistant", "content": ex.reference}]},
                           tokenizer, "chat", {"messages": "messages"}, max_length=max_length) for ex in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    from core.generate import _model_device

    device = _model_device(model)
    out = []
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            batch = data.collate(encoded[start:start + batch_size], pad)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
            labels = shifted_labels(batch["labels"]).to(device)
            ce = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
            counts = (labels != IGNORE).sum(dim=1)
            out += [(float(s), int(c)) for s, c in zip(ce.sum(dim=1).tolist(), counts.tolist())]
    return out


# -- the whole evaluation --------------------------------------------------------------------------

@dataclass
class System:
    """What answers: the base model (``adapter`` None) or the base with one adapter folder."""

    name: str
    adapter: str | None = None


def systems_for(adapters: Sequence[str | Path], *, base: bool = True, names: Sequence[str] | None = None) -> list[System]:
    """``base`` first (unless left out), then one system per adapter folder, named after its folder
    (or ``names``), made unique."""
    out = [System(BASE)] if base else []
    taken = {BASE} if base else set()
    for i, a in enumerate(adapters):
        name = (names[i] if names else None) or Path(a).name
        if Path(a).name == "adapter" and not (names and names[i]):  # a run folder's adapter/: named after the run
            name = Path(a).parent.name
        unique, k = name, 2
        while unique in taken:
            unique, k = f"{name}-{k}", k + 1
        taken.add(unique)
        out.append(System(unique, str(a)))
    if not out:
        raise StudioError("nothing to evaluate: give at least one --adapter, or leave out --no-base")
    return out


Progress = Callable[[str, int, int], None]
"""``progress(system, done, total)``: examples answered so far for ``system``."""


def evaluate(loaded, examples: Sequence[Example], systems: Sequence[System], *,
             metric_names: Sequence[str] = metrics.DEFAULT_METRICS, max_new_tokens: int = 128,
             batch_size: int = 8, max_length: int = 2048, chat_template: str = "auto",
             bootstrap_samples: int = 200, progress: Progress | None = None,
             cancel: Callable[[], bool] | None = None):
    """Answer ``examples`` with every system on ``loaded`` (a :class:`core.models.LoadedModel`) and score
    them. Each adapter is loaded, made the only active one, and removed afterwards; adapters already on
    the model are switched off for the time and switched back on. Raises :class:`Cancelled` when
    ``cancel()`` turns true (within one batch)."""
    from core import adapter as adapter_mod, chat, lora
    from core.eval_results import EvalResult, SystemResult, score_system

    if batch_size < 1:
        raise StudioError(f"--batch-size must be at least 1 (got {batch_size})")
    if max_new_tokens < 1:
        raise StudioError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    model = loaded.model
    tokenizer = chat.with_template(loaded.tokenizer, chat_template)
    was_active = lora.active_adapters(model)
    results = []
    try:
        for system in systems:
            started = time.perf_counter()
            name = None
            if system.adapter is not None:
                name = "evaluating"
                k = 2
                while name in lora.adapter_names(model):
                    name, k = f"evaluating-{k}", k + 1
                adapter_mod.load_adapter(model, system.adapter, name)
            lora.set_active_adapters(model, [name] if name else [])
            try:
                result = SystemResult(system.name, system.adapter, [])
                for start in range(0, len(examples), batch_size):
                    if cancel is not None and cancel():
                        raise Cancelled("evaluation cancelled")
                    chunk = examples[start:start + batch_size]
                    result.predictions += generate_batch(model, tokenizer, chunk, max_new_tokens=max_new_tokens,
                                                         cancel=cancel)
                    if progress is not None:
                        progress(system.name, len(result.predictions), len(examples))
                losses = (example_losses(model, tokenizer, examples, max_length=max_length, batch_size=batch_size)
                          if "loss" in metric_names else None)
            finally:
                if name is not None:
                    lora.remove_adapter(model, name)
            score_system(result, examples, metric_names, losses=losses, bootstrap_samples=bootstrap_samples)
            result.seconds = time.perf_counter() - started
            results.append(result)
    finally:
        lora.set_active_adapters(model, [a for a in was_active if a in lora.adapter_names(model)])
    settings = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "decoding": "greedy",
                "model": getattr(loaded, "spec", ""), "bootstrap_samples": bootstrap_samples,
                "confidence": 0.95, "chat_template": chat_template}
    return EvalResult(examples=list(examples), systems=results, metrics=list(metric_names), settings=settings)
