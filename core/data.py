"""Datasets: from a file on disk to token ids and labels ready to train on.

The path of one example::

    file ──read()──▶ Source (a memory-mapped datasets.Dataset + format + field mapping)
         ──encode()─▶ Encoded(input_ids, labels)   one row, rendered and tokenised
         ──prepare()▶ Prepared(train, val, stats, problems)   all rows, split, optionally packed
         ──collate()▶ {"input_ids", "labels", "attention_mask"}   one padded batch

**Reading.** ``.jsonl``, ``.json`` (a list of objects, or an object holding one such list, e.g.
``{"data": [...]}``), ``.csv``/``.tsv``, ``.parquet``, ``.txt`` and ``save_to_disk`` folders are read
through the ``datasets`` library into Arrow files under ``studio_home()/cache/datasets`` and
memory-mapped, so a million-row file never becomes a million Python dicts. A ``.txt`` file is one
example per *paragraph* (blank-line separated) when it contains a blank line between two pieces of
text, else one example per *line*: a poem or a function stays whole, and a file of one-liners works
too. When ``datasets`` fails, the file is diagnosed cheaply afterwards (only then) to name what is
wrong: the line and byte offset of a non-UTF-8 byte, the ``file:line`` of a malformed JSON line.

**Formats** (``detect_format``; overridable with ``format`` and a ``fields`` mapping from a format's
fields to the file's columns):

=================  =====================================================  ========================
format             fields (synonyms detected automatically)               becomes
=================  =====================================================  ========================
chat               messages (or conversations: ShareGPT's from/value,      the conversation
                   human/gpt/system mapped to user/assistant/system)
instruction        instruction; input (context); output (response);        user: instruction +
                   system                                                  input; assistant: output
prompt-completion  prompt (question, query); completion (answer,           user: prompt;
                   response); system                                       assistant: completion
text               text                                                    all of it is trained
=================  =====================================================  ========================

**Rendering.** Conversations are rendered with the tokenizer's chat template where it has one. Each
assistant turn is located as the text between ``render(turns before it, add_generation_prompt=True)``
and ``render(turns up to it)``, after checking that each is a prefix of the next (a template that
renders history differently, like those that drop earlier reasoning, has those turns kept as context
but not trained). The whole conversation is tokenised once, exactly as at inference, and each token
is trained when it *starts* inside an answer span (character offsets from the fast tokenizer). A
tokenizer without a chat template gets a documented plain template (:data:`PLAIN_TEMPLATE`)::

    {system}\\n\\n                        (only when there is a system message)
    ### Instruction:\\n{user}\\n\\n
    ### Response:\\n{assistant}{eos}      (the answer and the EOS are trained)
    \\n\\n### Instruction:\\n...          (further turns)

A ``prompt-completion`` row without a chat template is the raw concatenation ``prompt + completion +
eos`` (what prompt/completion means for a base model); a ``text`` row is ``text + eos``, all trained.

**End of turn.** Every answer ends in a trained end-of-turn token: the template's own (ChatML's
``<|im_end|>``, Llama 3's ``<|eot_id|>``, Gemma's ``<end_of_turn>``, or EOS), found in the answer span;
anything after it in the span (ChatML's trailing newline) is not trained. A template that writes no
such token gets the EOS inserted after the answer. A model that never sees a trained stop token never
learns to stop, the most common complaint about fine-tuning tools.

**Labels** are -100 on everything but the answers (``train_on_prompt`` trains every token).
Examples longer than ``max_length`` are cut and counted; one whose answer is cut away entirely is
skipped and reported. Rows with an empty answer, no assistant turn, an unknown role or a value of the
wrong type are skipped and listed in ``Prepared.problems`` with their row numbers (1-based, in file
order), so one bad row in ten thousand does not stop a run; a file in which no row is usable is an
error.

**Packing** (optional, training split only): whole examples in sequences of at most ``max_length``
tokens, each example's positions and attention its own (core.packing). The validation split is never
packed, so its loss compares across runs with and without packing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from core import chat, data_encode, dataset_cache
from core.chat import END_OF_TURN, end_of_turn_ids  # noqa: F401  (the one list lives in core.chat)
from core.encoded import IGNORE, Encoded, EncodedSet, SetBuilder  # noqa: F401  (core.data's public names)
from core.errors import Cancelled, StudioError
from core.packing import collate, pack  # noqa: F401  (collate: core.data's public name)
from core.home import sample_dataset, studio_home
from core import safeio

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

ROLES = {"user": "user", "human": "user", "system": "system", "assistant": "assistant", "gpt": "assistant",
         "bot": "assistant", "model": "assistant", "chatgpt": "assistant"}
"""Message roles accepted in chat data (lower-cased), mapped to the chat template's three roles."""

