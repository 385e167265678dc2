"""Where LoRA Studio keeps its files: the library, the model cache, the run folders.

Everything lives under one folder, the platform's user data folder, or ``$LORA_STUDIO_HOME`` when it
is set (tests and scripts point it at a temporary folder).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

RESOURCES = Path(__file__).resolve().parents[1] / "resources"


def studio_home() -> Path:
    """The root folder of all of LoRA Studio's data, created on first use."""
    env = os.environ.get("LORA_STUDIO_HOME")
    if env:
        root = Path(env).expanduser()
    elif sys.platform == "win32":
        root = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "LoRA Studio"
    elif sys.platform == "darwin":
        root = Path.home() / "Library" / "Application Support" / "LoRA Studio"
    else:
        root = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "lora-studio"
    root.mkdir(parents=True, exist_ok=True)
    return root


def models_dir() -> Path:
    """The model cache: converted GGUF checkpoints and the list of models the user added."""
    d = studio_home() / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d


def library_dir() -> Path:
    """The adapter library: one folder per adapter plus the SQLite index."""
    d = studio_home() / "library"
    d.mkdir(parents=True, exist_ok=True)
    return d


def runs_dir() -> Path:
    """Where the window puts run folders when the user does not choose one."""
    d = studio_home() / "runs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def sample_dataset() -> Path:
    """The project's own sample dataset, preselected in the window."""
    return RESOURCES / "sample_dataset.jsonl"
