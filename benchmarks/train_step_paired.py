"""Training step time of our LoRA, PEFT's LoRA and the floor, interleaved step by step in one process.

    .venv/bin/python benchmarks/train_step_paired.py [--rounds 30] [--json-out benchmarks/results/train_step_paired-cpu.json]

``train_step.py`` runs each method in its own process (the only way to measure each one's peak
memory), a few steps each, rounds apart; on a shared machine whose speed drifts by ±10 % from one
minute to the next, that cannot resolve a 10 % difference. This script measures time only, and
pairs it: the three models (same checkpoint, same batch, same seeds and settings as
``train_step.py``) live in one process, and each round runs one step of each, in an order that
rotates from round to round, so drift and the position in the round hit every method alike. The
ratios are taken within each round (ours ÷ PEFT, ours ÷ floor) and their median and interquartile
range are reported, beside each method's median step.

Settings as in train_step.py: SmolLM2-135M-Instruct by default, fp32 (``--dtype bfloat16`` for a
bf16 base), batch 4 × 128 tokens, r = 8, alpha = 16, all-linear, dropout 0. What the trainer runs:
ours injects its adapter in fp32 whatever the base's dtype (master weights) and computes the loss as
the trainer does (core.loss: chunked through the head); PEFT keeps its default (adapter in fp32,
``autocast_adapter_dtype``) and takes transformers' ``model(labels=...).loss``; both step the trainer's
optimizer (core.train.make_adamw, fused AdamW). The floor freezes every weight, takes the labels loss
and back-propagates to the input embeddings' output.

``--variant NAME=FILE`` adds another version of the engine as a fourth method ``ours:NAME`` in the
same rotation, and reports ours ÷ ours:NAME: what a change to the engine bought, measured the same
way. FILE is a copy of either of the engine's two modules, told apart by what it defines:

* ``core/lora.py`` (it defines ``inject_adapter``; ``git show COMMIT:core/lora.py > /tmp/lora_old.py``):
  the layer and the model-level API, with the autograd functions of ``core/lora_autograd.py``, or with
  its own if it comes from before they moved there;
* ``core/lora_autograd.py`` (it defines the autograd functions and no ``inject_adapter``;
  ``git show COMMIT:core/lora_autograd.py > /tmp/autograd_old.py``): the current ``core/lora.py``,
  run on these autograd functions instead.

The same NAME given twice, once with each, makes one variant of both: a commit that changed both
modules (``--variant old=/tmp/lora_old.py --variant old=/tmp/autograd_old.py``).

``--infer`` measures inference instead, the same way: forward latency (inference mode, no labels)
of the base model, of the model with a random-B adapter merged, and with it active but unmerged;
ratios merged ÷ base and unmerged ÷ base within each round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import common  # noqa: E402

METHODS = ("ours", "peft", "floor")
INFER_METHODS = ("infer-base", "infer-merged", "infer-unmerged")


def defined_in(file: str) -> set[str]:
    """The names of the functions and classes ``file`` defines at its top level (read, not run)."""
    import ast

    tree = ast.parse(Path(file).read_text(encoding="utf-8"), filename=file)
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def engine_module(file: str) -> str | None:
    """Which of the engine's modules ``file`` is a copy of: "lora" (core/lora.py: it defines
    inject_adapter), "autograd" (core/lora_autograd.py: the autograd functions, no inject_adapter), or
    None."""
    defined = defined_in(file)
    if "inject_adapter" in defined:
        return "lora"
    return "autograd" if "_LoRAFunction" in defined else None


def _module_from(module_name: str, file):
    import importlib.util

    spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_variant(name: str, files: dict[str, str]):
    """Another version of core/lora.py as a module of its own: ``files["lora"]`` (default: the
    current core/lora.py), which imports ``files["autograd"]`` in place of core.lora_autograd when
    that is given (``files`` as :func:`engine_module` names them)."""
    lora_file = files.get("lora", ROOT / "core" / "lora.py")
    if "autograd" not in files:
        return _module_from(f"lora_variant_{name}", lora_file)
    # lora.py's `from core.lora_autograd import ...` takes what sys.modules holds under that name
    saved = sys.modules.get("core.lora_autograd")
    sys.modules["core.lora_autograd"] = _module_from(f"lora_autograd_variant_{name}", files["autograd"])
    try:
        return _module_from(f"lora_variant_{name}", lora_file)
    finally:
        if saved is None:
            sys.modules.pop("core.lora_autograd")
        else:
            sys.modules["core.lora_autograd"] = saved


def build_infer(method: str, folder: Path, args, x):
    import torch

    from core import lora, targets

    model = common.load_model(folder, args.device, args.dtype)
    sync = common.device_sync(args.device)
    trainable = 0
    if method != "infer-base":
        torch.manual_seed(0)
        lora.inject_adapter(model, targets.resolve_targets(model, args.targets), rank=args.rank,
                            alpha=args.alpha, dtype=getattr(torch, args.dtype))
        common.randomise_lora_b(model)
        trainable = sum(p.numel() for p in lora.lora_parameters(model).values())
        if method == "infer-merged":
            lora.merge_adapter(model)
    model.eval()

    def step() -> float:
        with torch.inference_mode():
            logits = model(input_ids=x, use_cache=False).logits
        sync()
        return float(logits[0, -1, 0])

    return step, trainable


def build(method: str, folder: Path, args, x, engine=None):
    import torch

    if method.startswith("infer"):
        return build_infer(method, folder, args, x)
    model = common.load_model(folder, args.device, args.dtype)
    from core import targets

    from core.loss import loss_sum
    from core.train import make_adamw

    names = targets.resolve_targets(model, args.targets)
    torch.manual_seed(0)  # the same seed before injection: ours and PEFT draw the same A
    ours = method == "ours" or engine is not None
    if ours:
        from core import lora

        lora = engine or lora
        # as the trainer injects: adapters in fp32 whatever the base's dtype (master weights)
        lora.inject_adapter(model, names, rank=args.rank, alpha=args.alpha, dropout=0.0)
        trainable = list(lora.lora_parameters(model).values())
    elif method == "peft":
        model, trainable = common.peft_model(model, names, args)
    else:
        model.enable_input_require_grads()
        trainable = []
    model.train()
    # the trainer's optimizer (fused AdamW where torch has it) for both LoRA methods: what differs is
    # the engine and the loss, not the optimizer
    opt = make_adamw(trainable, lr=1e-4) if trainable else None
    sync = common.device_sync(args.device)
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}
    n_trained = x.shape[0] * (x.shape[1] - 1)

    def step() -> float:
        if ours:  # the trainer's loss: chunked through the head (core.loss), a sum over tokens
            loss = loss_sum(model, batch) / n_trained
        else:
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        value = float(loss.detach())
        sync()
        return value

    return step, sum(p.numel() for p in trainable)


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def parse_args(argv=None):
    """The options, and ``{"ours:NAME": module}`` for each ``--variant``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="'default' (the bundled SmolLM2-135M-Instruct) or a local folder")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="all-linear")
    p.add_argument("--rounds", type=int, default=30, help="timed rounds, one step of each method each (default 30)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each method first (default 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--fused-adamw", action="store_true",
                   help="accepted for older commands; both LoRA methods now use the trainer's optimizer "
                        "(core.train.make_adamw: fused AdamW where torch has it)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FILE",
                   help="another version of core/lora.py or of core/lora_autograd.py (told apart by what it "
                        "defines), timed as method ours:NAME (repeatable; the same NAME with one of each "
                        "makes one variant of both)")
    p.add_argument("--infer", action="store_true",
                   help="time inference instead: base, adapter merged, adapter unmerged")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    files: dict[str, dict[str, str]] = {}
    for v in args.variant:
        name, sep, file = v.partition("=")
        module = engine_module(file) if sep and name and Path(file).is_file() else None
        if module is None:
            p.error(f"--variant {v}: expected NAME=FILE with FILE a copy of core/lora.py or core/lora_autograd.py")
        if module in files.setdefault(name, {}):
            p.error(f"--variant {v}: {name} has a copy of that module already ({files[name][module]})")
        files[name][module] = file
        if len(files[name]) == 2 and "_LoRAFunction" in defined_in(files[name]["lora"]):
            p.error(f"--variant {v}: {files[name]['lora']} has its autograd functions inside; give it alone")
    if args.infer and files:
        p.error("--variant times training steps; leave it out with --infer")
    return args, {f"ours:{name}": load_variant(name, f) for name, f in files.items()}


