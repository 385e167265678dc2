"""Peak memory and step time of long-sequence LoRA training: our trainer's step against PEFT +
transformers' ``model(labels=...).loss``, on the bundled default in fp32 on the CPU.

Why
    The plain loss materialises ``tokens × vocabulary`` logits several times over (SmolLM2: 49 152
    words, 192 KiB per token in fp32), so at 2k tokens the loss, not the model, sets the memory peak.
    ``core.loss`` computes it chunk by chunk through the head; this measures what that buys (issue 13:
    at 1 × 2048 with gradient checkpointing, ours ≤ 0.6 × PEFT's peak, and the step no slower than
    our own step with the old plain loss).

What runs
    One fresh process per (method, shape), so no peak, allocator state or cache of one leaks into
    another: load the model (``core.models.load_model("default", device="cpu", precision="fp32")``),
    put all-linear LoRA r=8 (alpha 16, dropout 0) on it, turn on gradient checkpointing as the trainer
    does (non-reentrant, ``enable_input_require_grads``) where the shape asks for it, reset the
    resident-set high-water mark (VmHWM) and run ``--warmup`` + ``--steps`` optimizer steps on a fixed
    random batch (every token trained, no padding: no head product is skipped):

    - ``ours``: ``core.lora`` and the trainer's own ``Trainer._loss_sum`` (the chunked loss),
      ``loss_sum / tokens``, backward, ``clip_grad_norm_``, ``core.train.make_adamw`` (fused AdamW);
    - ``ours-plain``: the same with ``core.loss.plain_loss_sum`` (the trainer's loss before this
      change: full logits, ``F.cross_entropy``), so its step time is the "today" the target speaks of;
    - ``peft``: ``peft.get_peft_model`` on the same modules, ``model(..., labels=...).loss`` (transformers'
      loss: full logits, mean over tokens), the same clipping and fused AdamW.

    Peak: VmHWM after the steps (reset to the current RSS just before them by writing 5 to
    /proc/self/clear_refs), so it counts the resident model and runtime plus the steps' transient
    peak, not the transient of reading the checkpoint; ``above`` is that peak less the RSS before the
    steps. Step time: ``ours`` against ``ours-plain`` alternating in one process (``paired``: the
    same adapter and optimizer, the loss function switched each step, the order swapped each round),
    because across processes this shared machine's drift is larger than the difference; the per-
    process step times are printed too, marked as such.

    flock /tmp/heavy.lock .venv/bin/python benchmarks/long_context_memory.py \\
        --json-out benchmarks/results/long_context_memory-cpu.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (puts the repository root on sys.path too)

SHAPES = "1x2048+ckpt,4x512+ckpt,1x2048"  # batch x sequence length, +ckpt: gradient checkpointing
METHODS = ("ours", "peft", "ours-plain")
MIB = 2**20


# -- one process: one method, one shape ------------------------------------------------------------
def _checkpointing(model) -> None:
    """Gradient checkpointing exactly as core.train.Trainer turns it on."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def _step_fn(method: str, model, names, batch: dict, args):
    """One optimizer step as a function ``step(kind=method)``, and the model it trains. For our
    engine ``kind`` picks the loss of that step ("ours": the trainer's, "ours-plain": the old one),
    over the same adapter and optimizer, so the paired timing can alternate them in one process."""
    import torch

    from core import lora
    from core.config import RunConfig
    from core.loss import plain_loss_sum
    from core.train import Trainer, make_adamw

    n_tokens = int((batch["labels"][:, 1:] != -100).sum())
    if method == "peft":
        model, params = common.peft_model(model, names, args)

        def loss_fn(kind):
            return model(**batch, use_cache=False).loss
    else:
        torch.manual_seed(0)
        lora.inject_adapter(model, names, rank=args.rank, alpha=args.alpha)
        params = list(lora.lora_parameters(model).values())
        trainer = Trainer(RunConfig(out=tempfile.mkdtemp()))  # only for its _loss_sum, as the loop calls it
        sums = {"ours": trainer._loss_sum, "ours-plain": plain_loss_sum}

        def loss_fn(kind):
            return sums[kind](model, batch) * (1.0 / n_tokens)
    opt = make_adamw(params, lr=1e-4)

    def step(kind=method):
        loss = loss_fn(kind)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step, model


