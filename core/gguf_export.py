"""GGUF export for llama.cpp, Ollama and LM Studio: the merged model (one adapter or a weighted
combination, merged by core.export's verified path) as one ``.gguf`` file, or the adapter alone as a
GGUF LoRA (core.gguf_lora), with an Ollama ``Modelfile`` beside it (core.ollama).

Proof before anything is moved into place (everything is written into a hidden staging folder inside
the destination, and renamed out of it only when every check passed; a failure or a cancel removes
the staging folder, so nothing is left at the destination):

* the merge itself: core.export.export_merged checks the merged weights against base + adapters
  unmerged, as for a merged folder;
* the GGUF file, read back independently (core.gguf_write.read_back), against the merged model in
  transformers on fixed prompts: F16/BF16 logits within 1e-2 of the largest (relative); Q8_0 the same
  token at every step of the reference's 32-token greedy continuation on every prompt, except at steps
  where the reference's own top two logits are within 0.1 (a near-tie: on SmolLM2 "a wise and" vs
  "a wise old" differ by 0.03, which 8-bit rounding cannot be expected to keep; such steps are
  counted in the report); Q4/Q5 (and K-quants) the same top-1 token on at least 95 % of the positions
  (the prompts and the reference's continuations, teacher-forced);
* the tokenizer in the file tokenizes a multilingual text and every special token to the same ids
  as the Hugging Face tokenizer (core.gguf_vocab.check_tokenizer); the chat template is in it.

K-quants (Q4_K_M, ...) need llama.cpp's own quantizer: they are offered when ``llama-cpp-python`` is
importable, made from the verified F16 file by ``llama_model_quantize``, and checked like Q4/Q5.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from core import gguf_write
from core.errors import Cancelled, StudioError

K_TYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
           "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M", "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K"}
K_QUANT_HINT = ("K-quants (q4_k_m, q5_k_m, q6_k, ...) need llama.cpp's quantizer: "
                "pip install 'lora-studio[gguf-k]' (llama-cpp-python, which builds llama.cpp)")
PROMPTS = ("The capital of France is",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "Question: What is 17 + 25?\nAnswer:",
           "Once upon a time, in a small village by the sea, there lived")
GREEDY_TOKENS = 32
LOGITS_TOLERANCE = 1e-2
TOP1_MIN = 0.95
TIE_MARGIN = 0.1
"""Logits: a reference step whose top two are closer than this is a near-tie (see _greedy_steps)."""

Progress = Callable[[str, float], None]


def k_quants_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def types() -> tuple[str, ...]:
    """The types on offer here: the numpy ones, plus the K-quants when llama-cpp-python is installed."""
    return gguf_write.TYPES + (tuple(K_TYPES) if k_quants_available() else ())


def check_type(type_name: str) -> str:
    t = str(type_name or "").strip().lower()
    if t in gguf_write.TYPES or (t in K_TYPES and k_quants_available()):
        return t
    if t in K_TYPES:
        raise StudioError(f"--type {type_name}: {K_QUANT_HINT}; or choose one of {', '.join(gguf_write.TYPES)}")
    raise StudioError(f"--type {type_name}: not one of {', '.join(types())}")


def _say(progress: Progress | None, cancelled: Callable[[], bool] | None, message: str, fraction: float) -> None:
    if cancelled is not None and cancelled():
        raise Cancelled()
    if progress is not None:
        progress(message, min(1.0, max(0.0, fraction)))


def file_name(model_name: str, adapter_names: Sequence[str], type_name: str, adapter_only: bool = False) -> str:
    stem = "-".join([model_name, *adapter_names])[:100]
    stem = re.sub(r"[^\w.\-]+", "_", stem).strip("._") or "model"
    return f"{stem}-{'lora-' if adapter_only else ''}{type_name.upper()}.gguf"


def parameter_count(spec: str) -> int:
    """The base model's parameter count, from its meta model (no weights read)."""
    from core import models

    meta = models.meta_model(spec)
    return sum(p.numel() for p in meta.parameters())


def expected_size(parameters: int, type_name: str) -> int:
    """About how many bytes the GGUF file of a model this size takes in ``type_name``."""
    return int(parameters * gguf_write.BYTES_PER_WEIGHT[type_name]) + (4 << 20)


def free_space(folder: Path) -> int:
    p = Path(folder).expanduser().resolve()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


# -- the checks ----------------------------------------------------------------------------------------

def _inputs(tokenizer) -> list[torch.Tensor]:
    return [torch.tensor([tokenizer(p, add_special_tokens=True)["input_ids"][:64]], dtype=torch.long)
            for p in PROMPTS]


