"""``lora-studio data``: what a dataset looks like to the model, before any training."""

from __future__ import annotations

import argparse
import json
import sys

from core.config import FORMATS
from studio.commands import add_model_option, fetch_model


def register(sub) -> None:
    d = sub.add_parser(
        "data", help="check a dataset: its format, token statistics and the first example as trained",
        description="Read a dataset, detect its format (or use --format and --fields), tokenise every "
                    "example with the model's tokenizer and report: the number of examples, the token "
                    "length statistics, how many examples --max-length cuts, the rows that cannot be "
                    "trained on, and the first example exactly as it will be trained, with the trained "
                    "tokens marked (underlined on a terminal, else between ⟦ ⟧). Nothing is written.",
        epilog="FILE is .jsonl, .json, .csv, .tsv, .parquet, .txt (one example per paragraph when blank "
               "lines separate them, else per line) or a folder written by datasets' save_to_disk. "
               "Formats: chat (messages with role/content, or ShareGPT conversations with from/value), "
               "instruction (instruction, input, output), prompt-completion (prompt, completion; or "
               "question, answer) and text (text).")
    d.add_argument("file", metavar="FILE", help="the dataset file or save_to_disk folder, or a Hub dataset id "
                                                "(org/name, read through datasets into its cache)")
    d.add_argument("--data-split", metavar="S", help="with a Hub dataset: the split (default: train, or its only one)")
    d.add_argument("--data-config", metavar="C", help="with a Hub dataset: its configuration, where it has several")
    add_model_option(d, prefix="whose tokenizer and chat template to use: ")
    d.add_argument("--format", default="auto", choices=FORMATS,
                   help="the dataset's format (default: auto, detected from the columns)")
    d.add_argument("--fields", default="", metavar="FIELD=COLUMN,...",
                   help="map the format's fields to the file's columns, e.g. instruction=question,output=answer")
    d.add_argument("--chat-template", default="auto", metavar="auto|plain|chatml|FILE.jinja",
                   help="how conversations are rendered: the model's own template (auto; plain text when it has "
                        "none), plain ### Instruction/### Response, ChatML, or a template file (default: auto)")
    d.add_argument("--max-length", type=int, default=512, metavar="N",
                   help="cut examples at N tokens and count them (default: 512)")
    d.add_argument("--train-on-prompt", action="store_true",
                   help="train on every token, not only the answers'")
    d.add_argument("--packing", action="store_true",
                   help="also report how many sequences packing into --max-length gives")
    d.add_argument("--val-split", type=float, default=0.0, metavar="FRACTION",
                   help="hold out this fraction for validation, chosen by --seed (default: 0)")
    d.add_argument("--seed", type=int, default=42, help="seed of the train/validation split (default: 42)")
    d.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    d.set_defaults(func=cmd_data)


def _tokenizer(spec: str):
    """The model's tokenizer through core.models (which converts a GGUF once and caches it)."""
    from core import models

    return models.load_tokenizer(spec)


def _progress(enabled: bool):
    """A tqdm bar on stderr for long files when stderr is a terminal; else nothing."""
    if not enabled:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=0, unit="rows", desc="tokenising", file=sys.stderr, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return update, bar.close


def _histogram_lines(hist: dict, width: int = 40, rows: int = 8) -> list[str]:
    """A few text bars of the length histogram (neighbouring bins merged to ``rows`` lines)."""
    edges, counts = hist.get("edges") or [], hist.get("counts") or []
    if not counts:
        return []
    step = max(1, -(-len(counts) // rows))
    merged = [(edges[i], edges[min(i + step, len(counts))], sum(counts[i:i + step]))
              for i in range(0, len(counts), step)]
    top = max(c for _, _, c in merged) or 1
    return [f"  {int(a):>6}-{int(b) - 1:<6} {'█' * max(1 if c else 0, round(width * c / top))} {c}"
            for a, b, c in merged]


def cmd_data(args: argparse.Namespace) -> int:
    from core import chat, data
    from core.config import DataConfig, RunConfig
    from core.errors import ConfigError

    cfg = DataConfig(path=args.file, format=args.format, fields=data.parse_fields(args.fields),
                     max_length=args.max_length, packing=args.packing, train_on_prompt=args.train_on_prompt,
                     val_split=args.val_split, chat_template=args.chat_template,
                     split=args.data_split or "", subset=args.data_config or "")
    problems = [p for p in RunConfig(data=cfg).problems()
                if p.startswith(("--max-length", "--val-split", "--chat-template"))]
    if problems:
        raise ConfigError(problems)
    source = data.read(cfg.path, format=cfg.format, fields=cfg.fields, split=cfg.split or None,
                       subset=cfg.subset or None)
    tok = _tokenizer(fetch_model(args.model))
    update, close = _progress(not args.json and sys.stderr.isatty())
    try:
        prepared = data.prepare(cfg, tok, seed=args.seed, progress=update, source=source)
    finally:
        close()
    st = prepared.stats
    ex = prepared.example
    if args.json:
        out = {
            "path": str(source.path), "format": prepared.format, "fields": prepared.fields,
            "columns": source.columns, "rows": source.rows, "notes": source.notes, "model": args.model,
            "chat_template": bool(getattr(tok, "chat_template", None)),
            "rendering": chat.describe(tok, args.chat_template),
            "stats": st, "truncated": prepared.truncated, "problems": prepared.problems,
            "first_example": None if ex is None else {
                "tokens": len(ex), "trained_tokens": ex.trained_tokens, "truncated": ex.truncated,
                "pieces": [[text, trained] for text, trained in data.render_marked(ex, tok)],
                "text": data.render_text(ex, tok, style="brackets"),
                "input_ids": ex.input_ids, "labels": ex.labels,
            },
        }
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0

    lens = st["lengths"]
    fields = ", ".join(f"{k}={v}" for k, v in prepared.fields.items())
    print(f"{source.path}: {source.rows} rows, format {prepared.format} ({fields})")
    for note in source.notes:
        print(f"  read as: {note}")
    print(f"tokenizer of '{args.model}': {chat.describe(tok, args.chat_template)}")
    print(f"examples: {st['examples']} ({st['train_examples']} train, {st['val_examples']} validation"
          + (f", {st['skipped']} skipped" if st["skipped"] else "") + ")"
          + (f"; packed into {st['train_sequences']} training sequences" if st["packed"] else ""))
    share = 100 * st["trained_tokens"] / max(1, st["tokens"])
    print(f"tokens per example: min {lens['min']}, p50 {lens['p50']}, mean {lens['mean']:.1f}, "
          f"p90 {lens['p90']}, p99 {lens['p99']}, max {lens['max']}; {st['tokens']:,} tokens, "
          f"{st['trained_tokens']:,} trained ({share:.0f}%)")
    for line in _histogram_lines(lens.get("histogram", {})):
        print(line)
    print(f"truncated at {args.max_length} tokens: {prepared.truncated}")
    if prepared.problems:
        print("problems:")
        for p in prepared.problems:
            print(f"  {p}")
    else:
        print("problems: none")
    if ex is not None:
        tty = sys.stdout.isatty()
        how = "underlined" if tty else "between ⟦ ⟧"
        print(f"\nfirst example as trained ({len(ex)} tokens, {ex.trained_tokens} trained, {how}"
              + (", truncated" if ex.truncated else "") + "):")
        print(data.render_text(ex, tok, style="ansi" if tty else "brackets"))
    return 0
