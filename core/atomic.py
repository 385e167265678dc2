"""Atomic writes: a file or folder that matters is either complete on disk or not there at all.

Adapters, checkpoints, the library and exports are written into a temporary sibling and renamed into
place; a rename within one filesystem is atomic, so a crash or ``kill -9`` at any instant leaves the
previous complete version (or nothing), never a half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_umask_lock = threading.Lock()


def umask() -> int:
    """The process's umask (read by setting it and putting it back, under a lock)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def normal_permissions(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes a plain ``open()`` or
    ``mkdir`` would: 0o666 / 0o777 less the umask. ``tempfile`` makes 0o600 files and 0o700 folders,
    which would otherwise end up in exported adapters and models that other users or tools read."""
    mask = umask()
    path = Path(path)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename
    (with the permissions a plain ``open()`` would give it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def staged_folder(final: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; on success it is renamed to ``final``.

    Temporary folders are named ``.<name>.partial-*`` so that listings (the library, the checkpoints)
    can skip them: a folder whose name starts with a dot is never a finished one. On an exception the
    temporary folder is removed and ``final`` is untouched. The finished folder and its files get
    the permissions a plain ``mkdir`` and ``open()`` would give them (:func:`normal_permissions`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
        normal_permissions(tmp)
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                with contextlib.suppress(OSError), open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        if final.exists():
            if not replace:
                raise FileExistsError(final)
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
