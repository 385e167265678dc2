"""What an adapter learned: the ΔW analysis of Hu et al. (arXiv:2106.09685), section 7.

For every adapted matrix, with ΔW = s·B·A (d_out × d_in, the Linear layout):

* **singular values** of ΔW, computed from the factors (QR of B and of Aᵀ, then the SVD of the small
  r × r core; see :func:`core.combine.low_rank_svd`), so a 49152-wide matrix costs no more than its
  factors; in fp32;
* **effective rank**: how many of the largest singular values hold ``energy`` (90 %) of
  ‖ΔW‖_F² = Σ σ_j² (a rank-8 adapter with effective rank 1 learned one direction);
* **amplification factor** (section 7.3): ‖ΔW‖_F / ‖Uᵀ·W0·V‖_F, with U (d_out × r) and V (d_in × r)
  ΔW's top-r left and right singular vectors and r the module's LoRA rank. It says how strongly ΔW
  amplifies directions the base weight W0 already had weakly (the paper finds about 20 for r = 4 on
  W_q); it needs the base model;
* **subspace similarity** (section 7.2, figure 3) between two adapters: with U_i the top-i right
  singular vectors of one adapter's A and U_j the top-j of the other's,
  φ(i, j) = ‖U_iᵀ·U_j‖_F² / min(i, j), between 0 (orthogonal) and 1 (one subspace holds the other).
  ``using="A"`` is the paper's definition (the right singular vectors of A, input directions ordered by
  A alone); ``using="delta"`` orders the input directions by ΔW's singular values instead, which also
  counts what B does with them.

Every function returns plain dicts of floats and lists, JSON-able for ``lora-studio inspect --json``
and drawable by the window.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from core import lora
from core.adapter import AdapterFiles, align_to, read_adapter
from core.combine import low_rank_svd
from core.errors import StudioError

ENERGY = 0.9


def _adapter(a: AdapterFiles | str | Path) -> AdapterFiles:
    return a if isinstance(a, AdapterFiles) else read_adapter(a)


def _svd(adapter: AdapterFiles, module: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (d_out × r), S (r), V (d_in × r) of ΔW = s·B·A, fp32."""
    a, b = adapter.tensors[module]
    return low_rank_svd(b.float() * adapter.scaling(module), a.float())