def prepare(methods, args, variants):
    """Every method built and warmed up on one token batch: ``(steps, trainable, first_losses, info)``."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = common.model_folder(args.model)
    info = common.machine()
    print(f"model {folder}\nmachine: {common.describe(info)}", file=sys.stderr)
    from transformers import AutoConfig

    x = common.token_batch(AutoConfig.from_pretrained(folder).vocab_size, args.batch, args.seq, args.device)
    steps, trainable, first_losses = {}, {}, {}
    for m in methods:
        steps[m], trainable[m] = build(m, folder, args, x, variants.get(m))
        first_losses[m] = [steps[m]() for _ in range(args.warmup)]
    return steps, trainable, first_losses, info


def measure(methods, steps, rounds: int):
    """Wall and CPU seconds of each method's steps, round by round in rotating order."""
    def progress(r, done):
        if (r + 1) % 10 == 0:
            print(f"  round {r + 1}: " + "  ".join(f"{m} {1000 * done[m][-1][0]:.0f} ms" for m in methods),
                  file=sys.stderr)

    figures = common.rotating_rounds(methods, rounds, lambda m: common.wall_and_cpu(steps[m]),
                                     each_round=progress)
    return {m: [w for w, _ in figures[m]] for m in methods}, {m: [c for _, c in figures[m]] for m in methods}


