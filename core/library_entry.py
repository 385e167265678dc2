"""The adapter library's entries: what one adapter folder says about itself, read cheaply (no
tensors), and the :class:`Entry` record the library keeps of it (``entry.json``, and a row of the
index). Names and ids live here too: :func:`slugify` makes the folder name (the id) from a display
name and cannot produce a path that leaves the library. :mod:`core.library` re-exports all of it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from core.errors import StudioError

ENTRY_FILE = "entry.json"
ENTRY_FORMAT = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
STUDIO_FILE = "studio.json"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, STUDIO_FILE)
"""What an entry's folder keeps of an imported adapter; anything else (READMEs, optimizer states,
pickled ``adapter_model.bin``) is left behind."""

SORTS = ("name", "created", "loss", "rank", "size")

MAX_JSON_BYTES = 64 * 2**20
"""Largest JSON file accepted from a zip; ours are a few kilobytes, a loss curve a few megabytes."""

_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)),
                     *(f"lpt{i}" for i in range(10)), "conin$", "conout$"}
_MAX_ID = 64
_MAX_NAME = 200


# -- names and ids ---------------------------------------------------------------------------------

def clean_name(name: str) -> str:
    """A display name as stored: control characters removed, whitespace runs collapsed, trimmed,
    at most 200 characters. Raises StudioError if nothing is left."""
    if not isinstance(name, str):
        raise StudioError(f"an adapter name must be text (got {type(name).__name__})")
    text = "".join(" " if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") else c for c in name)
    text = re.sub(r"\s+", " ", text).strip()[:_MAX_NAME].strip()
    if not text:
        raise StudioError(f"adapter name {name!r} is empty once control characters and spaces are removed")
    return text


def slugify(name: str) -> str:
    """A folder name made from ``name`` that is safe on Windows, macOS and Linux.

    Lower case (case-insensitive file systems would otherwise merge two ids), ASCII letters, digits,
    ``.``, ``_`` and ``-`` only; everything else becomes ``-``. It never starts with a dot (a hidden
    or staged folder), never ends with a dot or space (Windows strips them), is never ``.``/``..``,
    and a Windows device name (``CON``, ``nul.txt``, ``COM1``...) gets ``-adapter`` after its stem.
    """
    text = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode("ascii").lower()
    text = re.sub(r"[^a-z0-9._-]+", "-", text)
    text = re.sub(r"-{2,}", "-", text)
    text = re.sub(r"\.{2,}", ".", text)
    text = text[:_MAX_ID].strip(".-_ ")
    if not text:
        text = "adapter"
    stem, dot, rest = text.partition(".")
    if stem in _WINDOWS_RESERVED:  # Windows reserves the name whatever the extension: nul.txt is NUL
        text = f"{stem}-adapter{dot}{rest}"
    return text


def _check_id(entry_id: str) -> str:
    """Refuse an id that is not a plain, safe folder name (ids come from users on the command line)."""
    if not isinstance(entry_id, str) or not entry_id or slugify(entry_id) != entry_id:
        raise StudioError(f"'{entry_id}' is not an adapter id in this library")
    return entry_id


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- reading adapter folders cheaply ---------------------------------------------------------------

def _read_json(path: Path, *, limit: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file; StudioError naming the file and line if it is not valid (core.safeio: sizes
    and nesting capped)."""
    from core import safeio

    return safeio.read_json(path, max_bytes=limit)


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (names, dtypes, shapes) without reading any tensor."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise StudioError(f"{path}: not a safetensors file (too short)")
            n = int.from_bytes(raw, "little")
            if n <= 0 or n > 100 * 2**20 or n > path.stat().st_size - 8:
                raise StudioError(f"{path}: not a safetensors file (bad header length)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise StudioError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise StudioError(f"{path}: not a safetensors file (the header is not JSON)") from None
    if not isinstance(header, dict):
        raise StudioError(f"{path}: not a safetensors file")
    header.pop("__metadata__", None)
    return header


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


def adapter_shape_facts(folder: Path) -> dict:
    """rank, alpha, targets, modules and trainable parameters of an adapter folder, from its config and
    the safetensors header only (cheap enough for rebuilding the index of a large library)."""
    config = _read_json(folder / CONFIG_FILE)
    if not isinstance(config, dict):
        raise StudioError(f"{folder / CONFIG_FILE}: expected a JSON object")
    header = safetensors_header(folder / WEIGHTS_FILE)
    modules: set[str] = set()
    params = 0
    ranks: set[int] = set()
    for key, info in header.items():
        m = _LORA_KEY.match(key)
        if not m or not isinstance(info, dict):
            continue
        shape = info.get("shape") or []
        modules.add(m.group("module"))
        n = 1
        for s in shape:
            n *= int(s)
        params += n
        if m.group("which") == "A" and shape:
            ranks.add(int(shape[0]))
    rank = config.get("r")
    if not isinstance(rank, int):
        rank = min(ranks) if ranks else None
    alpha = config.get("lora_alpha")
    return {
        "rank": rank,
        "alpha": float(alpha) if isinstance(alpha, (int, float)) else None,
        "rslora": bool(config.get("use_rslora", False)),
        "targets": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "modules": len(modules),
        "trainable_params": params,
        "base_model": config.get("base_model_name_or_path") or "",
    }


def _folder_size(folder: Path) -> int:
    """Bytes of the adapter's files in ``folder`` (entry.json, a few kilobytes, is not counted)."""
    total = 0
    for p in folder.iterdir():
        with contextlib.suppress(OSError):
            if p.is_file() and p.name != ENTRY_FILE:
                total += p.stat().st_size
    return total


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _first(d: dict, *keys, default=None):
    """The first of ``keys`` present (and not None) in ``d``; dotted keys look into nested dicts."""
    for key in keys:
        cur: Any = d
        for part in key.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        if cur is not None:
            return cur
    return default


def _curve(rows: Any) -> list[list[float]]:
    """A loss curve as ``[[step, loss], ...]`` from the shapes studio.json or metrics may use."""
    out: list[list[float]] = []
    if not isinstance(rows, list):
        return out
    for i, r in enumerate(rows):
        if isinstance(r, dict):
            step, loss = r.get("step", i + 1), r.get("loss")
        elif isinstance(r, (list, tuple)) and len(r) >= 2:
            step, loss = r[0], r[1]
        elif isinstance(r, (int, float)):
            step, loss = i + 1, r
        else:
            continue
        if isinstance(step, (int, float)) and isinstance(loss, (int, float)):
            out.append([int(step), float(loss)])
    return out


def metrics_curves(rows: list[dict]) -> tuple[list[list[float]], list[list[float]], dict]:
    """The training and evaluation curves of a run's metrics rows (``core.runs.read_metrics``) and a
    summary with the trainer's own key names (steps, final_loss, best_eval_loss, duration_seconds,
    tokens). Returns ``(train [[step, loss]], eval [[step, eval_loss]], summary)``."""
    train: list[list[float]] = []
    evals: list[list[float]] = []
    seconds = 0.0
    tokens = 0
    for row in rows:
        if not isinstance(row.get("step"), (int, float)):
            continue
        step = int(row["step"])
        if isinstance(row.get("loss"), (int, float)):
            train.append([step, float(row["loss"])])
            if isinstance(row.get("step_seconds"), (int, float)):
                seconds += float(row["step_seconds"])
            if isinstance(row.get("tokens"), (int, float)):
                tokens += int(row["tokens"])
        if isinstance(row.get("eval_loss"), (int, float)):
            evals.append([step, float(row["eval_loss"])])
    summary: dict[str, Any] = {}
    if train:
        summary.update(steps=train[-1][0], final_loss=train[-1][1], duration_seconds=round(seconds, 3))
        if tokens:
            summary["tokens"] = tokens
    if evals:
        summary.update(final_eval_loss=evals[-1][1], best_eval_loss=min(v for _, v in evals))
    return train, evals, summary


# -- entries ---------------------------------------------------------------------------------------

_FIELD_TYPES = {"str": str, "int": int, "bool": bool, "dict": dict, "list": list, "list[str]": list,
                "dict | None": (dict, type(None)), "int | None": (int, type(None)),
                "float | None": (int, float, type(None))}


def _fits(annotation: str, value) -> bool:
    """Whether ``value`` (from entry.json) has the type an :class:`Entry` field is annotated with."""
    want = _FIELD_TYPES.get(annotation)
    if want is None:
        return True
    if isinstance(value, bool) and annotation != "bool":
        return False
    return isinstance(value, want) and (annotation != "list[str]" or all(isinstance(t, str) for t in value))


@dataclass
class Entry:
    """One adapter in the library: what ``entry.json`` holds, plus where it lies."""

    id: str
    """The folder name under ``adapters/``; stable for the entry's life, never shown as its name."""
    name: str
    """The display name (editable, unique in the library, case-insensitively)."""
    notes: str = ""
    created: str = ""
    """When the adapter entered the library (ISO 8601, UTC), or when it was trained if studio.json says."""
    imported_from: str = ""
    """The folder, zip or run folder it came from."""
    base_model: str = ""
    """The base model's spec or id as recorded by the trainer (or PEFT's base_model_name_or_path)."""
    base_fingerprint: dict | None = None
    """core.models.fingerprint of the base model it was trained on (shapes and content hashes)."""
    rank: int | None = None
    alpha: float | None = None
    rslora: bool = False
    targets: list[str] = field(default_factory=list)
    """Module name suffixes adapted (q_proj, v_proj, ...)."""
    modules: int = 0
    """How many modules carry the adapter."""
    trainable_params: int = 0
    size_bytes: int = 0
    """Bytes of the adapter's files on disk."""
    adapter_hash: str = ""
    """sha256 of adapter_model.safetensors: the same adapter imported twice is recognised."""
    dataset: dict = field(default_factory=dict)
    """``path`` and ``hash`` of the training data (and its format and rows when known)."""
    training: dict = field(default_factory=dict)
    """The trainer's summary: steps, final_loss, best_eval_loss, duration_seconds, tokens... when known."""
    loss_curve: list = field(default_factory=list)
    """``[[step, loss], ...]`` of training."""
    eval_curve: list = field(default_factory=list)
    """``[[step, eval_loss], ...]``."""
    trashed: str = ""
    """When it was moved to the trash (empty while in the library)."""
    path: Path | None = None
    """The entry's folder (not stored in entry.json)."""

    @property
    def loss(self) -> float | None:
        """The figure the library sorts by: best validation loss, else the final training loss."""
        t = self.training or {}
        for key in ("best_eval_loss", "final_eval_loss", "final_loss"):
            if isinstance(t.get(key), (int, float)):
                return float(t[key])
        return None

    def to_dict(self, *, curves: bool = True) -> dict:
        d = asdict(self)
        d.pop("path")
        if not curves:
            d.pop("loss_curve")
            d.pop("eval_curve")
        d["loss"] = self.loss
        return d

    def to_json(self) -> dict:
        """What entry.json holds."""
        d = asdict(self)
        d.pop("path")
        d["format"] = ENTRY_FORMAT
        return d

    @classmethod
    def from_json(cls, d: dict, path: Path | None = None) -> "Entry":
        # entry.json is the library's own file, but a crash or a hand edit can leave any value in it:
        # a value of the wrong type is dropped (its default used) rather than failing later
        kept = {f.name: d[f.name] for f in fields(cls)
                if f.name != "path" and f.name in d and _fits(str(f.type), d[f.name])}
        e = cls(**{"id": "", "name": "", **kept})
        e.path = path
        return e


def _describe(folder: Path, *, name: str, imported_from: str, studio: dict | None = None,
              extra: dict | None = None) -> Entry:
    """Build an entry for the adapter files in ``folder`` (studio.json read when present)."""
    facts = adapter_shape_facts(folder)
    if studio is None:
        studio = _read_json(folder / STUDIO_FILE) if (folder / STUDIO_FILE).is_file() else {}
    if not isinstance(studio, dict):
        studio = {}
    training = _first(studio, "training", "summary", "train", default={})
    training = dict(training) if isinstance(training, dict) else {}  # a hand-edited studio.json: ignore the rest
    curve = _curve(_first(studio, "loss_curve", "curve", "training.loss_curve", default=[]))
    evals = _curve(_first(studio, "eval_curve", "training.eval_curve", default=[]))
    training.pop("loss_curve", None)
    training.pop("eval_curve", None)
    if curve and "final_loss" not in training:
        training["final_loss"] = curve[-1][1]
    if evals and training.get("best_eval_loss") is None:
        training["best_eval_loss"] = min(v for _, v in evals)
    dataset = _first(studio, "dataset", "data", default={})
    if isinstance(dataset, str):
        dataset = {"path": dataset}
    if isinstance(dataset, dict) and dataset.get("sha256") and not dataset.get("hash"):
        dataset = dict(dataset, hash=dataset["sha256"])  # the trainer's key; "hash" is the library's
    base = _first(studio, "base_model.spec", "base_model.name", "base_model", default=None)
    fp = _first(studio, "fingerprint", "base_fingerprint", "base_model.fingerprint", default=None)
    e = Entry(
        id="", name=name, created=str(_first(studio, "created", default="") or _now()),
        imported_from=imported_from,
        base_model=str(base if isinstance(base, str) else facts["base_model"]),
        base_fingerprint=fp if isinstance(fp, dict) else None,
        rank=facts["rank"], alpha=facts["alpha"], rslora=facts["rslora"], targets=facts["targets"],
        modules=facts["modules"], trainable_params=facts["trainable_params"],
        adapter_hash=_file_hash(folder / WEIGHTS_FILE),
        dataset=dataset if isinstance(dataset, dict) else {}, training=training,
        loss_curve=curve, eval_curve=evals,
    )
    for key, value in (extra or {}).items():
        if value not in (None, "", [], {}):
            setattr(e, key, value)
    return e

def _validate_adapter(folder: Path) -> None:
    """Refuse what the studio cannot represent (DoRA, modules_to_save, pickled weights, a lone A...)
    before an adapter enters the library, with core.adapter's own message."""
    from core import adapter as adapter_io

    adapter_io.read_adapter(folder)