def _setup(method: str, batch_size: int, seq: int, checkpointing: bool, args):
    """The bundled default with ``method``'s adapter, its step function and batch."""
    import torch

    torch.set_num_threads(args.threads)
    from core import models, targets

    loaded = models.load_model(args.model, device="cpu", precision="fp32")
    model = loaded.model
    names = targets.resolve_targets(model, "all-linear")
    ids = common.token_batch(model.config.vocab_size, batch_size, seq, "cpu")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    step, trained = _step_fn(method, model, names, batch, args)
    inner = trained.get_base_model() if method == "peft" else trained
    if checkpointing:
        _checkpointing(inner)
    trained.train()
    return step


def child(method: str, batch_size: int, seq: int, checkpointing: bool, args) -> dict:
    step = _setup(method, batch_size, seq, checkpointing, args)
    peak = common.PeakMemory("cpu")
    rss_before = common.PeakMemory._status("VmRSS")
    peak.start()
    losses = []
    wall, cpu = common.timed(lambda: losses.append(float(step())), args.steps, args.warmup, lambda: None)
    return {"method": method, "batch": batch_size, "seq": seq, "checkpointing": checkpointing,
            "peak": peak.peak(), "rss_before_steps": rss_before, "peak_source": peak.source,
            "step_seconds": wall, "step_cpu_seconds": cpu, "losses": losses}


def paired(batch_size: int, seq: int, checkpointing: bool, args) -> dict:
    """Our step with the chunked loss against the same step with the old plain loss, alternating in
    one process (one warm-up step each, then ``--paired`` rounds, the order swapped every round), so
    the machine's drift hits both alike; a process per method gave ratios from 0.70 to 1.07 here."""
    step = _setup("ours", batch_size, seq, checkpointing, args)
    kinds = ("ours", "ours-plain")
    for kind in kinds:
        step(kind)
    figures = common.rotating_rounds(kinds, args.paired, lambda k: common.wall_and_cpu(lambda: step(k)))
    times = {k: {"wall": [w for w, _ in figures[k]], "cpu": [c for _, c in figures[k]]} for k in kinds}
    ratio = [a / b for a, b in zip(times["ours"]["wall"], times["ours-plain"]["wall"])]
    ratio_cpu = [a / b for a, b in zip(times["ours"]["cpu"], times["ours-plain"]["cpu"])]
    return {"batch": batch_size, "seq": seq, "checkpointing": checkpointing, "rounds": args.paired,
            "times": times, "ratio": ratio, "ratio_cpu": ratio_cpu}


