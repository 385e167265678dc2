"""A GGUF base model (the bundled default included), converted once into a safetensors checkpoint.

:func:`checkpoint_folder` turns any model spec into a folder of safetensors that transformers loads
in seconds: a GGUF is read once through transformers' GGUF support (dequantised to bf16 for a
quantised file, its own float width otherwise), rebuilt as a plain model and written into the model
cache (``models_dir()/<name>-<key>``, atomically), where the key covers the GGUF's path, size and
modification time and the conversion's version, so a changed file is converted again and an
unchanged one never is. torch and transformers are imported only when a conversion runs: finding
the cached folder is cheap.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import re
import shutil
import struct
import time
from pathlib import Path

from core import atomic
from core.errors import StudioError
from core.home import models_dir
from core.model_sources import (BUNDLED_GGUF, BUNDLED_NAME, ModelRef, Progress, _check_folder, _first_line,
                                _say, _weight_files, resolve)

SOURCE_FILE = "studio-source.json"
"""Written into each converted folder: which GGUF it came from (path, size, mtime) and when."""

CONVERSION = 2
"""The GGUF conversion's version, part of the cache key. 1 wrote every GGUF in fp32; 2 writes a
quantised GGUF in bf16 (:func:`_conversion_dtype`). A cache written by an earlier version has another
key, so it is never taken for a new one: the GGUF is converted again on first use and the old folder
is removed then (it is correct but up to twice the size, and keeping both would cost more disk)."""


def _gguf_key(path: Path) -> str:
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|v{CONVERSION}"  # version 1's had no |v
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def _cache_name(path: Path) -> str:
    stem = BUNDLED_NAME if path.name == BUNDLED_GGUF else path.stem
    return re.sub(r"[^\w.\-]+", "_", stem)


def _converted_folder(path: Path) -> Path:
    """Where the GGUF at ``path`` is (or will be) converted: ``models_dir()/<name>-<key>``."""
    return models_dir() / f"{_cache_name(path)}-{_gguf_key(path)}"


def _converted_folders(path: Path) -> list[Path]:
    """Every cached conversion of the GGUF at ``path``, current or stale."""
    found = []
    for d in models_dir().glob(f"{_cache_name(path)}-*"):
        try:
            src = json.loads((d / SOURCE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if Path(src.get("gguf", "")) == path.resolve():
            found.append(d)
    return found


def _gguf_header(ref: ModelRef):
    """Parse the GGUF's metadata and tensor table (no tensor data); refuse what cannot load."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata

        header = GgufHeader.from_file(str(ref.path))
        metadata, _ = read_gguf_metadata(str(ref.path))
    except (ValueError, OSError, struct.error, IndexError, KeyError, UnicodeDecodeError, OverflowError,
            MemoryError) as e:  # lengths and counts in the header are the file's word: anything goes
        raise StudioError(f"--model {ref.spec}: {ref.path} is not a readable GGUF file ({_first_line(e)})",
                          hint="download or copy it again") from None
    arch = header.architecture
    if not isinstance(arch, str):  # the metadata's types are the file's word
        raise StudioError(f"--model {ref.spec}: {ref.path} is not a readable GGUF file (general.architecture is "
                          f"{type(arch).__name__}, not text)", hint="download or copy it again")
    if arch not in GGUF_SUPPORTED_ARCHITECTURES and arch.replace("-", "_") not in GGUF_SUPPORTED_ARCHITECTURES:
        raise StudioError(
            f"--model {ref.spec}: {ref.path.name} holds a '{arch}' model, an architecture transformers' "
            "GGUF reader does not support",
            hint=f"supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}; or use the model's "
                 "Hugging Face (safetensors) version")
    size = ref.path.stat().st_size
    end = max((header.data_start + t.offset + t.nbytes for t in header.tensors), default=0)
    if end > size:
        raise StudioError(f"--model {ref.spec}: {ref.path} is cut short: {size:,} bytes, its tensor table "
                          f"describes {end:,}", hint="download or copy it again")
    return header, metadata


def _check_gguf(ref: ModelRef) -> None:
    _gguf_header(ref)


_GGML_FLOAT = {0: "float32", 1: "float16", 30: "bfloat16"}
"""GGML tensor types that are plain floats (F32, F16, BF16), by torch dtype name; every other type is
a quantisation."""


