"""One module per subcommand. Each has ``register(subparsers)``, which adds its parser and sets
``func`` to a function taking the parsed arguments and returning the exit code.

Modules are imported lazily by name so that one command's heavy imports never slow another's start;
none of them imports Qt except ``gui``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# In the order ``lora-studio --help`` lists them.
NAMES = ("gui", "models", "data", "targets", "train", "merge", "inspect", "library")


def load() -> list[ModuleType]:
    found = []
    for name in NAMES:
        try:
            found.append(importlib.import_module(f"studio.commands.{name}"))
        except ModuleNotFoundError as e:
            if e.name != f"studio.commands.{name}":
                raise
    return found
