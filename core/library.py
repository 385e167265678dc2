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
The index (core.library_index) is rebuilt from the folders whenever it is missing or unreadable.
Entries and names: core.library_entry; zip import and export: core.library_zip.

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
import os
import re
import shutil
import unicodedata
import zipfile
from pathlib import Path
from typing import Any

from core import atomic
from core.errors import StudioError
from core.home import library_dir
from core.library_entry import (_MAX_ID, ADAPTER_FILES, CONFIG_FILE, ENTRY_FILE, ENTRY_FORMAT,  # noqa: F401
                                MAX_JSON_BYTES, SORTS, STUDIO_FILE, WEIGHTS_FILE, Entry, _check_id, _curve,
                                _describe, _file_hash, _first, _folder_size, _now, _read_json, _validate_adapter,
                                adapter_shape_facts, clean_name, metrics_curves, safetensors_header, slugify)
from core.library_index import SCHEMA, IndexedFolders  # noqa: F401
from core.library_zip import MAX_FILE_BYTES, MAX_ZIP_RATIO  # noqa: F401

# -- the library -----------------------------------------------------------------------------------

class Library(IndexedFolders):
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
            from core import library_zip

            return library_zip.import_zip(self, src, name=name)
        if not (src / CONFIG_FILE).is_file() and (src / "adapter" / CONFIG_FILE).is_file():
            return self.adopt_run(src, name=name)
        return self.add_folder(src, name=name)
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
        from core import library_zip

        return library_zip.export_entry(self.resolve(name_or_id), dest, zip=zip)

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