@torch.no_grad()
def compare(got_model, ref_model, tokenizer, type_name: str) -> dict:
    """The figures of the issue's proof for this type, and whether they pass (``ok``)."""
    inputs = _inputs(tokenizer)
    figures: dict[str, Any] = {"type": type_name}
    if type_name in ("f16", "bf16"):
        diff = scale = 0.0
        for ids in inputs:
            a, b = got_model(input_ids=ids).logits.float(), ref_model(input_ids=ids).logits.float()
            diff, scale = max(diff, float((a - b).abs().max())), max(scale, float(b.abs().max()))
        rel = diff / max(scale, 1e-12) if math.isfinite(diff) else math.inf
        figures.update(relative=rel, max_abs_diff=diff, tolerance=LOGITS_TOLERANCE, ok=rel <= LOGITS_TOLERANCE)
        return figures
    conts = [gguf_write.greedy(ref_model, ids, GREEDY_TOKENS) for ids in inputs]
    if type_name == "q8_0":
        return figures | _greedy_steps(got_model, ref_model, inputs, conts)
    agree = total = 0
    for ids, cont in zip(inputs, conts):
        full = torch.cat([ids, torch.tensor([cont], dtype=torch.long)], dim=1)
        a, b = got_model(input_ids=full).logits.argmax(-1), ref_model(input_ids=full).logits.argmax(-1)
        agree, total = agree + int((a == b).sum()), total + int(b.numel())
    figures.update(top1_agreement=agree / max(total, 1), positions=total, minimum=TOP1_MIN,
                   ok=agree / max(total, 1) >= TOP1_MIN)
    return figures


@torch.no_grad()
def _greedy_steps(got_model, ref_model, inputs, conts) -> dict:
    """Q8_0: at every step of the reference's greedy continuation (teacher-forced), the file's model
    must pick the same token, except where the reference's own top two logits are within TIE_MARGIN
    (a near-tie no 8-bit rounding can be expected to keep; such steps are counted, not hidden)."""
    same_prompts, ties, first = 0, 0, []
    for ids, cont in zip(inputs, conts):
        full = torch.cat([ids, torch.tensor([cont], dtype=torch.long)], dim=1)
        n = ids.shape[1]
        want = ref_model(input_ids=full).logits[0, n - 1: n - 1 + len(cont)].float()
        got = got_model(input_ids=full).logits[0, n - 1: n - 1 + len(cont)].argmax(-1)
        bad = None
        for j, (w, g) in enumerate(zip(cont, got.tolist())):
            if g != w:
                if float(want[j, w] - want[j, g]) < TIE_MARGIN:
                    ties += 1
                elif bad is None:
                    bad = j
        same_prompts += bad is None
        first.append(bad)
    return {"greedy_tokens": len(conts[0]) if conts else 0, "prompts_same": same_prompts, "prompts": len(conts),
            "first_difference": first, "near_ties_excused": ties, "tie_margin": TIE_MARGIN,
            "ok": same_prompts == len(conts)}


def _fail_message(figures: dict, dest: Path) -> str:
    t = figures["type"]
    if "relative" in figures:
        what = f"logits differ by {figures['relative']:.3g} relative (tolerance {figures['tolerance']:g})"
    elif "prompts_same" in figures:
        what = (f"the greedy continuation differs on {figures['prompts'] - figures['prompts_same']} of "
                f"{figures['prompts']} prompts (first differing token per prompt: {figures['first_difference']})")
    else:
        what = f"the top-1 token agrees on {100 * figures['top1_agreement']:.1f}% of positions (minimum 95%)"
    return f"GGUF check failed ({t.upper()}): {what}; nothing was written to {dest}"


