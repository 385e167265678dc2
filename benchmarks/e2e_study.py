"""The README's study: which r and which matrices, on E2E NLG with the bundled default (issue 16).

What it does, in order:

1. **Split by meaning representation.** ``../shared/data/e2e/devset.csv`` (read from there, never
   copied into the repository) has 547 distinct MRs with several reference sentences each. The MRs
   are shuffled with ``--seed``; ``--test-mrs`` of them are held out for the test, every sentence of
   the others is a training row. No test MR is seen in training, and nothing is tuned on the test
   MRs: every setting below is fixed before the test is scored. The training rows' own validation
   split (``--val-split``, by row, so its MRs also appear in training) gives the validation loss.
2. **Table 6 of the paper:** a sweep of ``--ranks`` × ``--target-sets`` (core.sweep), every cell the
   same steps, batch, learning rate and seed.
3. **Table 5 of the paper:** a sweep of the target sets at a fixed parameter budget (``--budget``;
   default: what r = 8 on W_q trains), each set at the rank that trains about that many parameters.
4. **Full fine-tuning** as the reference: every weight trained, the same steps, batch, schedule and
   seed, with its own learning rate (``--full-lr``; full fine-tuning diverges at LoRA's rates).
5. **BLEU on the held-out MRs** (greedy answers, core.evaluate; sacrebleu with all of each MR's
   references, as the E2E challenge scores), for the base model, every cell and full fine-tuning;
   also chrF, and the single-reference BLEU Evaluate reports. Each cell's scores are written into its
   sweep's results.json (``metrics``), so the Sweep window's heatmap can show them.

Everything goes under ``--work`` (default ``~/.cache/lora-studio-bench/e2e-study``): the split files,
the two sweep folders (resumable: run the same command again after a crash) and the evaluations.
The summary (tables, the machine, the command) is printed and written to ``--json-out``.

The study at the defaults is 10 runs of 60 steps (7-8 minutes each on a 2-core CPU with one torch thread
while other work ran, full fine-tuning 13 minutes; two threads on a busy machine were slower). Run again with more ranks or target sets, it trains and
scores only what is new: the base model's scores, each cell's and full fine-tuning's are kept in --work.
Check it first at a miniature size:

    flock /tmp/heavy.lock .venv/bin/python benchmarks/e2e_study.py --steps 3 --ranks 1,2 \
        --target-sets q+v --no-budget --test-mrs 4 --max-new-tokens 16 --work /tmp/e2e-mini

The full study (the README's command; one torch thread, see above):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/e2e_study.py \
        --json-out benchmarks/results/e2e_study-cpu.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from common import ROOT, describe, machine, write_json

E2E = ROOT.parent / "shared" / "data" / "e2e" / "devset.csv"
PROMPT = "Write one sentence describing this restaurant: {mr}"


def split_by_mr(path: Path, test_mrs: int, seed: int) -> tuple[list[dict], dict[str, list[str]]]:
    """Training rows (prompt/completion, every sentence of the training MRs) and the held-out MRs with
    all their references. The split is over distinct MRs, never over rows."""
    import numpy as np

    with open(path, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["mr"].strip() and r["ref"].strip()]
    refs: dict[str, list[str]] = {}
    for r in rows:
        refs.setdefault(r["mr"].strip(), []).append(r["ref"].strip())
    mrs = sorted(refs)
    if not 0 < test_mrs < len(mrs):
        raise SystemExit(f"--test-mrs must be between 1 and {len(mrs) - 1}")
    order = np.random.default_rng(seed).permutation(len(mrs))
    held = {mrs[i] for i in order[:test_mrs]}
    train = [{"prompt": PROMPT.format(mr=m), "completion": s} for m in mrs if m not in held for s in refs[m]]
    assert not {t["prompt"] for t in train} & {PROMPT.format(mr=m) for m in held}  # no test MR is trained on
    return train, {m: refs[m] for m in sorted(held)}


def base_config(args, data: Path):
    from core.config import RunConfig

    cfg = RunConfig()
    cfg.model.source, cfg.model.device, cfg.model.precision = args.model, args.device, args.precision
    cfg.data.path, cfg.data.val_split, cfg.data.max_length = str(data), args.val_split, args.max_length
    t = cfg.train
    t.steps, t.epochs, t.batch_size, t.lr, t.seed = args.steps, None, args.batch_size, args.lr, args.seed
    t.warmup, t.scheduler, t.save_every, t.eval_every = min(20, args.steps // 10), "linear", 50, 0
    cfg.lora.alpha = 16.0
    return cfg


def full_finetune(cfg, loaded, lr: float) -> dict:
    """Every weight trained with the trainer's batch order, loss and schedule (core.train's pieces),
    AdamW at ``lr``; returns its final loss and seconds. The model is changed in place."""
    import numpy as np
    import torch

    from core import data
    from core.loss import loss_sum
    from core.train import lr_factor, make_adamw

    torch.manual_seed(cfg.train.seed)
    model, tok = loaded.model, loaded.tokenizer
    prepared = data.prepare(cfg.data, tok, seed=cfg.train.seed)
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = make_adamw(params, lr=lr, weight_decay=cfg.train.weight_decay)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rng = np.random.default_rng(cfg.train.seed)
    order, pos, loss = rng.permutation(len(prepared.train)), 0, None
    model.train()
    started = time.perf_counter()
    for step in range(cfg.train.steps):
        if pos + cfg.train.batch_size > len(order):
            order, pos = rng.permutation(len(prepared.train)), 0
        batch = data.collate([prepared.train[int(i)] for i in order[pos:pos + cfg.train.batch_size]], pad)
        pos += cfg.train.batch_size
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, cfg.train.steps, cfg.train.warmup, cfg.train.scheduler)
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        value = loss_sum(model, batch) / max(1, tokens)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(value.detach())
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return {"final_loss": loss, "seconds": round(time.perf_counter() - started, 1), "lr": lr}


def score(loaded, examples, systems, refs: dict[str, list[str]], args) -> dict:
    """Greedy answers of ``systems`` on the held-out MRs; multi-reference BLEU and chrF, and Evaluate's
    single-reference BLEU."""
    from core import evaluate, metrics

    result = evaluate.evaluate(loaded, examples, systems, metric_names=["bleu", "chrf"],
                               max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch)
    out = {}
    all_refs = list(refs.values())  # in the order of the examples (both made from the same dict)
    for s in result.systems:
        out[s.name] = {"bleu": metrics.multi_reference("bleu", s.predictions, all_refs),
                       "chrf": metrics.multi_reference("chrf", s.predictions, all_refs),
                       "bleu_single_reference": s.scores["bleu"], "example": s.predictions[0]}
    return out


def base_score(loaded, examples, refs: dict[str, list[str]], args) -> tuple[dict, bool]:
    """The base model's scores, kept in ``--work`` so that continuing a stopped study does not
    generate them again (they depend only on the held-out MRs and the generation settings); and
    whether they were kept, i.e. the evaluation settings are those of before (then the cells' and
    full fine-tuning's kept scores hold too)."""
    from core import evaluate

    key = {"model": args.model, "precision": args.precision, "seed": args.seed, "test_mrs": args.test_mrs,
           "max_new_tokens": args.max_new_tokens, "eval_batch": args.eval_batch}
    path = args.work / "base-scores.json"
    if path.is_file():
        kept = json.loads(path.read_text(encoding="utf-8"))
        if kept.get("key") == key:
            return kept["scores"], True
    scores = score(loaded, examples, [evaluate.System("base")], refs, args)["base"]
    path.write_text(json.dumps({"key": key, "scores": scores}), encoding="utf-8")
    return scores, False


def run_sweep(cfg, folder: Path, loaded, **grid) -> list:
    from core import sweep

    def say(kind, cell, event):
        if kind == "done":
            print(f"  {cell.key}: {cell.status}, final loss {cell.final_loss}, {cell.seconds} s", file=sys.stderr)

    return sweep.Sweep(cfg, folder, loaded=loaded, callback=say, **grid).run()


def evaluate_cells(folder: Path, cells, loaded, examples, refs, args) -> dict:
    from core import evaluate, sweep

    done = [c for c in cells if c.status == "finished"]
    kept = {c.key: dict(c.metrics) for c in done if args.same_eval and "bleu" in (c.metrics or {})}
    systems = [evaluate.System(c.key, str(folder / c.run / "adapter")) for c in done if c.key not in kept]
    scores = {**kept, **(score(loaded, examples, systems, refs, args) if systems else {})}
    for c in done:
        c.metrics = {k: v for k, v in scores[c.key].items() if k != "example"}
    sweep.write_results(folder, cells)
    return scores


def markdown(cells, scores: dict, key: str = "bleu") -> str:
    from core.sweep_report import heatmap

    h = heatmap(cells, f"metrics.{key}")
    lines = ["| r \\ targets | " + " | ".join(h["targets"]) + " |", "|---" * (len(h["targets"]) + 1) + "|"]
    for r, row in zip(h["ranks"], h["values"]):
        lines.append(f"| {r} | " + " | ".join("–" if v is None else f"{v:.1f}" for v in row) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    from core.sweep import TABLE5_TARGET_SETS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--e2e", type=Path, default=E2E, help=f"the E2E devset.csv (default: {E2E})")
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", help="the LoRA runs' precision (full fine-tuning is always fp32)")
    p.add_argument("--work", type=Path, default=Path.home() / ".cache" / "lora-studio-bench" / "e2e-study")
    p.add_argument("--test-mrs", type=int, default=30, help="held-out MRs (default: 30 of 547)")
    p.add_argument("--val-split", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4, help="LoRA's learning rate (default: 5e-4)")
    p.add_argument("--full-lr", type=float, default=5e-5, help="full fine-tuning's (default: 5e-5)")
    p.add_argument("--ranks", default="1,8,64", help="Table 6's ranks (default: 1,8,64)")
    p.add_argument("--target-sets", default="q+v", help="Table 6's target sets (default: q+v)")
    p.add_argument("--budget-sets", default="q,k,v,q+v,q+k+v+o,all-linear",
                   help=f"Table 5's target sets at the fixed budget (default: q,k,v,q+v,q+k+v+o,all-linear; "
                        f"the paper's: {','.join(TABLE5_TARGET_SETS)})")
    p.add_argument("--budget", type=int, help="Table 5's parameter budget (default: r = 8 on q)")
    p.add_argument("--no-budget", action="store_true", help="leave out the fixed-budget sweep")
    p.add_argument("--no-full", action="store_true", help="leave out full fine-tuning")
    p.add_argument("--max-length", type=int, default=128, help="tokens per training example (default: 128)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--eval-batch", type=int, default=15)
    p.add_argument("--json-out")
    return p.parse_args(argv)


def write_split(args) -> tuple[list[dict], dict[str, list[str]], Path, list]:
    """Split by MR (step 1) into ``--work``: the training rows, the held-out MRs with their references,
    the training file and the held-out MRs as evaluation examples."""
    from core import evaluate

    args.work.mkdir(parents=True, exist_ok=True)
    train, held = split_by_mr(args.e2e, args.test_mrs, args.seed)
    data = args.work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train), encoding="utf-8")
    examples = [evaluate.Example(row=i + 1, messages=[{"role": "user", "content": PROMPT.format(mr=m)}],
                                 reference=rs[0]) for i, (m, rs) in enumerate(held.items())]
    print(f"{len(train)} training rows from {len({r['prompt'] for r in train})} MRs; {len(held)} held-out MRs",
          file=sys.stderr)
    return train, held, data, examples


def comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def fixed_budget(cfg, loaded, budget: int, examples, held, args) -> tuple[dict, str]:
    """Table 5 (step 3): the budget sweep, scored; its summary and its markdown table."""
    budget_dir = args.work / "table5"
    cells5 = run_sweep(cfg, budget_dir, loaded, ranks=[], target_sets=comma_list(args.budget_sets), budget=budget)
    result = {"scores": evaluate_cells(budget_dir, cells5, loaded, examples, held, args),
              "cells": [c.__dict__ for c in cells5]}
    table = "\n".join(
        ["| targets | r | trainable | final loss | BLEU |", "|---|---|---|---|---|"]
        + [f"| {c.targets} | {c.rank} | {c.trainable_params:,} | {c.final_loss:.3f} | {c.metrics.get('bleu', 0):.1f} |"
           for c in cells5 if c.status == "finished"])
    return result, table


def full_reference(cfg, loaded, examples, held, args) -> dict:
    """Full fine-tuning (step 4), scored; kept in ``--work`` and reused while its settings and the
    evaluation's are those of before."""
    from core import evaluate

    path = args.work / "full.json"  # full fine-tuning changes the loaded model: it runs last, once
    kept = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    key = {"steps": args.steps, "batch_size": args.batch_size, "full_lr": args.full_lr, "seed": args.seed}
    if args.same_eval and kept.get("key") == key:
        return kept["result"]
    full = full_finetune(cfg, loaded, args.full_lr)
    full.update(score(loaded, examples, [evaluate.System("full-ft")], held, args)["full-ft"])
    path.write_text(json.dumps({"key": key, "result": full}), encoding="utf-8")
    return full


