"""A loopback server that plays the Hugging Face Hub's download side, for tests and benchmarks.

``HubServer`` serves model repos built from local folders (what ``save_pretrained`` writes,
subfolders included) on ``127.0.0.1``, with the endpoints, headers and error codes that
``huggingface_hub`` (2.x, httpx2) reads, so that ``snapshot_download``, ``hf_hub_download``,
``HfApi.model_info(files_metadata=True)``, ``list_repo_tree``, ``get_paths_info`` and
``get_hf_file_metadata`` work against it, and so that a downloader of our own sees what it
would see on huggingface.co::

    with HubServer() as hub:
        hub.add_repo("org/tiny", folder)
        path = snapshot_download("org/tiny", endpoint=hub.url, cache_dir=tmp_path / "cache")

or, for code that takes no ``endpoint``, ``use_endpoint(monkeypatch, hub.url)`` in a test.

What it emulates:

- ``GET /api/models/{repo_id}`` and ``/api/models/{repo_id}/revision/{revision}``: repo info
  with ``sha`` and ``siblings`` (``?blobs=true``: ``size``, ``blobId``, ``lfs``);
- ``GET /api/models/{repo_id}/tree/{revision}[/{path}]?recursive=&expand=``, paginated with
  a ``Link: <...>; rel="next"`` header past ``tree_page_size`` entries (1000, as the Hub);
- ``POST /api/models/{repo_id}/paths-info/{revision}`` (form field ``paths``, repeated);
- ``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}``: ``X-Repo-Commit``, ``ETag``
  (the git blob sha1 of a regular file, the sha256 of an LFS file), ``X-Linked-Etag`` and
  ``X-Linked-Size`` for LFS files, ``Content-Length``, ``Accept-Ranges: bytes``; ``Range:
  bytes=a-b``, ``bytes=a-`` and ``bytes=-n`` give 206 with ``Content-Range``, an
  unsatisfiable range 416 with ``Content-Range: bytes */size``. With ``redirect_lfs=True``
  (the default) an LFS file answers 302 with an absolute ``Location`` on a second port of the
  same server, the "CDN": another origin, so ``huggingface_hub`` does not follow it on its
  HEAD (it reads the metadata off the 302, as with the real CDN) and sends no
  ``Authorization`` there; CDN URLs are signed, and the CDN serves the bytes with ranges;
- errors as ``hf_raise_for_status`` maps them: 404 + ``X-Error-Code: RepoNotFound``,
  ``RevisionNotFound`` or ``EntryNotFound`` (with ``X-Repo-Commit``); a repo added with
  ``token=`` answers 401 (``RepoNotFound``, as a private repo) without ``Authorization:
  Bearer <token>`` and 401 ``Invalid credentials in Authorization header`` with another one.

A file is LFS when its suffix is one the Hub's default ``.gitattributes`` tracks
(``.safetensors``, ``.bin``, ``.pt``, ...) or it is at least ``lfs_threshold`` bytes (10 MiB);
its tree ``oid``/``blobId`` is then the sha1 of its LFS pointer file. Directory oids are real
git tree hashes, the commit a git commit hash over the root tree (deterministic).

For tests: ``bandwidth=`` (bytes/s, one token bucket shared by every connection, applied to
file bodies sent in pieces of at most 64 KiB), faults by file name (``drop``, ``corrupt``,
``error``), a request log, ``bytes_sent`` and ``max_concurrent_gets``.

What it does not emulate: xet (no ``X-Xet-*`` header or ``xetHash`` is ever sent, so
``huggingface_hub`` downloads over plain HTTP), datasets/spaces, uploads and commits, gzip
content encoding, tags and PR refs, short commit hashes, a synthetic ``.gitattributes``
(the repo holds exactly the folder's files), ``safetensors``/``cardData`` metadata in repo
info, and rate limits. The folder must not change while it is served (hashes are computed
once, in ``add_repo``). Bounds: 127.0.0.1 and ephemeral ports only, ``max_connections``
simultaneous connections (further ones wait to be accepted), and the server stops by itself
after ``idle_timeout`` seconds without traffic (and after ``lifetime``, if set), so that a
broken test cannot hang CI.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import socket
import socketserver
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

if TYPE_CHECKING:
    import pytest

__all__ = [
    "LFS_SUFFIXES",
    "LFS_THRESHOLD",
    "HubFile",
    "HubServer",
    "RequestRecord",
    "git_blob_sha1",
    "lfs_pointer",
    "use_endpoint",
]

#: suffixes that the Hub's default ``.gitattributes`` stores with LFS
LFS_SUFFIXES = frozenset(
    """.7z .arrow .bin .bz2 .ckpt .ftz .gguf .gz .h5 .joblib .mlmodel .model .msgpack .npy .npz
    .onnx .ot .parquet .pb .pickle .pkl .pt .pth .rar .safetensors .tar .tflite .tgz .wasm .xz
    .zip .zst""".split()
)
#: files at least this large are LFS whatever their suffix (the Hub refuses larger git blobs)
LFS_THRESHOLD = 10 * 1024 * 1024

_CHUNK = 64 * 1024  # throttled and fault-injected bodies go out in pieces of at most this
_FAST_CHUNK = 8 * 1024 * 1024  # sendfile() pieces when nothing needs to touch the bytes
_DATE = "2024-01-01T00:00:00.000Z"
_HASHES: dict[tuple[str, int, int, bool], str] = {}  # (path, size, mtime_ns, lfs) -> hex digest
_HASHES_LOCK = threading.Lock()


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: ``sha1(b"blob <size>\\0" + data)``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The LFS pointer file git stores in place of an LFS file."""
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


