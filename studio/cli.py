"""The command line: each subcommand is a few lines over ``core``; no Qt is imported here.

Errors a user can fix are :class:`core.errors.StudioError`: printed as one ``error: ...`` line on
stderr, exit code 1, never a traceback. Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import sys

from core import __version__
from core.errors import StudioError
from studio import commands


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lora-studio",
        description="Fine-tune language models with LoRA on your own machine. "
                    "Without a command, opens the studio window.",
    )
    p.add_argument("--version", action="version", version=f"lora-studio {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for module in commands.load():
        module.register(sub)
    return p


def run(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except StudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        # the system refused a path a file or option named (too long, no permission, disk full): one line
        # naming it; found by the fuzz suite (a config.json whose data path is 5,000 characters long)
        where = f"{str(e.filename)[:200]}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130
