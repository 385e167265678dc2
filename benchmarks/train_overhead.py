"""What the training engine's extras cost: ``lora-studio train`` against the bare loop.

Run it from the repository root (it is heavy: a few minutes of CPU)::

    flock /tmp/heavy.lock .venv/bin/python benchmarks/train_overhead.py --json-out benchmarks/results/train_overhead-cpu.json

Two methods, each in its own fresh process, alternating (studio, bare, studio, bare, ...) for
``--rounds`` rounds so the machine's drift hits both alike:

``studio``  ``python -m studio train --model default`` on the bundled sample dataset, with the
            progress bar (tqdm on stderr), a StepEvent per step, ``metrics.jsonl`` flushed per step,
            and a checkpoint every ``--save-every`` (50) steps, exactly as a user runs it.
``bare``    the same model, adapter (all-linear, same rank and seed), data, batches in the same order,
            loss, clipping, AdamW and schedule, in a plain loop: no events, no files, no progress
            bar, no checkpoints. Like the core-engine benchmark's loop (``train_step.py``) it reads
            the loss back every step.

Throughput is tokens (non-padding) per second over steps ``--skip``+1 .. ``--steps`` (6..55; the window
includes the checkpoint written at step 50); the studio's figure comes from its own
``metrics.jsonl`` (``elapsed`` is wall time since the loop began, so time spent between steps, in
the callback, the progress bar and checkpoints, is counted). Target: overhead ≤ 3%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="tokens/s of 'lora-studio train' against the bare training loop")
    p.add_argument("--model", default="default", help="model spec (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--data", default="", help="dataset (default: the bundled sample dataset)")
    p.add_argument("--steps", type=int, default=55, help="optimizer steps per run (default 55)")
    p.add_argument("--skip", type=int, default=5, help="first steps left out of the figure (default 5)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--rounds", type=int, default=2, help="rounds of studio, bare (default 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads in both (default: torch's choice)")
    p.add_argument("--json-out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _config(args, out: str):
    from core.config import RunConfig

    cfg = RunConfig(out=out)
    cfg.model.source, cfg.model.device = args.model, args.device
    cfg.data.path, cfg.data.max_length = args.data, args.max_length
    cfg.lora.rank = args.rank
    cfg.train.steps, cfg.train.batch_size, cfg.train.save_every = args.steps, args.batch_size, args.save_every
    return cfg


def bare(args) -> dict:
    """The plain loop over exactly the studio's batches (Trainer's own order and loss)."""
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from core import data, lora, models, targets
    from core.train import Trainer
    from core.train_optimizer import _Factor

    cfg = _config(args, tempfile.mkdtemp())
    tr = cfg.train
    lm = models.load_model(cfg.model.source, device=cfg.model.device, precision=cfg.model.precision)
    prepared = data.prepare(cfg.data, lm.tokenizer, seed=tr.seed)
    model = lm.model
    torch.manual_seed(tr.seed)
    lora.inject_adapter(model, targets.resolve_targets(model, cfg.lora.targets), rank=cfg.lora.rank,
                        alpha=cfg.lora.alpha)
    model.train()
    params = list(lora.lora_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=tr.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _Factor(tr.steps, tr.warmup, tr.scheduler))
    # borrow the trainer's data order and loss so both do exactly the same arithmetic
    t = Trainer(cfg)
    t.train_set, t.device, t.pad_id = prepared.train, lm.device, lm.tokenizer.pad_token_id
    t.consumed, t._perm_epoch, t._perm = 0, -1, None
    trained = np.array([e.trained_tokens - (1 if e.labels and e.labels[0] != -100 else 0) for e in prepared.train])
    lengths = prepared.train.lengths
    stamps, tokens = [], []
    t0 = time.perf_counter()
    for _ in range(tr.steps):
        chunk = t._take(tr.batch_size)
        n_tok = max(1, int(trained[chunk].sum()))
        batch = t._batch(chunk)
        loss = t._loss_sum(model, batch) / n_tok
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tr.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        float(loss.item())
        stamps.append(time.perf_counter() - t0)
        tokens.append(int(lengths[chunk].sum()))
    return {"elapsed": stamps, "tokens": tokens}


def studio(args) -> dict:
    out = tempfile.mkdtemp()
    cmd = [sys.executable, "-m", "studio", "train", "--model", args.model, "--out", out, "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--rank", str(args.rank),
           "--save-every", str(args.save_every), "--device", args.device]
    if args.data:
        cmd += ["--data", args.data]
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"lora-studio train failed:\n{proc.stderr[-3000:]}")
    from core import runs

    rows = [r for r in runs.read_metrics(out) if "loss" in r]
    return {"elapsed": [r["elapsed"] for r in rows], "tokens": [r["tokens"] for r in rows]}


def throughput(result: dict, skip: int) -> float:
    e, tok = result["elapsed"], result["tokens"]
    return sum(tok[skip:]) / (e[-1] - e[skip - 1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker == "bare":
        print("RESULT " + json.dumps(bare(args)), flush=True)
        return 0
    import common

    common.model_folder(args.model)  # convert the bundled GGUF once, outside the timings
    figures: dict[str, list[float]] = {"studio": [], "bare": []}
    for r in range(args.rounds):
        for method in ("studio", "bare"):
            if method == "studio":
                res = studio(args)
            else:
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", "bare", "--model", args.model,
                       "--data", args.data, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                       "--max-length", str(args.max_length), "--rank", str(args.rank), "--device", args.device]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise SystemExit(f"bare loop failed:\n{proc.stderr[-3000:]}")
                res = json.loads(line[7:])
            tps = throughput(res, args.skip)
            figures[method].append(tps)
            print(f"round {r + 1} {method:<7}{tps:>10.1f} tok/s", file=sys.stderr, flush=True)
    best = {m: max(v) for m, v in figures.items()}
    overhead = 1 - best["studio"] / best["bare"]
    summary = {"tokens_per_second": figures, "best": best, "overhead": overhead, "target": 0.03,
               "met": overhead <= 0.03, "steps": args.steps, "skip": args.skip, "batch_size": args.batch_size,
               "max_length": args.max_length, "save_every": args.save_every, "model": args.model,
               "device": args.device, "machine": common.machine()}
    print(f"studio {best['studio']:.1f} tok/s, bare {best['bare']:.1f} tok/s: overhead {overhead * 100:.1f}% "
          f"(target ≤ 3%: {'met' if summary['met'] else 'NOT met'})")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
