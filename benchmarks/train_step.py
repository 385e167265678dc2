"""Training-step and inference benchmark: our LoRA against PEFT's, full fine-tuning and the floor.

Run it from the repository root::

    flock /tmp/heavy.lock .venv/bin/python benchmarks/train_step.py --json-out benchmarks/results/train_step-cpu.json

Methods (each runs in its own fresh process; the parent alternates them, A B C D A B C D ..., for
``--rounds`` rounds, so each keeps its own memory peak and the machine's drift hits all alike):

``ours``   core.lora on every linear layer but the output head (``all-linear``), fused autograd path.
``peft``   PEFT's ``get_peft_model`` with ``target_modules="all-linear"``, the same r, alpha, dropout 0.
``full``   full fine-tuning: every weight trains, AdamW over all of them.
``floor``  forward + backward with every weight frozen. The loss would then have no path to anything
           that requires a gradient, so ``model.enable_input_require_grads()`` (transformers' own
           switch, the one used for gradient checkpointing with adapters) makes the input embeddings'
           output require grad: backward then runs through the whole network, computing every
           activation gradient but no weight gradient and no optimizer step. That is the least any
           adapter method must do, hence the floor.

A step is: forward with labels (the mean next-token cross-entropy), backward, and for the three
trained methods ``AdamW.step()`` and ``zero_grad(set_to_none=True)``. Each method reports the median
step time over ``--steps`` steps after ``--warmup`` steps (pooled over rounds) and the peak memory of
the steps (see ``common.PeakMemory``).

Inference (``--infer``, on by default): forward latency of the model with the adapter merged
(``infer-merged``) and active but unmerged (``infer-unmerged``) against the plain base model
(``infer-base``), also one process each, alternating. The adapter's B is random, so the merged
weights really differ from the base.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TRAIN_METHODS = ("ours", "peft", "full", "floor")
INFER_METHODS = ("infer-base", "infer-merged", "infer-unmerged")
OPTIONAL_METHODS = ("infer-peft",)  # PEFT unmerged inference, for reference; ask with --methods


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Median training-step time and peak memory of our LoRA, PEFT's LoRA, full "
                    "fine-tuning and the floor (frozen forward+backward), each in its own process, "
                    "alternating; plus merged/unmerged inference latency against the base model.")
    p.add_argument("--model", default="default",
                   help="'default' (the bundled SmolLM2-135M-Instruct, converted once to safetensors "
                        "and cached) or a local model folder (config.json + safetensors)")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--targets", default="all-linear",
                   help="target preset for ours (PEFT gets the same module names; default all-linear)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per process (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of A B C D ... (default 3)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model and adapter dtype (default float32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset/order, e.g. ours,peft (default: "
                        f"{','.join(TRAIN_METHODS + INFER_METHODS)}; also: {','.join(OPTIONAL_METHODS)})")
    p.add_argument("--fused-adamw", action="store_true",
                   help="every trained method (ours, PEFT, full) uses torch's fused AdamW, as core/train.py "
                        "does, instead of the default for-each implementation")
    p.add_argument("--no-infer", action="store_true", help="skip the inference measurements")
    p.add_argument("--json-out", default=None, help="write every figure and the machine to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    p.add_argument("--core-path", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variant", action="append", default=[], metavar="LABEL=DIR",
                   help="also time our LoRA from another copy of the code: DIR holds a 'core' package "
                        "(e.g. an older commit's, from 'git archive'); shown as ours:LABEL. Repeatable; "
                        "this is how each trick in benchmarks/README.md was measured")
    return p.parse_args(argv)


# -- the worker: one method, one fresh process -----------------------------------------------------

def _targets(model, spec):
    from core import targets

    return targets.resolve_targets(model, spec)


def worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device, method = args.device, args.worker
    if ":" in method:  # ours:LABEL, a variant of core.lora found under --core-path (A/B of a trick)
        sys.path.insert(0, args.core_path)
        method = method.split(":", 1)[0]
    t_load = time.perf_counter()
    model = common.load_model(Path(args.folder), device, args.dtype)
    load_s = time.perf_counter() - t_load
    x = common.token_batch(model.config.vocab_size, args.batch, args.seq, device)
    sync = common.device_sync(device)
    names = _targets(model, args.targets)
    result: dict = {"method": args.worker, "load_s": round(load_s, 2)}

    torch.manual_seed(0)  # the same seed before injection: ours and PEFT draw the same A
    if method in ("ours", "infer-merged", "infer-unmerged"):
        from core import lora

        lora.inject_adapter(model, names, rank=args.rank, alpha=args.alpha, dropout=0.0,
                            dtype=getattr(torch, args.dtype))
        trainable = list(lora.lora_parameters(model).values())
    elif method in ("peft", "infer-peft"):
        model, trainable = common.peft_model(model, names, args)
    elif method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        trainable = list(model.parameters())
    elif method in ("floor", "infer-base"):
        trainable = []
    else:
        raise SystemExit(f"unknown method {method}")
    result["trainable_params"] = sum(p.numel() for p in trainable)

    if method.startswith("infer"):
        if method != "infer-base":
            common.randomise_lora_b(model)
        if method == "infer-merged":
            lora.merge_adapter(model)
        model.eval()

        def step():
            with torch.inference_mode():
                model(input_ids=x, use_cache=False)
    else:
        model.train()
        if method == "floor":
            model.enable_input_require_grads()
        opt = torch.optim.AdamW(trainable, lr=1e-4, fused=True if args.fused_adamw else None) if trainable else None
        losses: list[float] = []

        def step():
            loss = model(input_ids=x, labels=x, use_cache=False).loss
            loss.backward()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        result["losses"] = losses

    mem = common.PeakMemory(device)
    mem.start()
    times, cpu = common.timed(step, args.steps, args.warmup, sync)
    result.update(step_s=common.median(times), times=[round(t, 5) for t in times],
                  cpu_s=common.median(cpu), cpu_times=[round(t, 5) for t in cpu],
                  peak_bytes=mem.peak(), peak_source=mem.source,
                  rss_before_steps=getattr(mem, "start_rss", None))
    if "losses" in result:
        result["losses"] = [round(v, 6) for v in result["losses"]]
    return result


# -- the parent: alternate processes, collect, compare ---------------------------------------------

def run_one(method: str, folder: Path, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--folder", str(folder),
           "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
           "--alpha", str(args.alpha), "--targets", args.targets, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--device", args.device, "--dtype", args.dtype]
    if args.fused_adamw:
        cmd += ["--fused-adamw"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if ":" in method:
        cmd += ["--core-path", dict(v.split("=", 1) for v in args.variant)[method.split(":", 1)[1]]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"{method} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for method, rs in runs.items():
        pooled = [t for r in rs for t in r["times"]]
        out[method] = {
            "step_s": common.median(pooled),
            "cpu_s": common.median([t for r in rs for t in r["cpu_times"]]),
            "round_medians_s": [round(r["step_s"], 4) for r in rs],
            "peak_bytes": max(r["peak_bytes"] for r in rs),
            "peak_source": rs[0]["peak_source"],
            "rss_before_steps": rs[0].get("rss_before_steps"),
            "trainable_params": rs[0]["trainable_params"],
            "first_losses": rs[0].get("losses", [])[:3],
        }
    return out


def ratios(s: dict) -> dict:
    def r(a, b, key="step_s"):
        return s[a][key] / s[b][key] if a in s and b in s else None

    out = {
        "ours/peft": r("ours", "peft"), "ours/floor": r("ours", "floor"),
        "peft/floor": r("peft", "floor"), "full/floor": r("full", "floor"),
        "memory ours/peft": r("ours", "peft", "peak_bytes"),
        "merged/base": r("infer-merged", "infer-base"),
        "unmerged/base": r("infer-unmerged", "infer-base"),
        "peft unmerged/base": r("infer-peft", "infer-base"),
    }
    for m in s:
        if m.startswith("ours:"):  # a variant against the current code: > 1 means the variant is slower
            out[f"{m}/ours"] = r(m, "ours")
    return {k: v for k, v in out.items() if v is not None}


TARGETS = {"ours/peft": 0.90, "ours/floor": 1.10, "memory ours/peft": 1.00, "merged/base": 1.02}


def table(s: dict, rat: dict) -> str:
    lines = [f"{'method':<16}{'median step':>13}{'CPU time':>12}{'per-round medians':>28}{'peak memory':>14}"
             f"{'trainable':>13}"]
    for m, v in s.items():
        rounds = " ".join(f"{t * 1000:.0f}" for t in v["round_medians_s"])
        lines.append(f"{m:<16}{v['step_s'] * 1000:>10.1f} ms{v['cpu_s'] * 1000:>9.0f} ms{rounds + ' ms':>28}"
                     f"{v['peak_bytes'] / 2**20:>10.0f} MiB{v['trainable_params']:>13,}")
    lines.append("")
    for k, v in rat.items():
        goal = TARGETS.get(k)
        mark = "" if goal is None else (f"  (target ≤ {goal:.2f}: " + ("met" if v <= goal else "NOT met") + ")")
        lines.append(f"{k:<20}{v:>7.3f}{mark}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        common.emit(worker(args))
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = common.model_folder(args.model)
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    else:
        methods = list(TRAIN_METHODS) + ([] if args.no_infer else list(INFER_METHODS))
        # variants right after "ours", so each A/B pair runs back to back
        methods[1:1] = [f"ours:{v.split('=', 1)[0]}" for v in args.variant]
    info = common.machine()
    print(f"model {folder}\nmachine: {common.describe(info)}", file=sys.stderr)
    print(f"batch {args.batch} x {args.seq} tokens, r={args.rank}, alpha={args.alpha:g}, {args.targets}, "
          f"{args.dtype} on {args.device}; {args.rounds} rounds x {args.steps} steps (+{args.warmup} warm-up)",
          file=sys.stderr)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    started = time.time()
    for rnd in range(args.rounds):
        for m in methods:
            r = run_one(m, folder, args)
            runs[m].append(r)
            print(f"  round {rnd + 1} {m:<15} {r['step_s'] * 1000:8.1f} ms  "
                  f"{r['peak_bytes'] / 2**20:7.0f} MiB", file=sys.stderr)
    s = summarise(runs)
    rat = ratios(s)
    if "ours" in s and "peft" in s and s["ours"]["first_losses"] and s["peft"]["first_losses"]:
        # Same seed, same A, B = 0: the first losses must agree, or the comparison is meaningless.
        diff = max(abs(a - b) for a, b in zip(s["ours"]["first_losses"], s["peft"]["first_losses"]))
        rat_check = f"first losses ours vs PEFT differ by at most {diff:.2e}"
    else:
        rat_check = ""
    info["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(table(s, rat))
    if rat_check:
        print(rat_check)
    print(f"machine: {common.describe(info)}; load average before/after "
          f"{info.get('load_average')} / {info['load_average_after']}; {time.time() - started:.0f} s")
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k not in ("worker", "folder", "json_out")}
        out.write_text(json.dumps({"settings": settings, "model_folder": str(folder), "machine": info,
                                   "summary": s, "ratios": rat, "check": rat_check,
                                   "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
