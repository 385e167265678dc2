"""Adapters in and out of the library as files: a zip (or folder) imported safely, an entry written
out as a clean PEFT folder or a ``.zip`` of one. :class:`core.library.Library`'s ``import_path`` and
``export`` call these.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from core import atomic
from core.errors import StudioError
from core.library_entry import (ADAPTER_FILES, CONFIG_FILE, ENTRY_FILE, MAX_JSON_BYTES, STUDIO_FILE, WEIGHTS_FILE,
                                Entry, _read_json)

MAX_FILE_BYTES = 16 * 2**30
"""Largest adapter file accepted from a zip (a rank-256 all-linear adapter of a 70B model is ~6 GiB)."""
MAX_ZIP_RATIO = 200
"""A member whose size is more than this many times its compressed size is refused (a zip bomb).
Safetensors of trained adapters barely compress; zeros compress ~1000x, so an untrained adapter of
zeros must be shared as a folder."""


def import_zip(library, path: Path, *, name: str | None) -> Entry:
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
        staging = library.adapters_dir / f".import-{os.getpid()}-{os.urandom(4).hex()}.partial-zip"
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
            return library.add_folder(staging, name=name, move=True, imported_from=str(path.resolve()),
                                   default_name=path.stem)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, RuntimeError,
                ValueError, OverflowError) as e:  # offsets, methods and sizes are the zip's word
            raise StudioError(f"{path}: the zip is damaged ({e})") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)


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


def export_entry(e: Entry, dest: str | os.PathLike, *, zip: bool = False) -> Path:
    """:meth:`core.library.Library.export` of a resolved entry."""
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
