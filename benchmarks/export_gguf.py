"""Time and size of the GGUF export (``core.gguf_export.export_gguf``) per type, on a real model.

Run it from the repository root (heavy: each type merges, writes and reads back the model; on a
shared machine take the lock)::

    flock /tmp/heavy.lock .venv/bin/python benchmarks/export_gguf.py --json-out benchmarks/results/export_gguf-cpu.json

An adapter (all-linear, r=8, random B, as benchmarks/export.py makes it) is exported merged into the
bundled default in each ``--type`` (default: f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0), then alone as a
GGUF LoRA. Each row: the stages export_gguf times itself (merge with its own check, write, read-back
check) and the total, the file's size, and the check's figures. With ``llama-cpp-python`` installed
(the optional extra ``gguf-k``; not needed otherwise) each file is also run in llama.cpp itself: its
greedy answer to each prompt is compared with transformers' on the merged model (``--no-llama-cpp``
skips it); without it the rows say so.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from export import make_adapter  # noqa: E402

TYPES = ("f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Time and size of the verified GGUF export per type.")
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a local model folder")
    p.add_argument("--type", action="append", help=f"a GGUF type; repeat for several (default: {', '.join(TYPES)})")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of the adapter (default 8)")
    p.add_argument("--no-adapter", action="store_true",
                   help="export the base model alone (no merge): the types' own cost and error on the bundled default")
    p.add_argument("--no-adapter-only", action="store_true", help="skip the adapter-alone GGUF LoRA row")
    p.add_argument("--no-llama-cpp", action="store_true", help="do not run the files in llama.cpp even if installed")
    p.add_argument("--json-out", default=None, help="write the figures and the machine to this JSON file")
    return p.parse_args(argv)


def llama_cpp_check(path: Path, merged_folder: Path, tokens: int = 32) -> dict:
    """llama.cpp's greedy answer to each prompt against transformers' on the merged model (token ids)."""
    import llama_cpp
    import torch

    from core import gguf_export, gguf_write
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_folder)
    ref = gguf_write.load_reference(merged_folder)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False, logits_all=False)
    same = 0
    for prompt in gguf_export.PROMPTS:
        ids = tok(prompt)["input_ids"]
        want = gguf_write.greedy(ref, torch.tensor([ids]), tokens)
        got = []
        for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            got.append(int(t))
            if len(got) == tokens:
                break
        same += got == want
    return {"llama_cpp_same_greedy": same, "prompts": len(gguf_export.PROMPTS)}


def main(argv=None) -> int:
    args = parse_args(argv)
    from core import gguf_export
    from core.errors import StudioError

    types = args.type or list(TYPES)
    use_llama = not args.no_llama_cpp and importlib.util.find_spec("llama_cpp") is not None
    work = Path(tempfile.mkdtemp(prefix="lora-studio-gguf-bench-"))
    rows = []
    try:
        if not args.no_adapter:
            facts = make_adapter(args.model, work / "adapter", args.rank, "all-linear")
            print(f"adapter: r={args.rank} on {facts['modules']} modules, {facts['trainable_parameters']:,} "
                  "parameters", flush=True)
        for t in types:
            out = work / f"out-{t}"
            start = time.perf_counter()
            try:
                report = gguf_export.export_gguf(args.model, [] if args.no_adapter else [work / "adapter"],
                                                 type_name=t, out=out)
            except StudioError as e:  # a failed check is a result too: the figures are in the message
                rows.append({"type": t, "refused": str(e), "wall_s": round(time.perf_counter() - start, 2)})
                print(f"{t:>26}: refused after {rows[-1]['wall_s']} s: {e}", flush=True)
                continue
            row = {"type": t, "seconds": report["seconds"], "wall_s": round(time.perf_counter() - start, 2),
                   "size_mib": round(report["size_bytes"] / 2**20, 1), "verify": report["verify"]}
            if use_llama:
                from core import models

                merged = models.checkpoint_folder(args.model) if args.no_adapter else work / "merged-ref"
                if not merged.exists():
                    from core.export import export_merged

                    export_merged(args.model, [work / "adapter"], out=merged, dtype="fp32")
                row["llama_cpp"] = llama_cpp_check(Path(report["out"]), merged)
            rows.append(row)
            print(_line(row), flush=True)
            shutil.rmtree(out, ignore_errors=True)
        if not args.no_adapter_only and not args.no_adapter:
            start = time.perf_counter()
            report = gguf_export.export_gguf(args.model, [work / "adapter"], type_name="f16", out=work / "lora",
                                             adapter_only=True)
            row = {"type": "lora (adapter alone, F16)", "seconds": report["seconds"],
                   "wall_s": round(time.perf_counter() - start, 2), "size_mib": round(report["size_bytes"] / 2**20, 2),
                   "verify": report["verify"]}
            rows.append(row)
            print(_line(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"machine": common.machine(), "model": args.model, "rank": None if args.no_adapter else args.rank,
              "rows": rows,
              "llama_cpp": "run" if use_llama else "not installed (pip install 'lora-studio[gguf-k]')"}
    common.write_json(args.json_out, result)
    print(common.describe(result["machine"]))
    if not use_llama:
        print("llama.cpp itself: not run (llama-cpp-python is not installed)")
    return 0


def _line(row: dict) -> str:
    v, s = row["verify"], row["seconds"]
    if "prompts_same" in v:
        check = f"greedy same on {v['prompts_same']}/{v['prompts']} prompts ({v['near_ties_excused']} near-ties)"
    elif "top1_agreement" in v:
        check = f"top-1 agreement {100 * v['top1_agreement']:.1f}%"
    else:
        check = f"logits {v['relative']:.2e} relative"
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in s.items() if k != "total")
    extra = f"; llama.cpp greedy same on {row['llama_cpp']['llama_cpp_same_greedy']}/4" if "llama_cpp" in row else ""
    return f"{row['type']:>26}: {s['total']:6.1f} s ({stages}), {row['size_mib']} MiB, {check}{extra}"


if __name__ == "__main__":
    sys.exit(main())
