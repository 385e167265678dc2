"""``lora-studio evaluate``: answer held-out examples with the base model and each adapter, and score them.

A thin layer over :mod:`core.evaluate`: read the examples, load the model once, answer with each
system (greedy, batched, a progress bar per system), write ``DIR/results.json``,
``DIR/predictions.jsonl`` and ``DIR/results.csv``, and print the systems × metrics table (or, with
``--json``, results.json itself).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.errors import StudioError
from studio.commands import add_model_option, fetch_model


def register(sub) -> None:
    from core.metrics import DEFAULT_METRICS, METRICS
    from studio.commands import add_quantize_option

    e = sub.add_parser(
        "evaluate", help="score the base model and adapters on held-out examples (BLEU, chrF, ROUGE-L, ...)",
        description="Generate an answer to each held-out example with the base model (unless --no-base) and "
                    "with each adapter, greedily, and score the answers against the references. Writes "
                    "DIR/results.json (systems x metrics, with 95%% bootstrap intervals), DIR/predictions.jsonl "
                    "(one line per example and system) and DIR/results.csv.",
        epilog="Example: lora-studio evaluate --model default --adapter my-adapter --data held_out.jsonl "
               "--out eval/first --metrics exact_match,bleu,json_fields")
    add_model_option(e)
    e.add_argument("--adapter", action="append", default=[], metavar="A",
                   help="an adapter folder (ours or PEFT's) or the name or id of an adapter in the library; "
                        "repeat for several")
    e.add_argument("--no-base", action="store_true", help="do not answer with the base model alone")
    e.add_argument("--data", required=True, metavar="FILE",
                   help="held-out examples with reference answers (prompt/completion, instruction/output or "
                        "chat rows; the last assistant turn is the reference), or a run folder: the rows its "
                        "validation split held out")
    e.add_argument("--format", help="the file's format (default: auto, detected)")
    e.add_argument("--fields", metavar="FIELD=COLUMN,...", help="map the format's fields to the file's columns")
    e.add_argument("--out", required=True, metavar="DIR", help="the folder to write the results to")
    e.add_argument("--metrics", metavar="LIST",
                   help=f"comma-separated, from {', '.join(METRICS)} (default: {','.join(DEFAULT_METRICS)})")
    e.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="longest answer (default: 128)")
    e.add_argument("--limit", type=int, metavar="N", help="evaluate the first N examples only")
    e.add_argument("--batch-size", type=int, default=8, metavar="N", help="prompts answered together (default: 8)")
    e.add_argument("--chat-template", default="auto", metavar="auto|plain|chatml|FILE.jinja",
                   help="how prompts are rendered; use what the adapters were trained with (default: auto)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    e.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"), help="auto, fp32, bf16 or fp16 (default: auto)")
    add_quantize_option(e, default="none")
    e.add_argument("--json", action="store_true", help="print results.json instead of a table")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from core import evaluate, metrics
    from core.eval_results import write_results
    from studio.commands.merge import adapter_folder

    names = metrics.parse_metrics(args.metrics)
    if args.limit is not None and args.limit < 1:
        raise StudioError(f"--limit must be at least 1 (got {args.limit})")
    fields = None
    if args.fields:
        from core.data import parse_fields

        fields = parse_fields(args.fields)
    from core.runs import is_run_folder

    if Path(args.data).is_dir() and is_run_folder(Path(args.data)):  # a run folder: its validation split
        examples = evaluate.run_examples(args.data, limit=args.limit)
    else:
        examples = evaluate.read_examples(args.data, format=args.format or "auto", fields=fields, limit=args.limit)
    folders = [adapter_folder(a) for a in args.adapter]
    given = [None if Path(a).expanduser().is_dir() else a for a in args.adapter]  # library names as typed
    systems = evaluate.systems_for(folders, base=not args.no_base, names=given)
    fetch_model(args.model)
    from core import models

    loaded = models.load_model(args.model, device=args.device, precision=args.precision, quantize=args.quantize)
    bars: dict = {}

    def progress(system: str, done: int, total: int) -> None:
        if args.no_progress:
            return
        from tqdm import tqdm

        bar = bars.get(system)
        if bar is None:
            bar = bars[system] = tqdm(total=total, desc=system, unit="ex", file=sys.stderr, leave=True)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    result = evaluate.evaluate(loaded, examples, systems, metric_names=names, max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, chat_template=args.chat_template, progress=progress)
    path = write_results(args.out, result)
    data = result.to_dict()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(format_table(data))
        print(f"wrote {path}, {path.parent / 'predictions.jsonl'} and {path.parent / 'results.csv'}", file=sys.stderr)
    return 0


def format_table(results: dict) -> str:
    """The systems × metrics table as text, each score with its 95% interval."""
    cols = [m for m in results["metrics"] if m != "loss"] + (["loss", "perplexity"] if "loss" in results["metrics"] else [])
    rows = [["system"] + cols]
    for name, scores in results["systems"].items():
        ci = results.get("intervals", {}).get(name, {})
        cells = [name]
        for m in cols:
            v = scores.get(m)
            lo_hi = ci.get(m)
            cells.append("-" if v is None else f"{v:.4g}" + (f" [{lo_hi[0]:.3g}, {lo_hi[1]:.3g}]" if lo_hi else ""))
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols) + 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
