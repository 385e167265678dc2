"""``lora-studio inspect``: what an adapter is and what it learned (the ΔW analysis of section 7)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.errors import StudioError
from studio.commands import add_model_option, fetch_model


def register(sub) -> None:
    p = sub.add_parser(
        "inspect", help="show an adapter's rank, targets, base model, training summary and ΔW analysis",
        description="Describe a LoRA adapter (ours or PEFT's): rank, alpha, scaling, target modules, "
                    "trainable parameters, the base model it belongs to, the training summary from its "
                    "studio.json, and the analysis of section 7 of the LoRA paper for every adapted "
                    "matrix ΔW = s·B·A: its singular values, its effective rank (how many singular values "
                    "hold the --energy share of ‖ΔW‖²) and, with --model, the amplification factor "
                    "‖ΔW‖ / ‖Uᵀ·W0·V‖ (how strongly ΔW amplifies directions the base weight W0 had "
                    "weakly).")
    p.add_argument("adapter", metavar="ADAPTER",
                   help="an adapter folder (with adapter_config.json and adapter_model.safetensors), or the "
                        "name or id of an adapter in the library")
    add_model_option(p, default=None, prefix="the base model, to check that the adapter fits it and to compute "
                                             "the amplification factor: ")
    p.add_argument("--compare", metavar="OTHER",
                   help="a second adapter (folder or library name): print the normalised subspace similarity "
                        "φ(i, j) = ‖U_iᵀ·U_j‖² / min(i, j) of the two adapters' top input directions (right "
                        "singular vectors of A, section 7.2 of the LoRA paper) for every module both adapt, "
                        "at i = j = 1 and at their full ranks; 1 means one subspace holds the other, 0 orthogonal")
    p.add_argument("--energy", type=float, default=0.9, metavar="F",
                   help="share of ‖ΔW‖² (sum of squared singular values) the effective rank must hold "
                        "(default: 0.9)")
    p.add_argument("--json", action="store_true",
                   help="print everything as one JSON object (every singular value included)")
    p.set_defaults(func=cmd_inspect)


def _folder(value: str) -> Path:
    """ADAPTER as a folder: a path if there is one, else a library entry's name or id."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    try:
        from core.library import Library
    except ModuleNotFoundError:
        raise StudioError(f"ADAPTER {value}: no such folder") from None
    try:
        return Library().resolve(value).path
    except StudioError:
        raise StudioError(f"ADAPTER {value}: no such folder, and no adapter of that name or id in the library",
                          hint="'lora-studio library list' shows the library") from None


def _load_model(spec: str):
    try:
        from core import models
    except ModuleNotFoundError:
        raise StudioError("--model needs core.models, which this installation lacks") from None
    return models.load_model(spec).model


def _short_targets(targets: list[str]) -> str:
    leaves: list[str] = []
    for t in targets:
        leaf = t.rsplit(".", 1)[-1]
        if leaf not in leaves:
            leaves.append(leaf)
    return ", ".join(leaves)


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def describe(folder: Path, model=None, energy: float = 0.9, compare: Path | None = None) -> dict:
    """Everything ``inspect`` shows, as plain data."""
    from core import adapter as adapter_io
    from core import analysis, targets

    ad = adapter_io.read_adapter(folder)
    warnings: list[str] = []
    share = total = None
    if model is not None:
        problems = adapter_io.check_compatible(ad, model)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise StudioError(f"--model: adapter {folder} does not fit this model: {problems[0]}{more}")
        warning = adapter_io.fingerprint_warning(ad, model)
        if warning:
            warnings.append(warning)
        total = targets.count_parameters(model)
        share = ad.trainable_parameters / total if total else None
    result = analysis.analyse(ad, model, energy=energy)
    similarity = None
    if compare is not None:
        other = adapter_io.read_adapter(compare)
        similarity = {"other": str(other.folder),
                      "top": analysis.subspace_similarity(ad, other, 1, 1),
                      "full": analysis.subspace_similarity(ad, other)}
    return {
        "folder": str(ad.folder),
        "name": ad.name,
        "base_model": ad.base_model,
        "format": "lora-studio" if ad.studio else "peft",
        "rank": ad.rank,
        "alpha": ad.alpha,
        "rslora": ad.rslora,
        "dropout": ad.dropout,
        "ranks": ad.ranks,
        "alphas": ad.alphas,
        "targets": ad.targets,
        "trainable_parameters": ad.trainable_parameters,
        "model_parameters": total,
        "share": share,
        "studio": ad.studio,
        "analysis": result,
        "similarity": similarity,
        "warnings": warnings,
    }


