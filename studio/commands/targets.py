"""``lora-studio targets``: a model's adaptable modules by block, and what a selection costs: the exact
trainable parameter count and the memory one training step needs (core.models.estimate_memory)."""

from __future__ import annotations

import argparse
import json

from core.errors import StudioError
from studio.commands import add_model_option, fetch_model


def register(sub) -> None:
    from studio.commands import add_quantize_option

    t = sub.add_parser(
        "targets", help="list a model's adaptable modules by block, and what a selection costs",
        description="List the modules LoRA can adapt (by block, with role and shape), the exact "
                    "trainable parameter count of a selection, and the memory one training step needs "
                    "at --batch-size x --max-length (weights, adapter, gradients, AdamW states, "
                    "activations). Reads only the model's configuration.")
    add_model_option(t, prefix="")
    t.add_argument("--targets", default="all-linear",
                   help="a preset (attention-qv, attention, mlp, all-linear), comma-separated name "
                        "suffixes, or a regular expression (default: all-linear)")
    t.add_argument("--rank", type=int, default=8, help="LoRA rank r (default: 8)")
    t.add_argument("--batch-size", type=int, default=4,
                   help="for the memory estimate: examples per forward pass (default: 4)")
    t.add_argument("--max-length", type=int, default=512,
                   help="for the memory estimate: tokens per example (default: 512)")
    t.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="for the memory estimate: the base weights' precision (default: auto, what "
                        "training with --device auto picks on this machine)")
    add_quantize_option(t, default="none", prefix="for the memory estimate: ")
    t.add_argument("--gradient-checkpointing", action="store_true",
                   help="for the memory estimate: recompute activations in the backward pass")
    t.add_argument("--json", action="store_true", help="print JSON instead of a table")
    t.set_defaults(func=cmd_targets)


def cmd_targets(args: argparse.Namespace) -> int:
    from core import models, targets

    if args.rank < 1:
        raise StudioError(f"--rank: must be at least 1 (got {args.rank})")
    if args.batch_size < 1:
        raise StudioError(f"--batch-size: must be at least 1 (got {args.batch_size})")
    if args.max_length < 1:
        raise StudioError(f"--max-length: must be at least 1 (got {args.max_length})")
    model = models.meta_model(fetch_model(args.model))
    found = targets.list_targets(model)
    chosen = set(targets.resolve_targets(found, args.targets))
    b = targets.budget(model, chosen, args.rank)
    memory = models.estimate_memory(model.config, batch_size=args.batch_size, seq_len=args.max_length,
                                    rank=args.rank, targets=sorted(chosen), precision=args.precision,
                                    gradient_checkpointing=args.gradient_checkpointing, quantize=args.quantize)
    if args.json:
        print(json.dumps({
            "modules": [dict(t.to_dict(), selected=t.name in chosen) for t in found],
            "budget": vars(b),
            "memory": dict(memory, batch_size=args.batch_size, max_length=args.max_length,
                           gradient_checkpointing=args.gradient_checkpointing),
        }, indent=2))
        return 0
    for block, groups in targets.group_by_block(found).items():
        print(block or "(outside the blocks)")
        for group, mods in groups.items():
            for t in mods:
                mark = "x" if t.name in chosen else " "
                print(f"  [{mark}] {group:<9} {t.role:<7} {t.name.split('.')[-1]:<16} "
                      f"{t.d_out:>6} x {t.d_in:<6} {t.kind}")
    print(f"{b.modules} modules selected; {b.trainable:,} trainable parameters at r={args.rank} "
          f"({100 * b.share:.3f}% of {b.total:,}); adapter file about {b.adapter_bytes / 2**20:.1f} MiB")
    gib = 2**30
    quantized = f", linear layers {memory['quantize']}" if memory["quantize"] != "none" else ""
    print(f"training memory at batch {args.batch_size} x {args.max_length} tokens, {memory['precision']}{quantized}"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}: about "
          f"{memory['total'] / gib:.2f} GiB (weights {memory['weights'] / gib:.2f}, adapter + gradients + "
          f"AdamW {(memory['adapter'] + memory['gradients'] + memory['optimizer']) / gib:.2f}, activations "
          f"{(memory['activations'] + memory['allocator']) / gib:.2f})")
    return 0
