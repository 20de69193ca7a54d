"""Load a hub checkpoint while it downloads: no wait for the last shard, every byte checked.

``leanstream.load("org/model")`` on a repo whose safetensors shards are not in the cache
does not download them first: :func:`open_hub` fetches the small files (configs, index,
tokenizer) with ``huggingface_hub.snapshot_download``, takes each file's size and sha256
from huggingface_hub's listing of the commit (the tree cache that call wrote, else
``HfApi.list_repo_tree``), fetches the header of every shard it needs, and returns a
:class:`HubDownload` whose worker threads download the shards in ranged HTTP requests
(``CHUNK_BYTES`` each, at most ``connections`` at once; each shard's ``resolve`` URL asked
once, the chunks fetched from the address it redirects to), in the order the model reads
the tensors (:meth:`HubDownload.prioritize`). The Rust reader opens the shards as they are
being written (``_core.Arrival``): a tensor is handed out, quantized and dropped as soon as
its bytes have arrived.

Every shard is hashed while it arrives (sha256 for LFS files, the git blob id for others)
and is marked complete only once its hash is the hub's: a mismatch is a
:class:`CorruptDownloadError`, found while streaming, and nothing of that shard is kept.

The cache ends as ``snapshot_download`` leaves it: blobs named by their sha256, snapshot
links, ``refs/<revision>``, huggingface_hub's tree listing and locks. While a shard
downloads, its bytes live in ``blobs/<sha256>.leanstream`` and the ranges already written
in ``blobs/<sha256>.leanstream.json`` (not huggingface_hub's ``.incomplete`` file, which
its own downloads would resume by size alone): an interrupted load (Ctrl-C, a dropped
connection after the retries) leaves them, and the next load resumes from them.

``keep=False`` keeps no full-precision bytes: the shards go to a temporary folder next to
the cache, each piece is dropped (a hole punched in the file) once the model has read it
and it was hashed, and at most about ``window`` bytes are on disk at once; a second load
downloads again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from . import _core
from .checkpoint import HUB_PATTERNS, select_weights
from .errors import (
    CorruptDownloadError,
    DownloadError,
    FileNotFoundCheckpointError,
    UnsupportedCheckpointError,
    checkpoint_error,
)

#: bytes of one ranged request
CHUNK_BYTES = 16 << 20
#: requests in flight at once, across shards
CONNECTIONS = 8
#: attempts at one chunk (a dropped connection resumes where it stopped; a 5xx retries)
ATTEMPTS = 5
#: first pause between attempts, doubled each time
BACKOFF_S = 0.5
#: bytes asked for first when fetching a shard's header (real headers: tens of KiB)
HEADER_GUESS = 256 << 10
#: with keep=False, about the most full-precision bytes on disk at once
WINDOW_BYTES = 1 << 30
#: seconds without a byte before a request is abandoned (and retried)
READ_TIMEOUT_S = 30.0
#: bytes hashed at once (fewer wake-ups of the hash threads than one per network read)
_HASH_STEP = 4 << 20
#: what the small-files pass of snapshot_download fetches: all but the weights
SMALL_PATTERNS = [p for p in HUB_PATTERNS if p != "*.safetensors"]

_PAGE = os.sysconf("SC_PAGE_SIZE")
_FALLOC_PUNCH_HOLE = 0x02
_FALLOC_KEEP_SIZE = 0x01


@dataclass
class _Shard:
    """One file of the repo to download, and its progress."""

    name: str  # path in the repo
    size: int
    etag: str  # sha256 (LFS) or git blob id: huggingface_hub's blob name
    url: str
    staged: Path  # what the Rust reader opens
    partial: Path  # where its bytes are written
    blob: Path | None  # where it goes once verified (None: keep=False)
    link: Path | None
    arrival: _core.Arrival
    hashed: int = 0
    digest: Any = None
    finished: bool = False
    sidecar_lock: threading.Lock = field(default_factory=threading.Lock)
    #: the address the hub redirects ``url`` to (asked once, again if it expires)
    location: str | None = None
    location_lock: threading.Lock = field(default_factory=threading.Lock)
    #: set when bytes arrived: wakes the shard's hash thread
    more: threading.Event = field(default_factory=threading.Event)
    #: keep=False: the bytes the reader is done with, and those punched out of the file
    #: (range sets, as the arrived bytes are: ``_core.Arrival`` of the file's length)
    droppable: _core.Arrival | None = None
    punched: _core.Arrival | None = None

    @property
    def lfs(self) -> bool:
        return len(self.etag) == 64

    @property
    def sidecar(self) -> Path:
        return self.partial.with_name(self.partial.name + ".json")


def locate(
    source: str | os.PathLike[str],
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    variant: str | None = None,
    keep: bool = True,
    progress: bool = False,
    headers_only: bool = False,
) -> tuple[Path, Path | list[Path], HubDownload | None]:
    """Where ``source``'s config and weights are: ``(folder, weights, download)``.

    A local folder, or a hub repo when offline (``local_files_only``, ``HF_HUB_OFFLINE``):
    its folder (in the cache), its weights (:func:`~leanstream.checkpoint.weight_files`),
    no download. A hub repo online: its small files are fetched and :func:`open_hub`
    starts downloading the shards the cache lacks (``headers_only``: only their headers,
    for what reads no tensor, ``inspect``).
    """
    from huggingface_hub import constants

    from .checkpoint import check_weights_format, weight_files

    folder, hub = config_folder(
        source,
        subfolder=subfolder,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
    )
    offline = local_files_only or constants.is_offline_mode()
    if not hub or offline:
        check_weights_format(folder)
        return folder, weight_files(folder, variant), None
    sub = PurePosixPath(folder.relative_to(_snapshot_of(folder))).as_posix()
    return open_hub(
        os.fspath(source),
        folder,
        subfolder=None if sub == "." else sub,
        token=token,
        cache_dir=cache_dir,
        variant=variant,
        keep=keep,
        progress=progress,
        headers_only=headers_only,
    )


def config_folder(
    source: str | os.PathLike[str],
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
) -> tuple[Path, bool]:
    """``source``'s folder (:func:`~leanstream.checkpoint.resolve`), and whether it is a
    hub repo. Of a hub repo only the small files are fetched (configs, index, tokenizer):
    a load streams the shards (:func:`locate`)."""
    from .checkpoint import resolve

    hub = not Path(source).expanduser().exists()
    folder = resolve(
        source,
        subfolder=subfolder,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        patterns=SMALL_PATTERNS if hub else None,
    )
    return folder, hub


def _snapshot_of(folder: Path) -> Path:
    """The ``snapshots/<commit>`` folder ``folder`` is in."""
    for parent in [folder, *folder.parents]:
        if parent.parent.name == "snapshots":
            return parent
    raise AssertionError(f"{folder} is not in a hub cache snapshot")


def open_hub(
    repo_id: str,
    folder: Path,
    *,
    subfolder: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike[str] | None,
    variant: str | None,
    keep: bool = True,
    progress: bool = False,
    headers_only: bool = False,
) -> tuple[Path, Path | list[Path], HubDownload | None]:
    """Get ``repo_id``, whose small files are in ``folder`` (a cache snapshot, or
    ``subfolder`` in it), ready to load: ``(folder, weights, download)``.

    ``weights`` is what to open with ``_core.Checkpoint``. ``download`` is ``None`` when
    every shard is in the cache already (``weights`` are the cached files), else a
    started :class:`HubDownload`: open ``weights`` with ``arrivals=download.arrivals``,
    then call :meth:`HubDownload.opened`, :meth:`HubDownload.prioritize` and, after the
    last tensor, :meth:`HubDownload.finish` (use it as a context manager: an exception
    stops it, keeping what was downloaded for the next load). ``headers_only``: the
    headers of the shards the cache lacks are fetched, nothing more, into a temporary
    folder that goes when the download is closed (what reads no tensor: ``inspect``).
    """
    from huggingface_hub import constants, hf_hub_url

    keep = keep and not headers_only
    sub = subfolder
    snapshot = _snapshot_of(folder)
    commit = snapshot.name
    storage = snapshot.parent.parent
    where = f"{repo_id}{'/' + sub if sub else ''} (revision {commit[:12]})"
    try:
        tree = _listing(repo_id, commit, storage, token)
    except Exception as err:
        # the hub did not answer (snapshot_download fell back to the cache): load what
        # the cache holds, if it holds the weights
        from .checkpoint import weight_files

        local = weight_files(folder, variant)
        if local == folder:
            raise checkpoint_error(
                FileNotFoundCheckpointError,
                f"{where}: the hub did not list the repo ({type(err).__name__}: {err}) and "
                "the cache holds no weights of it",
                file=repo_id,
            ) from err
        return folder, local, None
    prefix = f"{sub}/" if sub else ""
    here = {p[len(prefix) :]: f for p, f in tree.items() if p.startswith(prefix)}
    _verify_fetched(folder, here, where)
    names = [n for n in here if "/" not in n]
    chosen = select_weights(names, variant, where=where)
    if chosen is None:
        pickles = sorted(n for n in names if n.endswith((".bin", ".pt", ".ckpt", ".pth")))
        raise checkpoint_error(
            UnsupportedCheckpointError,
            f"{where}: no safetensors weights"
            + (f", only {', '.join(pickles)}" if pickles else "")
            + "; leanstream reads safetensors only (unpickling a downloaded file can run "
            "arbitrary code), so nothing was downloaded",
            file=repo_id,
        )
    if isinstance(chosen, str) and chosen.endswith(".json"):
        shards = sorted(set(_index_shards(folder / chosen)))
        index: str | None = chosen
    else:
        shards = [chosen] if isinstance(chosen, str) else list(chosen)
        index = None
    missing = [s for s in shards if s not in here]
    if missing:
        raise checkpoint_error(
            FileNotFoundCheckpointError,
            f"{where}: {index} names {', '.join(missing[:5])}, not in the repo",
            file=str(folder / (index or missing[0])),
        )

    todo: list[str] = []
    for name in shards:
        size, etag = here[name]
        blob = storage / "blobs" / etag
        link = folder / name
        if blob.is_file() and blob.stat().st_size == size:
            if not link.exists():
                _link(blob, link)
            continue
        todo.append(name)
    weights: Path | list[Path]
    if not todo:
        weights = folder / index if index else [folder / s for s in shards]
        return folder, weights if index or len(shards) > 1 else weights[0], None

    staging = Path(tempfile.mkdtemp(prefix=".leanstream-", dir=storage))
    entries = []
    for name in shards:
        size, etag = here[name]
        blob = storage / "blobs" / etag
        staged = staging / name
        if blob.is_file() and blob.stat().st_size == size:
            staged.parent.mkdir(parents=True, exist_ok=True)
            staged.symlink_to(blob)
            continue
        partial = (storage / "blobs" if keep else staging) / f"{etag}.leanstream"
        entries.append(
            _Shard(
                name=prefix + name,
                size=size,
                etag=etag,
                url=hf_hub_url(repo_id, prefix + name, revision=commit),
                staged=staged,
                partial=partial,
                blob=blob if keep else None,
                link=folder / name if keep else None,
                arrival=_core.Arrival(size),
            )
        )
    if index:
        (staging / index).symlink_to(folder / index)
    weights = staging / index if index else [staging / s for s in shards]
    if not index and len(shards) == 1:
        weights = weights[0]
    download = HubDownload(
        entries,
        staging=staging,
        storage=storage,
        cache_dir=Path(cache_dir) if cache_dir else Path(constants.HF_HUB_CACHE),
        token=token,
        keep=keep,
        progress=progress and not headers_only,
        label=repo_id,
        headers_only=headers_only,
    )
    try:
        download.start()
    except BaseException:
        download.close()
        raise
    return folder, weights, download


def _listing(
    repo_id: str, commit: str, storage: Path, token: str | bool | None
) -> dict[str, tuple[int, str]]:
    """``{path: (size, etag)}`` of the files of ``commit`` (etag: the sha256 of an LFS
    file, else its git blob id: huggingface_hub's blob name). From huggingface_hub's
    listing of that commit in the cache (``snapshot_download`` just wrote it; a commit
    does not change), else from the hub (``list_repo_tree``)."""
    try:
        from huggingface_hub._tree_cache import read_tree_cache

        cached = read_tree_cache(str(storage), commit)
    except Exception:  # a private module: any change in it falls back to asking the hub
        cached = None
    if cached:
        return {p: (e.lfs_size or e.size, e.lfs_sha256 or e.blob_id) for p, e in cached.items()}
    from huggingface_hub import HfApi

    listing = HfApi(token=token).list_repo_tree(repo_id, recursive=True, revision=commit)
    return {
        f.path: (f.size, f.lfs.sha256 if f.lfs is not None else f.blob_id)
        for f in listing
        if hasattr(f, "blob_id")
    }


def _verify_fetched(folder: Path, listing: dict[str, tuple[int, str]], where: str) -> None:
    """Check the small files ``snapshot_download`` put in ``folder`` (configs, index,
    tokenizer) against the hub's hashes, as the shards are: over plain HTTP
    huggingface_hub checks their size only. A mismatch is a :class:`CorruptDownloadError`
    and the file leaves the cache (its blob and its link)."""
    from fnmatch import fnmatch

    for name, (_, etag) in listing.items():
        path = folder / name
        if not any(fnmatch(name, p) for p in SMALL_PATTERNS) or not path.is_file():
            continue  # the shards are checked as they download
        data = path.read_bytes()
        digest = _hasher(etag, len(data))
        digest.update(data)
        got = digest.hexdigest()
        if got == etag:
            continue
        blob = path.resolve()
        for gone in (path, blob):
            with contextlib.suppress(OSError):
                gone.unlink()
        raise checkpoint_error(
            CorruptDownloadError,
            f"{where}: {name}: the downloaded bytes hash to {got}, the hub says {etag}; "
            "it was removed from the cache",
            file=name,
        )


def _hasher(etag: str, size: int) -> Any:
    """What hashes a file of ``size`` bytes to its hub ``etag``: sha256 for an LFS file
    (a 64-digit etag), else git's blob id (sha1 of ``blob <size>\\0`` and the bytes)."""
    if len(etag) == 64:
        return hashlib.sha256()
    digest = hashlib.sha1()
    digest.update(b"blob %d\0" % size)
    return digest


def _index_shards(index: Path) -> list[str]:
    from .checkpoint import read_json

    data = read_json(index, max_size=_core.MAX_INDEX_SIZE)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        return []  # the reader names what is wrong with it
    # './model-00001-of-00002.safetensors' is that shard (transformers and the reader
    # agree); a name leaving the folder is not in the repo's listing (refused before use)
    return [PurePosixPath(v).as_posix() for v in weight_map.values() if isinstance(v, str)]


def _link(blob: Path, link: Path) -> None:
    """``link`` -> ``blob``, relative, as huggingface_hub makes snapshot links (atomic)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.symlink_to(os.path.relpath(blob, link.parent))
    os.replace(tmp, link)


class HubDownload:
    """The shards of one load being downloaded; see :func:`open_hub`."""

    def __init__(
        self,
        shards: list[_Shard],
        *,
        staging: Path,
        storage: Path,
        cache_dir: Path,
        token: str | bool | None,
        keep: bool,
        progress: bool,
        label: str,
        headers_only: bool = False,
    ) -> None:
        from huggingface_hub.utils import build_hf_headers

        self.shards = shards
        self.staging = staging
        self.storage = storage
        self.cache_dir = cache_dir
        self.keep = keep
        self.label = label
        self.token = token
        self.headers_only = headers_only
        self.headers = build_hf_headers(token=token, library_name="leanstream")
        self.connections = max(1, CONNECTIONS)
        self.window = WINDOW_BYTES
        # keep=False: bytes are dropped once hashed, so hash in steps small to the window
        self._hash_step = _HASH_STEP if keep else max(_PAGE, min(_HASH_STEP, self.window // 16))
        self.total = sum(s.size for s in shards)
        self._cond = threading.Condition()
        self._queue: list[tuple[_Shard, int, int]] = []
        self._in_flight: dict[tuple[int, int], tuple[_Shard, int, int]] = {}
        self._error: BaseException | None = None
        self._stop = False
        self._opened = False
        self._threads: list[threading.Thread] = []
        self._release_at: dict[int, list[tuple[_Shard, int, int]]] = {}
        self._items: list[tuple[_Shard, int, int] | None] = []
        self._consumed = -1
        self._on_disk = 0
        self._peak_on_disk = 0
        #: ``time.monotonic()`` when the last missing byte was written (None before)
        self.last_byte_at: float | None = None
        self._received = 0
        self._missing_at_start = 0
        self._progress = progress
        self._bar: Any = None
        self._stack = contextlib.ExitStack()

    # -- what the loader calls --------------------------------------------------------

    @property
    def arrivals(self) -> list[tuple[Path, _core.Arrival]]:
        """``(path, Arrival)`` for ``_core.Checkpoint(..., arrivals=)``."""
        return [(s.staged, s.arrival) for s in self.shards]

    @property
    def downloaded(self) -> int:
        """Bytes of the shards in their files so far (resumed ones included)."""
        return sum(s.arrival.arrived for s in self.shards)

    @property
    def peak_on_disk(self) -> int:
        """With ``keep=False``: the most bytes held on disk at once (holes excluded)."""
        return self._peak_on_disk

    def start(self) -> None:
        """Take huggingface_hub's lock of each blob, resume or create its file, fetch the
        headers, and start the workers (in file order until :meth:`prioritize`)."""
        from huggingface_hub.utils import WeakFileLock

        if self._progress:
            from .progress import byte_progress

            self._bar = self._stack.enter_context(
                byte_progress(self.total, f"download {self.label}", enabled=True)
            )
        locks = self.cache_dir / ".locks" / self.storage.name
        for shard in self.shards:
            if self.keep:
                locks.mkdir(parents=True, exist_ok=True)
                self._stack.enter_context(WeakFileLock(locks / f"{shard.etag}.lock"))
                if shard.blob is not None and shard.blob.is_file():
                    # another process finished it while we waited for the lock
                    shard.partial = shard.blob
                    shard.arrival.add(0, shard.size)
                    shard.finished = True
                    shard.staged.symlink_to(shard.blob)
                    if shard.link is not None and not shard.link.exists():
                        _link(shard.blob, shard.link)
                    continue
            self._prepare(shard)
        if self._bar is not None:
            self._bar.update(self.downloaded)
        self._missing_at_start = self.total - self.downloaded
        pending = [s for s in self.shards if not s.finished]
        with self._pool(len(pending)) as run:
            for shard in pending:
                run(self._fetch_header, shard)
        if self.headers_only:
            return
        for shard in pending:
            self._queue.extend(
                (shard, start, min(start + CHUNK_BYTES, shard.size))
                for start in range(0, shard.size, CHUNK_BYTES)
            )
            self._spawn(self._hash, shard, name=f"leanstream-hash-{shard.etag[:8]}")
        for i in range(self.connections):
            self._spawn(self._work, name=f"leanstream-download-{i}")

    def opened(self) -> None:
        """The reader has opened every shard: verified ones may now be moved into place."""
        with self._cond:
            self._opened = True
            self._cond.notify_all()

    def prioritize(self, items: list[tuple[str, int, int]]) -> None:
        """Download in the order the model reads: ``(file, start, end)`` of each tensor as
        the reader sees it (``TensorInfo.file``), in reading order. What no item covers
        comes last, in file order."""
        by_path = {str(s.staged): s for s in self.shards}
        located = [(by_path.get(file), start, end) for file, start, end in items]
        order: list[tuple[_Shard, int, int]] = []
        seen: set[tuple[int, int]] = set()
        last_use: dict[tuple[int, int, int], int] = {}
        for i, (file, start, end) in enumerate(items):
            shard = by_path.get(file)
            if shard is None or start >= end:
                continue
            last_use[(id(shard), start, end)] = i
            for chunk in range(start // CHUNK_BYTES, (end - 1) // CHUNK_BYTES + 1):
                if (id(shard), chunk) not in seen:
                    seen.add((id(shard), chunk))
                    order.append(
                        (shard, chunk * CHUNK_BYTES, min((chunk + 1) * CHUNK_BYTES, shard.size))
                    )
        with self._cond:
            self._items = [(s, a, b) if s is not None else None for s, a, b in located]
            rest = [u for u in self._queue if (id(u[0]), u[1] // CHUNK_BYTES) not in seen]
            queued = {(id(u[0]), u[1]) for u in self._queue}
            self._queue = [u for u in order if (id(u[0]), u[1]) in queued] + rest
            if not self.keep:
                shards = {id(s): s for s in self.shards}
                for (sid, start, end), i in last_use.items():
                    self._release_at.setdefault(i, []).append((shards[sid], start, end))
                used = {(id(u[0]), u[1] // CHUNK_BYTES) for u in order}
                for shard in self.shards:
                    for start in range(0, shard.size, CHUNK_BYTES):
                        if (id(shard), start // CHUNK_BYTES) not in used:
                            self._droppable(shard, start, min(start + CHUNK_BYTES, shard.size))
                    self._droppable(shard, 0, _header_end(shard))
            self._cond.notify_all()

    def consumed(self, index: int) -> None:
        """The model is done with the items of :meth:`prioritize` up to ``index``: with
        ``keep=False``, the bytes no later item reads may go."""
        if self.keep:
            return
        with self._cond:
            while self._consumed < index:
                self._consumed += 1
                for shard, start, end in self._release_at.pop(self._consumed, ()):
                    self._droppable(shard, start, end)
            self._cond.notify_all()

    def finish(self) -> None:
        """Wait until every shard is downloaded, verified and in place; raise the
        download's error if there is one."""
        self.opened()
        with self._cond:
            while self._error is None and not all(s.finished for s in self.shards):
                self._cond.wait(0.1)
        self._raise()

    def close(self) -> None:
        """Stop the workers and let go of the locks, the progress bar and the staging
        folder. What was downloaded stays for the next load (``keep=True``)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for shard in self.shards:
            shard.more.set()
        reason = self._error or "the load stopped before the download ended"
        for shard in self.shards:
            if not shard.finished:
                shard.arrival.fail(str(reason))
        # a request stalled in a read would hold Ctrl-C up to READ_TIMEOUT_S: wait a
        # moment, then leave it (a daemon thread; what it still writes is the file's own
        # bytes, at their place, and is not recorded as written)
        deadline = time.monotonic() + 2.0
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for shard in self.shards:
            if self.keep and not shard.finished and shard.partial.exists():
                self._save_sidecar(shard)
        self._stack.close()
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> HubDownload:
        return self

    def __exit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        self.close()
        cause = self._error
        if exc is not None and cause is not None and cause is not exc:
            # the load failed because the download did (a shard found corrupt, a server
            # that kept failing): that is the error to see
            if isinstance(exc, _core.LeanstreamError):
                raise cause from None

    def error(self) -> BaseException | None:
        """The error that stopped the download, if any."""
        return self._error

    # -- workers ------------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], *args: Any, name: str) -> None:
        thread = threading.Thread(target=self._guarded, args=(target, *args), name=name)
        thread.daemon = True
        self._threads.append(thread)
        thread.start()

    def _guarded(self, target: Callable[..., None], *args: Any) -> None:
        try:
            target(*args)
        except BaseException as err:
            self._fail(err)

    @contextlib.contextmanager
    def _pool(self, n: int) -> Iterator[Callable[..., None]]:
        """Run calls on up to ``connections`` threads; re-raise the first error."""
        errors: list[BaseException] = []
        sem = threading.Semaphore(self.connections)
        threads = []

        def call(fn: Callable[..., None], *args: Any) -> None:
            try:
                fn(*args)
            except BaseException as err:
                errors.append(err)
            finally:
                sem.release()

        def run(fn: Callable[..., None], *args: Any) -> None:
            sem.acquire()
            t = threading.Thread(target=call, args=(fn, *args), daemon=True)
            threads.append(t)
            t.start()

        yield run
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def _fail(self, err: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = err
            self._stop = True
            self._cond.notify_all()
        for shard in self.shards:
            shard.more.set()
        for shard in self.shards:
            if not shard.finished:
                shard.arrival.fail(str(err))

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _prepare(self, shard: _Shard) -> None:
        """Create the shard's file at its full size, or resume the one a previous load
        left (its sidecar says which ranges were written)."""
        shard.partial.parent.mkdir(parents=True, exist_ok=True)
        ranges: list[tuple[int, int]] = []
        if shard.partial.exists():
            try:
                state = json.loads(shard.sidecar.read_text())
                if state.get("size") == shard.size and state.get("etag") == shard.etag:
                    ranges = [(int(a), int(b)) for a, b in state.get("ranges", [])]
            except (OSError, ValueError, TypeError, AttributeError):
                ranges = []  # no record to trust: download it all again (the hash decides)
        with open(shard.partial, "ab") as f:
            f.truncate(shard.size)
        for start, end in ranges:
            if 0 <= start < end <= shard.size:
                shard.arrival.add(start, end)
        shard.staged.parent.mkdir(parents=True, exist_ok=True)
        shard.staged.symlink_to(shard.partial)
        self._account(shard.arrival.arrived)

    def _fetch_header(self, shard: _Shard) -> None:
        """Write the 8-byte length and the JSON header first: the reader validates every
        header before the first tensor is read."""
        if not shard.arrival.covers(0, min(8, shard.size)):
            self._get(shard, 0, min(HEADER_GUESS, CHUNK_BYTES, shard.size))
        end = _header_end(shard)
        if end > shard.size:
            return  # the reader names the malformed header
        for start, stop in shard.arrival.missing(0, end):
            self._get(shard, start, stop)

    def _next_unit(self) -> tuple[_Shard, int, int] | None:
        with self._cond:
            while True:
                if self._stop:
                    return None
                pick = self._pick()
                if pick is not None:
                    unit = self._queue.pop(pick)
                    self._in_flight[(id(unit[0]), unit[1])] = unit
                    return unit
                if not self._queue:
                    return None
                self._cond.wait(0.5)

    def _pick(self) -> int | None:
        """(under the lock) Which queued chunk to download next: the first, in reading
        order. With keep=False, only if it fits in ``window`` with what is on disk; when
        nothing fits and nothing is in flight, one chunk anyway (so the load always
        progresses): the one the hash of its shard waits for, if queued (hashing it lets
        what was read behind it go), else the reader's next."""
        if not self._queue:
            return None
        if self.keep:
            return 0
        # what is on disk, and what the requests in flight will add (counted twice while
        # they arrive: the bound errs on the safe side)
        held = self._on_disk + sum(end - start for _, start, end in self._in_flight.values())
        for i, (_, start, end) in enumerate(self._queue):
            if held + (end - start) <= self.window:
                return i
        # over the window: only what the reader waits for, or what lets bytes go
        need = self._needed()
        if need is not None:
            for i, (shard, start, end) in enumerate(self._queue):
                if shard is need[0] and start < need[2] and end > need[1]:
                    return i
        if self._in_flight:
            return None
        for i, (shard, start, end) in enumerate(self._queue):
            waiting = shard.droppable is not None and any(
                e > shard.hashed for _, e in shard.droppable.ranges()
            )
            if waiting and start <= shard.arrival.contiguous < end:
                return i
        return None

    def _needed(self) -> tuple[_Shard, int, int] | None:
        """(under the lock) The item the reader is on, if its bytes have not all
        arrived: what it waits for."""
        at = self._consumed + 1
        item = self._items[at] if at < len(self._items) else None
        if item is not None and not item[0].arrival.covers(item[1], item[2]):
            return item
        return None

    def _work(self) -> None:
        while (unit := self._next_unit()) is not None:
            shard, start, end = unit
            try:
                for gap_start, gap_end in shard.arrival.missing(start, end):
                    self._get(shard, gap_start, gap_end)
            finally:
                with self._cond:
                    self._in_flight.pop((id(shard), start), None)
                    self._cond.notify_all()
                if self.keep:
                    self._save_sidecar(shard)

    def _location(self, shard: _Shard) -> tuple[str, dict[str, str]]:
        """Where ``shard``'s bytes are fetched from, and with which headers: the address
        the hub redirects its ``resolve`` URL to (its CDN), asked once per shard with
        huggingface_hub's ``get_hf_file_metadata`` (as ``hf_hub_download`` does) rather
        than once per chunk: the hub limits ``resolve`` requests. The token goes to the
        hub's own host only."""
        from urllib.parse import urlsplit

        from huggingface_hub import get_hf_file_metadata

        with shard.location_lock:
            if shard.location is None:
                meta = get_hf_file_metadata(shard.url, token=self.token)
                if meta.etag is not None and meta.etag != shard.etag:
                    raise checkpoint_error(
                        DownloadError,
                        f"{shard.name}: the hub now serves etag {meta.etag}, its listing of "
                        f"the same commit said {shard.etag}",
                        file=shard.name,
                    )
                shard.location = meta.location or shard.url
            location = shard.location
        headers = {**self.headers, "Accept-Encoding": "identity"}
        if urlsplit(location).netloc != urlsplit(shard.url).netloc:
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        return location, headers

    def _get(self, shard: _Shard, start: int, end: int) -> None:
        """Download ``[start, end)`` of ``shard`` into its file, resuming after a dropped
        connection and retrying server errors, ``ATTEMPTS`` times in all; an address that
        stopped working (a signed CDN URL that expired) is asked for again."""
        import httpx2
        from huggingface_hub.utils import get_session, hf_raise_for_status

        at, attempt = start, 0
        fd = os.open(shard.partial, os.O_WRONLY)
        try:
            while at < end:
                if self._stop:
                    raise DownloadError(str(self._error or "stopped"))
                progress_at = at
                try:
                    url, request = self._location(shard)
                    request["Range"] = f"bytes={at}-{end - 1}"
                    with get_session().stream(
                        "GET",
                        url,
                        headers=request,
                        follow_redirects=True,
                        timeout=httpx2.Timeout(READ_TIMEOUT_S, connect=READ_TIMEOUT_S),
                    ) as response:
                        if response.status_code in _EXPIRED and url != shard.url:
                            response.read()
                            with shard.location_lock:
                                shard.location = None
                            raise _Retryable(f"HTTP {response.status_code} from {url}")
                        if response.status_code >= 400:
                            response.read()
                            hf_raise_for_status(response)
                        whole = response.status_code == 200 and at == 0
                        if response.status_code != 206 and not whole:
                            raise _Retryable(
                                f"asked for bytes {at}-{end - 1}, got HTTP "
                                f"{response.status_code} without a range"
                            )
                        for data in response.iter_bytes():
                            if self._stop:
                                raise DownloadError(str(self._error or "stopped"))
                            take = data[: end - at]
                            os.pwrite(fd, take, at)
                            shard.arrival.add(at, at + len(take))
                            at += len(take)
                            self._arrived(shard, len(take))
                            if at >= end:
                                break
                    if at < end:
                        raise _Retryable(f"the response ended at byte {at} of {start}-{end - 1}")
                except (httpx2.TransportError, _Retryable) as err:
                    attempt = attempt + 1 if at == progress_at else 1
                    self._retry_or_raise(shard, attempt, err)
                except Exception as err:
                    status = getattr(getattr(err, "response", None), "status_code", None)
                    if status is not None and status >= 500:
                        attempt += 1
                        self._retry_or_raise(shard, attempt, err)
                    else:
                        raise checkpoint_error(
                            DownloadError,
                            f"{shard.name}: {type(err).__name__}: {err}",
                            file=shard.name,
                        ) from err
        finally:
            os.close(fd)

    def _retry_or_raise(self, shard: _Shard, attempt: int, err: BaseException) -> None:
        if attempt >= ATTEMPTS:
            raise checkpoint_error(
                DownloadError,
                f"{shard.name}: gave up after {ATTEMPTS} attempts without progress: "
                f"{type(err).__name__}: {err} (what was downloaded is kept: the next load "
                "resumes from it)",
                file=shard.name,
            ) from err
        with self._cond:
            self._cond.wait_for(lambda: self._stop, BACKOFF_S * 2 ** (attempt - 1))

    def _arrived(self, shard: _Shard, n: int) -> None:
        with self._cond:
            self._account(n)
            self._received += n
            if self._received >= self._missing_at_start:
                self.last_byte_at = time.monotonic()
        # what waits on the shared condition (a worker for room in the window, finish)
        # waits for chunks to end or bytes to be dropped, not for bytes to arrive
        shard.more.set()
        if self._bar is not None:
            self._bar.update(n)

    def _account(self, n: int) -> None:
        self._on_disk += n
        self._peak_on_disk = max(self._peak_on_disk, self._on_disk)

    def _hash(self, shard: _Shard) -> None:
        """Hash the shard's bytes as they arrive, in order; when all have, compare with
        the hub's hash and move the file into place (or drop it)."""
        shard.digest = _hasher(shard.etag, shard.size)
        fd = os.open(shard.partial, os.O_RDONLY)
        try:
            while shard.hashed < shard.size:
                # wait for at least _HASH_STEP more bytes in order (or the last ones)
                while not self._stop:
                    upto = shard.arrival.contiguous
                    if upto - shard.hashed >= self._hash_step or upto == shard.size:
                        break
                    shard.more.wait(0.5)
                    shard.more.clear()
                if self._stop:
                    return
                while shard.hashed < upto:
                    n = min(8 << 20, upto - shard.hashed)
                    data = os.pread(fd, n, shard.hashed)
                    if len(data) != n:
                        raise checkpoint_error(
                            DownloadError,
                            f"{shard.partial}: shorter than the bytes written to it",
                            file=shard.name,
                        )
                    shard.digest.update(data)
                    shard.hashed += n
                if not self.keep:
                    with self._cond:
                        self._punch(shard)
                        self._cond.notify_all()  # room in the window for a waiting worker
        finally:
            os.close(fd)
        self._complete(shard)

    def _complete(self, shard: _Shard) -> None:
        got = shard.digest.hexdigest()
        if got != shard.etag:
            err = checkpoint_error(
                CorruptDownloadError,
                f"{shard.name}: the downloaded bytes hash to {got}, the hub says {shard.etag} "
                f"({'sha256' if shard.lfs else 'git blob id'}); nothing of this file was kept",
                file=shard.name,
            )
            shard.arrival.fail(str(err))
            with self._cond:
                # the reader opens the file first (it then fails on it, as it should)
                self._cond.wait_for(lambda: self._opened or self._stop)
            with shard.sidecar_lock, contextlib.suppress(OSError):
                shard.sidecar.unlink()
            with contextlib.suppress(OSError):
                shard.partial.unlink()
            raise err
        if self.keep and shard.blob is not None:
            with self._cond:
                self._cond.wait_for(lambda: self._opened or self._stop)
            os.replace(shard.partial, shard.blob)
            with shard.sidecar_lock, contextlib.suppress(OSError):
                shard.sidecar.unlink()
            if shard.link is not None:
                _link(shard.blob, shard.link)
        with self._cond:
            shard.finished = True
            self._cond.notify_all()

    # -- keep=False: dropping what was read --------------------------------------------

    def _droppable(self, shard: _Shard, start: int, end: int) -> None:
        """(under the lock) ``[start, end)`` of ``shard`` is not read again."""
        if shard.droppable is None:
            shard.droppable, shard.punched = _core.Arrival(shard.size), _core.Arrival(shard.size)
        shard.droppable.add(start, end)
        self._punch(shard)

    def _punch(self, shard: _Shard) -> None:
        """(under the lock) Punch holes where bytes are hashed and not read again."""
        if shard.droppable is None or shard.punched is None:
            return
        for start, end in shard.droppable.ranges():
            lo = -(-start // _PAGE) * _PAGE
            hi = min(end, shard.hashed)
            hi = hi if hi == shard.size else hi // _PAGE * _PAGE
            for a, b in shard.punched.missing(lo, max(lo, hi)):
                if _punch_hole(shard.partial, a, b - a):
                    shard.punched.add(a, b)
                    self._on_disk -= b - a

    def _save_sidecar(self, shard: _Shard) -> None:
        """Record the ranges written, for the next load to resume (atomic); nothing once
        the shard was verified (or found corrupt)."""
        with shard.sidecar_lock:
            if shard.hashed >= shard.size:
                return
            state = {"size": shard.size, "etag": shard.etag, "ranges": shard.arrival.ranges()}
            tmp = shard.sidecar.with_name(f"{shard.sidecar.name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, shard.sidecar)


#: what a CDN answers for a signed address that expired: ask the hub for a new one
_EXPIRED = (401, 403, 404, 410)


class _Retryable(Exception):
    """A request that may succeed if made again (the attempt counts)."""


def _header_end(shard: _Shard) -> int:
    """Where the shard's header ends (8 + its length), from the bytes written."""
    if not shard.arrival.covers(0, 8):
        return 8
    with open(shard.partial, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


def _punch_hole(path: Path, offset: int, length: int) -> bool:
    """Free ``[offset, offset + length)`` of the file on disk (it reads as zeros after)."""
    import ctypes

    libc = _libc()
    if libc is None:  # no fallocate (not Linux): the bytes stay until the load ends
        return False
    fd = os.open(path, os.O_WRONLY)
    try:
        mode = _FALLOC_PUNCH_HOLE | _FALLOC_KEEP_SIZE
        rc = libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length))
        return rc == 0
    finally:
        os.close(fd)


@functools.cache
def _libc() -> Any:
    """libc with ``fallocate``, or None where there is none (not Linux)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    except (OSError, AttributeError):
        return None
    return libc


__all__ = ["CHUNK_BYTES", "CONNECTIONS", "HubDownload", "config_folder", "locate", "open_hub"]