def print_summary(summary: dict, held, budget: int, args) -> None:
    tables = summary["tables"]
    print(f"\nMachine: {describe(summary['machine'])}")
    print(f"Base model BLEU on {len(held)} held-out MRs: {summary['base']['bleu']:.1f}")
    print("\nBLEU (multi-reference) by rank x target set:\n" + tables["table6"])
    if "table5" in tables:
        print(f"\nFixed budget of {budget:,} trainable parameters:\n" + tables["table5"])
    if "full" in summary:
        print(f"\nFull fine-tuning (lr {args.full_lr:g}): BLEU {summary['full']['bleu']:.1f}, "
              f"final loss {summary['full']['final_loss']:.3f}, {summary['full']['seconds']} s")


def main(argv=None) -> int:
    args = parse_args(argv)
    from core import models, sweep

    train, held, data, examples = write_split(args)
    cfg = base_config(args, data)
    ranks = [int(r) for r in comma_list(args.ranks)]
    loaded = models.load_model(args.model, device=args.device, precision=args.precision)
    budget = args.budget or sweep.plan(loaded.model, ranks=[8], target_sets=["q"])[0].trainable_params
    started = time.perf_counter()
    summary = {"machine": machine(), "command": " ".join(["benchmarks/e2e_study.py"] + (argv or sys.argv[1:])),
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "train_rows": len(train), "held_out_mrs": len(held), "budget": budget}
    summary["base"], args.same_eval = base_score(loaded, examples, held, args)
    grid_dir = args.work / "table6"
    cells = run_sweep(cfg, grid_dir, loaded, ranks=ranks, target_sets=comma_list(args.target_sets))
    summary["table6"] = {"scores": evaluate_cells(grid_dir, cells, loaded, examples, held, args),
                         "cells": [c.__dict__ for c in cells]}
    tables = {"table6": markdown(cells, summary["table6"]["scores"])}
    if not args.no_budget:
        summary["table5"], tables["table5"] = fixed_budget(cfg, loaded, budget, examples, held, args)
    if not args.no_full:
        summary["full"] = full_reference(cfg, loaded, examples, held, args)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    summary["tables"] = tables
    print_summary(summary, held, budget, args)
    write_json(args.json_out, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