def _print(info: dict) -> None:
    st = info["studio"]
    base = info["base_model"] or "unknown"
    arch = (st.get("base_model") or {}).get("architecture") if isinstance(st.get("base_model"), dict) else None
    print(f"adapter     {info['folder']}  ({info['format']} format)")
    print(f"base model  {base}" + (f"  ({arch})" if arch else ""))
    if st.get("created"):
        print(f"created     {st['created']}")
    scale = "alpha/sqrt(r)" if info["rslora"] else "alpha/r"
    line = f"rank        {info['rank']}   alpha {info['alpha']:g}   scaling {scale}"
    line += f"   dropout {info['dropout']:g}"
    print(line)
    if info["ranks"] or info["alphas"]:
        print(f"            {len(info['ranks'])} module(s) with their own rank, "
              f"{len(info['alphas'])} with their own alpha")
    print(f"targets     {len(info['targets'])} modules: {_short_targets(info['targets'])}")
    trainable = f"{info['trainable_parameters']:,}"
    if info["share"] is not None:
        trainable += f" ({100 * info['share']:.3f}% of {info['model_parameters']:,})"
    print(f"trainable   {trainable} parameters")
    dataset = st.get("dataset")
    if isinstance(dataset, dict) and dataset:
        print("dataset     " + "   ".join(f"{k} {_num(v)}" for k, v in dataset.items()
                                          if not isinstance(v, (dict, list))))
    elif dataset:
        print(f"dataset     {dataset}")
    training = st.get("training")
    if isinstance(training, dict) and training:
        print("training    " + "   ".join(f"{k} {_num(v)}" for k, v in training.items()
                                          if v is not None and not isinstance(v, (dict, list))))
    curve = st.get("loss_curve")
    if isinstance(curve, list) and curve:
        try:
            first, last = curve[0][-1], curve[-1][-1]
            print(f"loss curve  {len(curve)} points, {first:.4g} → {last:.4g}")
        except (TypeError, IndexError):
            pass
    combined = st.get("combined")
    if isinstance(combined, dict):
        sources = combined.get("sources") or combined.get("from") or []
        print(f"combined    {combined.get('mode')} of {len(sources)} adapters")

    result = info["analysis"]
    rows = result["modules"]
    print()
    print(f"ΔW = s·B·A per matrix (effective rank: singular values holding "
          f"{100 * result['energy']:g}% of ‖ΔW‖²)")
    width = max([len(r["module"]) for r in rows] + [6])
    amp = any(r["amplification"] is not None for r in rows)
    head = f"{'module':<{width}}  {'out × in':>11}  {'r':>3}  {'eff.r':>5}  {'σ1':>9}  {'‖ΔW‖':>9}"
    print(head + ("  amplification" if amp else ""))
    for r in rows:
        shape = f"{r['shape'][0]} × {r['shape'][1]}"
        line = (f"{r['module']:<{width}}  {shape:>11}  {r['rank']:>3}  {r['effective_rank']:>5}  "
                f"{r['spectral']:>9.4g}  {r['frobenius']:>9.4g}")
        if amp:
            line += f"  {r['amplification']:>13.3g}" if r["amplification"] is not None else "  " + "-".rjust(13)
        print(line)
    s = result["summary"]
    line = (f"mean effective rank {s['mean_effective_rank']:.2f} of {info['rank']} (max {s['max_effective_rank']}); "
            f"‖ΔW‖ over all matrices {s['frobenius']:.4g}")
    if s["mean_amplification"] is not None:
        line += f"; mean amplification {s['mean_amplification']:.3g}"
    print(line)
    sim = info.get("similarity")
    if sim:
        print()
        print(f"subspace similarity with {sim['other']} (φ of A's top input directions; 1 = same, 0 = orthogonal)")
        print(f"{'module':<{width}}  {'φ(1,1)':>7}  {'φ(r,r)':>7}")
        for m, full in sim["full"]["modules"].items():
            print(f"{m:<{width}}  {sim['top']['modules'][m]:>7.3f}  {full:>7.3f}")
        print(f"mean φ(1,1) {sim['top']['mean']:.3f}; mean φ at full rank {sim['full']['mean']:.3f}")
    if not amp:
        print("(give --model to check the adapter against its base model and see the amplification factor)")


def cmd_inspect(args: argparse.Namespace) -> int:
    if not 0 < args.energy <= 1:
        raise StudioError(f"--energy: must be in (0, 1] (got {args.energy})")
    folder = _folder(args.adapter)
    from core import adapter as adapter_io

    adapter_io.read_adapter(folder)  # a broken adapter is reported before a model is loaded for it
    model = _load_model(fetch_model(args.model)) if args.model else None
    compare = _folder(args.compare) if args.compare else None
    info = describe(folder, model, energy=args.energy, compare=compare)
    for w in info["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        _print(info)
    return 0
