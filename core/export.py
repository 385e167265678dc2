"""Merged export: a plain Hugging Face model folder with one or more adapters folded in, checked by
its logits before it is moved into place.

Why the check: tools that merge adapters have shipped exports that load and run but compute garbage
(a transposed ΔW, a scaling applied twice, a tied embedding overwritten, a shard cut short). Here the
written folder is loaded back with ``transformers`` alone and its logits on a few fixed prompts are
compared with the base model running the adapter(s) *unmerged*, which is the definition of what the
export must compute; beyond tolerance the export is aborted with the figures and nothing is left at
the destination.

The steps, all on a fresh fp32 copy of the base (a model loaded in bf16/fp16 for training is never
merged into: its checkpoint is read again at full precision):

1. inject each adapter with its weight folded into its scaling (ΔW_i · w_i); compute the reference
   logits with the adapters active and unmerged, and the base logits with none active;
2. ``exact``: fold every adapter in, one after the other: W ← W + Σ w_i s_i B_i A_i, which is what
   concatenating them would give, without building the rank-Σr matrices. Other modes (``svd``, and
   ``ties``/``dare`` where core.combine has them) build one adapter with core.combine; the reference
   is then that adapter unmerged, and the gap to the exact sum is reported beside it;
3. ``core.lora.unload(merge=True)``: a plain transformers model; its fp32 logits are compared with the
   reference (the merge itself);
4. cast to the output dtype (the checkpoint's own unless asked), ``save_pretrained`` (safetensors
   shards, config, generation config) and the tokenizer with its chat template, into a staged folder;
5. load the staged folder with ``AutoModelForCausalLM`` in fp32 and compare its logits with the
   merged model's weights rounded to the output dtype in memory (the file must hold exactly those)
   and with the reference (the whole export); then rename it into place.

Tolerances, relative to the largest reference logit (``max|Δlogit| / max|logit|``):
  * the merge (step 3) and an fp32 export: 1e-4. Merging only reorders fp32 sums; the measured
    gap is ~1e-6, while a wrong ΔW moves logits by the adapter's own effect (1e-2 and up);
  * the file against the merged in-memory weights rounded to the output dtype (step 5): 1e-5: the
    same numbers in the same fp32 arithmetic (measured gap: 0);
  * a bf16 export against the fp32 reference: 5e-2, fp16: 1e-2: rounding every weight to 8 (bf16) or
    11 (fp16) significant bits moves logits by about that much, which is the price of the dtype, not
    an error; the two tight checks above are what catch a broken export in these dtypes.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from core import atomic
from core import lora
from core.adapter import align_to
from core.errors import StudioError

Progress = Callable[[str, float], None]

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Question: What is 17 + 25?\nAnswer:",
    "Once upon a time, in a small village by the sea, there lived",
)
"""Fixed prompts for the logits check: prose, code, arithmetic, a story (each under ~40 tokens)."""

TOLERANCE = {"merge": 1e-4, torch.float32: 1e-4, "file": 1e-5, torch.bfloat16: 5e-2, torch.float16: 1e-2}
"""Relative logit tolerances; see the module docstring for why each is what it is."""

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}
_HEADER_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float32}
MODES = ("exact", "svd")


def modes() -> tuple[str, ...]:
    """The combination modes on offer: ``exact`` and ``svd``, plus what core.combine adds (TIES, DARE)."""
    try:
        from core import combine as _combine
    except ImportError:
        return MODES
    extra = tuple(m for m in getattr(_combine, "MODES", ()) if m not in MODES)
    return MODES + extra


def _say(progress: Progress | None, message: str, fraction: float) -> None:
    if progress is not None:
        progress(message, min(1.0, max(0.0, fraction)))


@contextlib.contextmanager
def _timed(times: dict[str, float], stage: str):
    """Record in ``times[stage]`` the seconds the block took (nothing when it raises)."""
    t = time.perf_counter()
    yield
    times[stage] = time.perf_counter() - t


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``fp32``/``bf16``/``fp16`` (or a torch dtype, or None/"auto" for the checkpoint's own)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise StudioError(f"--dtype: {dtype} is not one of fp32, bf16, fp16")
        return dtype
    key = str(dtype).strip().lower()
    if key in ("", "auto"):
        return None
    if key not in _DTYPES:
        raise StudioError(f"--dtype: '{dtype}' is not one of auto, fp32, bf16, fp16")
    return _DTYPES[key]


def checkpoint_dtype(folder: Path) -> torch.dtype:
    """The dtype most of a checkpoint's floating-point tensors are stored in (safetensors headers only);
    fp32 when it cannot tell."""
    from core.library import safetensors_header

    counts: dict[torch.dtype, int] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            header = safetensors_header(f)
        except StudioError:
            continue
        for info in header.values():
            if isinstance(info, dict) and info.get("dtype") in _HEADER_DTYPES:
                n = math.prod(info.get("shape") or [1])
                d = _HEADER_DTYPES[info["dtype"]]
                counts[d] = counts.get(d, 0) + n
    return max(counts, key=counts.get) if counts else torch.float32


# -- adapters into the model -------------------------------------------------------------------------

@dataclass
class _Part:
    """One adapter to merge: its files, its weight, and the name it gets in the model."""

    adapter: Any  # core.adapter.AdapterFiles or core.combine's result
    weight: float
    name: str


def _inject(model, part: _Part) -> None:
    """Put ``part`` into ``model`` as adapter ``part.name`` with each module's scaling times the
    part's weight, so that running it unmerged computes W0·x + w·s·B·A·x. Each module is injected
    with its own rank and scaling (PEFT's rank_pattern, or a combined adapter whose modules kept
    different ranks). The global random state is left as it was (injection draws an A that the
    adapter's own then replaces)."""
    adapter = part.adapter
    groups: dict[tuple[int, float], list[str]] = {}  # one inject_adapter call per (rank, scaling)
    for module_name, (a, _b) in adapter.tensors.items():
        groups.setdefault((int(a.shape[0]), adapter.scaling(module_name) * part.weight), []).append(module_name)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for (r, scale), names in groups.items():
            lora.inject_adapter(model, names, part.name, rank=r, alpha=scale * r, freeze_base=False)
        layers = dict(lora.lora_layers(model))
        for module_name, (a, b) in adapter.tensors.items():
            layers[module_name].set_adapter_weights(part.name, a.float(), b.float())
    model.requires_grad_(False)  # nothing trains here: no autograd graph in the forward passes


def _tied_targets(model, modules: Sequence[str]) -> list[str]:
    """Adapted modules whose weight tensor is shared with another module (a tied lm_head): merging
    into one would silently change the other, which the unmerged adapter does not do."""
    owners: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and not isinstance(mod, lora.LoRALinear):
            owners.setdefault(id(w), []).append(name.replace(".base_layer", ""))
    out = []
    for m in modules:
        try:
            w = model.get_submodule(m).weight
        except AttributeError:
            continue
        if len(set(owners.get(id(w), []))) > 1:
            out.append(m)
    return out


@torch.no_grad()
def _logits(model, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 logits on the CPU for each prompt (run one at a time: no padding to get wrong)."""
    device = next(model.parameters()).device
    out = []
    for ids in inputs:
        y = model(input_ids=ids.to(device)).logits
        out.append(y.float().cpu())
    return out


def _compare(got: list[torch.Tensor], want: list[torch.Tensor]) -> dict:
    """max |got − want|, the largest |want|, and their ratio, over every prompt and position; plus how
    often the top token agrees."""
    diff = max(float((g - w).abs().max()) for g, w in zip(got, want))
    scale = max(float(w.abs().max()) for w in want)
    same = sum(int((g.argmax(-1) == w.argmax(-1)).sum()) for g, w in zip(got, want))
    total = sum(int(w.shape[0] * w.shape[1]) for w in want)
    finite = all(bool(torch.isfinite(g).all()) for g in got)
    rel = diff / max(scale, 1e-12) if finite else math.inf
    return {"max_abs_diff": diff if finite else math.inf, "max_abs_logit": scale, "relative": rel,
            "top1_agreement": same / max(total, 1)}


def _save_model(model, tokenizer, folder: Path, dtype: torch.dtype) -> None:
    """Write the merged model (safetensors shards, config, generation config) and its tokenizer (with
    the chat template) into ``folder``. A module-level function so tests can corrupt what it writes."""
    model.to(dtype)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="2GB")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def _load_plain(folder: Path):
    """The exported folder as anybody would load it: transformers alone, fp32, no remote code."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                                    trust_remote_code=False).eval()
    except Exception as e:  # any failure to load is a failed export, reported as such
        raise StudioError(f"export verification failed: transformers cannot load the exported folder "
                          f"({type(e).__name__}: {e}); nothing was written") from None


def _fail(what: str, c: dict, tol: float, out: Path) -> StudioError:
    return StudioError(
        f"export verification failed ({what}): max |Δlogit| {c['max_abs_diff']:.3g} against logits up to "
        f"{c['max_abs_logit']:.3g} (relative {c['relative']:.3g}, tolerance {tol:g}; top-1 agreement "
        f"{100 * c['top1_agreement']:.1f}%); nothing was written to {out}")


def _tokenizer_as_trained(tokenizer, files, warnings: list[str]):
    """The tokenizer to write: with the chat template the adapters were trained with when they all
    name one other than its own (ChatML or a template file chosen for a model without a template,
    ``core.chat``), so the merged model is chatted with as it learned; else as it is."""
    from core import chat

    trained = [chat.tokenizer_as_trained(tokenizer, f.studio.get("dataset")) for f in files]
    templates = {getattr(t, "chat_template", None) for t in trained if t is not None}
    if tokenizer is None or len(templates) != 1 or None in templates or len(trained) != len(files) \
            or None in trained or templates == {getattr(tokenizer, "chat_template", None)}:
        return tokenizer
    warnings.append("the exported tokenizer carries the chat template the adapter was trained with "
                    f"({chat.template_style(next(iter(templates))) or 'a chosen template'}), not the base model's")
    return trained[0]


def _trained_quantization(files, quantize: str | None) -> str:
    """``--quantize`` if given, else what the adapters' provenance says their base was (one answer)."""
    from core import quant

    if quantize is not None:
        return quant.check_method(quantize)
    found = {str((a.studio.get("base_model") or {}).get("quantization") or "none") for a in files}
    if len(found) > 1:
        raise StudioError(f"--adapter: these adapters were trained on different bases ({', '.join(sorted(found))})",
                          hint="merge them separately, or say which base with --quantize")
    return quant.check_method(found.pop() if found else "none")


# -- the export's stages, in the order export_merged runs them ----------------------------------------

def _checked_request(out, adapters, weights, combine, rank, dtype):
    """The request checked before anything is read or loaded: ``(out, folders, weights, mode,
    out_dtype)``, with ``out_dtype`` None for the checkpoint's own."""
    out = Path(out).expanduser()
    if out.exists():
        raise StudioError(f"--out {out}: already exists; choose a new folder")
    folders = [Path(a).expanduser() for a in adapters]
    if not folders:
        raise StudioError("--adapter: give at least one adapter to merge")
    if weights is None or len(weights) == 0:
        weights = [1.0] * len(folders)
    weights = [float(w) for w in weights]
    if len(weights) != len(folders):
        raise StudioError(f"--weights: {len(weights)} weight(s) for {len(folders)} adapter(s); give one per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise StudioError("--weights: every weight must be a finite number")
    mode = (combine or "exact").lower()
    if mode not in modes():
        raise StudioError(f"--combine: '{combine}' is not one of {', '.join(modes())}")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise StudioError(f"--rank: must be a whole number of at least 1 (got {rank!r})")
    out_dtype = parse_dtype(dtype)
    if not any(weights):
        raise StudioError("--weights: every weight is 0; the export would be the base model")
    return out, folders, weights, mode, out_dtype


def _read_adapters(folders: Sequence[Path], progress: Progress | None) -> list:
    """Each folder read as an adapter (core.adapter.AdapterFiles); a missing folder is refused by name."""
    from core import adapter as adapter_io

    _say(progress, "reading the adapters", 0.0)
    files = []
    for f in folders:
        if not f.is_dir():
            raise StudioError(f"--adapter {f}: no such folder")
        files.append(adapter_io.read_adapter(f))
    return files


def _load_base(spec: str, device: str, method: str, progress: Progress | None):
    """``(model, tokenizer, checkpoint folder)``: a fresh fp32 copy of the base on ``device``; for
    adapters trained on a quantised base (``method`` nf4/int8), that base as they learned against it."""
    from core import models

    loaded = models.load_model(spec, device=device, precision="fp32")
    model, tokenizer, source = loaded.model, loaded.tokenizer, loaded.path
    del loaded  # only ``model`` may hold the weights: it is dropped before the export is loaded back
    if method != "none":  # the base the QLoRA adapter learned against: W quantised, then de-quantised
        from core import quant

        _say(progress, f"de-quantising the {method} base the adapters were trained on", 0.1)
        quant.check_layout(model, method, device)
        quant.quantize_model(model, method, torch.float32)
        quant.dequantize_model(model, torch.float32)
    return model, tokenizer, source


def _fit_adapters(model, tokenizer, folders: Sequence[Path], files: list, spec: str, warnings: list[str]):
    """``(files, tokenizer)``: every adapter checked against ``model`` (the first problem refuses the
    export; warnings are collected), its modules named as in this model, and the tokenizer to write.
    An adapter that changes a tied weight is refused: a merged model cannot hold that change."""
    from core.library import check_adapter

    for f in folders:
        problems, warns = check_adapter(f, model)
        if problems:
            raise StudioError(f"--adapter {f}: does not fit {spec}: {problems[0]}"
                              + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
        warnings += warns
    # module names as in this model (an adapter made over the bare transformer fits the causal LM)
    files = [align_to(f, model) for f in files]
    tokenizer = _tokenizer_as_trained(tokenizer, files, warnings)
    tied = _tied_targets(model, sorted({m for a in files for m in a.tensors}))
    if tied:
        raise StudioError(f"--adapter: the adapter changes '{tied[0]}', whose weight this model shares with "
                          "another layer (tied embeddings); a merged model cannot hold that change",
                          hint="use the adapter unmerged")
    return files, tokenizer


@dataclass
class _Reference:
    """What the reference stage leaves for the merge and the checks. Logits are None without ``verify``."""

    inputs: list[torch.Tensor]  # the prompts' token ids, (1, T ≤ 64) each
    base: list[torch.Tensor] | None  # no adapter active
    logits: list[torch.Tensor] | None  # the adapter(s) to merge, active and unmerged: what the export must compute
    exact: list[torch.Tensor] | None  # the exact weighted sum unmerged (``logits`` itself in mode exact)
    merge_names: list[str]  # the adapters in the model to fold in
    combine_report: dict | None  # core.combine's report, for a mode other than exact


def _prompt_ids(tokenizer) -> list[torch.Tensor]:
    """PROMPTS as token ids, (1, T) each, cut at 64 tokens; an empty one is left out."""
    inputs = [torch.tensor([tokenizer(p, add_special_tokens=True)["input_ids"]], dtype=torch.long)
              for p in PROMPTS]
    return [ids[:, : min(ids.shape[1], 64)] for ids in inputs if ids.shape[1] > 0]


def _reference(model, inputs: list[torch.Tensor], files: list, weights: list[float], mode: str,
               rank: int | None, verify: bool, warnings: list[str]) -> _Reference:
    """Inject the adapters (each at its weight) and compute the logits the merge is held to: the
    adapters unmerged in mode exact, else the one adapter core.combine builds from them (which then
    replaces them in the model), with the exact sum's logits kept to report the gap."""
    base_logits = _logits(model, inputs) if verify else None
    parts = [_Part(a, w, f"export{i}") for i, (a, w) in enumerate(zip(files, weights)) if w != 0.0]
    for p in parts:
        _inject(model, p)
    combine_report: dict | None = None
    if mode == "exact":
        merge_names = [p.name for p in parts]
        lora.set_active_adapters(model, merge_names)
        ref = _logits(model, inputs) if verify else None
        exact_ref = ref
    else:
        from core import combine as combine_mod

        exact_ref = None
        if verify:
            lora.set_active_adapters(model, [p.name for p in parts])
            exact_ref = _logits(model, inputs)
        combined, combine_report = combine_mod.combine(files, weights, mode=mode, rank=rank)
        warnings += combine_report.get("warnings", [])
        for p in parts:
            lora.remove_adapter(model, p.name)
        _inject(model, _Part(combined, 1.0, "combined"))
        merge_names = ["combined"]
        lora.set_active_adapters(model, merge_names)
        ref = _logits(model, inputs) if verify else None
    return _Reference(inputs, base_logits, ref, exact_ref, merge_names, combine_report)


def _merge(model, names: Sequence[str]):
    """Fold the adapters ``names`` into their layers, then take the LoRA layers out: a plain model."""
    for n in names:
        lora.merge_adapter(model, n)
    return lora.unload(model, merge=True)


def _check_merged(model, ref: _Reference, out_dtype: torch.dtype, out: Path, warnings: list[str],
                  progress: Progress | None):
    """``(merged logits, checks)``: the merged in-memory model against the reference (beyond
    tolerance the export is refused), the adapters' own effect on the logits (a warning when the
    output dtype cannot resolve it), and, for a combined adapter, its gap to the exact sum."""
    from core import models

    _say(progress, "checking the merged weights", 0.5)
    merged = _logits(model, ref.inputs)
    checks: dict[str, Any] = {"merge": _compare(merged, ref.logits)}
    checks["merge"]["tolerance"] = TOLERANCE["merge"]
    checks["adapter_effect"] = _compare(ref.logits, ref.base)["relative"]
    if ref.exact is not None and ref.exact is not ref.logits:
        checks["combination_gap"] = _compare(ref.logits, ref.exact)["relative"]
    if checks["merge"]["relative"] > TOLERANCE["merge"]:
        raise _fail("the merged weights against base + adapter unmerged", checks["merge"], TOLERANCE["merge"], out)
    if checks["adapter_effect"] < TOLERANCE.get(out_dtype, 1e-4):
        warnings.append(f"the adapter changes the logits by only {checks['adapter_effect']:.2g} (relative), "
                        f"below what a {models.precision_name(out_dtype)} export can resolve")
    return merged, checks


def _unsaved_buffers(model) -> dict[str, torch.Tensor]:
    """Copies of the buffers ``save_pretrained`` leaves out (RoPE's inv_freq): whoever loads the export
    rebuilds them in fp32, so they are put back after the cast for the in-memory model to compute what
    a loader does."""
    saved_keys = set(model.state_dict())
    return {n: b.detach().clone() for n, b in model.named_buffers() if n not in saved_keys}


def _as_written(model, transient: dict[str, torch.Tensor], inputs: list[torch.Tensor],
                merged: list[torch.Tensor], out_dtype: torch.dtype):
    """``(logits, device)``: the logits the written files must give (the merged model's own in fp32,
    else its weights as rounded to ``out_dtype``, computed in fp32 with the unsaved buffers back), and
    the device the model is on."""
    expected = merged
    if out_dtype != torch.float32:
        model.to(torch.float32)  # the rounded weights, exactly representable in fp32
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in transient:
                    b.copy_(transient[n])
        expected = _logits(model, inputs)
    return expected, next(model.parameters()).device


def _check_file(folder: Path, device, ref: _Reference, expected: list[torch.Tensor], out_dtype: torch.dtype,
                out: Path) -> dict:
    """The staged ``folder`` loaded back with transformers alone on ``device`` (the merged model's,
    so like is compared with like): its logits against ``expected`` (the files hold exactly the merged
    weights) and against the reference (the whole export). Either beyond tolerance refuses the export."""
    plain = _load_plain(folder).to(device)
    got = _logits(plain, ref.inputs)
    del plain
    checks = {"file": _compare(got, expected), "export": _compare(got, ref.logits)}
    checks["file"]["tolerance"] = TOLERANCE["file"]
    checks["export"]["tolerance"] = TOLERANCE[out_dtype]
    if checks["file"]["relative"] > checks["file"]["tolerance"]:
        raise _fail("the written files against the merged weights", checks["file"], checks["file"]["tolerance"], out)
    if checks["export"]["relative"] > TOLERANCE[out_dtype]:
        raise _fail("the exported model against base + adapter unmerged", checks["export"], TOLERANCE[out_dtype], out)
    return checks


def export_merged(spec_or_loaded, adapters: Sequence[str | os.PathLike], weights: Sequence[float] | None = None,
                  *, combine: str = "exact", rank: int | None = None, out: str | os.PathLike,
                  dtype: str | torch.dtype | None = None, progress: Progress | None = None, verify: bool = True,
                  device: str = "cpu", quantize: str | None = None) -> dict:
    """Merge ``adapters`` (folders) at ``weights`` into the base model and write it to ``out``.

    Args:
        spec_or_loaded: a model spec (``default``, a folder, a .gguf, a cached repo id) or a
            core.models.LoadedModel (only its spec is used: the merge works on a fresh fp32 copy, so a
            model in use by the window is never modified).
        adapters: adapter folders (ours or PEFT's); ``weights`` one float each (default 1.0).
        combine: ``exact`` (the weighted sum of every ΔW) or ``svd`` (one adapter of rank ``rank``, as
            core.combine makes it), or another mode core.combine offers.
        out: the folder to write; it must not exist. Written only if verification passes.
        dtype: ``fp32``, ``bf16``, ``fp16``; by default the checkpoint's own.
        progress: ``progress(message, fraction)``.
        verify: compare the written model's logits with base + adapters unmerged (see module doc).
        device: where the merge and the reference forward passes run (``cpu`` by default: fp32 copies
            of large models fit in RAM more often than in GPU memory).
        quantize: ``nf4``/``int8``: the adapters were trained on a 4-bit/8-bit base (QLoRA), so they
            are merged into that base de-quantised (what they learned against), in fp32, and written
            in ``dtype`` like any export; ``none``: the full-precision base. By default what the
            adapters' studio.json records (``base_model.quantization``), else ``none``.

    Returns a report: out, files (name → bytes), size_bytes, dtype, adapters, weights, combine, rank,
    warnings, verify (figures of each comparison and tolerances), seconds (per stage and total).
    """
    from core import models

    t0 = time.perf_counter()
    times: dict[str, float] = {}
    out, folders, weights, mode, out_dtype = _checked_request(out, adapters, weights, combine, rank, dtype)
    files = _read_adapters(folders, progress)
    method = _trained_quantization(files, quantize)
    spec = getattr(spec_or_loaded, "spec", None) or str(spec_or_loaded)
    _say(progress, "loading the base model in fp32", 0.05)
    with _timed(times, "load"):
        model, tokenizer, source = _load_base(spec, device, method, progress)
        if out_dtype is None:
            out_dtype = checkpoint_dtype(source)

    warnings: list[str] = []
    files, tokenizer = _fit_adapters(model, tokenizer, folders, files, spec, warnings)

    _say(progress, "computing reference logits", 0.2)
    with _timed(times, "reference"):
        ref = _reference(model, _prompt_ids(tokenizer), files, weights, mode, rank, verify, warnings)
    _say(progress, "merging", 0.4)
    with _timed(times, "merge"):
        model = _merge(model, ref.merge_names)

    report: dict[str, Any] = {"out": str(out), "model": spec, "adapters": [str(f) for f in folders], "weights": weights,
                              "combine": mode, "rank": rank, "dtype": models.precision_name(out_dtype),
                              "warnings": warnings, "base_quantization": method}
    if ref.combine_report is not None:  # the rank the combination kept, in the place of the one asked for
        report.update(combine_report=ref.combine_report, rank=ref.combine_report.get("rank", rank))
    checks: dict[str, Any] = {}
    if verify:
        merged, checks = _check_merged(model, ref, out_dtype, out, warnings, progress)

    _say(progress, "writing the merged model", 0.6)
    transient = _unsaved_buffers(model)
    with atomic.staged_folder(out, replace=False) as tmp:
        with _timed(times, "save"):
            _save_model(model, tokenizer, tmp, out_dtype)
        if verify:
            _say(progress, "loading the export back to check it", 0.8)
            with _timed(times, "verify"):
                expected, device_used = _as_written(model, transient, ref.inputs, merged, out_dtype)
                del model  # the merged weights leave memory before the export is loaded back
                checks.update(_check_file(tmp, device_used, ref, expected, out_dtype, out))
        files_written = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    report["files"] = files_written
    report["size_bytes"] = sum(files_written.values())
    report["verify"] = checks if verify else None
    times["total"] = time.perf_counter() - t0
    report["seconds"] = {k: round(v, 3) for k, v in times.items()}
    _say(progress, "done", 1.0)
    return report
