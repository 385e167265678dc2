"""One module per subcommand. Each has ``register(subparsers)``, which adds its parser and sets
``func`` to a function taking the parsed arguments and returning the exit code.

Modules are imported lazily by name so that one command's heavy imports never slow another's start;
none of them imports Qt except ``gui``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# In the order ``lora-studio --help`` lists them.
NAMES = ("gui", "models", "data", "targets", "train", "generate", "merge", "export_gguf", "inspect", "library",
         "evaluate", "sweep")


def load() -> list[ModuleType]:
    found = []
    for name in NAMES:
        try:
            found.append(importlib.import_module(f"studio.commands.{name}"))
        except ModuleNotFoundError as e:
            if e.name != f"studio.commands.{name}":
                raise
    return found


QUANTIZE_HELP = ("hold the base model's linear layers (not the output head) in 4-bit NF4 (QLoRA) or "
                 "8-bit with bitsandbytes, computing in --precision: about a quarter (nf4) or half (int8) "
                 "of the bf16 weights' memory; needs 'pip install bitsandbytes'")


def add_quantize_option(parser, *, default: str | None = None, prefix: str = "") -> None:
    """``--quantize none|nf4|int8`` on a command that loads a model (or estimates its memory), with
    one help text for all of them. ``default`` None lets ``train --config FILE`` keep the file's."""
    from core.config import QUANTIZE  # no torch: core.config imports none

    shown = f" (default: {default})" if default else " (default: none)"
    parser.add_argument("--quantize", choices=QUANTIZE, default=default, help=prefix + QUANTIZE_HELP + shown)


MODEL_HELP = ("'default' (the bundled SmolLM2-135M-Instruct), a Hugging Face checkpoint folder, a .gguf file, "
              "or a Hub repo id (org/name, downloaded when not cached)")


def add_model_option(parser, *, default: str | None = "default", prefix: str = "base model: ",
                     shown: str | None = None) -> None:
    """``--model M`` with one help text for every command. ``default`` None lets ``train --config FILE``
    keep the file's (``shown`` is then the default the help names); ``prefix`` says what it is for."""
    shown = shown or default
    parser.add_argument("--model", default=default, metavar="M",
                        help=prefix + MODEL_HELP + (f" (default: {shown})" if shown else ""))


def fetch_model(spec: str | None, revision: str | None = None) -> str | None:
    """What every command does with its ``--model`` first: a Hub repo id (``org/name``) that is not
    completely in the local Hugging Face cache is downloaded, with a progress bar on stderr (offline:
    one line saying so). Anything else (``default``, a folder, a file, a cached id) passes unchanged."""
    if not spec:
        return spec
    from core import hub

    if hub.is_repo_id(spec) and hub.local_snapshot(spec, revision) is None:
        from studio.commands.models import download_with_bar

        hub.refuse_offline(f"--model {spec}")
        download_with_bar(spec, revision)
    return spec
