"""The bytes of a Hub download: one file after another into the Hugging Face cache, with progress,
cancel within a second, and resume.

Each file goes to ``blobs/<etag>.incomplete`` through huggingface_hub's own ``http_get`` (which retries
a dropped connection from where it stopped, with a ``Range`` request), is checked (its size, and its
sha256 where the Hub gives one: every LFS file, so every weight file), renamed to ``blobs/<etag>`` and
then linked into ``snapshots/<commit>/`` by ``hf_hub_download``, which finds the blob and only makes the
link. So a snapshot only ever holds whole, checked files; what a cancel, a crash or a dropped
connection leaves is an ``.incomplete`` file outside it, which the next download continues from its
last byte. (``hf_hub_download`` alone would throw a partial file away: it writes to a temporary
name unique to each attempt.) The ref (``refs/main``) is written last, atomically.

Cancel: ``should_stop()`` is asked for every chunk that arrives, and chunks are made small
(:data:`CHUNK`) so that it is asked several times a second on any usable connection.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from core import atomic
from core.errors import Cancelled, StudioError

CHUNK = 256 * 1024
"""Bytes per read while downloading (huggingface_hub's default is 10 MB: at 5 MB/s a cancel would
wait two seconds for the chunk to fill)."""
SPEED_WINDOW = 5.0
"""Seconds of recent transfer the speed (and so the time left) is measured over."""
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class DownloadProgress:
    """One progress report: the whole download, and the file in flight."""

    file: str
    file_done: int
    file_total: int
    done: int
    """Bytes of the whole download that are on disk (files cached before included)."""
    total: int
    speed: float
    """Bytes per second over the last few seconds (0 until there is a measure)."""
    eta: float | None
    """Seconds left at that speed; None until there is a speed."""
    files_done: int
    files: int

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


def _size(n: float) -> str:
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):  # as the window writes sizes
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def describe(p: DownloadProgress) -> str:
    """``model.safetensors: 12.3 MiB of 942.4 MiB at 4.1 MiB/s, 3 min 47 s left``."""
    text = f"{p.file}: {_size(p.done)} of {_size(p.total)}"
    if p.speed > 0:
        text += f" at {_size(p.speed)}/s"
        if p.eta is not None:
            m, s = divmod(int(p.eta + 0.5), 60)
            text += f", {m} min {s} s left" if m else f", {s} s left"
    return text


class _Meter:
    """Counts bytes, measures speed over a sliding window, reports, and asks whether to stop."""

    def __init__(self, total: int, files: int, progress, should_stop):
        self.total, self.files = total, files
        self.progress, self.should_stop = progress, should_stop
        self.done = 0
        self.files_done = 0
        self.file, self.file_done, self.file_total = "", 0, 0
        self.window: collections.deque[tuple[float, int]] = collections.deque()
        self.last_report = 0.0

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Cancelled()

    def start_file(self, name: str, total: int, have: int) -> None:
        self.file, self.file_total, self.file_done = name, total, have
        self.done += have
        self.window.clear()
        self.report(force=True)

    def skip_file(self, size: int) -> None:
        self.done += size
        self.files_done += 1

    def end_file(self) -> None:
        self.files_done += 1
        self.report(force=True)

    def add(self, n: int) -> None:
        self.check()
        self.done += n
        self.file_done += n
        now = time.monotonic()
        self.window.append((now, self.done))
        while len(self.window) > 2 and now - self.window[0][0] > SPEED_WINDOW:
            self.window.popleft()
        self.report()

    def speed(self) -> float:
        if len(self.window) < 2:
            return 0.0
        (t0, d0), (t1, d1) = self.window[0], self.window[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def report(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.progress is None or (not force and now - self.last_report < 0.1):
            return
        self.last_report = now
        speed = self.speed()
        eta = (self.total - self.done) / speed if speed > 0 else None
        self.progress(DownloadProgress(self.file, self.file_done, self.file_total, self.done, self.total,
                                       speed, eta, self.files_done, self.files))


class _FileBar:
    """What huggingface_hub's ``http_get`` takes as a progress bar (``tqdm_class``): it forwards the
    bytes to the meter, whose check raises Cancelled inside the transfer loop."""

    def __init__(self, meter: _Meter, **_):
        self.meter = meter

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        if n < 0:  # http_get rewinds when a server ignored the Range: those bytes are gone
            self.meter.done += n
            self.meter.file_done += n
            return
        self.meter.add(n)

    def close(self) -> None:
        pass


@contextlib.contextmanager
def _small_chunks_quietly():
    """Small chunks (see :data:`CHUNK`), and huggingface_hub's "Trying to resume download..." warnings
    kept off the terminal: a broken connection is reported once, as one line, by us."""
    from huggingface_hub import constants

    log = logging.getLogger("huggingface_hub.file_download")
    before, level = constants.DOWNLOAD_CHUNK_SIZE, log.level
    constants.DOWNLOAD_CHUNK_SIZE = min(before, CHUNK)
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        constants.DOWNLOAD_CHUNK_SIZE = before
        log.setLevel(level)


def _blobs(remote) -> Path:
    from core.hub import repo_folder

    return repo_folder(remote.repo_id) / "blobs"


def cached_bytes(remote) -> int:
    """Bytes of ``remote``'s files already in the cache: whole files in its snapshot, and what the
    partial files hold (their names are not known before asking the Hub, so every partial counts)."""
    from core.hub import repo_folder

    repo = repo_folder(remote.repo_id)
    snap = repo / "snapshots" / remote.commit
    have = sum(remote.sizes.get(n, 0) for n in remote.files if (snap / n).is_file())
    if (repo / "blobs").is_dir():
        have += sum(p.stat().st_size for p in (repo / "blobs").glob("*.incomplete"))
    return min(have, remote.download_bytes)


def _verify(part: Path, name: str, etag: str, size: int | None, repo_id: str) -> None:
    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink(missing_ok=True)
        raise StudioError(f"--model {repo_id}: {name} arrived with {got:,} bytes instead of {size:,}",
                          hint="download it again")
    if _SHA256.match(etag):
        h = hashlib.sha256()
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(8 * 2**20), b""):
                h.update(block)
        if h.hexdigest() != etag:
            part.unlink(missing_ok=True)
            raise StudioError(f"--model {repo_id}: {name} arrived damaged (its sha256 is not the Hub's)",
                              hint="download it again")


def _fetch_one(remote, name: str, meter: _Meter, ctx: dict) -> None:
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from core.hub import hub_error

    what, repo_id = f"--model {remote.repo_id}", remote.repo_id
    snap_file = Path(ctx["cache"]) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / remote.commit / name
    if snap_file.is_file():
        meter.skip_file(remote.sizes.get(name, 0))
        return
    try:
        url = hf_hub_url(repo_id, name, revision=remote.commit, endpoint=ctx["endpoint"])
        meta = get_hf_file_metadata(url, token=ctx["token"], endpoint=ctx["endpoint"])
        blob = _blobs(remote) / str(meta.etag)
        if not blob.is_file():
            part = blob.with_name(blob.name + ".incomplete")
            part.parent.mkdir(parents=True, exist_ok=True)
            have = part.stat().st_size if part.is_file() else 0
            if meta.size is not None and have > meta.size:
                part.unlink()
                have = 0
            meter.start_file(name, meta.size or remote.sizes.get(name, 0), have)
            headers = build_hf_headers(token=ctx["token"])
            if urlsplit(meta.location).netloc != urlsplit(url).netloc:
                headers.pop("authorization", None)  # a CDN's signed URL: the token stays with the Hub
            with open(part, "ab") as f:
                http_get(meta.location, f, resume_size=have, headers=headers,
                         expected_size=meta.size, tqdm_class=lambda **kw: _FileBar(meter, **kw))
            _verify(part, name, str(meta.etag), meta.size, repo_id)
            os.replace(part, blob)
        else:
            meter.start_file(name, meta.size or 0, meta.size or 0)
        hf_hub_download(repo_id, name, revision=remote.commit, cache_dir=ctx["cache"], endpoint=ctx["endpoint"],
                        token=ctx["token"])  # the blob is there: this only links it into the snapshot
    except Cancelled:
        raise
    except (HfHubHTTPError, OfflineModeIsEnabled) as e:
        raise hub_error(e, what, repo_id) from None
    except (httpx2.HTTPError, ConnectionError, TimeoutError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StudioError(f"{what}: the connection to {ctx['endpoint']} broke while downloading {name} ({text})",
                          hint="what arrived is kept; run the same command again and it continues "
                               "where it stopped") from None
    except OSError as e:  # http_get's "Consistency check failed", a full disk, ...
        raise StudioError(f"{what}: downloading {name} failed ({str(e).strip().splitlines()[0]})",
                          hint="run the same command again: it continues where it stopped") from None
    meter.end_file()


def fetch(remote, *, progress=None, should_stop=None) -> Path:
    """Download ``remote.files`` (a core.hub.RemoteModel) and return the snapshot folder."""
    from core.hub import endpoint, repo_folder, token
    from core.models import hf_cache_dir

    from huggingface_hub.utils import WeakFileLock

    ctx = {"cache": str(hf_cache_dir()), "endpoint": endpoint(), "token": token()}
    meter = _Meter(remote.download_bytes, len(remote.files), progress, should_stop)
    repo = repo_folder(remote.repo_id)
    lock = repo.parent / ".locks" / repo.name / "lora-studio-download.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    # one download of a repo at a time (the window and a command, or torchrun's processes): the second
    # waits, then finds the files there and only links them
    with WeakFileLock(lock), _small_chunks_quietly():
        for name in remote.files:
            meter.check()
            _fetch_one(remote, name, meter, ctx)
    if remote.revision != remote.commit:
        atomic.write_text(repo / "refs" / remote.revision, remote.commit)
    meter.report(force=True)
    return repo / "snapshots" / remote.commit
