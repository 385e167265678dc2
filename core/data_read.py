"""Reading a dataset file (or a Hub dataset) through ``datasets``, and working out its format.

**Reading.** ``.jsonl``, ``.json`` (a list of objects, or an object holding one such list, e.g.
``{"data": [...]}``), ``.csv``/``.tsv``, ``.parquet``, ``.txt`` and ``save_to_disk`` folders are read
through the ``datasets`` library into Arrow files under ``studio_home()/cache/datasets`` and
memory-mapped, so a million-row file never becomes a million Python dicts. A ``.txt`` file is one
example per *paragraph* (blank-line separated) when it contains a blank line between two pieces of
text, else one example per *line*: a poem or a function stays whole, and a file of one-liners works
too. When ``datasets`` fails, the file is diagnosed cheaply afterwards (only then) to name what is
wrong: the line and byte offset of a non-UTF-8 byte, the ``file:line`` of a malformed JSON line.

**Formats**: see core.data's table (``detect_format``; overridable with ``format`` and a ``fields``
mapping from a format's fields to the file's columns).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from core import safeio
from core.errors import StudioError
from core.home import studio_home

FORMATS = ("instruction", "chat", "prompt-completion", "text")
"""The formats a dataset can have (``core.config.FORMATS`` adds ``auto``)."""

SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".txt")

FIELDS: dict[str, dict[str, tuple[str, ...]]] = {
    # format -> field -> column names detected for it, in order of preference
    "chat": {"messages": ("messages", "conversations")},
    "instruction": {"instruction": ("instruction",), "input": ("input", "context"),
                    "output": ("output", "response"), "system": ("system",)},
    "prompt-completion": {"prompt": ("prompt", "question", "query"),
                          "completion": ("completion", "answer", "response"), "system": ("system",)},
    "text": {"text": ("text",)},
}
REQUIRED: dict[str, tuple[str, ...]] = {
    "chat": ("messages",), "instruction": ("instruction", "output"),
    "prompt-completion": ("prompt", "completion"), "text": ("text",),
}


# -- data classes ---------------------------------------------------------------------------------

@dataclass
class Source:
    """A dataset file, read and understood."""

    path: Path
    dataset: Any
    """A ``datasets.Dataset``, memory-mapped from the Arrow cache."""
    format: str
    """One of :data:`FORMATS`."""
    fields: dict[str, str]
    """The format's fields -> the file's columns, e.g. ``{"instruction": "question", "output": "answer"}``."""
    columns: list[str]
    rows: int
    notes: list[str] = field(default_factory=list)
    """How the file was read, when it is worth saying (``.txt``: by line or by paragraph)."""

    def row(self, i: int) -> dict:
        return self.dataset[int(i)]


# -- reading --------------------------------------------------------------------------------------

def _cache_dir() -> Path:
    d = studio_home() / "cache" / "datasets"
    d.mkdir(parents=True, exist_ok=True)
    return d


@contextlib.contextmanager
def _quiet_datasets():
    """``datasets`` prints progress bars and logs its own errors; the studio reports for itself."""
    import datasets
    from datasets.utils import logging as dlog

    bars = datasets.is_progress_bar_enabled()
    level = dlog.get_verbosity()
    datasets.disable_progress_bars()
    dlog.set_verbosity(dlog.CRITICAL)
    try:
        yield datasets
    finally:
        dlog.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _txt_mode(path: Path) -> str:
    """``paragraph`` if a blank line separates two pieces of text, else ``line`` (streams the file)."""
    seen_text = seen_blank = False
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                if seen_blank:
                    return "paragraph"
                seen_text = True
            elif seen_text:
                seen_blank = True
    return "line"


def _txt_rows(path: str, mode: str, size: int, mtime_ns: int) -> Iterator[dict]:
    """Rows of a .txt file (size and mtime only make the datasets cache key change with the file)."""
    with open(path, encoding="utf-8", newline=None) as f:
        if mode == "line":
            for line in f:
                line = line.rstrip("\n")
                if line.strip():
                    yield {"text": line}
            return
        para: list[str] = []
        for line in f:
            if line.strip():
                para.append(line.rstrip("\n"))
            elif para:
                yield {"text": "\n".join(para)}
                para = []
        if para:
            yield {"text": "\n".join(para)}


def _first_bad_utf8(path: Path, block: int = 1 << 24) -> tuple[int, int, int] | None:
    """(line, byte offset in the file, the byte) of the first invalid UTF-8 sequence, or None.

    Decodes 16 MiB blocks incrementally (a multi-byte character may straddle two blocks), so a
    large file is checked at the speed of the codec, about a second per GiB."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(block)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                # e.start is relative to the decoder's pending bytes plus this chunk
                pending = len(e.object) - len(chunk)
                at = offset - pending + e.start
                with open(path, "rb") as g:
                    head = g.read(at + 1)
                return head.count(b"\n", 0, at) + 1, at, head[at]
            if not chunk:
                return None
            offset += len(chunk)


