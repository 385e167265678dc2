"""``lora-studio gui``: open the studio window (the default when no command is given)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    g = sub.add_parser(
        "gui", help="open the studio window (the same as running lora-studio without a command)",
        description="Open the LoRA Studio window: choose a model, its layers and a dataset, train "
                    "with a live loss plot, and manage the adapter library.")
    g.add_argument("--smoke", action="store_true",
                   help="open the main window with the default model selected, wait until it is "
                        "shown, print 'window shown in S s' and exit 0 (a start-up check for CI "
                        "and packaging)")
    g.set_defaults(func=cmd_gui)


def cmd_gui(args: argparse.Namespace) -> int:
    from studio import app  # Qt is imported here only, never by the other commands

    t0 = getattr(args, "t0", None)
    return app.run(smoke=args.smoke, t0=t0)
