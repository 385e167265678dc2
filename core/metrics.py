"""Task metrics for held-out answers, from the libraries that define them (never re-implemented).

Every metric scores a list of predictions against a list of references, both as a whole (the corpus
score a paper reports) and per example (what the window sorts by to show where an adapter wins and
where it fails):

=============  ================================================================  ===========  =======
name           what it is                                                        library      range
=============  ================================================================  ===========  =======
exact_match    share of answers equal to the reference (surrounding spaces cut)  (plain ==)   0-1
bleu           corpus BLEU, 4-gram precision with brevity penalty, 13a tokens    sacrebleu    0-100
chrf           chrF, character 6-gram F-score (beta 2)                           sacrebleu    0-100
rougeL         ROUGE-L F-measure (longest common subsequence), mean per example  rouge-score  0-1
json_valid     of the examples whose reference is JSON, the share of answers     json         0-1
               that parse as JSON
json_fields    of the reference objects' top-level fields, the share the answer  json         0-1
               gives with an equal value
loss           held-out next-token loss of the reference answer (perplexity is    core.loss    ≥ 0
               exp of it); computed from the model, not from the answers
=============  ================================================================  ===========  =======

Per-example BLEU is sacrebleu's sentence BLEU with effective order (so a short answer is not zero),
as sacrebleu recommends for single sentences. :func:`bootstrap` gives percentile confidence intervals
by resampling examples with a fixed seed, recomputing the corpus score on each resample.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from core.errors import StudioError

TEXT_METRICS = ("exact_match", "bleu", "chrf", "rougeL", "json_valid", "json_fields")
"""Metrics computed from the answers' text."""
METRICS = TEXT_METRICS + ("loss",)
"""Every metric name ``evaluate --metrics`` accepts, in the order results list them."""
DEFAULT_METRICS = ("exact_match", "bleu", "chrf", "rougeL", "loss")

DESCRIPTIONS = {
    "exact_match": "Exact match: the share of answers identical to the reference (spaces around them "
                   "ignored). 0-1, higher is better.",
    "bleu": "BLEU (sacrebleu, 13a tokens): n-gram precision up to 4-grams against the reference, with a "
            "brevity penalty; the corpus score. 0-100, higher is better.",
    "chrf": "chrF (sacrebleu): character 6-gram F-score against the reference; robust to word forms. "
            "0-100, higher is better.",
    "rougeL": "ROUGE-L (rouge-score): F-measure of the longest common word subsequence with the "
              "reference, averaged over examples. 0-1, higher is better.",
    "json_valid": "JSON valid: of the examples whose reference is JSON, the share of answers that parse "
                  "as JSON. 0-1, higher is better.",
    "json_fields": "JSON fields: of all top-level fields of the reference objects, the share the answer "
                   "gives with an equal value. 0-1, higher is better.",
    "loss": "Held-out loss: mean next-token cross-entropy of the reference answers given the prompts "
            "(teacher forcing); perplexity is exp(loss). Lower is better.",
    "perplexity": "Perplexity: exp(held-out loss). Lower is better.",
}
HIGHER_IS_BETTER = {m: m not in ("loss", "perplexity") for m in METRICS + ("perplexity",)}


def parse_metrics(text: str | Sequence[str] | None) -> list[str]:
    """``"bleu,chrf"`` (or a list) as metric names, in :data:`METRICS` order; unknown names are one error."""
    if text is None or text == "":
        return list(DEFAULT_METRICS)
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    lookup = {m.lower(): m for m in METRICS}
    unknown = [n for n in names if n.lower() not in lookup]
    if unknown:
        raise StudioError(f"--metrics: unknown metric{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}",
                          hint=f"choose from {', '.join(METRICS)}")
    if not names:
        raise StudioError("--metrics: name at least one metric", hint=f"choose from {', '.join(METRICS)}")
    chosen = {lookup[n.lower()] for n in names}
    return [m for m in METRICS if m in chosen]


# -- JSON answers ----------------------------------------------------------------------------------

_MISSING = object()


