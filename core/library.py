"""The adapter library: one folder per adapter as the truth, a SQLite index as a cache of it.

Layout under the library root (``core.home.library_dir()`` unless another is given)::

    adapters/<id>/adapter_config.json      the adapter itself, as PEFT reads it
                  adapter_model.safetensors
                  studio.json              (when the studio trained it: fingerprint, data, curve)
                  entry.json               the library's record: name, notes, provenance, summary
    trash/<id>/...                         removed entries, the same folders, until the trash is emptied
    index.sqlite                           a cache of every entry.json, for search and sort

Why folders first: a database file is one corruption away from losing every adapter's provenance;
a folder per adapter survives a crash, a copy to another machine and a user poking at it by hand.
The index is rebuilt from the folders whenever it is missing, unreadable or of an older schema, and
kept in step with them (by each ``entry.json``'s modification time) before every read, so two
processes (the window and the command line) never disagree for long.

Every write is atomic: a new entry is assembled in a staged folder (``core.atomic.staged_folder``,
named ``.<id>.partial-*``) and renamed into place, ``entry.json`` is replaced by rename, and a folder
whose name starts with a dot is never listed. A crash at any instant leaves the previous state.

Names are display names and may be anything printable; ids are the folder names, derived from the
name by :func:`slugify`, which cannot produce a path that leaves the library (no ``..``, no
separators, no absolute paths, no Windows device names such as ``CON`` or ``COM1``, no trailing dots
or spaces, no control characters).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import sqlite3
import stat
import unicodedata
import zipfile
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from core import atomic
from core.errors import StudioError
from core.home import library_dir

SCHEMA = 2
"""The index's schema version (SQLite ``user_version``); an index of another version is rebuilt."""

ENTRY_FILE = "entry.json"
ENTRY_FORMAT = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
STUDIO_FILE = "studio.json"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, STUDIO_FILE)
"""What an entry's folder keeps of an imported adapter; anything else (READMEs, optimizer states,
pickled ``adapter_model.bin``) is left behind."""

SORTS = ("name", "created", "loss", "rank", "size")

MAX_FILE_BYTES = 16 * 2**30
"""Largest adapter file accepted from a zip (a rank-256 all-linear adapter of a 70B model is ~6 GiB)."""
MAX_JSON_BYTES = 64 * 2**20
"""Largest JSON file accepted from a zip; ours are a few kilobytes, a loss curve a few megabytes."""
MAX_ZIP_RATIO = 200
"""A member whose size is more than this many times its compressed size is refused (a zip bomb).
Safetensors of trained adapters barely compress; zeros compress ~1000x, so an untrained adapter of
zeros must be shared as a folder."""

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


def _exported_studio(e: Entry) -> dict:
    """An entry's studio.json as exported: the one in the library, plus the entry's name and notes
    and whatever the library knows that studio.json lacks (a PEFT import's provenance, ...)."""
    studio = _read_json(e.path / STUDIO_FILE) if (e.path / STUDIO_FILE).is_file() else {}
    studio = dict(studio) if isinstance(studio, dict) else {}
    studio["name"] = e.name
    if e.notes:
        studio["notes"] = e.notes
    for key, value in (("created", e.created), ("dataset", e.dataset), ("training", e.training),
                       ("loss_curve", e.loss_curve), ("eval_curve", e.eval_curve),
                       ("fingerprint", e.base_fingerprint)):
        if value and key not in studio:
            studio[key] = value
    if e.base_model and "base_model" not in studio:
        studio["base_model"] = {"spec": e.base_model}
    return studio


def _validate_adapter(folder: Path) -> None:
    """Refuse what the studio cannot represent (DoRA, modules_to_save, pickled weights, a lone A...)
    before an adapter enters the library, with core.adapter's own message."""
    from core import adapter as adapter_io

    adapter_io.read_adapter(folder)


# -- the library -----------------------------------------------------------------------------------