def effective_rank(singular_values: torch.Tensor | list[float], energy: float = ENERGY) -> int:
    """The fewest largest singular values whose squares hold ``energy`` of Σ σ² (0 for ΔW = 0)."""
    s = torch.as_tensor(singular_values, dtype=torch.float64)
    total = float((s ** 2).sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(s ** 2, 0) / total
    # the tolerance keeps a split that is exactly 0.9 in exact arithmetic from tipping to the next one
    return int((cumulative < energy - 1e-12).sum()) + 1


def _base_weight(model: nn.Module, module: str) -> torch.Tensor:
    """W0 of ``module`` as d_out × d_in, fp32 on the CPU, with merged adapters taken out."""
    try:
        m = model.get_submodule(module)
    except AttributeError:
        raise StudioError(f"module '{module}' is not in this model; the adapter belongs to another model") from None
    if isinstance(m, lora.LoRALinear):
        w = m.base_layer.weight.detach().float()
        for n in m.merged:
            w = w - m.delta_weight(n).to(w.device)
        transposed = m.transposed
    elif lora.is_adaptable(m):
        w = m.weight.detach().float()
        transposed = not isinstance(m, nn.Linear)
    else:
        raise StudioError(f"module '{module}' is a {type(m).__name__}, not a layer LoRA adapts")
    if w.is_meta:
        raise StudioError("the amplification factor needs the model's weights, not its shape only")
    w = w.t() if transposed else w
    return w.cpu()


def analyse_module(adapter: AdapterFiles, module: str, base_weight: torch.Tensor | None = None,
                   energy: float = ENERGY) -> dict:
    """The analysis of one module (see :func:`analyse`); ``base_weight`` is W0 as d_out × d_in."""
    a, b = adapter.tensors[module]
    r = adapter.module_rank(module)
    u, s, v = _svd(adapter, module)
    norm = float(torch.linalg.vector_norm(s))
    out = {
        "module": module,
        "shape": [int(b.shape[0]), int(a.shape[1])],
        "rank": r,
        "scaling": adapter.scaling(module),
        "singular_values": [float(x) for x in s],
        "effective_rank": effective_rank(s, energy),
        "frobenius": norm,
        "spectral": float(s[0]) if s.numel() else 0.0,
        "amplification": None,
        "projection_norm": None,
        "base_norm": None,
    }
    if base_weight is not None:
        w0 = base_weight.float()
        if tuple(w0.shape) != tuple(out["shape"]):
            raise StudioError(f"module '{module}': the model's weight is {w0.shape[0]} × {w0.shape[1]} but the "
                              f"adapter's ΔW is {out['shape'][0]} × {out['shape'][1]}")
        k = min(r, s.numel())
        projected = u[:, :k].t() @ w0 @ v[:, :k]  # Uᵀ·W0·V: W0 seen in ΔW's own top-r subspace (§7.3)
        p = float(torch.linalg.matrix_norm(projected))
        out["projection_norm"] = p
        out["base_norm"] = float(torch.linalg.matrix_norm(w0))
        out["amplification"] = norm / p if p > 0 else None
    return out


def analyse(adapter: AdapterFiles | str | Path, model: nn.Module | None = None, energy: float = ENERGY) -> dict:
    """Section 7's figures for every module of ``adapter`` (a folder or :class:`AdapterFiles`).

    Returns ``{"energy", "modules": [per module: module, shape [d_out, d_in], rank, scaling,
    singular_values (descending, r of them), effective_rank, frobenius ‖ΔW‖_F, spectral σ1,
    amplification, projection_norm ‖Uᵀ·W0·V‖_F, base_norm ‖W0‖_F], "summary": {modules,
    mean_effective_rank, max_effective_rank, rank, frobenius (over all modules), mean_amplification
    or None}}``. The amplification figures are None without ``model`` (the base model the adapter
    belongs to; adapters on it, merged or not, are accounted for).
    """
    adapter = _adapter(adapter)
    if not 0 < energy <= 1:
        raise StudioError(f"energy must be in (0, 1] (got {energy})")
    if model is not None:
        adapter = align_to(adapter, model)
    modules = []
    for m in adapter.targets:
        w0 = _base_weight(model, m) if model is not None else None
        modules.append(analyse_module(adapter, m, w0, energy))
    eff = [m["effective_rank"] for m in modules]
    amps = [m["amplification"] for m in modules if m["amplification"] is not None]
    return {
        "energy": energy,
        "modules": modules,
        "summary": {
            "modules": len(modules),
            "rank": adapter.rank,
            "mean_effective_rank": sum(eff) / len(eff) if eff else 0.0,
            "max_effective_rank": max(eff) if eff else 0,
            "frobenius": math.sqrt(sum(m["frobenius"] ** 2 for m in modules)),
            "mean_amplification": sum(amps) / len(amps) if amps else None,
        },
    }


def _directions(adapter: AdapterFiles, module: str, using: str) -> torch.Tensor:
    """Orthonormal input directions (d_in × r), strongest first."""
    if using == "A":
        a = adapter.tensors[module][0].float()
        _, _, vh = torch.linalg.svd(a, full_matrices=False)  # A = U·S·Vᵀ: V's columns, the paper's U_A
        return vh.t()
    if using == "delta":
        return _svd(adapter, module)[2]
    raise StudioError(f"using must be 'A' or 'delta' (got {using!r})")


def similarity_grid(a1: AdapterFiles | str | Path, a2: AdapterFiles | str | Path, module: str, *,
                    using: str = "A") -> list[list[float]]:
    """φ(i, j) for every i ≤ r1 and j ≤ r2 of one module (figure 3 of the paper): ``grid[i-1][j-1]``.

    With M = U1ᵀ·U2 (r1 × r2), ‖U1[:, :i]ᵀ·U2[:, :j]‖_F² is the sum of M's squared entries in the
    top-left i × j corner, so one 2-D cumulative sum gives the whole grid.
    """
    a1, a2 = _adapter(a1), _adapter(a2)
    for ad in (a1, a2):
        if module not in ad.tensors:
            raise StudioError(f"adapter {ad.folder or ad.name} does not adapt module '{module}'")
    u1, u2 = _directions(a1, module, using), _directions(a2, module, using)
    if u1.shape[0] != u2.shape[0]:
        raise StudioError(f"module '{module}' has {u1.shape[0]} inputs in one adapter and {u2.shape[0]} in the "
                          "other; they belong to different models")
    corner = torch.cumsum(torch.cumsum((u1.t().double() @ u2.double()) ** 2, 0), 1)
    r1, r2 = corner.shape
    return [[float(corner[i, j]) / min(i + 1, j + 1) for j in range(r2)] for i in range(r1)]


def subspace_similarity(a1: AdapterFiles | str | Path, a2: AdapterFiles | str | Path, i: int | None = None,
                        j: int | None = None, *, using: str = "A") -> dict:
    """φ(A1, A2, i, j) = ‖U_iᵀ·U_j‖_F² / min(i, j) for every module both adapters adapt.

    ``i`` and ``j`` default to each module's full rank (capped at the rank there). Returns
    ``{"i", "j", "using", "modules": {module: φ}, "mean": φ averaged over modules}``.
    """
    a1, a2 = _adapter(a1), _adapter(a2)
    common = [m for m in a1.targets if m in a2.tensors]
    if not common:
        raise StudioError("the two adapters have no module in common to compare")
    for name, v in (("i", i), ("j", j)):
        if v is not None and v < 1:
            raise StudioError(f"{name} must be at least 1 (got {v})")
    out = {}
    for m in common:
        grid = similarity_grid(a1, a2, m, using=using)
        ii = min(i or len(grid), len(grid))
        jj = min(j or len(grid[0]), len(grid[0]))
        out[m] = grid[ii - 1][jj - 1]
    return {"i": i, "j": j, "using": using, "modules": out, "mean": sum(out.values()) / len(out)}