# -- the parent ------------------------------------------------------------------------------------
def _run_child(method: str, shape, args) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps([method, *shape]), "--model", args.model,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--paired", str(args.paired)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=common.ROOT, env=dict(os.environ))
    if proc.returncode != 0:
        raise SystemExit(f"{method} {shape} failed:\n{proc.stderr[-4000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    result["process_seconds"] = round(time.perf_counter() - t0, 1)
    return result


def parse_shapes(text: str) -> list[tuple[int, int, bool]]:
    """``"1x2048+ckpt,4x512"`` → ``[(1, 2048, True), (4, 512, False)]``."""
    out = []
    for part in text.split(","):
        size, _, flag = part.strip().partition("+")
        b, _, t = size.partition("x")
        if not (b.isdigit() and t.isdigit()) or flag not in ("", "ckpt"):
            raise SystemExit(f"--shapes: {part!r} is not BATCHxSEQ or BATCHxSEQ+ckpt (e.g. 1x2048+ckpt)")
        out.append((int(b), int(t), flag == "ckpt"))
    return out


def _table(rows: list[dict], shapes) -> tuple[list[str], list[dict]]:
    """Printed lines and the per-shape summary (ratios)."""
    lines = [f"{'batch x seq':>11} {'ckpt':>4} {'method':<10} | {'peak MiB':>8} {'above':>6} | "
             f"{'s/step':>6} {'cpu s':>6} | first loss"]
    lines.append("-" * len(lines[0]))
    summary = []
    for shape in shapes:
        got = {r["method"]: r for r in rows if (r["batch"], r["seq"], r["checkpointing"]) == shape}
        for m in METHODS:
            r = got[m]
            lines.append(f"{f'{shape[0]} x {shape[1]}':>11} {'yes' if shape[2] else 'no':>4} {m:<10} | "
                         f"{r['peak'] / MIB:>8.0f} {(r['peak'] - r['rss_before_steps']) / MIB:>6.0f} | "
                         f"{common.median(r['step_seconds']):>6.2f} {common.median(r['step_cpu_seconds']):>6.2f} | "
                         f"{r['losses'][0]:.6f}")
        ours, peft, plain = got["ours"], got["peft"], got["ours-plain"]
        s = {"batch": shape[0], "seq": shape[1], "checkpointing": shape[2],
             "peak_ours_over_peft": ours["peak"] / peft["peak"],
             "above_ours_over_peft": (ours["peak"] - ours["rss_before_steps"]) / (peft["peak"] - peft["rss_before_steps"]),
             "peak_ours_over_ours_plain": ours["peak"] / plain["peak"],
             "step_ours_over_ours_plain": common.median(ours["step_seconds"]) / common.median(plain["step_seconds"]),
             "cpu_ours_over_ours_plain": (common.median(ours["step_cpu_seconds"])
                                          / common.median(plain["step_cpu_seconds"])),
             "step_ours_over_peft": common.median(ours["step_seconds"]) / common.median(peft["step_seconds"])}
        summary.append(s)
        lines.append(f"{'':>11} {'':>4} {'ratios':<10} | peak ours/PEFT {s['peak_ours_over_peft']:.3f} "
                     f"(above the loaded model {s['above_ours_over_peft']:.3f}), ours/ours-plain "
                     f"{s['peak_ours_over_ours_plain']:.3f}; step (separate processes, noisy) ours/ours-plain "
                     f"{s['step_ours_over_ours_plain']:.3f}, ours/PEFT {s['step_ours_over_peft']:.3f}")
    return lines, summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="the model (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=1, help="timed steps per memory process (default 1)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1; it allocates AdamW's state)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--shapes", default=SHAPES, help=f"BATCHxSEQ[+ckpt],... (default {SHAPES})")
    p.add_argument("--paired", type=int, default=3,
                   help="rounds of the paired chunked/plain step timing (default 3; 0: none)")
    p.add_argument("--paired-shape", default="1x2048+ckpt", help="its shape (default 1x2048+ckpt)")
    p.add_argument("--json-out", help="write the figures here too")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.targets = "all-linear"  # for common.peft_model
    if args.child:
        method, b, t, gc = json.loads(args.child)
        common.emit(paired(b, t, gc, args) if method == "paired" else child(method, b, t, gc, args))
        return 0

    from core import models

    models.checkpoint_folder(args.model)  # convert the bundled GGUF once, outside the measured runs
    info = common.machine()
    print(common.describe(info), flush=True)
    shapes = parse_shapes(args.shapes)
    rows = []
    for shape in shapes:
        for method in METHODS:
            rows.append(_run_child(method, shape, args))
            r = rows[-1]
            print(f"  {method} {shape}: peak {r['peak'] / MIB:.0f} MiB, {common.median(r['step_seconds']):.2f} s/step "
                  f"({r['process_seconds']} s in all)", flush=True)
    pair = None
    if args.paired > 0:
        shape = parse_shapes(args.paired_shape)[0]
        pair = _run_child("paired", shape, args)
        print(f"  paired {shape}: {pair['process_seconds']} s in all", flush=True)
    lines, summary = _table(rows, shapes)
    print(f"\nbundled default, fp32, CPU, all-linear LoRA r={args.rank}, {args.warmup} + {args.steps} steps per "
          f"process; peak = VmHWM during the steps (model and runtime included), above = peak - RSS before them")
    print("\n".join(lines))
    if pair is not None:
        t = pair["times"]
        print(f"\nstep time, paired in one process ({pair['batch']} x {pair['seq']}, checkpointing "
              f"{'on' if pair['checkpointing'] else 'off'}, {pair['rounds']} rounds, order alternating): ours "
              f"{common.median(t['ours']['wall']):.2f} s, ours-plain {common.median(t['ours-plain']['wall']):.2f} s; "
              f"ours/ours-plain per round {', '.join(f'{r:.3f}' for r in pair['ratio'])} (median "
              f"{common.median(pair['ratio']):.3f}; CPU time {common.median(pair['ratio_cpu']):.3f})")
    common.write_json(args.json_out, {"machine": info, "model": args.model, "rank": args.rank, "alpha": args.alpha,
                                      "steps": args.steps, "warmup": args.warmup, "runs": rows, "summary": summary,
                                      "paired": pair})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