def _utf8_error(path: Path) -> StudioError | None:
    bad = _first_bad_utf8(path)
    if bad is None:
        return None
    lineno, offset, byte = bad
    return StudioError(f"{path}: line {lineno} (byte {offset}): not UTF-8 text (byte 0x{byte:02x})",
                       hint="save the file with UTF-8 encoding")


def _first_bad_json_line(path: Path) -> str | None:
    """Where a JSON Lines file stops being JSON Lines, as ``file:line: problem``; None if nowhere."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = safeio.loads(line, str(path), lineno=lineno)
            except StudioError as e:
                return str(e)
            if not isinstance(value, dict):
                return (f"{path}:{lineno}: expected one JSON object per line, found "
                        f"{type(value).__name__ if not isinstance(value, list) else 'a list'}")
    return None


def _diagnose(path: Path, kind: str, err: BaseException) -> StudioError:
    """Turn a failure of ``datasets`` into one message naming the line at fault (runs only on failure)."""
    if kind == "jsonl":
        where = _first_bad_json_line(path)
        if where:
            return StudioError(where)
    if kind == "json":
        try:
            with open(path, encoding="utf-8") as f:
                if safeio.depth(json.load(f)) > safeio.MAX_DEPTH:
                    return safeio.too_deep(str(path))
        except RecursionError:
            return safeio.too_deep(str(path))
        except json.JSONDecodeError as e:
            # a .json file may be JSON Lines in disguise: then the line scan names the bad line
            lines = _first_bad_json_line(path) if e.msg == "Extra data" else None
            return StudioError(lines or f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})")
        except (OSError, ValueError):
            pass
    cause = err
    while cause.__cause__ is not None and str(cause.__cause__):
        cause = cause.__cause__
    msg = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return StudioError(f"{path}: cannot read this file ({msg})")


def train_split(splits: Mapping[str, Any], what: str, hint: str, notes: list[str]) -> tuple[Any, str]:
    """The split to train on from a dataset of several: 'train', or the only one; ``what`` names the
    dataset in the message when neither exists, and a note says which split was taken."""
    names = list(splits)
    name = "train" if "train" in splits else names[0] if len(names) == 1 else None
    if name is None:
        raise StudioError(f"{what} has the splits {', '.join(names)} and none is called 'train'", hint=hint)
    if len(names) > 1:
        notes.append(f"using the '{name}' split of {', '.join(names)}")
    return splits[name], name


def _check_arrow(path: Path, ds) -> None:
    """save_to_disk's arrow files are memory-mapped as they are, and pyarrow trusts their offsets: a
    damaged one crashes the process (a segfault, found by the fuzz suite) when a row is read. Arrow's
    full validation reads every buffer once (about a second per GB) and says so first."""
    try:
        ds.data.table.validate(full=True)
    except (ValueError, OSError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise StudioError(f"{path}: the dataset's arrow file is damaged ({safeio.first_line(e)})",
                          hint="write the dataset again with save_to_disk") from None


def _list_of_dicts(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _load(path: Path, fields: Mapping[str, str] | None) -> tuple[Any, list[str]]:
    """The file as a ``datasets.Dataset`` (memory-mapped) and notes on how it was read."""
    notes: list[str] = []
    with _quiet_datasets() as datasets:
        if path.is_dir():
            try:
                ds = datasets.load_from_disk(str(path))
            except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
                # a damaged arrow file, state.json or dataset_info.json: pyarrow and datasets raise any of these
                raise StudioError(f"{path}: this folder is not a dataset written by datasets' save_to_disk "
                                  f"({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                                  hint=f"give a file ({', '.join(SUFFIXES)}) or a save_to_disk folder") from None
            if isinstance(ds, datasets.DatasetDict):
                ds, _ = train_split(ds, f"{path}: this dataset", "save the split to train on by itself", notes)
            _check_arrow(path, ds)
            return ds, notes

        suffix = path.suffix.lower()
        if suffix not in SUFFIXES:
            raise StudioError(f"{path}: cannot read '{suffix or 'no extension'}' files",
                              hint=f"use {', '.join(SUFFIXES)} or a save_to_disk folder")
        size = path.stat().st_size
        if size == 0 or (size < 65536 and not path.read_bytes().strip()):
            raise StudioError(f"{path}: the file is empty")
        if suffix != ".parquet":
            # pyarrow's JSON reader passes some invalid UTF-8 through into the strings: check first
            bad = _utf8_error(path)
            if bad:
                raise bad
        cache = str(_cache_dir())
        kind = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "csv",
                ".parquet": "parquet", ".txt": "txt"}[suffix]
        try:
            if kind == "txt":
                mode = _txt_mode(path)
                notes.append("one example per paragraph (blank-line separated)" if mode == "paragraph"
                             else "one example per line")
                st = path.stat()
                ds = datasets.Dataset.from_generator(
                    _txt_rows, features=datasets.Features({"text": datasets.Value("string")}), cache_dir=cache,
                    gen_kwargs={"path": str(path), "mode": mode, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
            elif kind == "csv":
                extra = {"delimiter": "\t"} if suffix == ".tsv" else {}
                ds = datasets.load_dataset("csv", data_files=str(path), split="train", cache_dir=cache, **extra)
            else:
                ds = datasets.load_dataset("json" if kind in ("json", "jsonl") else kind, data_files=str(path),
                                           split="train", cache_dir=cache)
        except StudioError:
            raise
        except Exception as e:  # datasets wraps pyarrow, pandas and codec errors in many types
            if "corresponds to no data" in str(e):  # a JSON [] : datasets finds no split at all
                raise StudioError(f"{path}: the file has no examples") from None
            raise _diagnose(path, kind, e) from None

        if kind == "csv" and ds.column_names and ds.column_names[0].startswith("\ufeff"):
            # a byte-order mark (Excel writes one) would otherwise hide in the first column's name
            ds = ds.rename_column(ds.column_names[0], ds.column_names[0].lstrip("\ufeff"))
        if kind == "json" and ds.num_rows == 1:
            ds = _unwrap_json(path, ds, fields, datasets, cache, notes)
        return ds, notes


def _unwrap_json(path, ds, fields, datasets, cache, notes):
    """A .json object holding the examples in one list (``{"data": [...], "version": 2}``) is read
    by pyarrow as one row; read it again with that list as the rows."""
    row = ds[0]
    keep = {"messages", "conversations", *(fields or {}).values()}
    lists = [c for c in ds.column_names if c not in keep and _list_of_dicts(row[c])]
    if not lists:
        return ds
    if len(lists) > 1:
        preferred = [c for c in ("data", "train", "examples", "rows", "items", "instances") if c in lists]
        if not preferred:
            raise StudioError(f"{path}: the file holds several lists ({', '.join(lists)}); "
                              "cannot tell which one holds the examples",
                              hint="keep only the list of examples in the file, or write it as JSON Lines")
        lists = preferred[:1]
    try:
        out = datasets.load_dataset("json", data_files=str(path), field=lists[0], split="train", cache_dir=cache)
    except Exception as e:
        raise _diagnose(path, "json", e) from None
    notes.append(f"examples read from the list '{lists[0]}'")
    return out


def _formats_expected() -> str:
    return ("instruction (instruction, input, output), chat (messages, or ShareGPT conversations), "
            "prompt-completion (prompt, completion; or question, answer) or text (text)")


def detect_format(columns: Sequence[str], first_row: Mapping[str, Any] | None = None) -> tuple[str, dict[str, str]]:
    """The format of a dataset from its column names (and first row), with the field mapping found.

    Checked in order: chat (a ``messages`` or ``conversations`` column holding a list), instruction
    (``instruction`` and ``output``/``response``), prompt-completion (``prompt``/``question``/``query``
    and ``completion``/``answer``/``response``), text (``text``). Raises :class:`StudioError` listing
    the columns found and the formats expected when none fits.
    """
    cols = list(columns)
    for fmt in ("chat", "instruction", "prompt-completion", "text"):
        found = _match(fmt, cols, {})
        if all(r in found for r in REQUIRED[fmt]):
            if fmt == "chat" and first_row is not None:
                value = first_row.get(found["messages"])
                if not isinstance(value, (list, str)):
                    continue
            return fmt, found
    raise StudioError(f"cannot tell the dataset's format from its columns ({', '.join(map(str, cols)) or 'none'}); "
                      f"expected {_formats_expected()}",
                      hint="name the format with --format and map columns with --fields, e.g. "
                           "--fields instruction=question,output=answer",
                      window_hint="choose below which column is the prompt and which the answer (Fields), "
                                  "or pick the format")


def _match(fmt: str, cols: Sequence[str], given: Mapping[str, str]) -> dict[str, str]:
    """The format's fields -> columns: the given mapping first, then the synonyms found in ``cols``."""
    found = dict(given)
    taken = set(given.values())
    lower = {str(c).lower(): c for c in cols}
    for role, names in FIELDS[fmt].items():
        if role in found:
            continue
        for name in names:
            col = lower.get(name)
            if col is not None and col not in taken:
                found[role] = col
                taken.add(col)
                break
    return found


