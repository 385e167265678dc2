"""Sweeps: a grid of ordinary runs over rank × target set (× learning rate), one after another.

This is how the LoRA paper's Tables 5 and 6 (arXiv:2106.09685, section 7.1) are made: the same
training with the adapter on different matrices and with different ranks, optionally at a **fixed
parameter budget** (Table 5: each target set gets the rank that trains about the same number of
parameters, so more matrices means a smaller r).

Layout of a sweep folder ``DIR``::

    DIR/sweep.json      the grid and the base run configuration (what "the same sweep" means)
    DIR/results.json    {"cells": [{rank, targets, lr, trainable_params, final_loss, best_eval_loss,
                                    seconds, run, status, best}, ...]}, rewritten after every cell
    DIR/runs/<cell>/    an ordinary run folder (config.json, metrics.jsonl, checkpoints/, adapter/)

Every write is atomic and every cell is a resumable run, so a sweep killed at any moment continues
where it stopped when it is started again with the same ``DIR``: finished cells are kept, the cell
that was training resumes from its newest checkpoint, the rest start. The model is loaded once and
given to each run's :class:`core.train.Trainer` (which takes its adapter out again at the end).

Target sets are the training presets, module-name suffixes or regular expressions (as ``--targets``),
or the paper's role names joined with ``+``: ``q``, ``k``, ``v``, ``o`` (attention) and ``gate``,
``up``, ``down`` (MLP), e.g. ``q+v`` or ``q+k+v+o``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from core import atomic
from core.config import RunConfig
from core.errors import StudioError

TABLE5_TARGET_SETS = ("q", "k", "v", "o", "q+k", "q+v", "q+k+v+o", "all-linear")
"""The paper's Table 5 choices, plus all-linear (attention and MLP)."""
DEFAULT_RANKS = (1, 4, 16)
DEFAULT_TARGET_SETS = ("attention-qv", "all-linear")
ROLES = {"q": "attention", "k": "attention", "v": "attention", "o": "attention",
         "gate": "mlp", "up": "mlp", "down": "mlp"}


@dataclass
class Cell:
    """One run of the grid and what it gave."""

    rank: int
    targets: str
    """The target set as given (``q+v``, ``all-linear``, ...)."""
    run: str
    """The run folder, relative to the sweep folder (``runs/q+v-r4``)."""
    trainable_params: int
    lr: float | None = None
    """The learning rate when the grid has several (else the base configuration's)."""
    status: str = "pending"
    """``pending``, ``finished``, ``stopped`` or ``failed``."""
    final_loss: float | None = None
    best_eval_loss: float | None = None
    seconds: float | None = None
    best: bool = False
    """The best cell of the sweep (lowest best validation loss, else lowest final loss)."""
    message: str = ""
    metrics: dict = field(default_factory=dict)
    """Evaluate's metrics for this cell's adapter, when they were computed."""

    @property
    def key(self) -> str:
        return Path(self.run).name


def target_names(model, spec: str) -> list[str]:
    """The qualified module names a target set selects (see the module docstring)."""
    from core import targets as targets_mod

    parts = [p.strip() for p in spec.split("+")]
    if all(p in ROLES for p in parts):
        found = targets_mod.list_targets(model)
        names = [t.name for t in found if t.role in parts and t.group == ROLES[t.role]]
        missing = [p for p in parts if not any(t.role == p and t.group == ROLES[p] for t in found)]
        if missing:
            roles = sorted({f"{t.role}" for t in found if not t.is_head})
            raise StudioError(f"--target-set {spec}: this model has no separate {', '.join(missing)} matrix "
                              f"(its matrices' roles: {', '.join(roles)})",
                              hint="use a preset (attention-qv, attention, mlp, all-linear) or module names")
        return names
    return targets_mod.resolve_targets(model, spec)


def budget_rank(model, names: Sequence[str], budget: int) -> int:
    """The rank whose adapter on ``names`` trains closest to ``budget`` parameters (at least 1)."""
    from core.targets import budget as count

    per_rank = count(model, names, 1).trainable
    return max(1, round(budget / per_rank))


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9+_.-]+", "_", spec).strip("_") or "targets"


