"""The fuzz harness: a byte mutator over real seed files, and the check every hostile input must pass.

A case passes when the studio's entry point (a CLI command through ``studio.cli.run``, or a core call)
either succeeds or ends with our one-line error (:class:`core.errors.StudioError`), and

* no other exception escapes (no traceback, no ``RecursionError``, ``MemoryError``, ``OverflowError``);
* on the command line, stderr holds one ``error: ...`` line and no "Traceback";
* it finishes within a time bound (a file cannot make the studio hang);
* nothing is written outside the places it was told to write (the case folder is snapshotted).

Used by tests/test_fuzz*.py (a few fixed-seed cases per reader) and by benchmarks/fuzz.py (many).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import random
import re
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# -- the mutator -----------------------------------------------------------------------------------

INTERESTING = [
    b"[" * 5000, b"{\"a\":" * 3000, b"-1", b"0", b"1e309", b"-1e309", b"NaN", b"Infinity", b"9" * 5000,
    b"18446744073709551615", b"4294967296", b"2147483648", b"-2147483649", b"\x00", b"\xff\xfe", b"\xef\xbb\xbf",
    b"\"", b"\\", b"\\u0000", b"\\ud800", b"\n", b"\r\n", b"\t", b",", b":", b"null", b"true", b"[]", b"{}",
    b"\"\"", b"../../", b"/etc/passwd", b"\xc3\x28", b"\xf0\x28\x8c\x28", b"A" * 70000,
]




def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


TEXT_TOKENS = [t.decode("utf-8") for t in INTERESTING if _utf8(t)]


def mutate_text(data: bytes, rng: random.Random) -> bytes:
    """Like :func:`mutate`, but every edit keeps the file valid UTF-8 (so the parser behind the
    decoder is reached): ASCII insertions and overwrites, UTF-8 tokens, ranges cut at character
    boundaries."""
    text = data.decode("utf-8", errors="replace")
    for _ in range(rng.randint(1, 4)):
        n = len(text)
        at = rng.randrange(n + 1) if n else 0
        op = rng.randrange(6)
        if op == 0:
            text = text[:at] + "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randint(1, 6))) + text[at:]
        elif op == 1 and n:
            text = text[:at] + text[at + rng.randint(1, 64):]
        elif op == 2 and n:
            j = rng.randrange(n)
            text = text[:at] + text[j:j + rng.randint(1, 256)] + text[at:]
        elif op == 3:
            text = text[:at] + rng.choice(TEXT_TOKENS) + text[at:]
        elif op == 4 and n:
            text = text[:at] + rng.choice(TEXT_TOKENS) + text[at + rng.randint(1, 16):]
        elif n:
            text = text[:rng.randrange(n)]
    return text.encode("utf-8")


HOSTILE_VALUES = [None, True, False, 0, -1, 1, 2**31, 2**63, -2**63, 10**30, 1e308, -1e308, 1e-320, 0.5, "",
                  "x", "-1", "1e309", "NaN", "a" * 10000, [], {}, [None], [[]], {"": None}, ["q_proj", 3],
                  "../../etc", "/", ".*", "(a+)+$", "[", "\u0000", "\x00"]


def hostile_value(rng: random.Random):
    """A value of a wrong type or an absurd size for some field."""
    v = copy.deepcopy(rng.choice(HOSTILE_VALUES))  # never the list itself: a later edit would change it
    if rng.random() < 0.1:
        v = [v] * rng.choice([2, 1000])
    elif rng.random() < 0.05:
        for _ in range(rng.choice([5, 50, 150])):
            v = [v]
    return v


def mutate_json(data: bytes, rng: random.Random) -> bytes:
    """Parse ``data`` as JSON and set one to three fields anywhere in it (or new fields) to hostile
    values (:data:`HOSTILE_VALUES`), or delete them; falls back to :func:`mutate_text` if it is not JSON."""
    try:
        root = json.loads(data)
    except ValueError:
        return mutate_text(data, rng)
    for _ in range(rng.randint(1, 3)):
        holders = []
        stack = [root]
        while stack:
            v = stack.pop()
            if isinstance(v, dict) and v is not None:
                holders.append(v)
                stack.extend(v.values())
            elif isinstance(v, list):
                holders.append(v)
                stack.extend(v)
        if not holders:
            return json.dumps(hostile_value(rng)).encode()
        h = rng.choice(holders)
        if isinstance(h, dict):
            key = rng.choice(list(h) + ["extra"]) if h else "extra"
            if rng.random() < 0.15 and key in h:
                del h[key]
            else:
                h[key] = hostile_value(rng)
        elif h:
            h[rng.randrange(len(h))] = hostile_value(rng)
        else:
            h.append(hostile_value(rng))
    return json.dumps(root).encode()


def mutate_any(data: bytes, rng: random.Random, suffix: str = "") -> bytes:
    """Pick a mutator for a file: bytes, text (for text files) or fields (for JSON)."""
    r = rng.random()
    if suffix in (".json",) and r < 0.4:
        return mutate_json(data, rng)
    if suffix in (".json", ".jsonl", ".csv", ".tsv", ".txt") and r < 0.75:
        return mutate_text(data, rng)
    return mutate(data, rng)


def mutate(data: bytes, rng: random.Random, rounds: int | None = None) -> bytes:
    """``data`` changed by 1-4 random edits: flip bits, overwrite, insert or delete bytes, duplicate
    or drop a range, splice in an "interesting" token (deep nesting, huge numbers, bad UTF-8, ...),
    or truncate. Deterministic for a given ``rng`` state."""
    buf = bytearray(data)
    for _ in range(rounds or rng.randint(1, 4)):
        op = rng.randrange(8)
        n = len(buf)
        at = rng.randrange(n + 1) if n else 0
        if op == 0 and n:  # flip a bit
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # overwrite a byte
            buf[rng.randrange(n)] = rng.randrange(256)
        elif op == 2:  # insert random bytes
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 3 and n:  # delete a range
            buf[at:at + rng.randint(1, 64)] = b""
        elif op == 4 and n:  # duplicate a range
            j = rng.randrange(n)
            buf[at:at] = buf[j:j + rng.randint(1, 256)]
        elif op == 5:  # splice an interesting token
            buf[at:at] = rng.choice(INTERESTING)
        elif op == 6 and n:  # replace a range by an interesting token
            buf[at:at + rng.randint(1, 16)] = rng.choice(INTERESTING)
        elif n:  # truncate
            del buf[rng.randrange(n):]
    return bytes(buf)


# -- the check -------------------------------------------------------------------------------------

class Hang(BaseException):
    """Raised by the alarm when a case runs past its bound (a BaseException: no ``except Exception``
    in the studio swallows it)."""


@dataclass
class Outcome:
    """What one case did: ``ok``, ``error`` (our one line) or a failure (``crash``, ``hang``,
    ``stderr`` (more than one line, or a traceback), ``wrote`` (outside the case's targets))."""
    kind: str
    detail: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.kind not in ("ok", "error")


@contextlib.contextmanager
def _alarm(seconds: float):
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def ring(signum, frame):
        raise Hang(f"still running after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _snapshot(root: Path, allowed: list[Path]) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` outside the ``allowed`` folders: path -> (size, mtime_ns)."""
    allowed_s = [str(a.resolve()) for a in allowed]
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if any(dirpath == a or dirpath.startswith(a + os.sep) for a in allowed_s):
            dirnames[:] = []
            continue
        for name in filenames:
            p = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                st = os.lstat(p)
                out[p] = (st.st_size, st.st_mtime_ns)
    return out


def check(call: Callable[[], object], *, root: Path, writable: list[Path] = (), bound: float = 60.0,
          cli: bool = False) -> Outcome:
    """Run ``call()`` (a core call, or with ``cli`` a ``studio.cli.run`` returning an exit code) as
    one fuzz case and say what happened. ``root`` is the case's folder: nothing in it may change
    except under ``writable``. The working directory is ``root`` while the case runs."""
    from core.errors import StudioError

    root = Path(root).resolve()
    allowed = [Path(w) for w in writable]
    before = _snapshot(root, allowed)
    err = io.StringIO()
    cwd = os.getcwd()
    t0 = time.perf_counter()
    outcome: Outcome
    try:
        os.chdir(root)
        with _alarm(bound), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            result = call()
        outcome = Outcome("ok" if not cli or result == 0 else "error", f"exit {result}" if cli else "")
        if cli and result not in (0, 1):
            outcome = Outcome("crash", f"exit code {result}")
    except StudioError as e:
        text = str(e)
        outcome = Outcome("error", text) if "\n" not in text else Outcome("stderr", f"a message of several lines: {text!r}")
    except Hang as e:  # where it was when the bound rang
        outcome = Outcome("hang", f"{e}\n" + "".join(traceback.format_list(traceback.extract_tb(e.__traceback__)[-8:])))
    except (Exception, RecursionError, MemoryError, OverflowError, SystemExit) as e:  # noqa: B014
        frames = traceback.extract_tb(e.__traceback__)
        ours = [f for f in frames if re.search(r"/(core|studio)/", f.filename)][-3:]
        shown = ours + [f for f in frames[-4:] if f not in ours]
        outcome = Outcome("crash", f"{type(e).__name__}: {str(e)[:300]}\n"
                          + "".join(traceback.format_list(shown)))
    finally:
        os.chdir(cwd)
    outcome.seconds = time.perf_counter() - t0
    if outcome.failed:
        return outcome
    if cli:
        text = err.getvalue()
        errors = [ln for ln in text.splitlines() if ln.startswith("error:")]
        if "Traceback" in text or len(errors) > 1 or (outcome.kind == "error") != bool(errors):
            return Outcome("stderr", text[-2000:], outcome.seconds)
        if errors:
            outcome.detail = errors[0]
    after = _snapshot(root, allowed)
    changed = sorted(p for p in after if before.get(p) != after[p]) + sorted(p for p in before if p not in after)
    if changed:
        return Outcome("wrote", f"changed outside the targets: {changed[:5]}", outcome.seconds)
    return outcome


# -- bookkeeping for long runs ---------------------------------------------------------------------

@dataclass
class Tally:
    """Cases per reader and their outcomes; the failures found, one example each (first seen)."""
    cases: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, dict[str, int]] = field(default_factory=dict)
    failures: dict[tuple[str, str], str] = field(default_factory=dict)

    def add(self, reader: str, outcome: Outcome, case: str) -> None:
        self.cases[reader] = self.cases.get(reader, 0) + 1
        k = self.kinds.setdefault(reader, {})
        k[outcome.kind] = k.get(outcome.kind, 0) + 1
        if outcome.failed:
            self.failures.setdefault((reader, signature(outcome)), f"{case}\n{outcome.detail}")


def signature(outcome: Outcome) -> str:
    """What makes two failures the same: the kind, the exception's type and the deepest line of the
    studio's own code it passed through (messages differ from file to file; the place does not)."""
    detail = outcome.detail or ""
    first = detail.splitlines()[0] if detail else ""
    where = re.findall(r'File "[^"]*?/((?:core|studio)/[^"]+)", line (\d+)', detail)
    kind = first.split(":", 1)[0] if outcome.kind == "crash" else first[:80]
    return f"{outcome.kind}: {kind}" + (f" at {where[-1][0]}:{where[-1][1]}" if where else "")
