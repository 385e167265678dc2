"""``lora-studio sweep``: train one run per (rank, target set) one after another, resumable.

A thin layer over :class:`core.sweep.Sweep`. The training options are ``train``'s own (the same flags,
help and defaults, taken from its parser), except those the sweep sets per cell (``--rank``,
``--targets``, ``--out``, ``--name``, ``--resume``, ``--config``). Ctrl-C stops the cell in training
after its step (a checkpoint is kept) and exits 130; the same command continues the sweep.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from core.errors import StudioError
from studio.commands import fetch_model

_SET_PER_CELL = {"rank", "targets", "out", "name", "resume", "config", "help", "no_progress", "no_library"}


def _train_actions():
    """The actions of ``train``'s parser, group by group (its flags, help and types, not copied)."""
    from studio.commands import train

    tmp = argparse.ArgumentParser(add_help=False).add_subparsers()
    train.register(tmp)
    parser = tmp.choices["train"]
    for group in parser._action_groups:  # noqa: SLF001 (argparse has no public way to reuse a group)
        yield group.title, [a for a in group._group_actions if a.dest not in _SET_PER_CELL]  # noqa: SLF001


def register(sub) -> None:
    from core.sweep import TABLE5_TARGET_SETS

    s = sub.add_parser(
        "sweep", help="train a grid of runs over rank x target set (the LoRA paper's Tables 5 and 6)",
        description="Train one ordinary run per (rank, target set) under DIR/runs/, one after another on one "
                    "loaded model, and write DIR/results.json (rank, targets, trainable_params, final_loss, "
                    "best_eval_loss, seconds, run of each cell). Run the same command again to continue a "
                    "sweep that stopped. With --budget N each target set gets the rank that trains about N "
                    "parameters (Table 5 of arXiv:2106.09685).",
        epilog="Example: lora-studio sweep --model default --data orders.jsonl --out sweeps/first --ranks 1,4,16 "
               f"--target-set q+v --target-set all-linear --steps 40 --val-split 0.1. Target sets: a preset, "
               f"module-name suffixes, a regular expression, or roles joined by + ({', '.join(TABLE5_TARGET_SETS)})")
    g = s.add_argument_group("the grid")
    g.add_argument("--out", required=True, metavar="DIR", help="the sweep folder (run again to continue it)")
    g.add_argument("--ranks", metavar="R1,R2,...", help="the ranks to train (default: 1,4,16; not with --budget)")
    g.add_argument("--target-set", action="append", default=[], metavar="T",
                   help="a target set; repeat for several (default: attention-qv and all-linear)")
    g.add_argument("--budget", type=int, metavar="N",
                   help="instead of --ranks: give each target set the rank that trains about N parameters")
    g.add_argument("--lrs", metavar="LR1,LR2,...", help="also sweep the learning rate over these values")
    g.add_argument("--no-library", action="store_true",
                   help="do not put the best cell's adapter into the library when the sweep finishes")
    g.add_argument("--no-progress", action="store_true", help="one line per cell, no progress bar")
    for title, actions in _train_actions():
        if not actions:
            continue
        group = s.add_argument_group(f"{title} (as for train)" if title else "training")
        for action in actions:
            group._add_action(action)  # noqa: SLF001
    s.set_defaults(func=cmd_sweep, config=None, resume=False, rank=None, targets=None, name=None)


def _numbers(text: str | None, flag: str, kind) -> list:
    if not text:
        return []
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise StudioError(f"{flag} {text}: expected comma-separated numbers, e.g. {flag} 1,4,16") from None


def cmd_sweep(args: argparse.Namespace) -> int:
    from core import sweep
    from studio.commands.train import build_config

    ranks = _numbers(args.ranks, "--ranks", int)
    if args.budget is not None and ranks:
        raise StudioError("--budget picks each target set's rank; leave out --ranks")
    out = Path(args.out)
    args.out = None  # each cell's run folder is set by the sweep
    cfg = build_config(args)
    cfg.name = cfg.name or out.name
    fetch_model(cfg.model.source)
    lrs = _numbers(args.lrs, "--lrs", float) or None
    bar = {"bar": None}

    def on_event(kind, cell, event):
        from core.train import StepEvent

        if kind == "cell":
            print(f"cell {cell.key}: rank {cell.rank} on {cell.targets}, {cell.trainable_params:,} trainable "
                  "parameters", file=sys.stderr)
            if not args.no_progress:
                from tqdm import tqdm

                bar["bar"] = tqdm(total=None, desc=cell.key, unit="step", file=sys.stderr, leave=False)
        elif kind == "event" and isinstance(event, StepEvent) and bar["bar"] is not None:
            b = bar["bar"]
            b.total = event.total_steps
            b.update(event.step - b.n)
            if event.loss is not None:
                b.set_postfix(loss=f"{event.loss:.4f}")
        elif kind == "done":
            if bar["bar"] is not None:
                bar["bar"].close()
                bar["bar"] = None
            loss = f", final loss {cell.final_loss:.4f}" if cell.final_loss is not None else ""
            ev = f", best eval loss {cell.best_eval_loss:.4f}" if cell.best_eval_loss is not None else ""
            print(f"cell {cell.key}: {cell.status}{loss}{ev}" + (f" ({cell.message})" if cell.status == "failed" else ""),
                  file=sys.stderr)

    job = sweep.Sweep(cfg, out, ranks=ranks or ([] if args.budget else list(sweep.DEFAULT_RANKS)),
                      target_sets=args.target_set or list(sweep.DEFAULT_TARGET_SETS), budget=args.budget, lrs=lrs,
                      library=not args.no_library, callback=on_event)
    interrupted = {"n": 0}

    def on_sigint(signum, frame):
        interrupted["n"] += 1
        if interrupted["n"] > 1:
            raise KeyboardInterrupt
        print("stopping after this step (a checkpoint is kept; Ctrl-C again to abort)", file=sys.stderr)
        job.request_stop()

    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        cells = job.run()
    finally:
        signal.signal(signal.SIGINT, old)
    print(format_table(cells))
    print(f"wrote {out / 'results.json'}", file=sys.stderr)
    if interrupted["n"] or any(c.status in ("pending", "stopped") for c in cells):
        print(f"the sweep is not finished; continue it with the same command (--out {out})", file=sys.stderr)
        return 130 if interrupted["n"] else 0
    return 0


def format_table(cells) -> str:
    head = ["targets", "rank", "trainable", "final loss", "best eval loss", "seconds", "status"]
    rows = [head] + [[c.targets + (" *" if c.best else ""), str(c.rank), f"{c.trainable_params:,}",
                      "-" if c.final_loss is None else f"{c.final_loss:.4f}",
                      "-" if c.best_eval_loss is None else f"{c.best_eval_loss:.4f}",
                      "-" if c.seconds is None else f"{c.seconds:.0f}", c.status] for c in cells]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)