class Library:
    """The adapter library rooted at ``root`` (default: ``core.home.library_dir()``).

    Methods that name an entry take its id or its display name (see :meth:`resolve`).
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else library_dir()
        self.adapters_dir = self.root / "adapters"
        self.trash_dir = self.root / "trash"
        self.index_path = self.root / "index.sqlite"
        self.adapters_dir.mkdir(parents=True, exist_ok=True)
        self.trash_dir.mkdir(parents=True, exist_ok=True)

    # -- the index -------------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        """The index, if it is a readable database of the current schema (else sqlite3.DatabaseError)."""
        con = sqlite3.connect(self.index_path, timeout=10)
        try:
            version = con.execute("PRAGMA user_version").fetchone()[0]
            if version != SCHEMA:  # 0 for a file sqlite has just created
                raise sqlite3.DatabaseError(f"index schema {version}, expected {SCHEMA}")
            con.execute("SELECT id, mtime FROM entries LIMIT 1").fetchall()
            return con
        except BaseException:
            con.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        """Open the index, rebuilding it from the folders if it is missing, corrupt or of another schema."""
        try:
            return self._open()
        except sqlite3.DatabaseError as e:
            if any(w in str(e).lower() for w in ("locked", "busy")):  # another process is writing: not broken
                raise StudioError(f"the library index {self.index_path} is busy in another process; try again")
            self._create_index()
            return self._open()

    def _create_index(self) -> None:
        """A fresh, empty index of the current schema, written beside the old one and renamed over it
        (an unreadable index is simply replaced: everything in it can be rebuilt from the folders)."""
        tmp = self.index_path.with_name(f".index.{os.getpid()}.sqlite")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        con = sqlite3.connect(tmp)
        try:
            con.executescript(f"""
                CREATE TABLE entries (
                    id TEXT PRIMARY KEY, name TEXT NOT NULL, name_key TEXT NOT NULL, notes TEXT,
                    created TEXT, base_model TEXT, rank INTEGER, loss REAL, size INTEGER,
                    mtime INTEGER NOT NULL, data TEXT NOT NULL);
                CREATE INDEX entries_name ON entries(name_key);
                PRAGMA user_version = {SCHEMA};
            """)
            con.commit()
        finally:
            con.close()
        for suffix in ("-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                Path(str(self.index_path) + suffix).unlink()
        os.replace(tmp, self.index_path)

    def rebuild_index(self) -> int:
        """Throw the index away and rebuild it from the folders; returns the number of entries."""
        self._create_index()
        return len(self.entries())

    def _folders(self) -> dict[str, Path]:
        """Finished entry folders by id: staged (``.x.partial-*``) and other dot-folders are skipped."""
        out = {}
        with contextlib.suppress(FileNotFoundError):
            for p in self.adapters_dir.iterdir():
                if p.name.startswith(".") or not p.is_dir() or slugify(p.name) != p.name:
                    continue
                out[p.name] = p
        return out

    def _load_folder(self, folder: Path) -> Entry | None:
        """The entry in ``folder``; a folder without entry.json but with adapter files (copied in by
        hand) gets one written; a folder without adapter files is not an entry."""
        if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
            return None
        try:
            if (folder / ENTRY_FILE).is_file():
                data = _read_json(folder / ENTRY_FILE)
                if isinstance(data, dict) and isinstance(data.get("name"), str) and data["name"]:
                    e = Entry.from_json(data, folder)
                    e.id = folder.name
                    return e
            e = _describe(folder, name=folder.name, imported_from=str(folder))
        except StudioError:
            return None
        e.id, e.path = folder.name, folder
        e.size_bytes = _folder_size(folder)
        with contextlib.suppress(OSError):
            atomic.write_json(folder / ENTRY_FILE, e.to_json())
        return e

    @staticmethod
    def _mtime(folder: Path) -> int:
        try:
            return (folder / ENTRY_FILE).stat().st_mtime_ns
        except OSError:
            return -1

    def _sync(self, con: sqlite3.Connection) -> None:
        """Bring the index in step with the folders: re-read an entry whose entry.json changed, add new
        folders, drop rows whose folder is gone. One ``stat`` per entry when nothing changed."""
        folders = self._folders()
        rows = dict(con.execute("SELECT id, mtime FROM entries").fetchall())
        with con:
            for gone in set(rows) - set(folders):
                con.execute("DELETE FROM entries WHERE id = ?", (gone,))
            for entry_id, folder in folders.items():
                mtime = self._mtime(folder)
                if rows.get(entry_id) == mtime and mtime != -1:
                    continue
                e = self._load_folder(folder)
                if e is None:
                    con.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
                    continue
                self._put(con, e)

    def _put(self, con: sqlite3.Connection, e: Entry) -> None:
        con.execute(
            "INSERT OR REPLACE INTO entries (id, name, name_key, notes, created, base_model, rank, loss, size,"
            " mtime, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (e.id, e.name, e.name.casefold(), e.notes, e.created, e.base_model, e.rank, e.loss, e.size_bytes,
             self._mtime(self.adapters_dir / e.id), json.dumps(e.to_json(), default=str)))

    def _query(self, sql: str, params: Iterable = ()) -> list[Entry]:
        """Rows of ``sql`` (selecting ``data``) as entries, after bringing the index in step. A database
        damaged past its header (a page torn by a crash) is rebuilt once and the query repeated."""
        for attempt in (0, 1):
            con = self._connect()
            try:
                self._sync(con)
                rows = con.execute(sql, tuple(params)).fetchall()
                out = []
                for (data,) in rows:  # a row torn inside its JSON is a damaged index too: rebuilt below
                    d = json.loads(data)
                    out.append(Entry.from_json(d, self.adapters_dir / d["id"]))
                return out
            except (sqlite3.DatabaseError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
                if attempt or any(w in str(e).lower() for w in ("locked", "busy")):
                    raise StudioError(f"the library index {self.index_path} cannot be used ({e})") from None
                con.close()
                self._create_index()
            finally:
                con.close()
        raise AssertionError("unreachable: the second attempt returns or raises")

    # -- reading ---------------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        """Every adapter in the library, newest first."""
        return self.search()

    def search(self, text: str | None = None, base_model: str | None = None, rank: int | None = None, *,
               sort: str = "created", descending: bool | None = None) -> list[Entry]:
        """Entries whose name or notes contain ``text`` (case-insensitive), trained on ``base_model``
        (exact, or contained in the recorded spec), of ``rank``; sorted by ``sort`` (one of
        :data:`SORTS`). Dates and sizes sort newest/largest first by default, the rest ascending;
        entries without a figure to sort by come last."""
        if sort not in SORTS:
            raise StudioError(f"sort: '{sort}' is not one of {', '.join(SORTS)}")
        where, params = [], []
        if text:
            like = "%" + re.sub(r"([\\%_])", r"\\\1", text) + "%"
            where.append("(name LIKE ? ESCAPE '\\' OR notes LIKE ? ESCAPE '\\')")
            params += [like, like]
        if base_model:
            where.append("(base_model = ? OR base_model LIKE ? ESCAPE '\\')")
            params += [base_model, "%" + re.sub(r"([\\%_])", r"\\\1", base_model) + "%"]
        if rank is not None:
            where.append("rank = ?")
            params.append(int(rank))
        column = {"name": "name_key", "created": "created", "loss": "loss", "rank": "rank", "size": "size"}[sort]
        if descending is None:
            descending = sort in ("created", "size")
        order = f"{column} IS NULL, {column} {'DESC' if descending else 'ASC'}, name_key ASC"
        sql = "SELECT data FROM entries" + (" WHERE " + " AND ".join(where) if where else "") + f" ORDER BY {order}"
        return self._query(sql, params)

    def get(self, entry_id: str) -> Entry:
        """The entry with this id, read from its folder (the truth), loss curve included."""
        _check_id(entry_id)
        folder = self.adapters_dir / entry_id
        e = self._load_folder(folder) if folder.is_dir() else None
        if e is None:
            raise StudioError(f"no adapter with id '{entry_id}' in the library ({self.root})")
        return e

    def resolve(self, name_or_id: str) -> Entry:
        """The entry a user means: an exact id, else an exact name, else a name ignoring case."""
        key = str(name_or_id).strip()
        if key and slugify(key) == key and (self.adapters_dir / key / ENTRY_FILE).is_file():
            with contextlib.suppress(StudioError):
                return self.get(key)
        found = self._query("SELECT data FROM entries WHERE name = ?", (key,)) or \
            self._query("SELECT data FROM entries WHERE name_key = ?", (key.casefold(),))
        if len(found) == 1:
            return found[0]
        if not found:
            raise StudioError(f"no adapter named '{name_or_id}' in the library",
                              hint="'lora-studio library list' shows the names and ids")
        raise StudioError(f"{len(found)} adapters are named '{name_or_id}'",
                          hint=f"use an id: {', '.join(e.id for e in found)}")

    def _name_taken(self, name: str, *, except_id: str | None = None) -> bool:
        return any(e.id != except_id for e in self._query("SELECT data FROM entries WHERE name_key = ?",
                                                          (name.casefold(),)))

    def _unique_name(self, name: str) -> str:
        base, n = clean_name(name), 2
        candidate = base
        while self._name_taken(candidate):
            candidate = f"{base} ({n})"
            n += 1
        return candidate

    def _unique_id(self, name: str) -> str:
        base, n = slugify(name), 2
        taken = set(self._folders()) | {p.name.split(".partial-")[0].lstrip(".")
                                        for p in self.adapters_dir.glob(".*.partial-*")}
        candidate = base
        while candidate in taken:
            suffix = f"-{n}"
            candidate = base[: _MAX_ID - len(suffix)].rstrip(".-_") + suffix
            n += 1
        return candidate

    # -- adding ----------------------------------------------------------------------------------
    def add_folder(self, path: str | os.PathLike, *, name: str | None = None, move: bool = False,
                   imported_from: str | None = None, extra: dict | None = None,
                   default_name: str | None = None) -> Entry:
        """Add the adapter in folder ``path`` (ours or PEFT's) as a new entry and return it.

        Only the adapter's files are taken (adapter_config.json, adapter_model.safetensors,
        studio.json); with ``move`` they are moved rather than copied (for a folder the caller owns).
        The adapter is read in full first, so DoRA, modules_to_save and broken files are refused
        before anything is written. ``extra`` overrides entry fields (notes, dataset, training...).
        Without ``name`` the name recorded with the adapter is used, else ``default_name``, else the
        folder's name, made unique with a " (2)" suffix if taken.
        """
        src = Path(path).expanduser()
        if not src.is_dir():
            raise StudioError(f"{src}: no such folder")
        _validate_adapter(src)
        previous = _read_json(src / ENTRY_FILE) if (src / ENTRY_FILE).is_file() else {}
        previous = previous if isinstance(previous, dict) else {}
        if not previous and (src / STUDIO_FILE).is_file():  # an exported folder: its notes are in studio.json
            studio = _read_json(src / STUDIO_FILE)
            notes = studio.get("notes") if isinstance(studio, dict) else None
            previous = {"notes": notes} if isinstance(notes, str) else {}
        wanted = name or previous.get("name") or _first(_read_json(src / STUDIO_FILE) if (src / STUDIO_FILE).is_file()
                                                        else {}, "name", default=None) or default_name or src.name
        display = self._unique_name(str(wanted)) if name is None else clean_name(name)
        if name is not None and self._name_taken(display):
            raise StudioError(f"an adapter named '{display}' is already in the library",
                              hint="choose another name with --name", window_hint="choose another name")
        entry_id = self._unique_id(display)
        keep = {k: previous[k] for k in ("notes", "dataset", "training", "loss_curve", "eval_curve", "created",
                                         "base_fingerprint", "base_model") if previous.get(k)}
        keep.update(extra or {})
        with atomic.staged_folder(self.adapters_dir / entry_id, replace=False) as tmp:
            for fname in ADAPTER_FILES:
                if (src / fname).is_file():
                    (shutil.move if move else shutil.copy2)(str(src / fname), str(tmp / fname))
            e = _describe(tmp, name=display, imported_from=imported_from or str(src.resolve()), extra=keep)
            e.id = entry_id
            e.size_bytes = _folder_size(tmp)
            atomic.write_json(tmp / ENTRY_FILE, e.to_json())
        return self._refresh(entry_id)

    def _refresh(self, entry_id: str) -> Entry:
        """Update the index row for one entry and return it."""
        e = self.get(entry_id)
        con = self._connect()
        try:
            with con:
                self._put(con, e)
        finally:
            con.close()
        return e

    def import_path(self, path: str | os.PathLike, *, name: str | None = None) -> Entry:
        """Import an adapter folder (ours or PEFT's), a zip of one, or a run folder (its ``adapter/``)."""
        src = Path(path).expanduser()
        if not src.exists():
            raise StudioError(f"{src}: no such file or folder")
        if src.is_file():
            if not zipfile.is_zipfile(src):
                raise StudioError(f"{src}: not a zip file or an adapter folder",
                                  hint="import the folder holding adapter_config.json, or a .zip of it")
            return self._import_zip(src, name=name)
        if not (src / CONFIG_FILE).is_file() and (src / "adapter" / CONFIG_FILE).is_file():
            return self.adopt_run(src, name=name)
        return self.add_folder(src, name=name)

    def _import_zip(self, path: Path, *, name: str | None) -> Entry:
        """Extract the adapter files of a zip into a staging folder inside the library, then add them.

        Zip-slip safe: member names are never joined to a path; only the three adapter files (and our
        entry.json) are taken, each from the one folder in the zip holding adapter_config.json, and
        written under their own fixed names. Links, absolute or ``..`` names, oversized members and
        zip bombs are refused, and the bytes written are counted against the declared size.
        """
        try:
            zf = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, OverflowError, NotImplementedError) as e:
            raise StudioError(f"{path}: not a readable zip file ({e})") from None
        with zf:
            members = [i for i in zf.infolist() if not i.is_dir()]
            for info in members:
                pure = PurePosixPath(info.filename.replace("\\", "/"))
                if info.filename.startswith(("/", "\\")) or ".." in pure.parts or re.match(r"^[A-Za-z]:", info.filename):
                    raise StudioError(f"{path}: member '{info.filename}' points outside the folder; refusing this zip")
            configs = [i for i in members if PurePosixPath(i.filename.replace("\\", "/")).name == CONFIG_FILE]
            if not configs:
                raise StudioError(f"{path}: no {CONFIG_FILE} in this zip", hint="zip an adapter folder")
            if len(configs) > 1:
                raise StudioError(f"{path}: holds {len(configs)} adapters ({', '.join(c.filename for c in configs)}); "
                                  "import them one at a time")
            prefix = str(PurePosixPath(configs[0].filename.replace("\\", "/")).parent)
            wanted = {}
            for info in members:
                p = PurePosixPath(info.filename.replace("\\", "/"))
                if str(p.parent) == prefix and p.name in (*ADAPTER_FILES, ENTRY_FILE, "adapter_model.bin"):
                    wanted[p.name] = info
            staging = self.adapters_dir / f".import-{os.getpid()}-{os.urandom(4).hex()}.partial-zip"
            staging.mkdir(parents=True)
            try:
                for fname, info in wanted.items():
                    mode = (info.external_attr >> 16) & 0o170000
                    if mode and not stat.S_ISREG(mode):
                        raise StudioError(f"{path}: member '{info.filename}' is a link or device, not a file")
                    limit = MAX_FILE_BYTES if fname.endswith((".safetensors", ".bin")) else MAX_JSON_BYTES
                    if info.file_size > limit:
                        raise StudioError(f"{path}: member '{info.filename}' is {info.file_size:,} bytes, "
                                          f"over the {limit:,}-byte limit")
                    if info.file_size > 1 << 20 and info.file_size > MAX_ZIP_RATIO * max(info.compress_size, 1):
                        raise StudioError(f"{path}: member '{info.filename}' expands {info.file_size:,} bytes from "
                                          f"{info.compress_size:,}: refusing a possible zip bomb")
                    written = 0
                    with zf.open(info) as fin, open(staging / fname, "wb") as fout:
                        for chunk in iter(lambda: fin.read(1 << 20), b""):
                            written += len(chunk)
                            if written > info.file_size or written > limit:
                                raise StudioError(f"{path}: member '{info.filename}' is larger than it declares")
                            fout.write(chunk)
                return self.add_folder(staging, name=name, move=True, imported_from=str(path.resolve()),
                                       default_name=path.stem)
            except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, RuntimeError,
                    ValueError, OverflowError) as e:  # offsets, methods and sizes are the zip's word
                raise StudioError(f"{path}: the zip is damaged ({e})") from None
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def adopt_run(self, run_dir: str | os.PathLike, *, name: str | None = None) -> Entry:
        """Add a finished run's adapter (``run_dir/adapter``) with its provenance.

        The loss curve and summary come from the adapter's studio.json when it has them, else from the
        run's ``metrics.jsonl``; the dataset and base model from the run's ``config.json``. Adopting the
        same run twice returns the entry made the first time (the trainer adopts automatically and a
        user may press "add to library" as well).
        """
        run = Path(run_dir).expanduser()
        adapter_dir = run / "adapter"
        if not (adapter_dir / CONFIG_FILE).is_file():
            raise StudioError(f"{run}: no finished adapter (expected {adapter_dir / CONFIG_FILE})",
                              hint="the run has not finished; a checkpoint can be resumed with 'train --resume'")
        digest = _file_hash(adapter_dir / WEIGHTS_FILE) if (adapter_dir / WEIGHTS_FILE).is_file() else ""
        source = str(run.resolve())
        for e in self.entries():
            if e.imported_from == source and e.adapter_hash == digest:
                return e
        config: dict = {}
        if (run / "config.json").is_file():
            with contextlib.suppress(StudioError):
                c = _read_json(run / "config.json")
                config = c if isinstance(c, dict) else {}
        from core import runs

        train, evals, summary = metrics_curves(runs.read_metrics(run))
        studio = _read_json(adapter_dir / STUDIO_FILE) if (adapter_dir / STUDIO_FILE).is_file() else {}
        studio = studio if isinstance(studio, dict) else {}
        extra: dict[str, Any] = {}
        if not _curve(_first(studio, "loss_curve", "curve", "training.loss_curve", default=[])) and train:
            extra["loss_curve"] = train
        if not _curve(_first(studio, "eval_curve", "training.eval_curve", default=[])) and evals:
            extra["eval_curve"] = evals
        if not _first(studio, "training", "summary", "train", default=None) and summary:
            extra["training"] = summary
        if not _first(studio, "dataset", "data", default=None) and _first(config, "data.path", default=None):
            extra["dataset"] = {"path": _first(config, "data.path"), "format": _first(config, "data.format")}
        if not _first(studio, "base_model", default=None) and _first(config, "model.source", default=None):
            extra["base_model"] = _first(config, "model.source")
        display = name or _first(config, "name", default=None) or run.name
        return self.add_folder(adapter_dir, name=self._unique_name(str(display)) if name is None else name,
                               imported_from=source, extra=extra)

    # -- editing ---------------------------------------------------------------------------------
    def _update(self, entry_id: str, **changes) -> Entry:
        e = self.get(entry_id)
        for k, v in changes.items():
            setattr(e, k, v)
        atomic.write_json(e.path / ENTRY_FILE, e.to_json())
        return self._refresh(entry_id)

    def rename(self, name_or_id: str, new_name: str) -> Entry:
        """Give an entry a new display name (unique in the library); its id and folder stay."""
        e = self.resolve(name_or_id)
        new = clean_name(new_name)
        if self._name_taken(new, except_id=e.id):
            raise StudioError(f"an adapter named '{new}' is already in the library")
        return self._update(e.id, name=new)

    def set_notes(self, name_or_id: str, notes: str) -> Entry:
        """Replace an entry's free-text notes."""
        e = self.resolve(name_or_id)
        text = "".join(c for c in str(notes) if c in "\n\t" or unicodedata.category(c) != "Cc")
        return self._update(e.id, notes=text)

    # -- trash -----------------------------------------------------------------------------------
    def remove(self, name_or_id: str) -> Entry:
        """Move an entry to the trash (recoverable with :meth:`restore` until :meth:`empty_trash`).
        Returns the trashed entry; its ``id`` is its id in the trash."""
        e = self.resolve(name_or_id)
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        trash_id = f"{e.id}-{stamp}"
        n = 2
        while (self.trash_dir / trash_id).exists():
            trash_id = f"{e.id}-{stamp}-{n}"
            n += 1
        e.trashed = _now()
        atomic.write_json(e.path / ENTRY_FILE, e.to_json())
        os.replace(e.path, self.trash_dir / trash_id)
        con = self._connect()
        try:
            with con:
                con.execute("DELETE FROM entries WHERE id = ?", (e.id,))
        finally:
            con.close()
        e.id, e.path = trash_id, self.trash_dir / trash_id
        return e

    def trash(self) -> list[Entry]:
        """What is in the trash, most recently removed first (ids are trash ids)."""
        out = []
        with contextlib.suppress(FileNotFoundError):
            for p in self.trash_dir.iterdir():
                if p.name.startswith(".") or not p.is_dir():
                    continue
                e = self._load_folder(p)
                if e is not None:
                    e.id, e.path = p.name, p
                    out.append(e)
        return sorted(out, key=lambda e: e.trashed or "", reverse=True)

    def _resolve_trash(self, name_or_id: str) -> Entry:
        items = self.trash()
        for e in items:
            if e.id == name_or_id:
                return e
        found = [e for e in items if e.name == name_or_id] or \
            [e for e in items if e.name.casefold() == str(name_or_id).casefold()]
        if not found:
            raise StudioError(f"nothing named '{name_or_id}' in the trash")
        return found[0]  # the most recently removed one of that name

    def restore(self, name_or_id: str) -> Entry:
        """Bring an entry back from the trash (with a new name if its name was taken meanwhile)."""
        t = self._resolve_trash(name_or_id)
        data = _read_json(t.path / ENTRY_FILE) if (t.path / ENTRY_FILE).is_file() else {}
        original = re.sub(r"-\d{8}-\d{6}(-\d+)?$", "", t.id)
        entry_id = original if not (self.adapters_dir / original).exists() else self._unique_id(original)
        name = t.name if not self._name_taken(t.name) else self._unique_name(t.name)
        data.update(name=name, trashed="", id=entry_id)
        atomic.write_json(t.path / ENTRY_FILE, data)
        os.replace(t.path, self.adapters_dir / entry_id)
        return self._refresh(entry_id)

    def empty_trash(self, name_or_id: str | None = None) -> int:
        """Delete everything in the trash (or one item) for good; returns how many were deleted."""
        items = self.trash() if name_or_id is None else [self._resolve_trash(name_or_id)]
        for e in items:
            # rename first so that an interrupted delete never leaves a half-deleted, listable entry
            doomed = self.trash_dir / f".{e.id}.deleting-{os.getpid()}"
            os.replace(e.path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        return len(items)

    # -- export ----------------------------------------------------------------------------------
    def export(self, name_or_id: str, dest: str | os.PathLike, *, zip: bool = False) -> Path:
        """Write an entry as a clean PEFT folder (``dest`` must not exist) or a ``.zip`` of one;
        returns it.

        The folder holds adapter_config.json, adapter_model.safetensors and studio.json, which also
        carries the entry's name and notes (read back by :meth:`import_path`); the library's own
        entry.json stays in the library. Folders are 0o777 and files 0o666 less the umask.
        """
        e = self.resolve(name_or_id)
        out = Path(dest).expanduser()
        if zip and out.suffix.lower() != ".zip":
            out = out.with_name(out.name + ".zip")
        if out.exists():
            raise StudioError(f"{out}: already exists; choose a new destination")
        files = {f: (e.path / f).read_bytes() for f in (CONFIG_FILE, WEIGHTS_FILE) if (e.path / f).is_file()}
        files[STUDIO_FILE] = (json.dumps(_exported_studio(e), indent=2, default=str) + "\n").encode()
        if zip:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
            try:
                with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                    for f, data in files.items():
                        info = zipfile.ZipInfo(f"{e.id}/{f}", date_time=_dt.datetime.now().timetuple()[:6])
                        info.external_attr = (0o100000 | (0o666 & ~atomic.umask())) << 16
                        info.compress_type = zipfile.ZIP_DEFLATED
                        zf.writestr(info, data)
                atomic.normal_permissions(tmp)
                os.replace(tmp, out)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        else:
            with atomic.staged_folder(out, replace=False) as tmp:
                for f, data in files.items():
                    (tmp / f).write_bytes(data)
        return out

    # -- compatibility ---------------------------------------------------------------------------
    def check(self, entry_or_folder: "Entry | str | os.PathLike", model) -> tuple[list[str], list[str]]:
        """Can this adapter be applied to ``model`` (an nn.Module or core.models.LoadedModel)?

        Returns ``(problems, warnings)``. Problems (refuse): a target module the model lacks, a tensor
        shape that does not match, an unreadable adapter. Warnings (apply only after telling the user):
        the model's weights differ from those the adapter was trained on (same shapes, different
        content hash), or its architecture hash differs though every adapted layer fits.
        """
        if isinstance(entry_or_folder, Entry):
            folder, recorded = entry_or_folder.path, entry_or_folder.base_fingerprint
        else:
            p = Path(entry_or_folder)
            if not p.is_dir():
                p = self.resolve(str(entry_or_folder)).path
            folder = p
            recorded = None
            if (p / ENTRY_FILE).is_file():
                with contextlib.suppress(StudioError):
                    recorded = (_read_json(p / ENTRY_FILE) or {}).get("base_fingerprint")
        return check_adapter(folder, model, recorded=recorded)


def _module_of(model):
    """The nn.Module inside a core.models.LoadedModel, or the module itself."""
    try:
        from core.models import LoadedModel
    except ImportError:  # pragma: no cover
        LoadedModel = ()  # type: ignore[assignment]
    return model.model if LoadedModel and isinstance(model, LoadedModel) else model


def check_adapter(folder: str | os.PathLike, model, *, recorded: dict | None = None) -> tuple[list[str], list[str]]:
    """:meth:`Library.check` for any adapter folder (in the library or not).

    ``recorded`` is the base model fingerprint to compare with; by default the one in studio.json.
    """
    from core import adapter as adapter_io

    folder = Path(folder)
    module = _module_of(model)
    try:
        adapter = adapter_io.read_adapter(folder)
    except StudioError as e:
        return [str(e)], []
    try:
        problems = list(adapter_io.check_compatible(adapter, module))
    except StudioError as e:
        problems = [str(e)]
    except (RuntimeError, ValueError, KeyError, AttributeError) as e:  # never a size-mismatch traceback
        problems = [f"adapter {folder}: does not fit this model ({type(e).__name__}: {e})"]
    if problems:
        return problems, []
    if recorded:  # the library's record wins over studio.json (it may have been set on import)
        adapter.studio = dict(adapter.studio, fingerprint=recorded)
    # a LoadedModel's fingerprint was taken at load: merge/unmerge cycles since then do not count
    warning = adapter_io.fingerprint_warning(adapter, module, now=getattr(model, "fingerprint", None)
                                             if module is not model else None)
    return [], [f"adapter {folder.name}: {warning}"] if warning else []