PLAIN_TEMPLATE = {"system": "{content}\n\n", "user": "### Instruction:\n{content}\n\n",
                  "assistant": "### Response:\n", "between": "\n\n"}
"""The template for tokenizers without a chat template: see the module docstring."""

CHUNK = 256
"""Rows tokenised per batch in :func:`prepare`: progress and cancel are checked between chunks."""

Progress = Callable[[int, int], None]


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


@dataclass
class Prepared:
    """A dataset tokenised, split and (optionally) packed: what the trainer consumes."""

    train: EncodedSet
    """Training examples (or, with packing, packed sequences); ``train[i]`` is an :class:`Encoded`."""
    val: EncodedSet
    """Validation examples (empty without ``val_split``); never packed."""
    format: str
    fields: dict[str, str]
    stats: dict
    """``examples``, ``train_examples``, ``val_examples``, ``train_sequences`` (after packing),
    ``tokens``, ``trained_tokens``, ``truncated``, ``skipped``, ``lengths`` (:func:`token_stats` of the
    examples' lengths, before packing) and ``max_length``."""
    truncated: int
    problems: list[str]
    """Rows skipped and why, grouped, with row numbers; and warnings about the options."""
    source: Source | None = None
    example: Encoded | None = None
    """The first usable row in file order, encoded (what ``lora-studio data`` shows)."""


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


# -- one row -> a conversation --------------------------------------------------------------------

class RowProblem(StudioError):
    """A row that cannot be trained on (empty answer, wrong type, ...); :func:`prepare` skips and
    lists it, :func:`encode` raises it."""


