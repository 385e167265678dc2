"""What a sweep shows: its rank × target-set heatmap, the ΔW analysis across its adapters, and the
measured step time that says what a grid will cost before it starts. Plain data for the window, the
command line and benchmarks/e2e_study.py."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from core.sweep import Cell, step_seconds

VALUES = ("best_eval_loss", "final_loss", "trainable_params", "seconds")
"""What a heatmap cell can show besides Evaluate's metrics (``metrics.NAME``)."""


def cell_value(cell: Cell, key: str):
    if key.startswith("metrics."):
        return (cell.metrics or {}).get(key.split(".", 1)[1])
    return getattr(cell, key, None)


def heatmap(cells: Sequence[Cell], key: str = "best_eval_loss") -> dict:
    """``{"ranks": [...], "targets": [...], "values": [[value per target set] per rank]}`` (None where
    a cell is missing or has no value). With several learning rates the best value of a (rank, targets)
    pair is shown (lowest for losses, highest for metrics)."""
    ranks = sorted({c.rank for c in cells})
    targets = list(dict.fromkeys(c.targets for c in cells))
    lower = key in ("best_eval_loss", "final_loss", "seconds", "trainable_params", "metrics.loss")
    grid: list[list] = [[None] * len(targets) for _ in ranks]
    for c in cells:
        v = cell_value(c, key)
        if v is None:
            continue
        i, j = ranks.index(c.rank), targets.index(c.targets)
        old = grid[i][j]
        grid[i][j] = v if old is None else (min(old, v) if lower else max(old, v))
    return {"ranks": ranks, "targets": targets, "values": grid, "key": key, "lower_is_better": lower}


def delta_analysis(out: str | Path, cells: Sequence[Cell]) -> dict:
    """The paper's section 7 across a sweep's finished adapters (core.analysis): each cell's mean
    effective rank of ΔW, and for each target set the subspace similarity φ between its smallest- and
    its largest-rank adapter (figure 3: how much of the small adapter's top directions the large one
    holds; ``i`` and ``j`` are the full ranks)."""
    from core import analysis

    out = Path(out)
    done = [c for c in cells if c.status == "finished" and (out / c.run / "adapter").is_dir()]
    effective = {c.key: analysis.analyse(out / c.run / "adapter")["summary"]["mean_effective_rank"] for c in done}
    similarity = {}
    for t in dict.fromkeys(c.targets for c in done):
        same = sorted((c for c in done if c.targets == t), key=lambda c: c.rank)
        if len(same) >= 2 and same[0].rank != same[-1].rank:
            small, large = same[0], same[-1]
            phi = analysis.subspace_similarity(out / small.run / "adapter", out / large.run / "adapter")
            similarity[t] = {"ranks": [small.rank, large.rank], "phi": phi["mean"]}
    return {"effective_rank": effective, "similarity": similarity}


def _model_of(run: str | Path) -> str | None:
    import json

    try:
        return json.loads((Path(run) / "config.json").read_text(encoding="utf-8"))["model"]["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def measured_step_seconds(out: str | Path | None, runs: Sequence[dict] = (), *,
                          model: str | None = None) -> tuple[float | None, str]:
    """A step time measured on this machine, and where it comes from: this sweep's own cells first,
    else the newest run of ``runs`` (core.runs.list_runs dicts) that has one and, when ``model`` is
    given, trained that model (another model's steps say nothing about this one's)."""
    if out is not None and (Path(out) / "runs").is_dir():
        for run in sorted((Path(out) / "runs").iterdir()):
            s = step_seconds(run)
            if s:
                return s, f"measured in this sweep's {run.name}"
    for info in runs:
        path = info.get("path")
        if not path or (model is not None and _model_of(path) != model):
            continue
        s = step_seconds(path)
        if s:
            return s, f"measured in the run {Path(path).name}"
    return None, "no step time measured yet on this machine"