def round_ratios(args, variants, times, cpu) -> dict[str, list[float]]:
    """The ratios reported, each taken within every round."""
    def within(a, b, t=times):
        return [x / y for x, y in zip(t[a], t[b])]

    if args.infer:
        ratios = {"merged/base": within("infer-merged", "infer-base"),
                  "unmerged/base": within("infer-unmerged", "infer-base"),
                  "merged/base (CPU time)": within("infer-merged", "infer-base", cpu)}
    else:
        ratios = {"ours/peft": within("ours", "peft"), "ours/floor": within("ours", "floor"),
                  "peft/floor": within("peft", "floor"),
                  "ours/peft (CPU time)": within("ours", "peft", cpu),
                  "ours/floor (CPU time)": within("ours", "floor", cpu)}
    for m in variants:
        ratios[f"ours/{m}"] = within("ours", m)
        ratios[f"{m}/floor"] = within(m, "floor")
    return ratios


def report(args, methods, times, cpu, trainable, ratios, first_losses) -> dict:
    """Print the table of medians and ratios; return the ratios' median and quartiles."""
    print(f"{args.batch} x {args.seq} tokens, r={args.rank}, alpha={args.alpha:g}, {args.targets}, {args.dtype} on "
          f"{args.device}; {args.rounds} rounds, order rotating")
    print(f"{'method':<16}{'median step':>13}{'CPU time':>11}{'trainable':>13}")
    for m in methods:
        print(f"{m:<16}{1000 * statistics.median(times[m]):>10.1f} ms{1000 * statistics.median(cpu[m]):>8.0f} ms"
              f"{trainable[m]:>13,}")
    print(f"{'ratio (within each round)':<26}{'median':>8}{'quartiles':>16}")
    summary = {}
    for name, xs in ratios.items():
        q1, med, q3 = quartiles(xs)
        summary[name] = {"median": round(med, 4), "q1": round(q1, 4), "q3": round(q3, 4)}
        print(f"{name:<26}{med:>8.3f}    {q1:.3f} - {q3:.3f}")
    if args.infer:
        diff = max(abs(a - b) for a, b in zip(first_losses["infer-merged"], first_losses["infer-unmerged"]))
        print(f"a logit of the merged and the unmerged model differs by {diff:.2e}")
    else:
        diff = max(abs(a - b) for a, b in zip(first_losses["ours"], first_losses["peft"]))
        print(f"first losses ours vs PEFT differ by at most {diff:.2e}")
    return summary


def main(argv=None) -> int:
    args, variants = parse_args(argv)
    methods = INFER_METHODS if args.infer else METHODS + tuple(variants)
    steps, trainable, first_losses, info = prepare(methods, args, variants)
    started = time.time()
    times, cpu = measure(methods, steps, args.rounds)
    ratios = round_ratios(args, variants, times, cpu)
    summary = report(args, methods, times, cpu, trainable, ratios, first_losses)
    print(f"machine: {common.describe(info)}; {time.time() - started:.0f} s")
    common.write_json(args.json_out, {
        "benchmark": "train_step_paired", "settings": {k: v for k, v in vars(args).items() if k != "json_out"},
        "machine": info, "trainable": trainable, "first_losses": first_losses,
        "median_step_s": {m: statistics.median(times[m]) for m in methods},
        "median_cpu_s": {m: statistics.median(cpu[m]) for m in methods},
        "ratios": summary, "times": times, "cpu_times": cpu})
    return 0


if __name__ == "__main__":
    sys.exit(main())
