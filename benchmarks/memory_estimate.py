"""How close is ``core.models.estimate_memory`` to what a real LoRA training step uses?

Each setting runs in a fresh subprocess (so nothing from an earlier one stays resident): import
torch and transformers, warm them up, load the tokenizer and import the model's code, read the
resident set size (the runtime's own memory, the *baseline*), load the bundled default on the CPU
in the setting's precision (its linear layers in 4 or 8 bits with ``--quantize nf4``/``int8``,
core.quant), put a LoRA adapter on it, reset the kernel's high-water mark (``/proc/self/clear_refs``),
run two optimizer steps (AdamW, a padded batch of random tokens, the trainer's chunked loss
(core.loss.loss_sum) on the non-padding tokens) and
read the high-water mark (``VmHWM``). The measured figure is that peak minus the baseline: what
training needed beyond the Python runtime, which is what the estimate's ``total`` counts.

Each setting runs twice: with glibc's default malloc (what a user gets) and with a fixed mmap
threshold, under which freed blocks go back to the system at once, so the peak is the live
tensors' (compared with the estimate less its allocator allowance). Linux only (/proc).

    flock /tmp/heavy.lock .venv/bin/python benchmarks/memory_estimate.py [--threads 2] \
        [--quantize none,nf4,int8] [--json-out benchmarks/results/memory_estimate-cpu.json]

Prints one row per setting: the estimate by part, both measurements and the errors.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = [
    # batch, seq_len, rank, targets, gradient checkpointing, quantize, precision
    (4, 128, 8, "all-linear", False, "none", "fp32"),
    (2, 512, 16, "attention-qv", False, "none", "fp32"),
    (8, 256, 8, "all-linear", True, "none", "fp32"),
    (4, 128, 8, "all-linear", False, "nf4", "fp32"),
    (4, 128, 8, "all-linear", False, "int8", "fp32"),
    (4, 128, 8, "all-linear", False, "nf4", "bf16"),
]


def _status(key: str) -> int:
    """A ``/proc/self/status`` figure (``VmRSS``, ``VmHWM``) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child(batch: int, seq_len: int, rank: int, targets: str, checkpointing: bool, quantize: str, precision: str,
          threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import transformers  # noqa: F401  (the runtime's memory belongs to the baseline)

    from core import lora, models, quant
    from core import targets as targets_mod
    from core.loss import loss_sum

    if quantize != "none":
        quant.bnb(quantize)  # bitsandbytes' own code and kernels belong to the baseline too
    # The runtime: torch's kernels and autograd warmed up, the model's code imported and the
    # tokenizer loaded; none of it is training memory, so it belongs to the baseline.
    x = torch.randn(64, 64, requires_grad=True)
    (x @ x).sum().backward()
    models.load_tokenizer(models.DEFAULT)
    models.meta_model(models.DEFAULT)
    baseline = _status("VmRSS")

    loaded = models.load_model(models.DEFAULT, device="cpu", precision=precision, quantize=quantize)
    model = loaded.model
    names = targets_mod.resolve_targets(model, targets)
    lora.inject_adapter(model, names, rank=rank, alpha=2 * rank)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = list(lora.lora_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=1e-4)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=g)
    mask = torch.ones(batch, seq_len, dtype=torch.long)
    mask[0, seq_len // 2:] = 0  # one padded row: the estimate assumes padded batches
    labels = ids.masked_fill(mask == 0, -100)
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    n_trained = int((labels[:, 1:] != -100).sum())
    loaded_rss = _status("VmRSS")

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    started = time.perf_counter()
    for _ in range(2):  # the second step has AdamW's states allocated
        # the trainer's loss (core.loss: chunked through the head, no full logits), which is what the
        # estimate counts; model(labels=...).loss would add the full fp32 logits and their gradient
        loss = loss_sum(model, inputs) / n_trained
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
    seconds = (time.perf_counter() - started) / 2
    peak = _status("VmHWM")

    est = models.estimate_memory(model.config, batch_size=batch, seq_len=seq_len, rank=rank, targets=targets,
                                 precision=precision, gradient_checkpointing=checkpointing, quantize=quantize)
    return {"baseline": baseline, "loaded": loaded_rss, "peak": peak, "measured": peak - baseline,
            "estimate": est, "step_seconds": seconds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads in each run (default: 2)")
    p.add_argument("--quantize", default="none,nf4,int8",
                   help="run the settings with these base quantisations, comma-separated (default: all)")
    p.add_argument("--json-out", help="also write the settings, estimates and measurements to this JSON file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*json.loads(args.child), threads=args.threads)))
        return 0
    wanted = {q.strip() for q in args.quantize.split(",") if q.strip()}
    settings = [st for st in SETTINGS if st[5] in wanted]
    if not settings:
        raise SystemExit(f"--quantize {args.quantize}: no setting uses it (settings use none, nf4, int8)")

    from core import models

    models.checkpoint_folder(models.DEFAULT)  # convert once, outside the measured runs
    mib = 2**20

    def run(setting, live: bool) -> dict:
        env = dict(os.environ)
        if live:  # large blocks always mmapped and unmapped on free: RSS follows the live tensors
            env["MALLOC_MMAP_THRESHOLD_"] = "131072"
        proc = subprocess.run([sys.executable, __file__, "--threads", str(args.threads),
                               "--child", json.dumps(setting)], capture_output=True, text=True, cwd=ROOT, env=env)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    rows = [(setting, run(setting, False), run(setting, True)) for setting in settings]

    print(f"bundled default (SmolLM2-135M-Instruct), CPU, torch threads={args.threads}; MiB")
    head = (f"{'batch x seq':>11} {'rank':>4} {'targets':<12} {'ckpt':>4} {'quant':>5} {'prec':>4} | "
            f"{'weights':>7} {'adapter+':>8} "
            f"{'activ.':>6} {'alloc.':>6} {'estimate':>8} | {'RSS peak':>8} {'error':>6} | {'live est':>8} "
            f"{'live':>6} {'error':>6} | {'s/step':>6}")
    print(head)
    print("-" * len(head))
    worst = worst_live = 0.0
    for (b, t, r, tg, gc, q, prec), res, live in rows:
        e = res["estimate"]
        err = (e["total"] - res["measured"]) / res["measured"]
        live_est = e["total"] - e["allocator"]
        err_live = (live_est - live["measured"]) / live["measured"]
        worst, worst_live = max(worst, abs(err)), max(worst_live, abs(err_live))
        print(f"{f'{b} x {t}':>11} {r:>4} {tg:<12} {'yes' if gc else 'no':>4} {q:>5} {prec:>4} | "
              f"{e['weights'] / mib:>7.0f} {(e['adapter'] + e['gradients'] + e['optimizer']) / mib:>8.1f} "
              f"{e['activations'] / mib:>6.0f} {e['allocator'] / mib:>6.0f} {e['total'] / mib:>8.0f} | "
              f"{res['measured'] / mib:>8.0f} {100 * err:>+5.1f}% | {live_est / mib:>8.0f} "
              f"{live['measured'] / mib:>6.0f} {100 * err_live:>+5.1f}% | {res['step_seconds']:>6.1f}")
    print(f"runtime baseline (not in any figure): {rows[0][1]['baseline'] / mib:.0f} MiB. 'adapter+': adapter, "
          "gradients and AdamW states. 'RSS peak': the step's high-water mark over the baseline with glibc's "
          "default malloc; 'live': the same with MALLOC_MMAP_THRESHOLD_=131072 (freed blocks go back at once), "
          "against the estimate without its allocator allowance.")
    print(f"largest error: {100 * worst:.1f}% against the RSS peak (target: within 25%), "
          f"{100 * worst_live:.1f}% against the live peak.")
    if args.json_out:
        from core import atomic

        keys = ("batch", "seq_len", "rank", "targets", "gradient_checkpointing", "quantize", "precision")
        atomic.write_json(args.json_out, {
            "machine": f"{os.cpu_count()} CPUs, torch threads {args.threads}", "unit": "bytes",
            "rows": [{"setting": dict(zip(keys, st)), "estimate": res["estimate"],
                      "measured_rss": res["measured"], "measured_live": live["measured"],
                      "error_rss": (res["estimate"]["total"] - res["measured"]) / res["measured"],
                      "error_live": (res["estimate"]["total"] - res["estimate"]["allocator"] - live["measured"])
                      / live["measured"], "step_seconds": res["step_seconds"]}
                     for st, res, live in rows]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