def _json(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _MISSING


def _json_valid_one(pred: str, ref: str) -> float | None:
    if _json(ref) is _MISSING:
        return None
    return 0.0 if _json(pred) is _MISSING else 1.0


def _json_fields_counts(pred: str, ref: str) -> tuple[int, int] | None:
    """(fields equal, fields in the reference) for a reference that is a JSON object, else None."""
    r = _json(ref)
    if not isinstance(r, dict) or not r:
        return None
    p = _json(pred)
    if not isinstance(p, dict):
        return 0, len(r)
    return sum(1 for k, v in r.items() if k in p and p[k] == v), len(r)


# -- one metric ------------------------------------------------------------------------------------

@dataclass
class Scores:
    """One metric over a set of answers."""

    corpus: float | None
    """The corpus score; None when no example applies (json metrics on non-JSON references)."""
    per_example: list[float | None]
    """One score per example (None where the metric does not apply to it)."""


def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def _corpus_fn(metric: str) -> Callable[[list[str], list[str]], float | None]:
    """The corpus score of ``metric`` as a function of (predictions, references)."""
    if metric == "exact_match":
        return lambda p, r: float(np.mean([a.strip() == b.strip() for a, b in zip(p, r)])) if p else None
    if metric in ("bleu", "chrf"):
        from sacrebleu.metrics import BLEU, CHRF

        scorer = BLEU() if metric == "bleu" else CHRF()
        return lambda p, r: float(scorer.corpus_score(list(p), [list(r)]).score) if p else None
    if metric == "rougeL":
        scorer = _rouge()
        return lambda p, r: (float(np.mean([scorer.score(b, a)["rougeL"].fmeasure for a, b in zip(p, r)]))
                             if p else None)
    if metric == "json_valid":
        def valid(p, r):
            vals = [v for v in (_json_valid_one(a, b) for a, b in zip(p, r)) if v is not None]
            return float(np.mean(vals)) if vals else None
        return valid
    if metric == "json_fields":
        def fields(p, r):
            counts = [c for c in (_json_fields_counts(a, b) for a, b in zip(p, r)) if c is not None]
            total = sum(c[1] for c in counts)
            return sum(c[0] for c in counts) / total if total else None
        return fields
    raise StudioError(f"--metrics: '{metric}' is not a text metric", hint=f"choose from {', '.join(TEXT_METRICS)}")


def _per_example(metric: str, preds: list[str], refs: list[str]) -> list[float | None]:
    if metric == "exact_match":
        return [1.0 if a.strip() == b.strip() else 0.0 for a, b in zip(preds, refs)]
    if metric in ("bleu", "chrf"):
        from sacrebleu.metrics import BLEU, CHRF

        scorer = BLEU(effective_order=True) if metric == "bleu" else CHRF()
        return [float(scorer.sentence_score(a, [b]).score) for a, b in zip(preds, refs)]
    if metric == "rougeL":
        scorer = _rouge()
        return [float(scorer.score(b, a)["rougeL"].fmeasure) for a, b in zip(preds, refs)]
    if metric == "json_valid":
        return [_json_valid_one(a, b) for a, b in zip(preds, refs)]
    if metric == "json_fields":
        out: list[float | None] = []
        for a, b in zip(preds, refs):
            c = _json_fields_counts(a, b)
            out.append(None if c is None else c[0] / c[1])
        return out
    raise StudioError(f"--metrics: '{metric}' is not a text metric")


def score(metric: str, predictions: Sequence[str], references: Sequence[str]) -> Scores:
    """``metric`` (one of :data:`TEXT_METRICS`) over the answers, as a corpus score and per example."""
    preds, refs = [str(p) for p in predictions], [str(r) for r in references]
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    return Scores(corpus=_corpus_fn(metric)(preds, refs), per_example=_per_example(metric, preds, refs))


def bootstrap(metric: str, predictions: Sequence[str], references: Sequence[str], *, samples: int = 200,
              confidence: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
    """A percentile bootstrap interval of the corpus score: ``samples`` resamples of the examples with
    replacement (numpy's generator seeded by ``seed``, so the same answers give the same interval)."""
    preds, refs = [str(p) for p in predictions], [str(r) for r in references]
    if len(preds) < 2:
        return None
    fn = _corpus_fn(metric)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        idx = rng.integers(0, len(preds), len(preds))
        v = fn([preds[i] for i in idx], [refs[i] for i in idx])
        if v is not None and not math.isnan(v):
            values.append(v)
    if not values:
        return None
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_mean(values: Sequence[float], *, samples: int = 1000, confidence: float = 0.95,
                   seed: int = 0) -> tuple[float, float] | None:
    """The percentile bootstrap interval of a mean (used for the token-weighted held-out loss: pass
    one value per example and its weight is ignored, an approximation stated in the results)."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size < 2:
        return None
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, (samples, arr.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def multi_reference(metric: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU or chrF with several references per example (E2E NLG has several sentences per
    meaning representation), through sacrebleu's reference streams. Examples with fewer references
    are padded by repeating their own: a duplicate reference changes neither the clipped n-gram counts
    (the maximum over references) nor the closest reference length, so the score is that of the
    variable-length reference sets."""
    from sacrebleu.metrics import BLEU, CHRF

    if metric not in ("bleu", "chrf"):
        raise StudioError(f"multi-reference scoring is for bleu and chrf (got {metric})")
    refs = [[str(r) for r in rs] for rs in references]
    if len(refs) != len(predictions) or any(not rs for rs in refs):
        raise ValueError("one non-empty list of references per prediction")
    width = max(len(rs) for rs in refs)
    streams = [[rs[k % len(rs)] for rs in refs] for k in range(width)]
    scorer = BLEU() if metric == "bleu" else CHRF()
    return float(scorer.corpus_score([str(p) for p in predictions], streams).score)