def plan(model, *, ranks: Sequence[int], target_sets: Sequence[str], budget: int | None = None,
         lrs: Sequence[float] | None = None) -> list[Cell]:
    """The cells of a grid, each with its exact trainable parameter count, before anything is trained."""
    from core.targets import budget as count

    if not target_sets:
        raise StudioError("--target-set: name at least one target set", hint=f"e.g. {', '.join(DEFAULT_TARGET_SETS)}")
    if budget is None and not ranks:
        raise StudioError("--ranks: name at least one rank, or give --budget")
    bad = [r for r in ranks if int(r) < 1]
    if bad:
        raise StudioError(f"--ranks: a rank must be at least 1 (got {bad[0]})")
    if budget is not None and budget < 1:
        raise StudioError(f"--budget must be at least 1 parameter (got {budget})")
    if len(set(target_sets)) != len(target_sets):
        raise StudioError("--target-set: a target set is given twice")
    cells = []
    for spec in target_sets:
        names = target_names(model, spec)
        for r in ([budget_rank(model, names, budget)] if budget is not None else sorted({int(r) for r in ranks})):
            for lr in (lrs or [None]):
                key = f"{_slug(spec)}-r{r}" + (f"-lr{lr:g}" if lr is not None else "")
                cells.append(Cell(rank=r, targets=spec, lr=lr, run=f"runs/{key}",
                                  trainable_params=count(model, names, r).trainable))
    return cells


def _comparable(cfg: RunConfig) -> dict:
    """The base configuration without what the sweep sets per cell (and without where it is written)."""
    d = cfg.to_dict()
    d.pop("out", None)
    d.pop("name", None)
    d.get("lora", {}).pop("rank", None)
    d.get("lora", {}).pop("targets", None)
    return d


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def read_results(out: str | Path) -> list[Cell]:
    """The cells of a sweep folder's results.json (empty when there is none yet)."""
    path = Path(out) / "results.json"
    if not path.is_file():
        return []
    from core import safeio

    try:
        data = safeio.loads(path.read_text(encoding="utf-8"), str(path))
        return [Cell(**{k: v for k, v in c.items() if k in Cell.__dataclass_fields__}) for c in data["cells"]]
    except (KeyError, TypeError) as e:
        raise StudioError(f"{path}: not a sweep's results ({e})", hint="use another --out") from None


def write_results(out: str | Path, cells: Sequence[Cell], settings: dict | None = None) -> Path:
    path = Path(out) / "results.json"
    atomic.write_json(path, {"cells": [asdict(c) for c in cells], **({"settings": settings} if settings else {})})
    return path


def mark_best(cells: Sequence[Cell]) -> Cell | None:
    """Mark the finished cell with the lowest best validation loss (final loss when no cell has one)."""
    done = [c for c in cells if c.status == "finished"]
    key = "best_eval_loss" if any(c.best_eval_loss is not None for c in done) else "final_loss"
    ranked = [c for c in done if getattr(c, key) is not None]
    for c in cells:
        c.best = False
    if not ranked:
        return None
    best = min(ranked, key=lambda c: getattr(c, key))
    best.best = True
    return best