def _text(value, field_name: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "" if isinstance(value, float) and math.isnan(value) else str(value)
    raise RowProblem(f"field '{field_name}' is {type(value).__name__}, expected text")


def _content(value) -> str:
    """A message's content: text, or the text parts of a list of parts (``[{"type": "text", ...}]``)."""
    if isinstance(value, list):
        return "".join(p.get("text") or "" for p in value if isinstance(p, dict))
    return _text(value, "content")


def _messages(value, column: str) -> list[dict[str, str]]:
    """A chat column's value as ``[{"role", "content"}]`` with roles mapped to user/assistant/system."""
    if isinstance(value, str):  # CSV cells hold the list as JSON text
        try:
            value = safeio.loads(value, f"field '{column}'")
        except StudioError:
            raise RowProblem(f"field '{column}' is text, expected a list of messages") from None
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise RowProblem(f"field '{column}' is not a list of messages")
    out = []
    for m in value:
        role = m.get("role") if m.get("role") is not None else m.get("from")
        content = m.get("content") if m.get("content") is not None else m.get("value")
        if role is None:
            raise RowProblem(f"a message has no 'role' (or ShareGPT 'from'); its keys: "
                             f"{', '.join(k for k, v in m.items() if v is not None)}")
        mapped = ROLES.get(str(role).lower())
        if mapped is None:
            raise RowProblem(f"unknown role '{role}' (expected user, assistant or system; ShareGPT's human, gpt)")
        out.append({"role": mapped, "content": _content(content)})
    return out


def _conversation(example: Mapping[str, Any], fmt: str, fields: Mapping[str, str]) -> list[dict[str, str]]:
    """Any conversational format as a list of messages ending with an assistant turn."""
    if fmt == "chat":
        msgs = _messages(example.get(fields["messages"]), fields["messages"])
    else:
        get = (lambda role: _text(example.get(fields[role]), fields[role]) if role in fields else "")
        if fmt == "instruction":
            user = get("instruction").strip()
            extra = get("input").strip()
            user = f"{user}\n\n{extra}" if extra else user
            answer = get("output")
        else:
            user, answer = get("prompt"), get("completion")
        system = get("system")
        msgs = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    while msgs and msgs[-1]["role"] != "assistant":  # trailing questions teach nothing
        msgs.pop()
    if not msgs:
        raise RowProblem("no assistant turn")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
        raise RowProblem("empty answer")
    return msgs


# -- rendering: text plus the character spans to train --------------------------------------------

def _has_template(tokenizer) -> bool:
    return chat.has_template(tokenizer)


def _bos_text(tokenizer) -> str:
    """The BOS token's text when the tokenizer puts one in front of plain text, else ''."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return ""
    with_special = tokenizer("a")["input_ids"]
    return tokenizer.bos_token if with_special[:1] == [bos] else ""


def _eos_text(tokenizer) -> str:
    if tokenizer.eos_token is None:
        raise StudioError("the tokenizer has no end-of-sequence token, so the model could not learn to stop",
                          hint="choose a model whose tokenizer defines eos_token")
    return tokenizer.eos_token


def _render(tokenizer, messages, generation: bool) -> str:
    return chat.render(tokenizer, messages, generation)


def format_prompt(tokenizer, messages: Sequence[Mapping[str, str]]) -> str:
    """The text to generate an answer from: the conversation so far, ending where the assistant's
    answer starts, rendered exactly as in training (chat template or :data:`PLAIN_TEMPLATE`, BOS
    included where training has one). Tokenise it with ``add_special_tokens=False``, or use
    :func:`prompt_ids`."""
    msgs = [{"role": ROLES.get(str(m["role"]).lower(), m["role"]), "content": m["content"]} for m in messages]
    if _has_template(tokenizer):
        return _render(tokenizer, msgs, True)
    text, _ = _plain(tokenizer, msgs + [{"role": "assistant", "content": ""}], _bos_text(tokenizer))
    return text[: len(text) - len(_eos_text(tokenizer))]


def prompt_ids(tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """:func:`format_prompt` as token ids: the same ids a training example has before its answer."""
    return list(tokenizer(format_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"])


def _plain(tokenizer, messages, bos: str) -> tuple[str, list[tuple[int, int]]]:
    """Render with :data:`PLAIN_TEMPLATE`: (text, spans of the answers including their EOS)."""
    eos = _eos_text(tokenizer)
    parts = [bos]
    spans = []
    pos = len(bos)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            head = PLAIN_TEMPLATE["assistant"]
            parts.append(head)
            pos += len(head)
            answer = m["content"] + eos
            parts.append(answer)
            spans.append((pos, pos + len(answer)))
            pos += len(answer)
            if i < len(messages) - 1:
                parts.append(PLAIN_TEMPLATE["between"])
                pos += len(PLAIN_TEMPLATE["between"])
        else:
            piece = PLAIN_TEMPLATE[m["role"]].format(content=m["content"])
            parts.append(piece)
            pos += len(piece)
    return "".join(parts), spans


def _with_template(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    """Render with the chat template: (text, spans of the assistant turns that can be trained), by
    :func:`core.chat.answer_spans`; a conversation it cannot train is a :class:`RowProblem`."""
    try:
        return chat.answer_spans(tokenizer, messages)
    except chat.TemplateProblem as e:
        raise RowProblem(str(e)) from None


def _rendered(example, tokenizer, fmt, fields, bos: str) -> tuple[str, list[tuple[int, int]], bool]:
    """(text, answer spans, template) for one row; ``template``: spans came from a chat template."""
    if fmt == "text":
        text = _text(example.get(fields["text"]), fields["text"])
        if not text.strip():
            raise RowProblem("empty text")
        full = bos + text + _eos_text(tokenizer)
        return full, [(len(bos), len(full))], False
    if fmt == "prompt-completion" and not _has_template(tokenizer):
        prompt = _text(example.get(fields["prompt"]), fields["prompt"])
        answer = _text(example.get(fields["completion"]), fields["completion"])
        if not answer.strip():
            raise RowProblem("empty answer")
        head = bos + prompt
        full = head + answer + _eos_text(tokenizer)
        return full, [(len(head), len(full))], False
    messages = _conversation(example, fmt, fields)
    if _has_template(tokenizer):
        text, spans = _with_template(tokenizer, messages)
        return text, spans, True
    text, spans = _plain(tokenizer, messages, bos)
    return text, spans, False


def _labels_for(ids: list[int], offsets, spans, end_ids: set[int], eos_id: int | None,
                template: bool, text: str = "") -> tuple[list[int], list[int]]:
    """Token labels from character spans: a token is trained when it starts inside a span. In each
    span, the answer ends at its end-of-turn token (:func:`core.chat.answer_end`: what follows it is
    not trained); a template span with no such token gets the EOS inserted after its last token."""
    trained = [False] * len(ids)
    inserts: list[int] = []
    k = 0
    n = len(ids)
    def blank(j: int) -> bool:  # white space only (ChatML's "\n" after <|im_end|>); asked only at a span's tail
        return bool(text) and not text[offsets[j][0]:offsets[j][1]].strip()

    for a, b in spans:
        while k < n and offsets[k][0] < a:
            k += 1
        first = k
        while k < n and offsets[k][0] < b:
            k += 1
        members = range(first, k)
        if not members:
            continue
        last_end = chat.answer_end(ids, first, k, end_ids, blank)
        if last_end is None:
            stop = k
            if template and eos_id is not None:
                inserts.append(stop)  # the template wrote no stop token: teach one anyway
        else:
            stop = last_end + 1
        for j in range(first, stop):
            trained[j] = True
    labels = [t if m else IGNORE for t, m in zip(ids, trained)]
    for at in reversed(inserts):
        ids = ids[:at] + [eos_id] + ids[at:]
        labels = labels[:at] + [eos_id] + labels[at:]
    return ids, labels


def _tokenize(tokenizer, texts: list[str]) -> tuple[list[list[int]], list]:
    """Token ids and character offsets for many texts in one call of the fast tokenizer."""
    if getattr(tokenizer, "is_fast", False):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and backend.truncation is None and backend.padding is None:
            # straight to the Rust tokenizer: the same ids and offsets as tokenizer(...), without the
            # wrapper's "longer than the maximum length" warning for examples we cut ourselves
            encs = backend.encode_batch(texts, add_special_tokens=False)
            return [e.ids for e in encs], [e.offsets for e in encs]
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]
    raise StudioError("this tokenizer is not a fast (Rust) tokenizer, which LoRA Studio needs to find the "
                      "answer's tokens", hint="give the model folder a tokenizer.json")


def _encode_many(examples: Sequence[Mapping[str, Any]], tokenizer, fmt: str, fields: Mapping[str, str], *,
                 max_length: int, train_on_prompt: bool = False,
                 end_ids: set[int] | None = None) -> list[Encoded | RowProblem]:
    """Encode rows in one tokenizer call; a row that cannot be trained is a :class:`RowProblem`.
    ``end_ids``: end_of_turn_ids(tokenizer), given once for many calls (it reads the whole vocabulary)."""
    bos = _bos_text(tokenizer)
    end_ids = set(end_of_turn_ids(tokenizer)) if end_ids is None else end_ids
    eos_id = tokenizer.eos_token_id
    rendered: list[Any] = []
    for ex in examples:
        try:
            rendered.append(_rendered(ex, tokenizer, fmt, fields, bos))
        except RowProblem as e:
            rendered.append(e)
    texts = [r[0] for r in rendered if not isinstance(r, RowProblem)]
    all_ids, all_offsets = _tokenize(tokenizer, texts) if texts else ([], [])
    out: list[Encoded | RowProblem] = []
    t = 0
    for r in rendered:
        if isinstance(r, RowProblem):
            out.append(r)
            continue
        text, spans, template = r
        ids, labels = _labels_for(list(all_ids[t]), all_offsets[t], spans, end_ids, eos_id, template, text)
        t += 1
        if train_on_prompt:
            labels = list(ids)
        truncated = len(ids) > max_length
        if truncated:
            ids, labels = ids[:max_length], labels[:max_length]
        if all(x == IGNORE for x in labels):
            out.append(RowProblem(f"the prompt alone fills --max-length {max_length}; nothing left to train"))
            continue
        out.append(Encoded(ids, labels, truncated))
    return out


def encode(example: Mapping[str, Any], tokenizer, fmt: str, fields: Mapping[str, str], *, max_length: int,
           train_on_prompt: bool = False, chat_template: str = "auto") -> Encoded:
    """Render one row and tokenise it: ``input_ids`` and ``labels`` (-100 except on the answers and
    their end-of-turn token, or everywhere with ``train_on_prompt``), cut at ``max_length``;
    ``chat_template`` as ``DataConfig.chat_template``.

    Raises :class:`RowProblem` (a :class:`StudioError`) for a row that cannot be trained on."""
    tokenizer = chat.with_template(tokenizer, chat_template)
    result = _encode_many([example], tokenizer, fmt, fields, max_length=max_length,
                          train_on_prompt=train_on_prompt)[0]
    if isinstance(result, RowProblem):
        raise result
    return result


# -- the whole dataset ----------------------------------------------------------------------------

def _rows_text(rows: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(r + 1) for r in rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def prepare(cfg, tokenizer, *, seed: int = 42, progress: Progress | None = None,
            cancel: Callable[[], bool] | None = None, source: Source | None = None,
            workers: int | None = None) -> Prepared:
    """Read ``cfg.path`` (the sample dataset when empty), split it by ``seed``, tokenise every row and
    pack if asked.

    ``cfg`` is a :class:`core.config.DataConfig`. ``progress(done, total)`` is called with rows done
    after each chunk of :data:`CHUNK` rows; ``cancel()`` is asked before each and a true answer raises
    :class:`core.errors.Cancelled`. A ``source`` already read can be passed to skip reading again.
    The split is by row (``round(rows * val_split)`` held out, chosen by ``seed``), independent of the
    tokenizer, so the same file and seed hold out the same rows for every model. ``workers``:
    processes that tokenise (default: core.data_encode.default_workers, one below 50,000 rows).
    """
    if source is None:
        source = read(cfg.path or sample_dataset(), format=cfg.format, fields=cfg.fields,
                      split=getattr(cfg, "split", "") or None, subset=getattr(cfg, "subset", "") or None)
    tokenizer = chat.with_template(tokenizer, getattr(cfg, "chat_template", "auto"))
    staged = dataset_cache.Staged(dataset_cache.key(source, tokenizer, cfg, seed))
    cached = staged.load()  # the same data, tokenizer and options seen before: no tokenising at all
    if cached is not None:
        return Prepared(source=source, **cached)
    try:
        result = _prepare_into(staged, cfg, tokenizer, seed, progress, cancel, source, workers)
    except BaseException:
        staged.discard()
        raise
    staged.store(result)
    return result


def _prepare_into(staged, cfg, tokenizer, seed, progress, cancel, source, workers) -> Prepared:
    """prepare's work when nothing is cached: every row tokenised into ``staged``'s files."""
    n = source.rows
    val_split = float(cfg.val_split or 0.0)
    n_val = int(round(n * val_split)) if val_split > 0 else 0
    if val_split > 0 and n_val == 0:
        raise StudioError(f"--val-split {val_split:g}: {source.path} has {n} examples, so the validation split "
                          "would be empty", hint=f"use at least {1.5 / n:.2g}, or more data")
    if n_val >= n:
        raise StudioError(f"--val-split {val_split:g}: {source.path} has {n} examples, so the training split "
                          "would be empty", hint="use a smaller fraction")
    is_val = np.zeros(n, bool)
    if n_val:
        is_val[np.random.default_rng(seed).permutation(n)[:n_val]] = True

    end_ids = set(end_of_turn_ids(tokenizer))  # once, not per chunk: it reads the whole vocabulary

    def encode(start: int, stop: int) -> list[Encoded | RowProblem]:
        try:
            batch = source.dataset[start:stop]  # columns -> lists, only for this chunk
        except (ValueError, OSError) as e:  # a damaged arrow file (save_to_disk): bad UTF-8, torn buffers
            raise StudioError(f"{source.path}: rows {start + 1}-{stop} cannot be read ({safeio.first_line(e)})",
                              hint="write the dataset again") from None
        rows = [{c: batch[c][i] for c in batch} for i in range(stop - start)]
        return _encode_many(rows, tokenizer, source.format, source.fields, end_ids=end_ids,
                            max_length=cfg.max_length, train_on_prompt=cfg.train_on_prompt)

    # on disk as it goes (memory stays flat); a large dataset in several processes
    train, val, problems, first = data_encode.encode_rows(
        encode, n, CHUNK, is_val, staged, progress=progress, cancel=cancel,
        workers=data_encode.default_workers(n) if workers is None else workers)
    notes = []
    for msg, rows in list(problems.items())[:20]:
        notes.append(f"{len(rows)} row{'s' if len(rows) != 1 else ''} skipped ({msg}): row{'s' if len(rows) != 1 else ''} "
                     f"{_rows_text(rows)}")
    if len(problems) > 20:
        notes.append(f"... and {len(problems) - 20} more kinds of problem")
    skipped = sum(len(v) for v in problems.values())
    if len(train) == 0:
        raise StudioError(f"{source.path}: no example left to train on"
                          + (f": {'; '.join(notes)}" if notes else ""))
    if n_val and len(val) == 0:
        raise StudioError(f"--val-split {val_split:g}: every validation row of {source.path} was skipped"
                          + (f": {'; '.join(notes)}" if notes else ""))
    ctx = getattr(tokenizer, "model_max_length", None)
    if isinstance(ctx, int) and 0 < ctx < cfg.max_length:
        notes.append(f"--max-length {cfg.max_length} is beyond the model's context length ({ctx})")

    lengths = np.concatenate([train.lengths, val.lengths])
    truncated = int(train.truncated.sum() + val.truncated.sum())
    stats = {
        "examples": len(train) + len(val), "train_examples": len(train), "val_examples": len(val),
        "tokens": train.tokens + val.tokens, "trained_tokens": train.trained_tokens + val.trained_tokens,
        "truncated": truncated, "skipped": skipped, "max_length": cfg.max_length,
        "lengths": token_stats(lengths),
    }
    if cfg.packing:
        train = pack(train, cfg.max_length)
    stats["train_sequences"] = len(train)
    stats["packed"] = bool(cfg.packing)
    return Prepared(train=train, val=val, format=source.format, fields=dict(source.fields), stats=stats,
                    truncated=truncated, problems=notes, source=source, example=first)


# -- batches and statistics -----------------------------------------------------------------------

def token_stats(lengths, bins: int = 20) -> dict:
    """count, min, max, mean, p50, p90, p99 of example lengths, and a histogram's ``edges`` (bins + 1)
    and ``counts`` (bins) for the window to draw."""
    a = np.asarray(lengths, dtype=np.int64).ravel()
    if a.size == 0:
        return {"count": 0, "min": 0, "max": 0, "mean": 0.0, "p50": 0, "p90": 0, "p99": 0,
                "histogram": {"edges": [], "counts": []}}
    lo, hi = int(a.min()), int(a.max())
    width = -(-(hi - lo + 1) // bins)  # whole tokens per bin, so every bin is "from n to m tokens"
    edges = lo + width * np.arange(-(-(hi - lo + 1) // width) + 1)
    counts, _ = np.histogram(a, bins=edges)
    pct = lambda q: int(np.percentile(a, q, method="nearest"))  # noqa: E731 — a length, not between two
    return {"count": int(a.size), "min": lo, "max": hi, "mean": round(float(a.mean()), 2),
            "p50": pct(50), "p90": pct(90), "p99": pct(99),
            "histogram": {"edges": [int(e) for e in edges], "counts": [int(c) for c in counts]}}


def render_marked(encoded: Encoded, tokenizer) -> list[tuple[str, bool]]:
    """The example as text pieces, each with whether its tokens are trained; special tokens
    (``<|im_end|>``) are kept visible. Consecutive tokens of the same kind are decoded together."""
    pieces: list[tuple[str, bool]] = []
    ids, labels = list(encoded.input_ids), list(encoded.labels)
    i = 0
    while i < len(ids):
        trained = labels[i] != IGNORE
        j = i
        while j < len(ids) and (labels[j] != IGNORE) == trained:
            j += 1
        text = tokenizer.decode(ids[i:j], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        pieces.append((text, trained))
        i = j
    return pieces


UNDERLINE = ("\x1b[4m", "\x1b[24m")
BRACKETS = ("⟦", "⟧")


def render_text(encoded: Encoded, tokenizer, *, style: str = "auto", stream=None) -> str:
    """:func:`render_marked` as plain text for a terminal: trained pieces underlined (``style="ansi"``)
    or between ⟦ ⟧ (``"brackets"``); ``"auto"`` underlines when ``stream`` (stdout) is a terminal."""
    if style == "auto":
        stream = stream if stream is not None else sys.stdout
        style = "ansi" if getattr(stream, "isatty", lambda: False)() else "brackets"
    on, off = UNDERLINE if style == "ansi" else BRACKETS
    out = []
    for text, trained in render_marked(encoded, tokenizer):
        if not trained:
            out.append(text)
        elif style == "ansi":  # underline line by line, so a terminal never carries it past a newline
            out.append("\n".join(f"{on}{line}{off}" if line else line for line in text.split("\n")))
        else:
            out.append(f"{on}{text}{off}")
    return "".join(out)