def resolve_fields(fmt: str, columns: Sequence[str], fields: Mapping[str, str] | None = None,
                   first_row: Mapping[str, Any] | None = None, *, where: str = "") -> tuple[str, dict[str, str]]:
    """The format and field mapping for a dataset: detected (``fmt="auto"``), or checked and completed
    from the user's ``fields`` mapping. Every error names the option to change."""
    prefix = f"{where}: " if where else ""
    fields = dict(fields or {})
    cols = list(columns)
    if fmt not in ("auto", *FORMATS):
        raise StudioError(f"--format: '{fmt}' is not one of auto, {', '.join(FORMATS)}")
    if fmt == "auto" and fields:
        # the roles named in --fields usually say the format (output= means instruction, ...)
        owners = [f for f in FORMATS if set(fields) - {"system"} and set(fields) - {"system"} <= set(FIELDS[f])]
        if len(owners) == 1:
            fmt = owners[0]
    if fmt == "auto":
        try:
            detected = detect_format(cols, first_row)
        except StudioError as e:
            raise StudioError(prefix + e.message, hint=e.hint, window_hint=e.window_hint) from None
        if not fields:
            return detected
        fmt = detected[0]  # then check the user's mapping against that format below
    for role, col in fields.items():
        if role not in FIELDS[fmt]:
            raise StudioError(f"--fields: '{role}' is not a field of the {fmt} format "
                              f"(its fields: {', '.join(FIELDS[fmt])})")
        if col not in cols:
            raise StudioError(f"{prefix}--fields {role}={col}: no column '{col}' "
                              f"(columns found: {', '.join(map(str, cols)) or 'none'})")
    found = _match(fmt, cols, fields)
    missing = [r for r in REQUIRED[fmt] if r not in found]
    if missing:
        tried = "; ".join(f"{r}: tried {', '.join(FIELDS[fmt][r])}" for r in missing)
        raise StudioError(f"{prefix}the {fmt} format needs the field(s) {', '.join(missing)} ({tried}); "
                          f"columns found: {', '.join(map(str, cols)) or 'none'}. Formats expected: "
                          f"{_formats_expected()}",
                          hint=f"map a column with --fields {missing[0]}=COLUMN",
                          window_hint=f"choose the column that holds the {missing[0]} under Fields")
    return fmt, found


