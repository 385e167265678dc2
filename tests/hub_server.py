"""A small Hugging Face Hub on 127.0.0.1 for the tests: the few HTTP routes ``huggingface_hub`` and
``datasets`` call, serving files held in memory, so the real download code runs without the internet.

Routes (``{type}`` is ``models`` or ``datasets``; a dataset's file URLs start with ``/datasets/``):

* ``GET /api/{type}/{org}/{name}[/revision/{rev}]``: the repo's info (``sha``, ``gated``, ``siblings``
  with sizes and LFS sha256), what ``HfApi.model_info`` / ``dataset_info`` parse;
* ``GET /api/{type}/{org}/{name}/tree/{rev}[/{path}]`` and ``POST .../paths-info/{rev}``: listings;
* ``HEAD`` / ``GET /[datasets/]{org}/{name}/resolve/{rev}/{path}``: a file, with ``ETag`` (the LFS
  sha256, or a git-style sha1), ``X-Repo-Commit``, ``Content-Length``, and ``Range`` answered 206.

Errors carry the ``X-Error-Code`` headers ``hf_raise_for_status`` maps to exceptions (RepoNotFound,
RevisionNotFound, EntryNotFound, GatedRepo). Knobs a test turns: :attr:`HubServer.rate` (bytes per
second for file bodies, so a cancel lands mid-file), :attr:`HubServer.drop_after` (file name -> byte
offset at which every GET of that file closes the connection), :attr:`HubServer.token` (what a gated
repo accepts). :attr:`HubServer.log` records every request (method, path, Range, bytes sent).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".parquet", ".gguf")


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, bytes]
    repo_type: str = "model"
    gated: bool = False
    commit: str = ""
    listed: dict[str, int] = field(default_factory=dict)
    """Sizes the listing gives instead of the real ones (a repo that only shows a real model's config
    and file sizes, for a fit check; its weights are never fetched)."""

    def __post_init__(self):
        if not self.commit:
            h = hashlib.sha1(self.repo_id.encode())
            for name in sorted(self.files):
                h.update(name.encode() + b"\0" + self.files[name])
            self.commit = h.hexdigest()

    def entry(self, name: str) -> dict:
        data = self.files[name]
        size = self.listed.get(name, len(data))
        out = {"type": "file", "path": name, "size": size,
               "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
        if name.endswith(LFS_SUFFIXES):
            out["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": size, "pointerSize": 134}
        return out

    def etag(self, name: str) -> str:
        e = self.entry(name)
        return e["lfs"]["oid"] if "lfs" in e else e["oid"]


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None
    sent: int = 0


@dataclass
class HubServer:
    repos: dict[tuple[str, str], HubRepo] = field(default_factory=dict)
    rate: float | None = None
    drop_after: dict[str, int] = field(default_factory=dict)
    token: str = "hf_test_token"
    log: list[Request] = field(default_factory=list)
    _httpd: ThreadingHTTPServer | None = None

    def add(self, repo: HubRepo) -> HubRepo:
        self.repos[(repo.repo_type, repo.repo_id)] = repo
        return repo

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True, name="test-hub").start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def bytes_sent(self, name: str) -> int:
        return sum(r.sent for r in self.log if r.method == "GET" and r.path.endswith("/" + name))


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet: the tests read HubServer.log instead
        pass

    # -- plumbing --------------------------------------------------------------------------------
    def _json(self, obj, status: int = 200) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _record(self) -> Request:
        req = Request(self.command, urlsplit(self.path).path, self.headers.get("Range"),
                      self.headers.get("Authorization"))
        self.hub.log.append(req)
        return req

    def _repo(self, repo_type: str, org: str, name: str) -> HubRepo | None:
        repo = self.hub.repos.get((repo_type, f"{org}/{name}"))
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}.")
        return repo

    def _revision_ok(self, repo: HubRepo, rev: str) -> bool:
        if unquote(rev) in ("main", repo.commit):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {unquote(rev)}")
        return False

    def _allowed(self, repo: HubRepo) -> bool:
        if not repo.gated:
            return True
        auth = self.headers.get("Authorization")
        if auth == f"Bearer {self.hub.token}":
            return True
        status = 403 if auth else 401
        self._error(status, "GatedRepo", f"Access to model {repo.repo_id} is restricted. You must have access "
                                         "to it and be authenticated to access it. Please log in.")
        return False

    # -- routes ----------------------------------------------------------------------------------
    def do_HEAD(self):
        self._route()

    def do_GET(self):
        self._route()

    def do_POST(self):
        self._route()

    def _route(self) -> None:
        req = self._record()
        parts = [unquote(p) for p in req.path.strip("/").split("/")]
        try:
            if parts[:1] == ["api"] and len(parts) >= 4 and parts[1] in ("models", "datasets"):
                return self._api(parts[1][:-1], parts[2], parts[3], parts[4:])
            repo_type = "model"
            if parts[:1] == ["datasets"]:
                repo_type, parts = "dataset", parts[1:]
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve(req, repo_type, parts[0], parts[1], parts[3], "/".join(parts[4:]))
            self._error(404, "EntryNotFound", f"no route for {req.path}")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _api(self, repo_type: str, org: str, name: str, rest: list[str]) -> None:
        repo = self._repo(repo_type, org, name)
        if repo is None:
            return
        if not rest or rest[0] == "revision":
            if rest and not self._revision_ok(repo, rest[1]):
                return
            return self._json(self._info(repo))
        if rest[0] == "tree" and len(rest) >= 2:
            if not self._revision_ok(repo, rest[1]):
                return
            query = parse_qs(urlsplit(self.path).query)
            return self._json(self._tree(repo, "/".join(rest[2:]), query.get("recursive", ["false"])[0] == "true"))
        if rest[0] == "paths-info" and len(rest) >= 2:
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode())
            paths = form.get("paths", [])
            return self._json(self._paths_info(repo, paths))
        self._error(404, "EntryNotFound", f"no route for {self.path}")

    def _info(self, repo: HubRepo) -> dict:
        siblings = []
        for n in sorted(repo.files):
            e = repo.entry(n)
            s = {"rfilename": n, "size": e["size"], "blobId": e["oid"]}
            if "lfs" in e:
                s["lfs"] = {"sha256": e["lfs"]["oid"], "size": e["size"], "pointerSize": 134}
            siblings.append(s)
        return {"_id": repo.commit[:24], "id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit,
                "private": False, "gated": "manual" if repo.gated else False, "disabled": False,
                "downloads": 0, "likes": 0, "tags": [], "siblings": siblings, "cardData": {},
                "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z"}

    def _tree(self, repo: HubRepo, prefix: str, recursive: bool) -> list[dict]:
        prefix = prefix.strip("/")
        out, folders = [], set()
        for n in sorted(repo.files):
            if prefix and not n.startswith(prefix + "/"):
                continue
            rel = n[len(prefix) + 1:] if prefix else n
            if "/" in rel and not recursive:
                folders.add((prefix + "/" if prefix else "") + rel.split("/")[0])
                continue
            if recursive and "/" in rel:
                bits = rel.split("/")[:-1]
                for i in range(1, len(bits) + 1):
                    folders.add((prefix + "/" if prefix else "") + "/".join(bits[:i]))
            out.append(repo.entry(n))
        out += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in sorted(folders)]
        return out

    def _paths_info(self, repo: HubRepo, paths: list[str]) -> list[dict]:
        out = []
        for p in paths:
            p = p.strip("/")
            if p in repo.files:
                out.append(repo.entry(p))
            elif any(n.startswith(p + "/") for n in repo.files) or p == "":
                out.append({"type": "directory", "path": p, "oid": hashlib.sha1(p.encode()).hexdigest()})
        return out

    def _resolve(self, req: Request, repo_type: str, org: str, name: str, rev: str, path: str) -> None:
        repo = self._repo(repo_type, org, name)
        if repo is None or not self._revision_ok(repo, rev) or not self._allowed(repo):
            return
        if path not in repo.files:
            return self._error(404, "EntryNotFound", f"{path} does not exist on \"{rev}\"", repo.commit)
        data = repo.files[path]
        start, end = 0, len(data) - 1
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[len("bytes="):].partition("-")
            start = int(a) if a else 0
            end = min(int(b), end) if b else end
        self.send_response(206 if rng else 200)
        self.send_header("ETag", f'"{repo.etag(path)}"')
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if self.command == "HEAD":
            return
        self._send_body(req, data, start, end + 1, self.hub.drop_after.get(path))

    def _send_body(self, req: Request, data: bytes, start: int, stop: int, drop: int | None) -> None:
        pos, step = start, 16384
        began = time.monotonic()
        while pos < stop:
            if drop is not None and pos >= drop:
                self.close_connection = True
                self.connection.shutdown(2)  # mid-file: the client sees a body cut short
                return
            n = min(step, stop - pos, (drop - pos) if drop is not None else step)
            self.wfile.write(data[pos:pos + n])
            pos += n
            req.sent += n
            if self.hub.rate:
                ahead = (pos - start) / self.hub.rate - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)
