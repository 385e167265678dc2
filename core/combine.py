"""Weighted combination of several LoRA adapters into one.

For adapters i with weights w_i the combined update of every module is

    ΔW = Σ_i w_i · s_i · B_i · A_i            (a module an adapter lacks contributes zero)

Two ways to hold it as one adapter:

* ``exact``: stack the factors, A = [A_1; A_2; ...] and B = [w_1·s_1·B_1, w_2·s_2·B_2, ...] / s,
  so B·A·s is ΔW with no error at all; the rank is the sum of the ranks (PEFT's ``cat``).
* ``svd``: the best rank-k approximation of ΔW (Eckart–Young), found without forming the d_out × d_in
  matrix: with the stacked factors ΔW = P·Q (P: d_out × R, Q: R × d_in, R = Σ r_i), QR-factor P and Qᵀ,
  take the SVD of the small R × R core and keep the top k directions. The relative Frobenius error it
  makes, ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F = sqrt(Σ_{j>k} σ_j²) / sqrt(Σ_j σ_j²), is reported per module and
  over all modules. PEFT's ``svd`` computes the same truncation densely.

Three task-merging methods are offered too, each as PEFT's ``add_weighted_adapter`` defines it in
its ``*_svd`` form (the merge is done on the dense ΔW_i = s_i·B_i·A_i of each module, then compressed
to rank k by SVD exactly as in ``svd`` mode, the error reported against the merged ΔW):

* ``ties`` (Yadav et al., 2023, arXiv:2306.01708): keep each ΔW_i's ``density`` share of largest-magnitude
  entries, elect each entry's sign (sign of the sum of the trimmed, unweighted ΔW_i; ``majority_sign``
  "frequency" counts signs instead), then average the weighted entries that agree with it;
* ``dare_linear`` (Yu et al., 2023, arXiv:2311.03099): drop each entry of each ΔW_i with probability
  1 − ``density`` and rescale the survivors by 1 / ``density``, then the weighted sum;
* ``dare_ties``: DARE's random drop followed by TIES' sign election and disjoint mean.

DARE draws its masks from a generator seeded with ``seed`` (or the ``generator`` given), module by
module in target order and adapter by adapter, each mask over the Linear-layout ΔW.

Weights may be negative (task negation: subtract what an adapter learned). The result is an
:class:`core.adapter.AdapterFiles` that :func:`core.adapter.write_adapter` saves and
:func:`core.adapter.load_adapter` puts on a model; its scaling is alpha / r with alpha equal to the
adapter-wide rank, and the factors carry the rest.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from core.adapter import AdapterFiles
from core.errors import StudioError

MODES = ("exact", "svd", "ties", "dare_linear", "dare_ties")
TASK_MERGES = ("ties", "dare_linear", "dare_ties")
DEFAULT_DENSITY = {"ties": 0.2, "dare_linear": 0.1, "dare_ties": 0.1}
"""TIES keeps the top 20 % of entries (the paper's k = 20); DARE drops 90 % (its usual drop rate p = 0.9)."""


def _check(adapters: Sequence[AdapterFiles], weights: Sequence[float], mode: str, rank: int | None,
           density: float | None, majority_sign: str) -> list[float]:
    if mode not in MODES:
        raise StudioError(f"--combine {mode}: unknown; use one of {', '.join(MODES)}")
    if not adapters:
        raise StudioError("no adapters to combine")
    weights = [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise StudioError(f"--weights: {len(weights)} weights for {len(adapters)} adapters; give one per adapter")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise StudioError(f"--weights: {bad[0]} is not a finite number")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise StudioError(f"--rank: must be a positive integer (got {rank!r})")
    if mode == "exact" and rank is not None:
        raise StudioError("--rank only applies to --combine svd; exact combination has rank Σ r_i")
    if density is not None and mode not in TASK_MERGES:
        raise StudioError(f"--density only applies to {', '.join(TASK_MERGES)}")
    if density is not None and not 0 < density <= 1:
        raise StudioError(f"--density: must be in (0, 1] (got {density})")
    if majority_sign not in ("total", "frequency"):
        raise StudioError(f"majority sign method '{majority_sign}': use total or frequency")
    shapes: dict[str, tuple[tuple[int, int], AdapterFiles]] = {}
    for ad in adapters:
        for m, (a, b) in ad.tensors.items():
            shape = (b.shape[0], a.shape[1])
            seen = shapes.setdefault(m, (shape, ad))
            if seen[0] != shape:
                raise StudioError(f"adapters {seen[1].folder or seen[1].name} and {ad.folder or ad.name} do not fit "
                                  f"the same base model: module '{m}' is {seen[0][0]} × {seen[0][1]} in one and "
                                  f"{shape[0]} × {shape[1]} in the other")
    return weights


def _stacked(adapters: Sequence[AdapterFiles], weights: Sequence[float], module: str,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, Q) with P·Q = Σ w_i·s_i·B_i·A_i: P = [w_i·s_i·B_i] (d_out × R), Q = [A_i] (R × d_in)."""
    ps, qs = [], []
    for ad, w in zip(adapters, weights):
        if module in ad.tensors:
            a, b = ad.tensors[module]
            ps.append(b.to(dtype) * (w * ad.scaling(module)))
            qs.append(a.to(dtype))
    return torch.cat(ps, dim=1), torch.cat(qs, dim=0)


def low_rank_svd(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of P·Q (P: d_out × R, Q: R × d_in) without forming it, in O((d_out + d_in)·R²).

    P = Q_p·R_p and Qᵀ = Q_q·R_q (reduced QR), so P·Q = Q_p·(R_p·R_qᵀ)·Q_qᵀ; with the SVD of the
    R × R core, R_p·R_qᵀ = U_c·S·V_cᵀ, the left singular vectors are Q_p·U_c and the right ones Q_q·V_c.
    Returns U (d_out × R), S (R, descending), V (d_in × R), so that P·Q = U·diag(S)·Vᵀ.
    """
    qp, rp = torch.linalg.qr(p)
    qq, rq = torch.linalg.qr(q.t())
    uc, s, vch = torch.linalg.svd(rp @ rq.t(), full_matrices=False)
    return qp @ uc, s, qq @ vch.t()


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·n) largest-magnitude entries of ``delta``, zero the rest (TIES' trim)."""
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=delta.dtype)
    mask[torch.topk(delta.abs().reshape(-1), k=k, largest=True).indices] = 1
    return delta * mask.reshape(delta.shape)


def _drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale by 1 / density (unbiased)."""
    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * mask / density


def task_merge(mode: str, deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float,
               majority_sign: str = "total", generator: torch.Generator | None = None) -> torch.Tensor:
    """Merge same-shaped ΔW's by ``ties``, ``dare_linear`` or ``dare_ties`` (PEFT's merge_utils)."""
    if mode == "ties":
        pruned = torch.stack([_trim(d, density) for d in deltas])
    else:
        generator = generator or torch.Generator().manual_seed(0)
        pruned = torch.stack([_drop(d, density, generator) for d in deltas])
    w = torch.tensor(list(weights), dtype=pruned.dtype).view(-1, *([1] * (pruned.dim() - 1)))
    if mode == "dare_linear":
        return (pruned * w).sum(0)
    # elect the sign from the unweighted pruned ΔW's, then the mean of the weighted ones that agree
    votes = pruned.sum(0) if majority_sign == "total" else pruned.sign().sum(0)
    agree = pruned.sign() == torch.where(votes >= 0, 1.0, -1.0).to(pruned.dtype)
    return (pruned * w * agree).sum(0) / agree.sum(0).clamp(min=1)


def _combine_module(adapters: Sequence[AdapterFiles], weights: Sequence[float], m: str, *, mode: str,
                    out_rank: int, exact_rank: int | None, alpha: float, density: float | None,
                    majority_sign: str, generator: torch.Generator | None, work: torch.dtype):
    """One module of :func:`combine`: ``(A, B, rank, ‖ΔW‖², ‖what the rank cut off‖²)`` in ``work``."""
    p, q = _stacked(adapters, weights, m, work)
    d_out, d_in = p.shape[0], q.shape[1]
    if mode == "exact":
        r_m = exact_rank
        s_out = alpha / r_m
        b, a = p / s_out, q
        u, s, _ = low_rank_svd(p, q)
        norm2, tail2 = float((s ** 2).sum()), 0.0
    else:
        r_m = min(out_rank, d_out, d_in)
        s_out = alpha / r_m
        if mode in TASK_MERGES:  # dense: trimming and sign election act entry by entry
            present = [(ad, w) for ad, w in zip(adapters, weights) if m in ad.tensors]
            merged = task_merge(mode, [ad.delta(m) for ad, _ in present], [w for _, w in present],
                                density, majority_sign, generator)
            u, s, vh = torch.linalg.svd(merged.to(work), full_matrices=False)
            v = vh.t()
        else:
            u, s, v = low_rank_svd(p, q)
        k = min(r_m, s.numel())
        root = s[:k].sqrt()
        b = torch.zeros(d_out, r_m, dtype=work)
        a = torch.zeros(r_m, d_in, dtype=work)
        b[:, :k] = u[:, :k] * root / s_out  # split √σ onto both factors: balanced for further training
        a[:k] = (v[:, :k] * root).t()
        norm2, tail2 = float((s ** 2).sum()), float((s[k:] ** 2).sum())
    return a, b, r_m, norm2, tail2


def combine(adapters: Sequence[AdapterFiles], weights: Sequence[float], *, mode: str = "exact",
            rank: int | None = None, density: float | None = None, majority_sign: str = "total",
            seed: int = 0, generator: torch.Generator | None = None) -> tuple[AdapterFiles, dict]:
    """Combine ``adapters`` with ``weights`` into one adapter; returns it and a report.

    ``mode="exact"``: rank Σ r_i per module, no error. ``mode="svd"``: rank ``rank`` (default: the
    largest input rank), capped per module by min(d_out, d_in); where ΔW has fewer directions than
    that, the extra ones are zero (so every module has the same rank and the file needs no
    ``rank_pattern``). Modules are the union of the inputs' targets. ``mode="ties"``,
    ``"dare_linear"``, ``"dare_ties"``: the task merge of the dense ΔW's (``density``, by default
    :data:`DEFAULT_DENSITY`; ``majority_sign``; DARE's masks from ``generator`` or ``seed``), then
    compressed like ``svd``.

    The report: ``{"mode", "rank", "weights", "adapters", "modules": {module: {"rank", "rel_error",
    "norm"}}, "rel_error" (over all modules), "max_rel_error", "warnings"}``; ``norm`` is ‖ΔW‖_F of
    the combination. All numbers are plain floats (JSON-able).
    """
    weights = _check(adapters, weights, mode, rank, density, majority_sign)
    if mode in TASK_MERGES:
        density = DEFAULT_DENSITY[mode] if density is None else float(density)
        generator = generator or torch.Generator().manual_seed(seed)
    modules: list[str] = []
    for ad in adapters:
        modules += [m for m in ad.targets if m not in modules]
    work = torch.float64  # the factors are small; double precision makes the reported error exact
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ranks: dict[str, int] = {}
    report_modules: dict[str, dict] = {}
    tail_total = norm_total = 0.0
    out_ranks: dict[str, int] = {}
    if mode == "exact":
        out_ranks = {m: sum(ad.module_rank(m) for ad in adapters if m in ad.tensors) for m in modules}
        out_rank = max(out_ranks.values())
    else:
        out_rank = rank or max(max([ad.rank, *ad.ranks.values()]) for ad in adapters)
    alpha = float(out_rank)  # s = alpha / r_m: 1 for modules at the adapter-wide rank
    for m in modules:
        a, b, r_m, norm2, tail2 = _combine_module(adapters, weights, m, mode=mode, out_rank=out_rank,
                                                  exact_rank=out_ranks.get(m) if mode == "exact" else None,
                                                  alpha=alpha, density=density, majority_sign=majority_sign,
                                                  generator=generator, work=work)
        tensors[m] = (a.to(torch.float32).contiguous(), b.to(torch.float32).contiguous())
        if r_m != out_rank:
            ranks[m] = r_m
        report_modules[m] = {"rank": r_m, "rel_error": math.sqrt(tail2 / norm2) if norm2 > 0 else 0.0,
                             "norm": math.sqrt(norm2)}
        tail_total += tail2
        norm_total += norm2

    warnings = []
    prints = {(ad.studio.get("fingerprint") or {}).get("content") for ad in adapters}
    prints.discard(None)
    if len(prints) > 1:
        warnings.append("the adapters were trained on base models with different weights; the combination "
                        "may not mean on one base what each meant on its own")
    sources = [{"name": ad.name, "folder": str(ad.folder) if ad.folder else None, "weight": w,
                "rank": ad.rank, "base_model": ad.base_model} for ad, w in zip(adapters, weights)]
    first = adapters[0]
    studio = {"combined": {"mode": mode, "rank": out_rank, "sources": sources}}
    if mode in TASK_MERGES:
        studio["combined"].update(density=density, majority_sign=majority_sign)
    if len(prints) <= 1 and first.studio.get("fingerprint"):
        studio["fingerprint"] = first.studio["fingerprint"]
    if first.base_model:
        studio["base_model"] = {"spec": first.base_model}
    # GPT-2's Conv1D layers: PEFT wants fan_in_fan_out=true there (it corrects a wrong flag with a warning)
    config = {"fan_in_fan_out": any(bool(ad.config.get("fan_in_fan_out")) for ad in adapters)}
    result = AdapterFiles(folder=None, config=config, rank=out_rank, alpha=alpha, rslora=False,
                          dropout=first.dropout, targets=modules, tensors=tensors, studio=studio, ranks=ranks)
    errors = [v["rel_error"] for v in report_modules.values()]
    report = {
        "mode": mode, "rank": out_rank, "weights": weights, "adapters": sources,
        "density": density if mode in TASK_MERGES else None,
        "modules": report_modules,
        "rel_error": math.sqrt(tail_total / norm_total) if norm_total > 0 else 0.0,
        "max_rel_error": max(errors) if errors else 0.0,
        "trainable_parameters": result.trainable_parameters,
        "warnings": warnings,
    }
    return result, report


def provenance(names: Sequence[str], weights: Sequence[float], mode: str, rank: int | None) -> str:
    """What a combined library entry's "Came from" says: the adapters it was made of, with weights."""
    how = "exact sum" if mode == "exact" else f"{mode.replace('_', ' ')} to rank {rank}"
    return f"combined ({how}) from " + ", ".join(f"{n} × {w:g}" for n, w in zip(names, weights))


