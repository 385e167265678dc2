"""``lora-studio generate``: one prompt, answered side by side by the base model and by each adapter,
as the window's Playground does (core.library_jobs.generate_answers: the same job, the same prompt
rendering per adapter)."""

from __future__ import annotations

import json
import sys

from core.errors import StudioError
from studio.commands import add_model_option, add_quantize_option, fetch_model


def register(sub) -> None:
    g = sub.add_parser(
        "generate", help="answer one prompt with the base model and with each adapter, side by side",
        description="Load the base model once, put each --adapter on it, and answer --prompt with the base "
                    "model alone (unless --no-base) and then with each adapter in turn, as the window's "
                    "Playground does. Greedy by default, so answers are reproducible.",
        epilog="example: lora-studio generate --adapter my-adapter --prompt 'Two lattes, please.'")
    add_model_option(g)
    g.add_argument("--adapter", action="append", default=[], metavar="A",
                   help="an adapter folder (ours or PEFT's) or the name or id of an adapter in the library; "
                        "repeat for several")
    g.add_argument("--no-base", action="store_true", help="do not answer with the base model alone")
    g.add_argument("--prompt", required=True, help="what to ask")
    g.add_argument("--system", help="a system message (chat models)")
    g.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="longest answer (default: 128)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 answers greedily (default: 0)")
    g.add_argument("--top-p", type=float, default=0.9, metavar="P", help="nucleus sampling's p (default: 0.9)")
    g.add_argument("--seed", type=int, default=0, help="the sampling seed (default: 0)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto, fp32, bf16 or fp16 (default: auto)")
    add_quantize_option(g, default="none")
    g.add_argument("--json", action="store_true", help="print the answers as JSON")
    g.set_defaults(func=cmd_generate)


def _choices(args) -> tuple[list[str], list[dict | None]]:
    """What answers, in order: labels to print and core.library_jobs.generate_answers's choices."""
    from studio.commands.merge import adapter_folder

    if args.no_base and not args.adapter:
        raise StudioError("--no-base: nothing would answer; give at least one --adapter")
    labels, choices = ([], []) if args.no_base else (["base model"], [None])
    for i, value in enumerate(args.adapter, 1):
        folder = adapter_folder(value)
        labels.append(f"adapter {value}")
        choices.append({"name": f"generate-{i}", "folder": str(folder)})
    return labels, choices


def cmd_generate(args) -> int:
    from core import models
    from core.library_jobs import generate_answers

    if args.max_new_tokens < 1:
        raise StudioError(f"--max-new-tokens: must be at least 1 (got {args.max_new_tokens})")
    if args.temperature < 0:
        raise StudioError(f"--temperature: must be 0 or more (got {args.temperature:g})")
    labels, choices = _choices(args)
    fetch_model(args.model)
    loaded = models.load_model(args.model, device=args.device, precision=args.precision, quantize=args.quantize)
    settings = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                "greedy": args.temperature == 0, "seed": args.seed, "system": args.system}
    answers = generate_answers(loaded.model, loaded.tokenizer, args.prompt, choices, settings)
    if args.json:
        print(json.dumps([{"system": label, "text": g.text, "tokens": len(g.token_ids), "stop_reason": g.stop_reason,
                           "seconds": round(g.seconds, 3)} for label, g in zip(labels, answers)], indent=2))
        return 0
    for label, g in zip(labels, answers):
        print(f"=== {label} ({len(g.token_ids)} tokens, {g.stop_reason}) ===")
        print(g.text)
        print()
    sys.stdout.flush()
    return 0
