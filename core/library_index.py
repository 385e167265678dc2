"""The adapter library's SQLite index: a cache of every entry.json, for search and sort.

The folders are the truth; the index is rebuilt from them whenever it is missing, unreadable or of
an older schema, and kept in step with them (by each ``entry.json``'s modification time) before
every read, so two processes (the window and the command line) never disagree for long.
:class:`IndexedFolders` is the part of :class:`core.library.Library` that does this.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Iterable

from core import atomic
from core.errors import StudioError
from core.library_entry import (CONFIG_FILE, ENTRY_FILE, WEIGHTS_FILE, Entry, _describe, _folder_size, _read_json,
                                slugify)

SCHEMA = 2
"""The index's schema version (SQLite ``user_version``); an index of another version is rebuilt."""


class IndexedFolders:
    """The index over ``self.adapters_dir`` kept at ``self.index_path`` (set by :class:`core.library.Library`)."""

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
