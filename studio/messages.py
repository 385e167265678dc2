"""Core's messages phrased for the window.

``core`` is shared by the command line and the window, so its errors name the option at fault the
command line's way (``--format: ...``, ``map a column with --fields output=COLUMN``). A person in the
window has no flags to type: :func:`for_window` turns a :class:`core.errors.StudioError` (or any
text) into the window's words. An error that needs different advice in the window carries it as
``window_hint``; every other flag is renamed to the control that sets it (:data:`OPTIONS`).
The command line's messages are untouched.

No Qt here: the Data page's workers call it too.
"""

from __future__ import annotations

import re

OPTIONS: dict[str, str] = {
    "--model": "the model",
    "--quantize": "Quantize (Model page)",
    "--device": "Device (Model page)",
    "--precision": "Precision (Model page)",
    "--targets": "the layers to adapt (Layers page)",
    "--rank": "Rank r",
    "--alpha": "Alpha α",
    "--dropout": "Dropout (Layers page)",
    "--format": "Format (Data page)",
    "--fields": "the field mapping (Data page)",
    "--max-length": "Max length",
    "--chat-template": "the chat template choice (Data page)",
    "--val-split": "Validation split (Train page)",
    "--steps": "Steps (Train page)",
    "--epochs": "Epochs (Train page)",
    "--batch-size": "Batch size (Train page)",
    "--grad-accum": "Accumulation (Train page)",
    "--lr": "Learning rate (Train page)",
    "--scheduler": "Schedule (Train page)",
    "--warmup": "Warmup steps (Train page)",
    "--eval-every": "Evaluate every (Train page)",
    "--save-every": "Save every (Train page)",
    "--gradient-checkpointing": "Gradient checkpointing (Train page)",
    "--resume": "resuming the run",
    "--config": "the run's configuration",
    "--adapter": "the adapter",
    "--weights": "the weights",
    "--combine": "the way to combine",
    "--density": "the density",
    "--dtype": "Precision (export dialog)",
    "--type": "the GGUF type (export dialog)",
    "--out": "the folder",
    "--name": "the name",
    "--revision": "the revision",
    "--data": "the dataset (Data page)",
    "--data-split": "the dataset split",
    "--data-config": "the dataset configuration",
    "--adapter-only": "Adapter only (GGUF export)",
    "--metrics": "the metrics (Evaluate page)",
    "--no-base": "the base model's answers (Evaluate page)",
    "--max-new-tokens": "Max new tokens",
    "--ranks": "the ranks (Sweep)",
    "--target-set": "the target sets (Sweep)",
    "--budget": "the parameter budget (Sweep)",
}
"""Each command-line option core's messages may name → what the window calls it, and where."""

PASSTHROUGH = frozenset({"--force-reinstall", "--no-deps", "--upgrade", "--index-url", "--extra-index-url"})
"""Flags of commands a message asks the user to type in a terminal (``pip install ...``): kept."""

_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def rephrase(text: str) -> str:
    """``text`` with every option named the command line's way renamed as the window names it."""
    out = _FLAG.sub(lambda m: OPTIONS.get(m.group(0), m.group(0)), text)
    return out[:1].upper() + out[1:] if text.startswith("--") else out


def for_window(error) -> str:
    """One line for the window's message bar: a StudioError's message with its window hint (else its
    hint), or any text, with command-line options renamed (:func:`rephrase`)."""
    from core.errors import StudioError

    if isinstance(error, StudioError):
        hint = getattr(error, "window_hint", None) or error.hint
        text = error.message if not hint else f"{error.message}. {hint[:1].upper()}{hint[1:]}"
    else:
        text = str(error)
    return rephrase(text)
