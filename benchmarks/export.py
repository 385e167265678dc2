"""Time of a verified merged export (``core.export.export_merged``) on a real model.

Run it from the repository root (it is heavy: the base model is loaded, merged, written and loaded
back; on a shared machine take the lock)::

    flock /tmp/heavy.lock .venv/bin/python benchmarks/export.py --json-out benchmarks/results/export-cpu.json

An adapter (``--targets``, default all-linear, r=8, random B so the merge really changes the
weights) is written with core.adapter.save_adapter, then exported ``--repeats`` times into a
temporary folder for each ``--dtype`` asked (default: the checkpoint's own, then bf16). Each run
reports the stages export_merged times itself (load, reference logits, merge, save, verify) and
the total, the size written, and the verification figures (max |Δlogit| against base + adapter
unmerged, relative to the largest logit, and the tolerance). ``--no-verify`` shows what the check costs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Time a verified merged export of one adapter on a real model.")
    p.add_argument("--model", default="default",
                   help="'default' (the bundled SmolLM2-135M-Instruct) or a local model folder")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--targets", default="all-linear", help="target preset (default all-linear)")
    p.add_argument("--dtype", action="append", choices=["auto", "fp32", "bf16", "fp16"],
                   help="output dtype; repeat for several (default: auto and bf16)")
    p.add_argument("--repeats", type=int, default=2, help="exports per dtype (default 2; the first warms caches)")
    p.add_argument("--no-verify", action="store_true", help="also time exports without the logits check")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json-out", default=None, help="write the figures and the machine to this JSON file")
    return p.parse_args(argv)


def make_adapter(model_spec: str, folder: Path, rank: int, targets: str) -> dict:
    """An adapter with random B on every selected module, written as the trainer would write it."""
    import torch

    from core import adapter, lora, models
    from core import targets as targets_mod

    loaded = models.load_model(model_spec, device="cpu", precision="fp32")
    found = targets_mod.list_targets(loaded.model)
    chosen = targets_mod.resolve_targets(found, targets)
    lora.inject_adapter(loaded.model, chosen, rank=rank, alpha=2 * rank)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora.lora_layers(loaded.model):
            b = layer.lora_B["default"]
            b.copy_(torch.randn(b.shape, generator=g) * 0.02)
    adapter.save_adapter(loaded.model, folder, base_model=model_spec)
    return {"modules": len(chosen), "trainable_parameters": sum(
        p.numel() for p in lora.lora_parameters(loaded.model).values())}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from core.export import export_merged

    dtypes = args.dtype or ["auto", "bf16"]
    work = Path(tempfile.mkdtemp(prefix="lora-studio-export-bench-"))
    results = []
    try:
        t = time.perf_counter()
        facts = make_adapter(args.model, work / "adapter", args.rank, args.targets)
        print(f"adapter: r={args.rank} on {facts['modules']} modules ({args.targets}), "
              f"{facts['trainable_parameters']:,} parameters; made in {time.perf_counter() - t:.1f} s",
              file=sys.stderr)
        plan = [(d, True) for d in dtypes] + ([(dtypes[0], False)] if args.no_verify else [])
        for dtype, verify in plan:
            for i in range(args.repeats):
                out = work / f"merged-{dtype}-{int(verify)}-{i}"
                t = time.perf_counter()
                report = export_merged(args.model, [work / "adapter"], out=out, dtype=dtype, verify=verify)
                wall = time.perf_counter() - t
                v = report.get("verify") or {}
                row = {"dtype": report["dtype"], "verify": verify, "repeat": i, "wall_seconds": round(wall, 3),
                       "stages": report["seconds"], "size_bytes": report["size_bytes"],
                       "files": len(report["files"])}
                if v:
                    row.update(export_max_abs_diff=v["export"]["max_abs_diff"],
                               export_relative=v["export"]["relative"], tolerance=v["export"]["tolerance"],
                               file_relative=v["file"]["relative"], merge_relative=v["merge"]["relative"],
                               adapter_effect=v["adapter_effect"], top1_agreement=v["export"]["top1_agreement"])
                results.append(row)
                stages = ", ".join(f"{k} {s:.2f}" for k, s in report["seconds"].items() if k != "total")
                check = (f"; max |Δlogit| {row['export_max_abs_diff']:.2e} (relative {row['export_relative']:.2e},"
                         f" tolerance {row['tolerance']:g})" if v else "; not verified")
                print(f"{row['dtype']:>5} verify={verify!s:<5} #{i}: {wall:6.2f} s ({stages}), "
                      f"{row['size_bytes'] / 2**20:.0f} MiB{check}")
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = common.machine()
    print(common.describe(info))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps({"benchmark": "export", "model": args.model, "rank": args.rank,
                                                   "targets": args.targets, "machine": info, "adapter": facts,
                                                   "runs": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
