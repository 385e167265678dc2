"""Run folders: what a training run leaves on disk, and how the window and the command line read it.

A run folder (``--out RUN_DIR``) holds, as ``../shared/contract.md`` promises:

* ``config.json``: the complete resolved :class:`core.config.RunConfig`; ``train --config`` repeats it;
* ``metrics.jsonl``: one JSON object per optimizer step (``step``, ``loss``, ``lr``, ``tokens``,
  ``step_seconds``, ``grad_norm``, ``epoch``, ``elapsed``) and one per evaluation (``step``,
  ``eval_loss``). Each line is written and flushed on its own, so a crash leaves every finished line
  readable; a trailing partial line is ignored when read;
* ``checkpoints/step-N/``: everything needed to continue exactly, each written through
  :func:`core.atomic.staged_folder` (complete or absent). Folders whose names start with a dot are
  unfinished ones and never count;
* ``adapter/``: the final adapter (PEFT layout plus ``studio.json``);
* ``status.json``: ``running`` / ``paused`` / ``finished`` / ``stopped`` / ``failed``, the step and
  the process id, written atomically. A ``running`` run whose process is gone reads as
  ``interrupted``, so the list of runs survives a crash of the application.

Nothing here imports torch: listing runs must stay instant.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterable

from core import atomic
from core.home import runs_dir

CONFIG = "config.json"
METRICS = "metrics.jsonl"
STATUS = "status.json"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
CHECKPOINT_DONE = "state.json"
"""A checkpoint folder is complete when it holds this file (it is also renamed into place whole)."""
KEEP_CHECKPOINTS = 3
STATUSES = ("running", "paused", "finished", "stopped", "failed", "interrupted")

_STEP_DIR = re.compile(r"^step-(\d+)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


_NUMBERS = ("loss", "eval_loss", "lr", "tokens", "trained_tokens", "step_seconds", "grad_norm", "epoch")
"""Fields of a metrics row that must be numbers (or null) where present."""


def _well_formed(row) -> bool:
    """A metrics row as the trainer writes it: an object with an integer ``step`` and numbers where
    :data:`_NUMBERS` says (readers sum, compare and plot them without checking again)."""
    if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row["step"], bool):
        return False
    return all(row.get(k) is None or (isinstance(row[k], (int, float)) and not isinstance(row[k], bool))
               for k in _NUMBERS)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Every complete row of ``metrics.jsonl`` (``path`` is the file or its run folder).

    A line that does not parse (the partial last line of a killed run) is skipped, not fatal.
    """
    p = Path(path)
    if p.is_dir():
        p = p / METRICS
    rows: list[dict] = []
    try:
        with open(p, encoding="utf-8", errors="replace") as f:  # a damaged line is skipped below
            for line in f:
                if not line.endswith("\n"):
                    break  # the writer died mid-line
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):
                    continue
                if _well_formed(row):  # else not a row the trainer wrote: skipped like a torn one
                    rows.append(row)
    except FileNotFoundError:
        return []
    except IsADirectoryError:  # the run folder appeared between the is_dir() above and the open()
        return read_metrics(p / METRICS)
    return rows


def checkpoints(path: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run folder as ``(step, folder)``, oldest first."""
    d = Path(path) / CHECKPOINTS
    out = []
    if not d.is_dir():
        return out
    for child in d.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / CHECKPOINT_DONE).is_file():
            out.append((int(m.group(1)), child))
    return sorted(out)


def latest_checkpoint(path: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    found = checkpoints(path)
    return found[-1][1] if found else None


class RunFolder:
    """One run folder on disk; every write goes through :mod:`core.atomic` or a flushed append."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._metrics = None  # the open metrics.jsonl, line-buffered

    # -- paths -------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    @property
    def status_path(self) -> Path:
        return self.path / STATUS

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / f"step-{step}"

    # -- config ------------------------------------------------------------------------------------
    def write_config(self, cfg) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        cfg.save(self.config_path)

    def read_config(self):
        from core.config import RunConfig

        return RunConfig.load(self.config_path)

    # -- metrics -----------------------------------------------------------------------------------
    def append_metric(self, row: dict) -> None:
        """Append one row and flush it: the OS has it even if this process dies the next instant."""
        if self._metrics is None:
            self.path.mkdir(parents=True, exist_ok=True)
            self._metrics = open(self.metrics_path, "a", encoding="utf-8", buffering=1)
        self._metrics.write(json.dumps(row, separators=(",", ":")) + "\n")
        self._metrics.flush()

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.metrics_path)

    def truncate_metrics(self, step: int) -> None:
        """Keep only rows up to ``step`` (a resumed run rewrites what came after its checkpoint), and
        drop a partial last line."""
        self.close()
        if not self.metrics_path.exists():
            return
        rows = [r for r in read_metrics(self.metrics_path) if int(r.get("step", 0)) <= step]
        atomic.write_text(self.metrics_path, "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))

    def reset_metrics(self) -> None:
        self.close()
        if self.metrics_path.exists():
            self.metrics_path.unlink()

    # -- checkpoints -------------------------------------------------------------------------------
    def checkpoints(self) -> list[tuple[int, Path]]:
        return checkpoints(self.path)

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.path)

    def prune_checkpoints(self, keep: int = KEEP_CHECKPOINTS) -> None:
        """Delete all but the newest ``keep`` complete checkpoints, and leftovers of unfinished ones."""
        found = self.checkpoints()
        for _, folder in found[:-keep] if keep > 0 else found:
            shutil.rmtree(folder, ignore_errors=True)
        if self.checkpoints_dir.is_dir():
            for child in self.checkpoints_dir.iterdir():
                if child.name.startswith(".") and ".partial-" in child.name and _stale(child):
                    shutil.rmtree(child, ignore_errors=True)

    def remove_checkpoints(self) -> None:
        shutil.rmtree(self.checkpoints_dir, ignore_errors=True)

    # -- status ------------------------------------------------------------------------------------
    def write_status(self, status: str, **info: Any) -> None:
        """Record ``status`` (one of :data:`STATUSES`) with the step, the process and anything else."""
        old = self.read_status_raw()
        row = {"status": status, "pid": os.getpid(), "host": socket.gethostname(),
               "started": old.get("started") or time.time(), "updated": time.time()}
        for k in ("step", "total_steps", "name", "message"):
            if k in old:
                row[k] = old[k]
        row.update(info)
        atomic.write_json(self.status_path, row)

    def read_status_raw(self) -> dict:
        try:
            d = json.loads(self.status_path.read_text(encoding="utf-8"))
            return d if isinstance(d, dict) else {}
        except (OSError, ValueError, RecursionError):  # missing, torn, not UTF-8, nested absurdly deep
            return {}

    def status(self) -> dict:
        """``status.json`` with ``running``/``paused`` turned into ``interrupted`` when the process that
        wrote it (on this machine) is gone."""
        d = self.read_status_raw()
        if not d:
            return {"status": "finished" if self.adapter_dir.is_dir() else "interrupted"}
        if d.get("status") in ("running", "paused") and d.get("host") == socket.gethostname():
            pid = d.get("pid")
            if isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid):
                d["status"] = "interrupted"
        return d

    # -- summary for lists -------------------------------------------------------------------------
    def info(self) -> dict:
        """What the window's list of runs shows: path, name, status, step, total steps, last loss."""
        st = self.status()
        name = st.get("name") or ""
        if not name:
            try:
                cfg = json.loads(self.config_path.read_text(encoding="utf-8"))
                name = cfg.get("name") if isinstance(cfg, dict) else ""
            except (OSError, ValueError, RecursionError):
                name = ""
        name = name if isinstance(name, str) else ""
        latest = self.checkpoints()
        return {
            "path": str(self.path), "name": name or self.path.name, "status": st.get("status", ""),
            "step": st.get("step", latest[-1][0] if latest else 0), "total_steps": st.get("total_steps"),
            "message": st.get("message", ""), "started": st.get("started"), "updated": st.get("updated"),
            "final_loss": st.get("final_loss"), "has_adapter": (self.adapter_dir / "adapter_config.json").is_file(),
            "latest_checkpoint": str(latest[-1][1]) if latest else None,
        }


