"""``python -m studio`` and the ``lora-studio`` console script: without arguments, the window;
with a subcommand, that command, headless (no Qt imported)."""

from __future__ import annotations

import sys
import time

T0 = time.perf_counter()  # start-up time of `gui --smoke` is measured from here


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        from studio import app

        return app.run(t0=T0)
    if argv[0] == "gui":  # skip building every subcommand's parser: the window starts faster
        import argparse

        from studio.commands import gui

        p = argparse.ArgumentParser(prog="lora-studio")
        sub = p.add_subparsers(dest="command")
        gui.register(sub)
        args = p.parse_args(argv)
        args.t0 = T0
        return args.func(args)
    from studio.cli import run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