def verify(path: Path, folder: Path, type_name: str) -> dict:
    """Read the GGUF file back and compare it with the checkpoint in ``folder`` (see module doc)."""
    from transformers import AutoTokenizer

    from core import gguf_vocab

    ref = gguf_write.load_reference(folder)
    got = gguf_write.read_back(path, ref.config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    figures = compare(got, ref, tokenizer, type_name)
    del got, ref
    if not figures["ok"]:
        raise StudioError(_fail_message(figures, path.parent.parent))
    figures["tokenizer"] = gguf_vocab.check_tokenizer(path, tokenizer)
    return figures


def _k_quantize(src: Path, dst: Path, type_name: str) -> None:
    """llama.cpp's own quantizer through llama-cpp-python (the optional extra)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, K_TYPES[type_name])
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise StudioError(f"--type {type_name}: llama.cpp's quantizer failed (code {rc}); nothing was written")


# -- the whole export ----------------------------------------------------------------------------------

def destination(out: Path, fname: str) -> tuple[Path, Path]:
    """``out/fname`` and ``out/Modelfile``, refused when either exists (or ``out`` is a file)."""
    if out.exists() and not out.is_dir():
        raise StudioError(f"--out {out}: a file, not a folder; give the folder to write into")
    target, modelfile = out / fname, out / "Modelfile"
    for p in (target, modelfile):
        if p.exists():
            raise StudioError(f"--out {out}: {p.name} already exists there; choose another folder or remove it")
    return target, modelfile


def check_space(out: Path, params: int, type_name: str, *, merging: bool) -> None:
    """Refuse when the folder's disk cannot hold the file, the fp32 merged model staged beside it and,
    for a K-quant, the F16 file it is made from."""
    need = expected_size(params, type_name) + (params * 4 if merging else 0)
    if type_name in K_TYPES:
        need += expected_size(params, "f16")
    free = free_space(out)
    if free < need:
        raise StudioError(f"--out {out}: {free / 2**30:.2f} GiB free, the export needs about {need / 2**30:.2f} GiB "
                          "(the file and its temporary merged model); free some space or choose another folder")


@contextmanager
def staging(out: Path, fname: str):
    """A hidden folder inside ``out`` to write ``fname`` and its Modelfile in; removed afterwards whatever
    happens, and ``out`` too when this export made it and failed (an error, a failed check, Cancel)."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(os.path.join(out, f".{fname}.staging-{os.getpid()}"))
    try:
        stage.mkdir()
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    shutil.rmtree(stage, ignore_errors=True)


def publish(moves: Sequence[tuple[Path, Path]]) -> None:
    """Move checked files from the staging folder into place, with normal permissions."""
    from core import atomic

    for src, dst in moves:
        atomic.normal_permissions(src)
        os.replace(src, dst)


def _merged_folder(spec, adapters, weights, combine, rank, quantize, type_name, stage, say) -> Path:
    """The checkpoint the GGUF is made from: the base itself, or the adapters merged in by
    core.export.export_merged (verified there, to 1e-4) into the staging folder in fp32, so the GGUF
    types are made from the merge as computed, rounded once."""
    from core import export, models

    if not adapters:
        say("preparing the base model", 0.02)
        return models.checkpoint_folder(spec)
    dtype = "fp32"
    merged = stage / "merged"
    export.export_merged(spec, list(adapters), weights, combine=combine, rank=rank, out=merged, dtype=dtype,
                         quantize=quantize, progress=lambda m, f: say(f"merging: {m}", 0.02 + 0.33 * f))
    return merged


def export_gguf(spec, adapters: Sequence[str | os.PathLike] = (), weights: Sequence[float] | None = None, *,
                type_name: str = "q8_0", out: str | os.PathLike, combine: str = "exact", rank: int | None = None,
                adapter_only: bool = False, name: str | None = None, system: str | None = None,
                sampling: dict | None = None, quantize: str | None = None, progress: Progress | None = None,
                cancelled: Callable[[], bool] | None = None) -> dict:
    """Write ``out/<name>.gguf`` and ``out/Modelfile``; see the module doc. Returns a report (paths,
    sizes, the check's figures, seconds per stage)."""
    from core import gguf_arch, models, ollama

    t0 = time.perf_counter()
    type_name = check_type(type_name)
    spec = getattr(spec, "spec", None) or str(spec)
    config = models.load_config(spec)
    gguf_arch.check_config(config)  # an architecture we cannot write is refused before any work
    folders = [Path(a).expanduser() for a in adapters]
    for f in folders:
        if not f.is_dir():
            raise StudioError(f"--adapter {f}: no such folder")
    if adapter_only:
        from core import gguf_lora

        return gguf_lora.export_lora(spec, folders, weights, out=out, name=name, system=system, sampling=sampling,
                                     progress=progress, cancelled=cancelled)
    out = Path(out).expanduser()
    fname = name if name and name.endswith(".gguf") else file_name(name or models.resolve(spec).name,
                                                                     [f.name for f in folders], type_name)
    target, modelfile = destination(out, fname)
    params = parameter_count(spec)
    check_space(out, params, type_name, merging=bool(folders))

    times: dict[str, float] = {}

    def say(message: str, fraction: float) -> None:
        _say(progress, cancelled, message, fraction)

    with staging(out, fname) as stage:
        t = time.perf_counter()
        folder = _merged_folder(spec, folders, weights, combine, rank, quantize, type_name, stage, say)
        times["merge"] = time.perf_counter() - t
        t = time.perf_counter()
        staged = stage / fname
        first = "f16" if type_name in K_TYPES else type_name
        written = gguf_write.write_gguf(folder, staged if first == type_name else stage / "f16.gguf", first,
                                        name=fname[:-5], cancelled=cancelled,
                                        progress=lambda m, f: say(m, 0.35 + 0.35 * f))
        if type_name in K_TYPES:
            say(f"quantizing to {type_name.upper()} with llama.cpp", 0.7)
            _k_quantize(stage / "f16.gguf", staged, type_name)
        times["write"] = time.perf_counter() - t
        say("reading the file back to check it", 0.75)
        t = time.perf_counter()
        figures = verify(staged, folder, type_name)
        times["verify"] = time.perf_counter() - t
        say("writing the Modelfile", 0.97)
        text = ollama.modelfile(f"./{fname}", folder, system=system, sampling=sampling)
        (stage / "Modelfile").write_text(text, encoding="utf-8")
        publish([(staged, target), (stage / "Modelfile", modelfile)])
    times["total"] = time.perf_counter() - t0
    say("done", 1.0)
    return {"out": str(target), "modelfile": str(modelfile), "type": type_name, "size_bytes": target.stat().st_size,
            "model": spec, "adapters": [str(f) for f in folders], "weights": list(weights or []),
            "arch": written["arch"], "tensor_types": written["tensor_types"], "verify": figures,
            "parameters": params, "seconds": {k: round(v, 3) for k, v in times.items()}}