def parse_fields(text: str | None) -> dict[str, str]:
    """``"output=answer,instruction=question"`` -> ``{"output": "answer", "instruction": "question"}``."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        role, sep, col = part.partition("=")
        if not sep or not role.strip() or not col.strip():
            raise StudioError(f"--fields: '{part}' is not field=column (e.g. output=answer)")
        out[role.strip()] = col.strip()
    return out


def read(path: str | os.PathLike, *, format: str = "auto", fields: Mapping[str, str] | None = None,
         split: str | None = None, subset: str | None = None) -> Source:
    """Read a dataset file or ``save_to_disk`` folder, or a Hub dataset ``org/name`` (its ``split`` and
    ``subset``: core.hub_datasets), and work out its format and fields.

    Raises :class:`StudioError` naming the file (and the line, for malformed JSON and bad encodings)."""
    spec, path = str(path), Path(path).expanduser()
    if not path.exists():
        from core import hub_datasets

        if not hub_datasets.is_hub_dataset(spec):
            raise StudioError(f"{path}: no such file or folder")
        ds, notes = hub_datasets.load(spec, split, subset)
    elif split or subset:
        raise StudioError(f"--data-{'split' if split else 'config'}: only for a dataset on the Hub (org/name); "
                          f"{path} is on this machine", hint="leave it out")
    else:
        ds, notes = _load(path, fields)
    if ds.num_rows == 0:
        raise StudioError(f"{path}: the file has no examples")
    columns = list(ds.column_names)
    try:
        first = ds[0]
    except (ValueError, OSError) as e:  # a damaged arrow file (save_to_disk): bad UTF-8, torn buffers
        raise StudioError(f"{path}: the first row cannot be read ({safeio.first_line(e)})",
                          hint="write the dataset again") from None
    fmt, mapping = resolve_fields(format, columns, fields, first, where=str(path))
    return Source(path=path, dataset=ds, format=fmt, fields=mapping, columns=columns, rows=ds.num_rows,
                  notes=notes)
