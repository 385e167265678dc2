"""What an evaluation found: systems × metrics with bootstrap intervals, per-example scores, and the
files they are written to (``results.json``, ``predictions.jsonl``, ``results.csv``); see
:mod:`core.evaluate` for how the answers are made and :mod:`core.metrics` for what each metric is."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from core import atomic, metrics

@dataclass
class SystemResult:
    name: str
    adapter: str | None
    predictions: list[str]
    scores: dict[str, float | None] = field(default_factory=dict)
    intervals: dict[str, list[float] | None] = field(default_factory=dict)
    per_example: dict[str, list[float | None]] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class EvalResult:
    examples: list
    systems: list[SystemResult]
    metrics: list[str]
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "systems": {s.name: s.scores for s in self.systems},
            "intervals": {s.name: s.intervals for s in self.systems},
            "adapters": {s.name: s.adapter for s in self.systems},
            "seconds": {s.name: round(s.seconds, 3) for s in self.systems},
            "metrics": self.metrics, "examples": len(self.examples), "settings": self.settings,
        }

    def prediction_rows(self) -> list[dict]:
        rows = []
        for i, ex in enumerate(self.examples):
            for s in self.systems:
                rows.append({"system": s.name, "row": ex.row, "prompt": ex.prompt, "reference": ex.reference,
                             "prediction": s.predictions[i],
                             "scores": {m: v[i] for m, v in s.per_example.items()}})
        return rows


def score_system(system: SystemResult, examples: Sequence, names: Sequence[str], *,
                 losses: list[tuple[float, int]] | None = None, bootstrap_samples: int = 200) -> None:
    """Fill ``system``'s corpus scores, intervals and per-example scores for ``names``."""
    refs = [ex.reference for ex in examples]
    for m in names:
        if m == "loss":
            if not losses:
                continue
            total = sum(c for _, c in losses)
            value = sum(s for s, _ in losses) / total if total else None
            per = [s / c if c else None for s, c in losses]
            system.scores["loss"] = value
            system.scores["perplexity"] = math.exp(value) if value is not None and value < 50 else None
            system.per_example["loss"] = per
            ci = metrics.bootstrap_mean([p for p in per if p is not None], samples=bootstrap_samples * 5)
            system.intervals["loss"] = list(ci) if ci else None
            system.intervals["perplexity"] = [math.exp(min(v, 50.0)) for v in ci] if ci else None
            continue
        s = metrics.score(m, system.predictions, refs)
        system.scores[m] = s.corpus
        system.per_example[m] = s.per_example
        ci = metrics.bootstrap(m, system.predictions, refs, samples=bootstrap_samples) if s.corpus is not None else None
        system.intervals[m] = list(ci) if ci else None


def write_results(out: str | Path, result: EvalResult) -> Path:
    """``out/results.json``, ``out/predictions.jsonl`` and ``out/results.csv`` (systems × metrics),
    each written atomically."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_json(folder / "results.json", result.to_dict())
    atomic.write_text(folder / "predictions.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.prediction_rows()))
    atomic.write_text(folder / "results.csv", results_csv(result.to_dict()))
    return folder / "results.json"


def results_csv(results: dict) -> str:
    """The systems × metrics table of a results.json as CSV (with each interval's bounds)."""
    import csv
    import io

    names = [m for m in results.get("metrics", []) if m != "loss"] + (
        ["loss", "perplexity"] if "loss" in results.get("metrics", []) else [])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["system"] + [c for m in names for c in (m, f"{m}_low", f"{m}_high")])
    for name, scores in results.get("systems", {}).items():
        ci = results.get("intervals", {}).get(name, {})
        row = [name]
        for m in names:
            lo_hi = ci.get(m) or ["", ""]
            row += ["" if scores.get(m) is None else f"{scores[m]:.6g}"] + [
                "" if v == "" else f"{v:.6g}" for v in lo_hi]
        w.writerow(row)
    return buf.getvalue()


def example_rows(result: EvalResult, metric: str) -> list[dict]:
    """The table of examples the window shows: per example its row, prompt, reference, each system's
    answer and per-example ``metric`` score, and ``delta``: the best adapter's score minus the base's
    (None without a base or a score), by which a person sorts to see where the adapter wins and fails."""
    names = [s.name for s in result.systems]
    rows = []
    for i, ex in enumerate(result.examples):
        scores = {s.name: (s.per_example.get(metric) or [None] * len(result.examples))[i] for s in result.systems}
        others = [scores[n] for n in names if n != "base" and scores[n] is not None]
        base = scores.get("base")
        delta = (max(others) - base) if others and base is not None else None
        rows.append({"row": ex.row, "prompt": ex.prompt, "reference": ex.reference,
                     "answers": {s.name: s.predictions[i] for s in result.systems}, "scores": scores,
                     "delta": delta})
    return rows


def store_in_library(result: EvalResult, data: str) -> list[Path]:
    """Keep each adapter's scores beside it in the library (``evaluation.json`` in its entry folder,
    with the base's scores on the same examples for comparison); adapters outside the library are
    left alone. Returns the files written."""
    from core.library import ENTRY_FILE

    base = next((s for s in result.systems if s.adapter is None), None)
    written = []
    for s in result.systems:
        if s.adapter is None or not (Path(s.adapter) / ENTRY_FILE).is_file():
            continue
        path = Path(s.adapter) / "evaluation.json"
        atomic.write_json(path, {"data": data, "examples": len(result.examples), "scores": s.scores,
                                 "intervals": s.intervals, "base_scores": base.scores if base else None,
                                 "settings": result.settings})
        written.append(path)
    return written


def stored_evaluation(folder: str | Path) -> dict | None:
    """A library adapter's ``evaluation.json`` (written by :func:`store_in_library`), or None
    without a readable one."""
    from core import safeio
    from core.errors import StudioError

    path = Path(folder) / "evaluation.json" if folder else None
    if path is None or not path.is_file():
        return None
    try:
        data = safeio.loads(path.read_text(encoding="utf-8"), str(path))
    except (OSError, StudioError):
        return None
    return data if isinstance(data, dict) else None


def stored_summary(folder: str | Path) -> str | None:
    """One line for a library adapter's details from its ``evaluation.json`` (None without one):
    each score beside the base model's on the same examples."""
    data = stored_evaluation(folder)
    if data is None:
        return None
    scores, base = data.get("scores") or {}, data.get("base_scores") or {}
    parts = []
    for m, v in scores.items():
        if not isinstance(v, (int, float)) or m == "perplexity":
            continue
        fmt = "{:.1f}" if m in ("bleu", "chrf") else "{:.3f}"
        b = base.get(m)
        parts.append(f"{m} {fmt.format(v)}" + (f" (base {fmt.format(b)})" if isinstance(b, (int, float)) else ""))
    if not parts:
        return None
    return f"{', '.join(parts)}; {data.get('examples', '?')} examples of {Path(str(data.get('data', '?'))).name}"