@dataclass(frozen=True)
class HubFile:
    """One file of a served revision, with what the Hub reports about it."""

    path: str  # in the repo, '/'-separated
    local: Path
    size: int
    blob_id: str  # git oid: of the content, or of the LFS pointer for an LFS file
    sha256: str | None = None  # LFS files only
    pointer_size: int | None = None  # LFS files only

    @property
    def lfs(self) -> bool:
        return self.sha256 is not None

    @property
    def etag(self) -> str:
        """The ETag the Hub sends for it, unquoted: sha256 for LFS files, else the blob oid."""
        return self.sha256 if self.sha256 is not None else self.blob_id


@dataclass(frozen=True)
class RequestRecord:
    """One request as the server answered it."""

    method: str
    path: str  # as received, query included
    range: str | None  # the Range header
    status: int
    bytes_sent: int  # body bytes actually written
    server: str  # "hub" or "cdn"
    repo_id: str | None = None
    filename: str | None = None
    dropped: bool = False  # a drop() fault cut this body short


@dataclass
class _Commit:
    oid: str
    files: dict[str, HubFile]
    dirs: dict[str, str]  # directory path -> git tree oid ("" is the root)


@dataclass
class _Repo:
    repo_id: str
    token: str | None
    commits: dict[str, _Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit oid

    def resolve(self, revision: str) -> _Commit | None:
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        return self.commits.get(revision)


@dataclass
class _Fault:
    kind: str  # "drop", "corrupt" or "error"
    filename: str
    repo_id: str | None
    remaining: int | None  # None: for ever
    value: int  # drop: offset; corrupt: offset; error: status

    def matches(self, repo_id: str, filename: str) -> bool:
        return (
            self.filename == filename
            and self.repo_id in (None, repo_id)
            and (self.remaining is None or self.remaining > 0)
        )


def _digest(path: Path, *, lfs: bool) -> str:
    """sha256 of an LFS file's content, or git blob sha1 of a regular file's (cached)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, lfs)
    with _HASHES_LOCK:
        if key in _HASHES:
            return _HASHES[key]
    h = hashlib.sha256() if lfs else hashlib.sha1(b"blob %d\0" % st.st_size)
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            h.update(piece)
    digest = h.hexdigest()
    with _HASHES_LOCK:
        _HASHES[key] = digest
    return digest


def _tree_oid(entries: list[tuple[str, bool, str]]) -> str:
    """git tree object id; entries are (name, is_dir, oid)."""
    entries = sorted(entries, key=lambda e: e[0].encode() + (b"/" if e[1] else b""))
    body = b"".join(
        (b"40000 " if is_dir else b"100644 ") + name.encode() + b"\0" + bytes.fromhex(oid)
        for name, is_dir, oid in entries
    )
    return hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()


def _build_commit(repo_id: str, folder: Path, commit: str | None, lfs_threshold: int) -> _Commit:
    files: dict[str, HubFile] = {}
    for root, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if d not in (".git", ".cache"))
        for name in sorted(filenames):
            local = Path(root) / name
            rel = local.relative_to(folder).as_posix()
            size = local.stat().st_size
            if Path(name).suffix.lower() in LFS_SUFFIXES or size >= lfs_threshold:
                sha256 = _digest(local, lfs=True)
                pointer = lfs_pointer(sha256, size)
                files[rel] = HubFile(rel, local, size, git_blob_sha1(pointer), sha256, len(pointer))
            else:
                files[rel] = HubFile(rel, local, size, _digest(local, lfs=False))
    if not files:
        raise ValueError(f"{folder} holds no files to serve")
    children: dict[str, list[tuple[str, bool, str]]] = {"": []}
    for rel in files:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            children.setdefault("/".join(parts[:i]), [])
    for rel, f in files.items():
        parent, _, name = rel.rpartition("/")
        children[parent].append((name, False, f.blob_id))
    dirs: dict[str, str] = {}
    for d in sorted(children, key=lambda p: -p.count("/") - (p != "")):  # deepest first
        dirs[d] = _tree_oid(children[d])
        if d:
            parent, _, name = d.rpartition("/")
            children[parent].append((name, True, dirs[d]))
    if commit is None:
        body = (
            f"tree {dirs['']}\nauthor hubserver <hubserver@localhost> 0 +0000\n"
            f"committer hubserver <hubserver@localhost> 0 +0000\n\nUpload {repo_id}\n"
        ).encode()
        commit = hashlib.sha1(b"commit %d\0" % len(body) + body).hexdigest()
    elif len(commit) != 40 or any(c not in "0123456789abcdef" for c in commit):
        raise ValueError(f"commit must be 40 lowercase hex digits, not {commit!r}")
    return _Commit(commit, files, dirs)


class _TokenBucket:
    """Bytes per second shared by every connection; a taker sleeps off what it overdraws."""

    def __init__(self, rate: float, burst: int, stopping: threading.Event) -> None:
        self.rate = float(rate)
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._lock = threading.Lock()
        self._stopping = stopping

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= n
            debt = -self._tokens
        if debt > 0:
            self._stopping.wait(debt / self.rate)


class _HttpError(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers=None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers: dict[str, str] = dict(headers or {})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, hub: HubServer, role: str) -> None:
        self.hub = hub
        self.role = role
        super().__init__(("127.0.0.1", 0), _Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # HTTPServer's would ask DNS for a name
        self.server_name, self.server_port = self.server_address[:2]

    def process_request(self, request, client_address) -> None:
        while not self.hub._slots.acquire(timeout=0.1):
            if self.hub._stopping.is_set():
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.hub._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        with self.hub._lock:
            self.hub._open.add(request)
            late = self.hub._stopping.is_set()  # else _shutdown() sees it in _open
        if late:
            request.shutdown(socket.SHUT_RDWR)
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.hub._lock:
                self.hub._open.discard(request)
            self.hub._slots.release()

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], OSError):  # the client went away, or we stopped
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hubserver/1"
    timeout = 60  # an idle keep-alive connection is closed after this
    server: _Server

    # -- plumbing ------------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        hub = self.server.hub
        hub._touch()
        with hub._lock:
            hub._in_flight += 1
        self._status = 0
        self._sent = 0
        self._repo_id: str | None = None
        self._filename: str | None = None
        self._dropped = False
        try:
            try:
                length = int(self.headers.get("Content-Length") or 0)
                self._body = self.rfile.read(length) if length > 0 else b""
                if self.server.role == "cdn":
                    self._cdn()
                else:
                    self._hub()
            except _HttpError as e:
                self._json(e.status, {"error": e.message}, e.headers, code=e.code, msg=e.message)
        finally:
            hub._record(
                RequestRecord(
                    self.command,
                    self.path,
                    self.headers.get("Range"),
                    self._status,
                    self._sent,
                    self.server.role,
                    self._repo_id,
                    self._filename,
                    self._dropped,
                )
            )

    def _start(self, status: int, headers: dict[str, str]) -> None:
        self._status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _write(self, data: bytes) -> None:
        if self.command != "HEAD" and data:
            self.wfile.write(data)
            self._sent += len(data)

    def _json(self, status: int, obj: Any, headers=None, *, code=None, msg=None) -> None:
        body = json.dumps(obj).encode()
        h = {"Content-Type": "application/json; charset=utf-8", "Content-Length": str(len(body))}
        if code:
            h["X-Error-Code"] = code
        if msg:
            h["X-Error-Message"] = msg
        h.update(headers or {})
        self._start(status, h)
        self._write(body)

    # -- routing -------------------------------------------------------------------------------

    def _hub(self) -> None:
        split = urlsplit(self.path)
        segs = split.path.split("/")[1:]  # still percent-encoded: a revision may hold %2F
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        if len(segs) >= 3 and segs[0] == "api" and segs[1] == "models":
            return self._api(segs[2:], query)
        for i in (2, 1):  # /{org}/{name}/resolve/... or /{name}/resolve/...
            if len(segs) > i + 2 and segs[i] == "resolve":
                repo = self._repo("/".join(unquote(s) for s in segs[:i]))
                if self.command not in ("GET", "HEAD"):
                    break
                return self._resolve(repo, unquote(segs[i + 1]), unquote("/".join(segs[i + 2 :])))
        raise _HttpError(404, None, f"no route for {self.command} {split.path}")

    def _repo(self, repo_id: str) -> _Repo:
        self._repo_id = repo_id
        repo = self.server.hub._repos.get(repo_id)
        if repo is None:
            raise _HttpError(404, "RepoNotFound", "Repository not found")
        if repo.token is not None:
            auth = self.headers.get("Authorization")
            if auth is None:
                raise _HttpError(401, "RepoNotFound", "Invalid username or password.")
            if not hmac.compare_digest(auth.encode(), f"Bearer {repo.token}".encode()):
                raise _HttpError(401, None, "Invalid credentials in Authorization header")
        return repo

    @staticmethod
    def _commit(repo: _Repo, revision: str) -> _Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HttpError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def _api(self, segs: list[str], query: dict[str, str]) -> None:
        repos = self.server.hub._repos
        name = unquote(segs[0])
        pair = f"{name}/{unquote(segs[1])}" if len(segs) >= 2 else None
        if pair is not None and (pair in repos or name not in repos):
            repo_id, rest = pair, segs[2:]
        else:
            repo_id, rest = name, segs[1:]
        repo = self._repo(repo_id)
        if self.command == "GET" and not rest:
            return self._info(repo, self._commit(repo, "main"), query)
        if self.command == "GET" and len(rest) == 2 and rest[0] == "revision":
            return self._info(repo, self._commit(repo, unquote(rest[1])), query)
        if self.command == "GET" and len(rest) >= 2 and rest[0] == "tree":
            commit = self._commit(repo, unquote(rest[1]))
            return self._tree(repo, commit, unquote("/".join(rest[2:])).strip("/"), query)
        if self.command == "POST" and len(rest) == 2 and rest[0] == "paths-info":
            commit = self._commit(repo, unquote(rest[1]))
            form = parse_qs(self._body.decode())
            expand = _true(form.get("expand", ["false"])[-1])
            entries = []
            for p in form.get("paths", []):
                p = p.strip("/")
                if p in commit.files or (p and p in commit.dirs):
                    entries.append(self._entry(repo, commit, p, expand))
            return self._json(200, entries)
        raise _HttpError(404, None, f"no route for {self.command} {self.path}")

    # -- API -----------------------------------------------------------------------------------

    def _info(self, repo: _Repo, commit: _Commit, query: dict[str, str]) -> None:
        blobs = _true(query.get("blobs", "false"))
        siblings = []
        for f in commit.files.values():
            s: dict[str, Any] = {"rfilename": f.path}
            if blobs:
                s.update(blobId=f.blob_id, size=f.size)
                if f.lfs:
                    s["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
            siblings.append(s)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": commit.oid,
            "lastModified": _DATE,
            "createdAt": _DATE,
            "private": repo.token is not None,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(f.size for f in commit.files.values()),
        }
        config = commit.files.get("config.json")
        if config is not None:
            try:
                cfg = json.loads(config.local.read_bytes())
                info["config"] = {k: cfg[k] for k in ("architectures", "model_type") if k in cfg}
            except (OSError, ValueError):
                pass
        self._json(200, info)

    def _entry(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict[str, Any]:
        f = commit.files.get(path)
        if f is None:
            e: dict[str, Any] = {"type": "directory", "oid": commit.dirs[path], "size": 0}
        else:
            e = {"type": "file", "oid": f.blob_id, "size": f.size}
            if f.lfs:
                e["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
        e["path"] = path
        if expand:
            e["lastCommit"] = {"id": commit.oid, "title": f"Upload {repo.repo_id}", "date": _DATE}
        return e

    def _tree(self, repo: _Repo, commit: _Commit, path: str, query: dict[str, str]) -> None:
        if path and path not in commit.dirs:
            raise _HttpError(
                404,
                "EntryNotFound",
                f"{path} does not exist on {commit.oid}",
                {"X-Repo-Commit": commit.oid},
            )
        recursive = _true(query.get("recursive", "false"))
        expand = _true(query.get("expand", "false"))
        prefix = f"{path}/" if path else ""
        names = [p for p in list(commit.dirs) + list(commit.files) if p and p.startswith(prefix)]
        if not recursive:
            names = [p for p in names if "/" not in p[len(prefix) :]]
        names.sort(key=lambda p: (p not in commit.dirs, p))  # folders first, as the Hub
        size = self.server.hub.tree_page_size
        if expand:
            size = min(size, 50)
        start = int(query.get("cursor", "0") or 0)
        page = [self._entry(repo, commit, p, expand) for p in names[start : start + size]]
        headers = {}
        if start + size < len(names):
            q = urlencode(
                {"recursive": str(recursive), "expand": str(expand), "cursor": start + size}
            )
            base = f"http://{self.headers.get('Host', self.server.hub.url[7:])}"
            headers["Link"] = f'<{base}{urlsplit(self.path).path}?{q}>; rel="next"'
        self._json(200, page, headers)

    # -- files ---------------------------------------------------------------------------------

    def _resolve(self, repo: _Repo, revision: str, filename: str) -> None:
        hub = self.server.hub
        commit = self._commit(repo, revision)
        self._filename = filename
        f = commit.files.get(filename)
        if f is None:
            raise _HttpError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit.oid})
        headers = {"X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes", "ETag": f'"{f.etag}"'}
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(f.size)
        self._maybe_error(repo.repo_id, f)
        if f.lfs and hub.redirect_lfs:
            location = hub._cdn_location(repo.repo_id, f)
            body = f"Found. Redirecting to {location}".encode()
            headers.update(
                {
                    "Location": location,
                    "Content-Type": "text/plain; charset=utf-8",
                    "Content-Length": str(len(body)),
                }
            )
            self._start(302, headers)
            return self._write(body)
        self._serve(repo.repo_id, f, headers)

    def _cdn(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        segs = split.path.split("/")
        if self.command not in ("GET", "HEAD") or len(segs) != 3 or segs[1] != "lfs":
            raise _HttpError(404, None, "Not Found")
        sha256, repo_id, filename = segs[2], query.get("repo", ""), query.get("file", "")
        self._repo_id, self._filename = repo_id, filename
        if not hmac.compare_digest(query.get("sig", ""), hub._sign(sha256, repo_id, filename)):
            raise _HttpError(403, None, "Request signature does not match")
        f = hub._blobs.get(sha256)
        if f is None:
            raise _HttpError(404, None, "Not Found")
        self._maybe_error(repo_id, f, filename)
        headers = {
            "Accept-Ranges": "bytes",
            "ETag": f'"{sha256}"',
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(filename.rsplit('/')[-1])}",
        }
        self._serve(repo_id, f, headers, filename)

    def _maybe_error(self, repo_id: str, f: HubFile, filename: str | None = None) -> None:
        if self.command != "GET":
            return
        fault = self.server.hub._claim("error", repo_id, filename or f.path)
        if fault is not None:
            raise _HttpError(fault.value, None, f"injected error for {filename or f.path}")

    def _serve(self, repo_id: str, f: HubFile, headers: dict[str, str], name=None) -> None:
        hub = self.server.hub
        name = name or f.path
        span = _parse_range(self.headers.get("Range"), f.size)
        if span is None:
            start, end, status = 0, f.size, 200
        elif span == "unsatisfiable":
            headers.update({"Content-Range": f"bytes */{f.size}", "Content-Length": "0"})
            return self._start(416, headers)
        else:
            start, end = span
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{f.size}"
        headers["Content-Type"] = "application/octet-stream"
        headers["Content-Length"] = str(end - start)
        if self.command == "HEAD":
            return self._start(status, headers)
        drop = hub._claim("drop", repo_id, name, lambda v: start <= v < end)
        stop = drop.value if drop is not None else end
        flips = [
            fault.value
            for fault in hub._claim_all("corrupt", repo_id, name, lambda v: start <= v < end)
        ]
        with hub._lock:
            hub._active_gets += 1
            hub._max_concurrent_gets = max(hub._max_concurrent_gets, hub._active_gets)
        try:
            self._start(status, headers)
            with open(f.local, "rb") as fh:
                self._body_bytes(fh, start, stop, flips)
            if drop is not None:
                self._dropped = True
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
        finally:
            with hub._lock:
                hub._active_gets -= 1

    def _body_bytes(self, fh, start: int, stop: int, flips: list[int]) -> None:
        hub = self.server.hub
        bucket = hub._bucket
        pos = start
        if bucket is None and not flips:
            while pos < stop:
                n = self.connection.sendfile(fh, pos, min(_FAST_CHUNK, stop - pos))
                if n == 0:
                    raise ConnectionError("sendfile sent nothing")
                pos += n
                self._sent += n
                hub._sent_file_bytes(n)
            return
        piece = bucket.burst if bucket is not None else _CHUNK
        fh.seek(start)
        while pos < stop:
            data = fh.read(min(piece, stop - pos))
            if not data:
                raise ConnectionError(f"{fh.name} shrank while served")
            hits = [o for o in flips if pos <= o < pos + len(data)]
            if hits:
                buf = bytearray(data)
                for o in hits:
                    buf[o - pos] ^= 0xFF
                data = bytes(buf)
            if bucket is not None:
                bucket.take(len(data))
            self.wfile.write(data)
            pos += len(data)
            self._sent += len(data)
            hub._sent_file_bytes(len(data))


def _true(value: str) -> bool:
    return value.lower() in ("1", "true", "yes")


def _parse_range(header: str | None, size: int):
    """(start, end-exclusive), "unsatisfiable", or None to ignore the header (RFC 9110)."""
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # another unit or several ranges: served whole, which RFC 9110 allows
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or (not first and last.isdigit())):
        return None
    if not first:  # bytes=-n: the last n bytes
        n = int(last)
        return (size - min(n, size), size) if n > 0 and size > 0 else "unsatisfiable"
    start = int(first)
    if last and not last.isdigit():
        return None
    end = min(int(last) + 1, size) if last else size
    if last and int(last) < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, end


class HubServer:
    """The emulated Hub: ``with HubServer() as hub: hub.add_repo("org/name", folder)``.

    ``bandwidth``: bytes per second for all file bodies together (None: unlimited; settable
    while running). ``redirect_lfs``: LFS files answer 302 to the CDN port, as on the Hub.
    ``max_connections``: connections handled at once. ``idle_timeout``/``lifetime``: seconds
    without traffic / in all after which the server stops by itself (None: never).
    ``tree_page_size``: tree entries per page before a ``Link: rel="next"``.
    """

    def __init__(
        self,
        *,
        bandwidth: float | None = None,
        redirect_lfs: bool = True,
        max_connections: int = 64,
        idle_timeout: float | None = 300.0,
        lifetime: float | None = None,
        tree_page_size: int = 1000,
    ) -> None:
        if max_connections < 1 or tree_page_size < 1:
            raise ValueError("max_connections and tree_page_size must be at least 1")
        self.redirect_lfs = redirect_lfs
        self.idle_timeout = idle_timeout
        self.lifetime = lifetime
        self.tree_page_size = tree_page_size
        self.stopped_reason: str | None = None
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)  # no request between start and record
        self._in_flight = 0
        self._stopping = threading.Event()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._secret = secrets.token_bytes(16)
        self._repos: dict[str, _Repo] = {}
        self._blobs: dict[str, HubFile] = {}
        self._faults: list[_Fault] = []
        self._open: set[socket.socket] = set()
        self._log: list[RequestRecord] = []
        self._bytes_sent = 0
        self._active_gets = 0
        self._max_concurrent_gets = 0
        self._bucket: _TokenBucket | None = None
        self.bandwidth = bandwidth
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        self._last_activity = time.monotonic()

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> HubServer:
        if self._servers:
            raise RuntimeError("HubServer already started")
        self._servers = [_Server(self, "hub"), _Server(self, "cdn")]
        self._started = self._last_activity = time.monotonic()
        for s in self._servers:
            t = threading.Thread(
                target=s.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"hubserver-{s.role}-{s.server_address[1]}",
                daemon=True,
            )
            t.start()
            self._threads.append(t)
        watchdog = threading.Thread(target=self._watch, name="hubserver-watchdog", daemon=True)
        watchdog.start()
        self._threads.append(watchdog)
        return self

    def stop(self) -> None:
        """Stop serving, close every connection and wait for the threads (idempotent)."""
        self._shutdown("stopped")
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=10)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether any of the server's threads is still alive."""
        return any(t.is_alive() for t in self._threads)

    @property
    def url(self) -> str:
        """The Hub endpoint, ``http://127.0.0.1:<port>`` (pass as ``endpoint=``)."""
        return self._address(0)

    @property
    def cdn_url(self) -> str:
        """The origin LFS files are redirected to."""
        return self._address(1)

    def _address(self, i: int) -> str:
        if not self._servers:
            raise RuntimeError("HubServer not started: use `with HubServer() as hub:`")
        host, port = self._servers[i].server_address[:2]
        return f"http://{host}:{port}"

    def _shutdown(self, reason: str) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
            self.stopped_reason = reason
        for s in self._servers:
            s.shutdown()
        with self._lock:
            conns = list(self._open)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for s in self._servers:
            s.server_close()  # joins the handler threads

    def _watch(self) -> None:
        while not self._stopping.wait(0.05):
            now = time.monotonic()
            if self.lifetime is not None and now - self._started > self.lifetime:
                return self._shutdown(f"lifetime of {self.lifetime} s reached")
            if self.idle_timeout is not None and now - self._last_activity > self.idle_timeout:
                with self._lock:
                    busy = self._active_gets > 0
                if not busy:
                    return self._shutdown(f"idle for {self.idle_timeout} s")

    def _touch(self) -> None:
        self._last_activity = time.monotonic()

    # -- repos ---------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        folder: str | os.PathLike[str],
        *,
        commit: str | None = None,
        branch: str = "main",
        token: str | None = None,
        lfs_threshold: int = LFS_THRESHOLD,
    ) -> str:
        """Serve ``folder``'s files as ``repo_id`` at ``branch``; returns the commit hash.

        Adding the same repo again adds a commit and points ``branch`` at it (other branches
        and commits stay reachable). ``token``: requests must carry ``Authorization: Bearer
        <token>`` (the last ``add_repo`` of a repo decides). ``commit``: a 40-hex hash to use
        instead of the one computed from the content.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise NotADirectoryError(folder)
        built = _build_commit(repo_id, folder, commit, lfs_threshold)
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo(repo_id, token))
            repo.token = token
            repo.commits[built.oid] = built
            repo.refs[branch] = built.oid
            for f in built.files.values():
                if f.sha256 is not None:
                    self._blobs[f.sha256] = f
        return built.oid

    def files(self, repo_id: str, revision: str = "main") -> dict[str, HubFile]:
        """What the server reports about each file of a revision, by repo path."""
        commit = self._repos[repo_id].resolve(revision)
        if commit is None:
            raise KeyError(f"{repo_id} has no revision {revision!r}")
        return dict(commit.files)

    def _sign(self, sha256: str, repo_id: str, filename: str) -> str:
        msg = f"{sha256}\0{repo_id}\0{filename}".encode()
        return base64.urlsafe_b64encode(hmac.digest(self._secret, msg, "sha256")[:18]).decode()

    def _cdn_location(self, repo_id: str, f: HubFile) -> str:
        q = urlencode(
            {"repo": repo_id, "file": f.path, "sig": self._sign(f.sha256 or "", repo_id, f.path)}
        )
        return f"{self.cdn_url}/lfs/{f.sha256}?{q}"

    # -- bandwidth and faults ------------------------------------------------------------------

    @property
    def bandwidth(self) -> float | None:
        return self._bucket.rate if self._bucket is not None else None

    @bandwidth.setter
    def bandwidth(self, value: float | None) -> None:
        if value is None:
            self._bucket = None
            return
        if value <= 0:
            raise ValueError(f"bandwidth must be positive bytes/s, not {value}")
        burst = int(max(4096, min(_CHUNK, value / 20)))
        self._bucket = _TokenBucket(value, burst, self._stopping)

    def drop(self, filename: str, after_bytes: int, *, times: int = 1, repo_id=None) -> None:
        """Cut ``times`` GET bodies of ``filename`` before its byte at offset ``after_bytes``.

        A GET (resolve or CDN) whose range holds that offset sends the file's bytes up to it,
        then closes the connection (FIN, with bytes missing from ``Content-Length``); a range
        that does not hold it is served whole and does not count.
        """
        self._add_fault(_Fault("drop", filename, repo_id, times, after_bytes))

    def corrupt(
        self, filename: str, offset: int, *, times: int | None = None, repo_id=None
    ) -> None:
        """Flip every bit of ``filename``'s byte at ``offset`` in served bodies that hold it,
        for ever (``times=None``) or ``times`` bodies; headers still claim the true hashes."""
        self._add_fault(_Fault("corrupt", filename, repo_id, times, offset))

    def error(self, filename: str, status: int = 500, *, times: int = 1, repo_id=None) -> None:
        """Answer the next ``times`` GETs of ``filename`` (resolve or CDN) with ``status``."""
        self._add_fault(_Fault("error", filename, repo_id, times, status))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _add_fault(self, fault: _Fault) -> None:
        if fault.remaining is not None and fault.remaining < 1:
            raise ValueError("times must be at least 1 (or None for corrupt)")
        with self._lock:
            self._faults.append(fault)

    def _claim_all(self, kind: str, repo_id: str, filename: str, where=None) -> list[_Fault]:
        with self._lock:
            hits = [
                f
                for f in self._faults
                if f.kind == kind
                and f.matches(repo_id, filename)
                and (where is None or where(f.value))
            ]
            for f in hits:
                if f.remaining is not None:
                    f.remaining -= 1
            return hits

    def _claim(self, kind: str, repo_id: str, filename: str, where=None) -> _Fault | None:
        with self._lock:
            for f in self._faults:
                if f.kind == kind and f.matches(repo_id, filename):
                    if where is None or where(f.value):
                        if f.remaining is not None:
                            f.remaining -= 1
                        return f
        return None

    # -- observability -------------------------------------------------------------------------

    # A client can see a response end before the server thread has logged it: the readers
    # below first wait (up to settle_timeout s) for the requests in progress to be recorded.
    settle_timeout = 2.0

    def _settle(self) -> None:
        self._settled.wait_for(lambda: self._in_flight == 0, timeout=self.settle_timeout)

    @property
    def requests(self) -> list[RequestRecord]:
        """A copy of the request log, oldest first."""
        with self._lock:
            self._settle()
            return list(self._log)

    @property
    def bytes_sent(self) -> int:
        """File body bytes sent (resolve and CDN GETs), since start or ``reset_stats()``."""
        with self._lock:
            self._settle()
            return self._bytes_sent

    @property
    def max_concurrent_gets(self) -> int:
        """Peak number of file bodies being sent at once, since start or ``reset_stats()``."""
        with self._lock:
            return self._max_concurrent_gets

    @property
    def active_gets(self) -> int:
        with self._lock:
            return self._active_gets

    def reset_stats(self) -> None:
        """Clear the request log, ``bytes_sent`` and ``max_concurrent_gets``."""
        with self._lock:
            self._settle()
            self._log.clear()
            self._bytes_sent = 0
            self._max_concurrent_gets = self._active_gets

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._log.append(record)
            self._in_flight -= 1
            self._settled.notify_all()

    def _sent_file_bytes(self, n: int) -> None:
        self._last_activity = time.monotonic()
        with self._lock:
            self._bytes_sent += n


def use_endpoint(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Point ``huggingface_hub`` calls made without ``endpoint=`` at ``url``, for one test.

    Patches what ``HF_ENDPOINT`` would have set at import: ``constants.ENDPOINT`` and
    ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (read at call time by ``HfApi()``,
    ``hf_hub_url``, ``snapshot_download``), the module-level ``HfApi`` behind
    ``huggingface_hub.model_info``/``list_repo_tree``/... (its endpoint is copied at import),
    and the hub hosts/origins copied at import (``constants.HF_URL_HOSTS``,
    ``utils._http._HUB_ORIGINS``: whose redirects are followed with the token).
    ``monkeypatch`` (pytest's fixture) undoes it all after the test.
    """
    from huggingface_hub import constants, hf_api

    url = url.rstrip("/")
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(hf_api.api, "endpoint", url)
    host = urlsplit(url).hostname
    if host and hasattr(constants, "HF_URL_HOSTS"):
        monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {host.lower()})
    try:
        from huggingface_hub.utils import _http
    except ImportError:  # pragma: no cover
        return
    if hasattr(_http, "_HUB_ORIGINS") and hasattr(_http, "_url_origin"):
        monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(url)})