def _stale(folder: Path, seconds: float = 3600.0) -> bool:
    """An unfinished checkpoint folder is only removed when old: a concurrent writer may own it."""
    try:
        return time.time() - folder.stat().st_mtime > seconds
    except OSError:
        return False


def is_run_folder(path: Path) -> bool:
    return (path / CONFIG).is_file() and ((path / STATUS).is_file() or (path / METRICS).is_file()
                                          or (path / CHECKPOINTS).is_dir())


def list_runs(root: str | os.PathLike | None = None, *, roots: Iterable[str | os.PathLike] = ()) -> list[dict]:
    """Runs (``RunFolder.info()`` dicts) under ``root`` (default ``core.home.runs_dir()``) and ``roots``,
    newest first. A given folder that is itself a run folder is listed as one."""
    seen: set[str] = set()
    out: list[dict] = []
    for base in [Path(root) if root is not None else runs_dir(), *[Path(r) for r in roots]]:
        if not base.is_dir():
            continue
        candidates = [base] if is_run_folder(base) else sorted(c for c in base.iterdir() if c.is_dir())
        for c in candidates:
            key = str(c.resolve())
            if key in seen or c.name.startswith(".") or not is_run_folder(c):
                continue
            seen.add(key)
            out.append(RunFolder(c).info())
    out.sort(key=lambda d: d.get("updated") or d.get("started") or 0, reverse=True)
    return out


RESUMABLE = ("stopped", "interrupted", "failed")
"""Statuses of a run that can go on from its newest checkpoint (``running`` and ``paused`` belong to a
live process; a ``finished`` run has nothing left to train)."""


def resumable(info: dict) -> bool:
    """Whether a run (a :meth:`RunFolder.info` dict) can be continued: it stopped, was interrupted or
    failed, holds a complete checkpoint, and has steps left."""
    step, total = info.get("step") or 0, info.get("total_steps")
    return (info.get("status") in RESUMABLE and bool(info.get("latest_checkpoint"))
            and (not isinstance(total, int) or step < total))


def default_run_name(model: str, data: str) -> str:
    """A run's name when the user gives none: the model's and the dataset's names, e.g.
    ``smollm2-sample_dataset`` (the bundled default on the bundled sample)."""
    def last(spec: str) -> str:
        spec = str(spec).rstrip("/\\")
        p = Path(spec)
        return p.stem if p.suffix.lower() in (".gguf", ".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt") \
            else (p.name or spec)

    m = "smollm2" if model in ("", "default") else last(model)
    d = last(data) if data else "sample_dataset"
    return re.sub(r"[^\w.-]+", "-", f"{m}-{d}").strip("-.") or "run"


def new_run_folder(name: str, root: str | os.PathLike | None = None) -> Path:
    """A folder for a new run called ``name`` under ``root`` (default the studio's runs folder) that
    does not exist yet: ``name``, else ``name-2``, ``name-3``, ... (nothing is created)."""
    base = Path(root) if root is not None else runs_dir()
    stem = re.sub(r"[^\w.-]+", "-", name).strip("-.") or "run"
    folder, i = base / stem, 2
    while folder.exists():
        folder, i = base / f"{stem}-{i}", i + 1
    return folder

