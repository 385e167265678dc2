"""Merge, unmerge and swap times of core.lora on a real model (target: each under 1 s).

Run it from the repository root::

    flock /tmp/heavy.lock .venv/bin/python benchmarks/merge_swap.py --json-out benchmarks/results/merge_swap-cpu.json

Two adapters, ``one`` and ``two`` (``--targets``, default all-linear, r=8, random B so the merge
really changes the weights), are injected into the model. Then, ``--repeats`` times each:

``merge``    ``merge_adapter(model, "one")``: W ← W + s·B·A on every target, in fp32 (ΔW checked finite).
``unmerge``  ``unmerge_adapter(model, "one")``: W ← W − s·B·A.
``swap``     ``swap_adapter(model, "one", "two", merged=True)`` with ``one`` merged: the paper's task
             switch, one unmerge plus one merge, without reloading the base.

After one merge and unmerge the weights must equal the original ones to 1e-6 (checked before the
timed cycles; the drift after all of them, where fp32 rounding adds up, is reported too). PEFT's
``merge_adapter`` / ``unmerge_adapter`` on the same model and adapter are timed alongside for reference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Merge, unmerge and swap times of core.lora (and PEFT's, "
                                            "for reference) on a local model.")
    p.add_argument("--model", default="default",
                   help="'default' (the bundled SmolLM2-135M-Instruct) or a local model folder")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--targets", default="all-linear", help="target preset (default all-linear)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions of each operation (default 5)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-peft", action="store_true", help="skip PEFT's reference timings")
    p.add_argument("--json-out", default=None, help="write the figures and the machine to this JSON file")
    return p.parse_args(argv)


def _random_b(params, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.dtype))


def make_clock(device: str):
    """A function that times one call of ``fn`` in seconds, the device's queued work included."""
    sync = common.device_sync(device)

    def clock(fn):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    return clock


def time_ours(folder: Path, args, clock) -> tuple[dict, list[str]]:
    """Inject adapters ``one`` and ``two``, check one merge + unmerge restores the weights, then time
    merge, unmerge and swap ``--repeats`` times each; the figures as they go into the JSON, and the
    target modules' names."""
    import torch

    from core import lora, targets

    model = common.load_model(folder, args.device, args.dtype)
    names = targets.resolve_targets(model, args.targets)
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    for i, n in enumerate(("one", "two")):
        lora.inject_adapter(model, names, n, rank=args.rank, alpha=args.alpha)
        _random_b([(k, p) for k, p in lora.lora_parameters(model, [n]).items()], seed=i + 1)
    lora.set_active_adapters(model, ["one"])

    def weight_error():
        return max((v.float() - original[k.replace(".base_layer", "")].float()).abs().max().item()
                   for k, v in model.state_dict().items() if "lora_" not in k)

    times: dict[str, list[float]] = {"merge": [], "unmerge": [], "swap": []}
    lora.merge_adapter(model, "one")
    lora.unmerge_adapter(model, "one")
    restored = weight_error()  # one merge + unmerge: the 1e-6 promise
    for _ in range(args.repeats):
        times["merge"].append(clock(lambda: lora.merge_adapter(model, "one")))
        times["unmerge"].append(clock(lambda: lora.unmerge_adapter(model, "one")))
    for _ in range(args.repeats):
        lora.merge_adapter(model, "one")
        times["swap"].append(clock(lambda: lora.swap_adapter(model, "one", "two", merged=True)))
        lora.unmerge_adapter(model, "two")
        lora.set_active_adapters(model, ["one"])
    drift = weight_error()  # after every timed merge, unmerge and swap: rounding adds up
    return {"ours": {k: common.median(v) for k, v in times.items()},
            "ours_all_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
            "max_abs_weight_error_after_unmerge": restored,
            "max_abs_weight_drift_after_all_cycles": drift, "modules": len(names)}, names


def time_peft(folder: Path, names: list[str], args, clock) -> dict:
    """PEFT's merge_adapter and unmerge_adapter on the same targets, median seconds of each."""
    import peft
    import torch

    base = common.load_model(folder, args.device, args.dtype)
    torch.manual_seed(0)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=args.rank, lora_alpha=args.alpha,
                                                   target_modules=[n.rsplit(".", 1)[-1] for n in names],
                                                   task_type="CAUSAL_LM"))
    _random_b(pm.named_parameters(), seed=1)
    pt: dict[str, list[float]] = {"merge": [], "unmerge": []}
    for _ in range(args.repeats):
        pt["merge"].append(clock(pm.merge_adapter))
        pt["unmerge"].append(clock(pm.unmerge_adapter))
    return {k: common.median(v) for k, v in pt.items()}


def report(folder: Path, args, result: dict, info: dict) -> None:
    """The table of medians, the 1 s target and the weight check."""
    restored, drift = result["max_abs_weight_error_after_unmerge"], result["max_abs_weight_drift_after_all_cycles"]
    print(f"model {folder}: {result['modules']} {args.targets} modules, r={args.rank}, {args.dtype} on {args.device}; "
          f"median of {args.repeats}")
    print(f"{'operation':<10}{'ours':>10}{'PEFT':>10}")
    for op in ("merge", "unmerge", "swap"):
        theirs = result.get("peft", {}).get(op)
        print(f"{op:<10}{result['ours'][op] * 1000:>7.0f} ms"
              + (f"{theirs * 1000:>7.0f} ms" if theirs is not None else f"{'-':>10}"))
    ok = all(v < 1.0 for v in result["ours"].values())
    print(f"target: each under 1 s: {'met' if ok else 'NOT met'}; "
          f"weights after one merge+unmerge differ by at most {restored:.2e} (must be ≤ 1e-6); "
          f"after all {3 * args.repeats + 1} cycles by {drift:.2e}")
    print(f"machine: {common.describe(info)}")


def write_result(path: str | None, args, folder: Path, info: dict, result: dict) -> None:
    """``--json-out``: the settings, the model folder and the machine beside the figures."""
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in vars(args).items() if k != "json_out"}
        out.write_text(json.dumps({"settings": settings, "model_folder": str(folder), "machine": info,
                                   **result}, indent=1) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = common.model_folder(args.model)
    clock = make_clock(args.device)
    result, names = time_ours(folder, args, clock)  # its model is freed before PEFT's is loaded
    if not args.no_peft:
        result["peft"] = time_peft(folder, names, args, clock)
    info = common.machine()
    report(folder, args, result, info)
    write_result(args.json_out, args, folder, info, result)
    return 0 if result["max_abs_weight_error_after_unmerge"] <= 1e-6 else 1


if __name__ == "__main__":
    raise SystemExit(main())