def _conversion_dtype(header):
    """The dtype a GGUF is converted to.

    * Any quantised tensor (Q4_*, Q5_*, Q8_0, the K-quants, ...): bf16. The dequantised values carry
      at most 8 significant bits of information beyond the block scales, so bf16 loses next to nothing
      (rounding each to 8 bits, far below the quantisation's own error) and halves fp32's size: a 7B
      Q4 file becomes 14 GB instead of 28 GB. bf16 has fp32's range, so no dequantised value overflows.
    * Only float tensors: the widest storage type the file uses, so nothing is rounded: BF16 → bf16,
      F16 → fp16 (exact: bf16 would drop 3 of F16's 11 significant bits, and fp16 is the same size;
      F32 norms beside F16 matrices round to fp16 at most), all F32 → fp32.
    """
    import torch

    kinds = {int(t.ggml_type) for t in header.tensors}
    if kinds - set(_GGML_FLOAT):
        return torch.bfloat16
    for kind in (30, 1):  # BF16 before F16: fp16 cannot hold every bf16 value
        if kind in kinds:
            return getattr(torch, _GGML_FLOAT[kind])
    return torch.float32


def _converted_ok(folder: Path) -> bool:
    return ((folder / "config.json").is_file() and (folder / SOURCE_FILE).is_file()
            and bool(_weight_files(folder)))


def _convert_gguf(ref: ModelRef, progress: Progress | None) -> Path:
    """Dequantise the GGUF once into a safetensors checkpoint in the model cache; return the folder.

    transformers loads a GGUF with ``from_pretrained(folder, gguf_file=...)`` but refuses to
    ``save_pretrained`` the result ("quantized with gguf"), so a plain model is built from the same
    config on the meta device and the dequantised tensors are assigned to it (no second copy of the
    weights in memory). Tied input/output embeddings stay tied (one tensor, saved once). Weights are
    written in :func:`_conversion_dtype`'s dtype: bf16 for a quantised GGUF, the file's own float
    width otherwise (so an F32 file's cached model computes exactly what the GGUF does).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    header, _ = _gguf_header(ref)
    dtype = _conversion_dtype(header)
    final = _converted_folder(ref.path)
    started = time.monotonic()
    _say(progress, f"reading {ref.path.name}", 0.0)
    kwargs = dict(gguf_file=ref.path.name)
    # transformers casts each tensor to dtype as it is dequantised (no fp32 copy of the whole model).
    # For any dtype but fp32 it logs that packed GGUF weights compute fastest in fp32: true of the
    # model it would keep, not of the plain copy written here, so that logger is hushed meanwhile.
    gguf_log = logging.getLogger("transformers.quantizers.quantizer_gguf")
    level = gguf_log.level
    gguf_log.setLevel(logging.ERROR)
    try:
        gguf_model = AutoModelForCausalLM.from_pretrained(ref.path.parent, dtype=dtype, **kwargs)
        _say(progress, "reading the tokenizer", 0.6)
        tokenizer = AutoTokenizer.from_pretrained(ref.path.parent, **kwargs)
    except (ValueError, KeyError, OSError, NotImplementedError, RuntimeError) as e:
        raise StudioError(f"--model {ref.spec}: transformers cannot read {ref.path.name} "
                          f"({_first_line(e)})") from None
    finally:
        gguf_log.setLevel(level)
    _say(progress, "rebuilding the model", 0.7)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the rebuilt model holds plain float tensors
    config.dtype = dtype
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(gguf_model.state_dict(), strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    generation_config = gguf_model.generation_config
    del gguf_model
    context = getattr(config, "max_position_embeddings", None)
    if context and (tokenizer.model_max_length is None or tokenizer.model_max_length > 10**8):
        tokenizer.model_max_length = int(context)
    _say(progress, "writing safetensors", 0.8)
    st = ref.path.stat()
    with atomic.staged_folder(final) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic.write_json(tmp / SOURCE_FILE, {
            "gguf": str(ref.path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "converted": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - started, 1), "dtype": str(dtype).replace("torch.", ""),
            "conversion": CONVERSION,
        })
    for stale in _converted_folders(ref.path):  # an older conversion of a file that has changed since
        if stale != final:
            shutil.rmtree(stale, ignore_errors=True)
    _say(progress, "converted", 1.0)
    return final


def checkpoint_folder(spec: str, progress: Progress | None = None) -> Path:
    """A folder with config.json, ``*.safetensors`` and tokenizer files for ``spec``.

    Folders and HF-cache models are checked and returned as they are. A GGUF (and the default) is
    converted on first use (about 20 s for the default; ``progress(message, fraction)`` reports the
    stages) and the cached folder is returned from then on.
    """
    ref = resolve(spec)
    if ref.kind in ("folder", "hub"):
        _check_folder(ref)
        return ref.path
    folder = _converted_folder(ref.path)
    if _converted_ok(folder):
        return folder
    return _convert_gguf(ref, progress)