def step_seconds(run_dir: str | Path) -> float | None:
    """The median seconds of an optimizer step measured in a run's metrics.jsonl (None without any)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    values = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            v = json.loads(line).get("step_seconds")
        except ValueError:
            continue
        if isinstance(v, (int, float)) and v > 0:
            values.append(float(v))
    return sorted(values)[len(values) // 2] if values else None


def cost(cells: Sequence[Cell], steps: int, seconds_per_step: float | None) -> dict:
    """What a grid will cost: cells, steps in all, and seconds at a measured step time (None when no
    step time is known). Every cell trains ``steps`` steps; a larger rank costs about the same on a CPU."""
    todo = [c for c in cells if c.status != "finished"]
    total = steps * len(todo)
    return {"cells": len(cells), "to_train": len(todo), "steps": total,
            "seconds": total * seconds_per_step if seconds_per_step else None}


class Sweep:
    """Train every cell of a grid in ``out`` as ordinary runs on one loaded model; resumable.

    ``base`` is the run configuration every cell starts from (model, data, steps, ...); each cell sets
    ``lora.rank``, ``lora.targets`` (the selected module names), ``out`` and ``name`` (and ``train.lr``
    when the grid has learning rates). ``callback(kind, cell, event)`` sees ``("cell", cell, None)``
    when a cell starts, ``("event", cell, trainer_event)`` for each of its trainer's events and
    ``("done", cell, None)`` when it ends. :meth:`request_stop` stops the cell in training after its
    current step (it keeps a checkpoint) and ends the sweep; run it again to continue.
    """

    def __init__(self, base: RunConfig, out: str | Path, *, ranks: Sequence[int] = DEFAULT_RANKS,
                 target_sets: Sequence[str] = DEFAULT_TARGET_SETS, budget: int | None = None,
                 lrs: Sequence[float] | None = None, loaded=None, library: bool = False,
                 callback: Callable[[str, Cell, Any], None] | None = None):
        self.base = base.copy()
        self.out = Path(out)
        self.ranks, self.target_sets = [int(r) for r in ranks], list(target_sets)
        self.budget, self.lrs = budget, (list(lrs) if lrs else None)
        self.loaded, self.library, self.callback = loaded, library, callback
        self.cells: list[Cell] = []
        self._stop = threading.Event()
        self._trainer = None

    def request_stop(self) -> None:
        self._stop.set()
        trainer = self._trainer
        if trainer is not None:
            trainer.request_stop()

    def _settings(self) -> dict:
        return {"ranks": self.ranks, "target_sets": self.target_sets, "budget": self.budget, "lrs": self.lrs,
                "base": _comparable(self.base)}

    def _check_same_sweep(self) -> None:
        path = self.out / "sweep.json"
        if not path.is_file():
            return
        from core import safeio

        before = safeio.loads(path.read_text(encoding="utf-8"), str(path)).get("base", {})
        diff = _differences(before, self._settings()["base"])
        if diff:
            raise StudioError(f"{self.out} holds a sweep trained with other options (they differ in "
                              f"{', '.join(diff[:6])})", hint="give the same options to continue it, or use another --out")

    def load(self):
        if self.loaded is None:
            from core import models

            m = self.base.model
            self.loaded = models.load_model(m.source, device=m.device, precision=m.precision,
                                            trust_remote_code=m.trust_remote_code, quantize=m.quantize)
        return self.loaded

    def plan(self) -> list[Cell]:
        """The grid's cells, with what earlier sessions of this sweep already trained."""
        cells = plan(self.load().model, ranks=self.ranks, target_sets=self.target_sets, budget=self.budget,
                     lrs=self.lrs)
        before = {c.key: c for c in read_results(self.out)}
        for c in cells:
            old = before.get(c.key)
            if old is not None and old.status == "finished" and (self.out / c.run / "adapter").is_dir():
                c.status, c.final_loss, c.best_eval_loss = old.status, old.final_loss, old.best_eval_loss
                c.seconds, c.metrics, c.message = old.seconds, old.metrics, old.message
        self.cells = cells
        return cells

    def _emit(self, kind: str, cell: Cell, event=None) -> None:
        if self.callback is not None:
            self.callback(kind, cell, event)

    def run(self) -> list[Cell]:
        """Train the cells not finished yet, in order; return every cell. A failed cell is recorded
        and the sweep goes on; a stop ends it after the cell in training has saved a checkpoint."""
        from core.train import Trainer

        self.out.mkdir(parents=True, exist_ok=True)
        self._check_same_sweep()
        cells = self.plan()
        atomic.write_json(self.out / "sweep.json", self._settings())
        write_results(self.out, cells, self._settings_summary())
        for cell in cells:
            if cell.status == "finished":
                continue
            if self._stop.is_set():
                break
            cfg = self._cell_config(cell)
            run_dir = self.out / cell.run
            resume = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
            self._emit("cell", cell)
            started = time.perf_counter()
            try:
                self._trainer = Trainer(cfg, loaded=self.loaded, callback=lambda e, c=cell: self._emit("event", c, e))
                if self._stop.is_set():
                    self._trainer.request_stop()
                result = self._trainer.run(resume=resume)
                cell.status = result.status
                cell.final_loss, cell.best_eval_loss = result.final_loss, result.best_eval_loss
                cell.seconds = round(result.duration or (time.perf_counter() - started), 3)
                cell.message = result.message
            except StudioError as e:
                cell.status, cell.message = "failed", str(e)
            finally:
                self._trainer = None
            mark_best(cells)
            write_results(self.out, cells, self._settings_summary())
            self._emit("done", cell)
        best = mark_best(cells)
        write_results(self.out, cells, self._settings_summary())
        if best is not None and self.library and all(c.status == "finished" for c in cells):
            from core.library import Library

            Library().adopt_run(self.out / best.run)
        return cells

    def _cell_config(self, cell: Cell) -> RunConfig:
        cfg = self.base.copy()
        cfg.lora.rank = cell.rank
        cfg.lora.targets = target_names(self.loaded.model, cell.targets)
        if cell.lr is not None:
            cfg.train.lr = cell.lr
        cfg.out = str(self.out / cell.run)
        cfg.name = f"{self.base.name or self.out.name}-{cell.key}"
        return cfg

    def _settings_summary(self) -> dict:
        return {"model": self.base.model.source, "data": self.base.data.path, "steps": self.base.train.steps,
                "epochs": self.base.train.epochs, "budget": self.budget}
