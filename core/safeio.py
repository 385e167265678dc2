"""Bounded readers for files the studio did not write: JSON with a nesting cap, size caps.

Python's ``json`` parses a file nested a few thousand levels deep into a ``RecursionError`` (and one
nested a few hundred levels deep into a value that the next recursive walker, ours or a library's,
overflows on); a number of 5,000 digits into a ``ValueError``; a file of gigabytes into memory. Every
JSON file a user can hand the studio (run configs, adapter and model configs, studio.json, the
library's entries, dataset lines) goes through :func:`loads` or :func:`read_json`, which turn each of
these into one :class:`StudioError` naming the file (and line) and what is wrong.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from core.errors import StudioError

MAX_DEPTH = 100
"""Deepest nesting of arrays and objects accepted. Real files nest a handful of levels (a chat
dataset's row: object, list of messages, message, content parts: 4); 100 leaves room for any honest
file and stays far below the interpreter's recursion limit (1000) for whatever walks the value."""

MAX_JSON_BYTES = 64 * 2**20
"""Largest JSON file read whole (configs, entries, headers). Datasets are streamed, not read whole."""


class NestingError(StudioError):
    """A JSON value nested deeper than :data:`MAX_DEPTH`."""


def depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """The nesting depth of a parsed JSON value (a scalar is 0, ``[]`` is 1), counted without recursion;
    stops counting at ``limit + 1``."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            children = v.values()
        elif isinstance(v, (list, tuple)):
            children = v
        else:
            continue
        if d > deepest:
            deepest = d
            if deepest > limit:
                return deepest
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list, tuple)))
    return deepest


def too_deep(where: str, limit: int = MAX_DEPTH) -> NestingError:
    """The error for a value nested deeper than ``limit`` in ``where``."""
    return NestingError(f"{where}: JSON nested more than {limit} levels deep; the studio reads at most "
                        f"{limit} levels (is the file damaged?)")


def loads(text: str | bytes, where: str, *, max_depth: int = MAX_DEPTH, lineno: int | None = None) -> Any:
    """``json.loads`` that raises only :class:`StudioError`: invalid JSON names ``where``, the line and
    the column; nesting deeper than ``max_depth`` and numbers too long to convert are refused.

    ``lineno``: the text is that line of ``where`` (a JSON Lines file); messages say ``where:lineno:``."""
    if lineno is not None:
        where = f"{where}:{lineno}"
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise StudioError(f"{where}: not UTF-8 text (byte {e.start})",
                              hint="save the file with UTF-8 encoding") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise too_deep(where, max_depth) from None
    except json.JSONDecodeError as e:
        at = "" if lineno is not None else f" line {e.lineno}:"
        raise StudioError(f"{where}:{at} not valid JSON ({e.msg}, column {e.colno})") from None
    except ValueError as e:  # e.g. an integer of more than 4,300 digits
        raise StudioError(f"{where}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if depth(value, max_depth) > max_depth:
        raise too_deep(where, max_depth)
    return value


def read_json(path: str | os.PathLike, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH,
              where: str | None = None) -> Any:
    """Read and parse a whole JSON file through :func:`loads`, refusing one over ``max_bytes``.

    ``where`` names the file in messages (default: its path). A missing file, a folder or an
    unreadable file is a :class:`StudioError` too."""
    path = Path(path)
    where = where or str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise StudioError(f"{where}: {size:,} bytes is too large for this JSON file "
                                  f"(at most {max_bytes:,})")
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise StudioError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise StudioError(f"{where}: is a folder, not a JSON file") from None
    except OSError as e:
        raise StudioError(f"{where}: cannot be read ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise StudioError(f"{where}: too large for this JSON file (at most {max_bytes:,} bytes)")
    return loads(data, where, max_depth=max_depth)


def read_json_object(path: str | os.PathLike, **kw) -> dict:
    """:func:`read_json` of a file that must hold one JSON object."""
    value = read_json(path, **kw)
    if not isinstance(value, dict):
        raise StudioError(f"{kw.get('where') or path}: expected a JSON object, found "
                          f"{'a list' if isinstance(value, list) else type(value).__name__}")
    return value


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message cut to its first line (a library's message can run to pages)."""
    text = str(e).strip()
    return (text.splitlines()[0][:limit] if text else "") or type(e).__name__
