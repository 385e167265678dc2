"""``lora-studio merge``: a plain Hugging Face model folder with adapters merged in, verified by logits."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from core.errors import StudioError
from studio.commands import add_model_option, fetch_model

COMBINE_MODES = ("exact", "svd", "ties", "dare_linear", "dare_ties")
"""What ``--combine`` offers; kept here (not read from core.combine) so that building the parser
imports no torch."""


def register(sub) -> None:
    m = sub.add_parser(
        "merge", help="write a Hugging Face model folder with adapter(s) merged in",
        description="Merge one or more LoRA adapters into the base model and write a plain Hugging Face "
                    "model folder (config, safetensors shards, generation config, tokenizer and chat "
                    "template) that loads with transformers alone. The merge is done in fp32; before the "
                    "folder is moved into place it is loaded back and its logits on fixed prompts are "
                    "compared with the base model running the adapters unmerged. If they differ beyond "
                    "tolerance nothing is written and the figures are printed.")
    add_model_option(m)
    m.add_argument("--adapter", action="append", required=True, metavar="DIR",
                   help="an adapter folder (ours or PEFT's), or the name or id of an adapter in the library; "
                        "repeat to merge several")
    add_combine_options(m)
    m.add_argument("--out", required=True, metavar="DIR", help="the model folder to create (must not exist)")
    m.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="dtype of the saved weights (default auto: the base checkpoint's own; the merge "
                        "itself is always done in fp32)")
    m.add_argument("--quantize", choices=("none", "nf4", "int8"), default=None,
                   help="the base the adapters were trained on: with nf4 or int8 (QLoRA) they are merged into "
                        "that base de-quantised (what they learned against) and the model is written in "
                        "--dtype; none: the full-precision base (default: what the adapters' studio.json records)")
    m.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip loading the export back and comparing logits (faster, not recommended)")
    m.add_argument("--json", action="store_true", help="print the report (files, sizes, figures, times) as JSON")
    m.set_defaults(func=cmd_merge)


def add_combine_options(parser, *, what: str = "adapter") -> None:
    """``--weights``, ``--combine`` and ``--rank``: how several adapters become one (merge, library combine)."""
    parser.add_argument("--weights", metavar="W1,W2,...",
                        help=f"one weight per {what}, comma-separated (default: 1 each); ΔW of each is scaled by "
                             "its weight, so 0.5,0.5 averages two adapters and -1 subtracts one")
    parser.add_argument("--combine", default="exact", choices=COMBINE_MODES,
                        help="exact: the weighted sum of every adapter's ΔW, kept exactly (default); svd: "
                             "combine them into one adapter of rank --rank by truncated SVD; ties, "
                             "dare_linear, dare_ties: PEFT's task merges of the ΔW's (TIES keeps the top 20%% of "
                             "entries and elects signs; DARE drops 90%% at random and rescales), then rank --rank")
    parser.add_argument("--rank", type=int, metavar="R",
                        help="rank of the combined adapter with --combine svd, ties or dare_* (default: the "
                             "largest rank among the adapters)")


def check_rank_option(args) -> None:
    if args.rank is not None and args.combine == "exact":
        raise StudioError("--rank: not used with --combine exact (it keeps every adapter's full rank); "
                          "give it with svd, ties or dare_*")


def _parse_weights(text: str | None, n: int) -> list[float] | None:
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise StudioError(f"--weights: '{text}' is not a comma-separated list of numbers") from None
    if len(weights) != n:
        raise StudioError(f"--weights: {len(weights)} weight(s) for {n} adapter(s); give one per --adapter")
    if not all(math.isfinite(w) for w in weights):
        raise StudioError(f"--weights: '{text}' holds a value that is not a finite number")
    return weights


def adapter_folder(value: str) -> Path:
    """An ``--adapter`` value as a folder: a path if one exists there, else a library name or id."""
    p = Path(value).expanduser()
    if p.is_dir():
        return p
    from core.library import Library

    try:
        return Library().resolve(value).path
    except StudioError:
        raise StudioError(f"--adapter {value}: no such folder, and no adapter of that name or id in the library",
                          hint="'lora-studio library list' shows the library") from None


def cmd_merge(args) -> int:
    from tqdm import tqdm

    from core.export import export_merged

    fetch_model(args.model)
    folders = [adapter_folder(a) for a in args.adapter]
    weights = _parse_weights(args.weights, len(folders))
    check_rank_option(args)
    bar = tqdm(total=100, unit="%", disable=None, file=sys.stderr,
               bar_format="{l_bar}{bar}| {elapsed}")

    def progress(message: str, fraction: float) -> None:
        bar.set_description_str(message)
        bar.update(int(round(100 * fraction)) - bar.n)

    try:
        report = export_merged(args.model, folders, weights, combine=args.combine, rank=args.rank, out=args.out,
                               quantize=args.quantize,
                               dtype=args.dtype, progress=progress, verify=args.verify)
    finally:
        bar.close()
    for w in report.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    v = report.get("verify")
    size = report["size_bytes"] / 2**20
    print(f"wrote {report['out']}: {len(report['files'])} files, {size:.1f} MiB, {report['dtype']}, "
          f"in {report['seconds']['total']:.1f} s")
    if v:
        e = v["export"]
        print(f"verified: max |Δlogit| {e['max_abs_diff']:.2e} against base + adapter unmerged "
              f"(relative {e['relative']:.2e}, tolerance {e['tolerance']:g}; top-1 agreement "
              f"{100 * e['top1_agreement']:.1f}%)")
    else:
        print("not verified (--no-verify)")
    return 0