def combine_into_library(library, entry_ids: Sequence[str], weights: Sequence[float], *, mode: str = "exact",
                         rank: int | None = None, name: str, notes: str = ""):
    """Combine the library entries ``entry_ids`` and add the result to ``library`` as ``name``.

    Returns ``(entry, report)``. The new entry's provenance names the source adapters and weights
    (never the temporary folder it was written to); its studio.json records them under
    ``combined`` and keeps the first adapter's base model and fingerprint, so the compatibility check
    still knows what it belongs to.
    """
    import tempfile
    from pathlib import Path

    from core import adapter as adapter_io

    entries = [library.get(i) for i in entry_ids]
    adapters = [adapter_io.read_adapter(e.path) for e in entries]
    result, report = combine(adapters, list(weights), mode=mode, rank=rank)
    first = adapters[0].studio or {}
    studio = {"name": name, "combined": {"from": [e.name for e in entries], "weights": list(weights),
                                          "mode": mode, "rank": rank}}
    for key in ("fingerprint", "base_model"):
        if isinstance(first.get(key), dict):
            studio[key] = first[key]
    origin = provenance([e.name for e in entries], weights, mode, rank)
    with tempfile.TemporaryDirectory(prefix="lora-studio-combine-") as tmp:
        out = Path(tmp) / "combined"
        adapter_io.write_adapter(result, out, base_model=adapters[0].base_model, studio=studio)
        entry = library.add_folder(out, name=name, move=True, imported_from=origin,
                                   extra={"notes": notes or origin})
    return entry, report
