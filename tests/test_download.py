"""Loading a hub repo while it downloads (leanstream.download), against the loopback hub.

The shards are streamed in ranged requests and quantized as their bytes arrive; these
tests check what a user sees: the model equals a local-folder load, the cache equals
``snapshot_download``'s, faults (a dropped connection, corrupted bytes, server errors, an
interrupted load) end in a resumed download or a named error with nothing marked complete.
"""

from __future__ import annotations

import _thread
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from hubserver import HubServer, use_endpoint

import leanstream
from leanstream import _core, download
from models import write_model

REPO = "org/tiny"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama checkpoint in two shards (bf16)."""
    return write_model(tmp_path_factory.mktemp("src") / "llama", "llama", max_shard_size="200KB")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, source: Path):
    """The loopback hub serving ``source`` as ``org/tiny``, with huggingface_hub pointed
    at it; small chunks so that every shard takes several requests."""
    monkeypatch.setattr(download, "CHUNK_BYTES", 64 << 10)
    monkeypatch.setattr(download, "BACKOFF_S", 0.01)
    with HubServer() as server:
        server.add_repo(REPO, source)
        use_endpoint(monkeypatch, server.url)
        yield server


def _shards(source: Path) -> list[str]:
    return sorted(p.name for p in source.glob("*.safetensors"))


def _load(repo: str, cache: Path, **kwargs):
    return leanstream.load(repo, bits=4, device="cpu", cache_dir=cache, progress=False, **kwargs)


def _logits(model) -> torch.Tensor:
    ids = torch.arange(1, 17).reshape(1, 16) % model.config.vocab_size
    with torch.no_grad():
        return model(ids).logits


def _shard_gets(hub: HubServer, name: str) -> list:
    """The GETs of ``name`` that sent its bytes (not the hub's redirects to the CDN)."""
    return [r for r in hub.requests if r.method == "GET" and r.filename == name and r.status != 302]


def _tree(cache: Path) -> dict[str, str]:
    """Every path under ``cache``: a link's target, a file's bytes (as hex: locks are
    empty), a folder's marker."""
    out = {}
    for path in sorted(cache.rglob("*")):
        key = path.relative_to(cache).as_posix()
        if path.is_symlink():
            out[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            out[key] = "dir"
        else:
            out[key] = path.read_bytes().hex()
    return out


def test_hub_load_streams_and_equals_a_local_load(hub: HubServer, source: Path, tmp_path: Path):
    model = _load(REPO, tmp_path / "cache")
    reference = leanstream.load(source, bits=4, device="cpu", progress=False)
    assert torch.equal(_logits(model), _logits(reference))
    # the shards came in ranged requests of at most CHUNK_BYTES
    for name in _shards(source):
        gets = _shard_gets(hub, name)
        assert len(gets) >= 2, name
        assert all(r.range and r.range.startswith("bytes=") for r in gets), gets
        assert all(r.bytes_sent <= download.CHUNK_BYTES for r in gets)
        size = (source / name).stat().st_size
        assert sum(r.bytes_sent for r in gets) == size, "each byte downloaded once"
        # the hub's resolve URL is asked once per shard (a HEAD, as hf_hub_download
        # does: the hub limits those), the chunks come from where it redirects
        on_hub = [r for r in hub.requests if r.filename == name and r.server == "hub"]
        assert [r.method for r in on_hub] == ["HEAD"], on_hub
        assert all(r.server == "cdn" for r in gets)


def test_the_cache_ends_as_snapshot_download_leaves_it(hub: HubServer, tmp_path: Path):
    from huggingface_hub import snapshot_download

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    _load(REPO, ours)
    snapshot_download(REPO, cache_dir=theirs)
    assert _tree(ours) == _tree(theirs)
    # and the next load is local: no shard is asked for again
    hub.reset_stats()
    model = _load(REPO, ours)
    assert not [r for r in hub.requests if (r.filename or "").endswith(".safetensors")]
    assert model.is_loaded_in_4bit


def test_offline_mode_loads_from_the_cache(
    hub: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    from huggingface_hub import constants

    cache = tmp_path / "cache"
    expected = _logits(_load(REPO, cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.reset_stats()
    assert torch.equal(_logits(_load(REPO, cache)), expected)
    assert torch.equal(_logits(_load(REPO, cache, local_files_only=True)), expected)
    assert hub.requests == []


def test_a_dropped_connection_resumes_with_a_range(hub: HubServer, source: Path, tmp_path: Path):
    name = _shards(source)[0]
    cut = 100_000  # inside the second chunk
    hub.drop(name, cut)
    model = _load(REPO, tmp_path / "cache")
    assert torch.equal(_logits(model), _logits(leanstream.load(source, bits=4, device="cpu")))
    gets = _shard_gets(hub, name)
    assert any(r.dropped for r in gets)
    assert any(r.range == f"bytes={cut}-{2 * download.CHUNK_BYTES - 1}" for r in gets), [
        r.range for r in gets
    ]


def test_server_errors_are_retried(hub: HubServer, source: Path, tmp_path: Path):
    name = _shards(source)[1]
    hub.error(name, 503, times=2)
    model = _load(REPO, tmp_path / "cache")
    assert torch.equal(_logits(model), _logits(leanstream.load(source, bits=4, device="cpu")))
    assert [r.status for r in _shard_gets(hub, name)].count(503) == 2


def test_an_address_that_expired_is_asked_for_again(hub: HubServer, source: Path, tmp_path: Path):
    name = _shards(source)[0]
    hub.error(name, 403, times=1)  # as a CDN answers a signed URL past its expiry
    model = _load(REPO, tmp_path / "cache")
    assert torch.equal(_logits(model), _logits(leanstream.load(source, bits=4, device="cpu")))
    on_hub = [r.method for r in hub.requests if r.filename == name and r.server == "hub"]
    assert on_hub == ["HEAD", "HEAD"], on_hub


def test_corrupted_bytes_are_refused_and_nothing_is_marked_complete(
    hub: HubServer, source: Path, tmp_path: Path
):
    name = _shards(source)[1]
    hub.corrupt(name, (source / name).stat().st_size - 5000)
    cache = tmp_path / "cache"
    with pytest.raises(leanstream.CorruptDownloadError, match="hash") as err:
        _load(REPO, cache)
    assert err.value.file == name
    assert isinstance(err.value, leanstream.DownloadError)
    sha = hub.files(REPO)[name].sha256
    storage = cache / "models--org--tiny"
    assert not (storage / "blobs" / sha).exists()
    assert not list(storage.glob(f"snapshots/*/{name}"))
    assert not list(storage.glob(f"blobs/{sha}.leanstream*")), "the bad bytes are not kept"
    assert not list(storage.glob(".leanstream-*")), "the staging folder is gone"
    # once the server is right again, the next load gets it
    hub.clear_faults()
    model = _load(REPO, cache)
    assert torch.equal(_logits(model), _logits(leanstream.load(source, bits=4, device="cpu")))


def test_an_interrupted_download_resumes_where_it_stopped(
    hub: HubServer, source: Path, tmp_path: Path
):
    name = _shards(source)[0]
    size = (source / name).stat().st_size
    cut = 2 * download.CHUNK_BYTES + 1000
    assert cut < size
    hub.drop(name, cut, times=1000)  # every attempt at that byte fails
    cache = tmp_path / "cache"
    with pytest.raises(leanstream.DownloadError, match="attempts") as err:
        _load(REPO, cache)
    assert err.value.file == name
    storage = cache / "models--org--tiny"
    sha = hub.files(REPO)[name].sha256
    assert not (storage / "blobs" / sha).exists(), "not marked complete"
    state = json.loads((storage / "blobs" / f"{sha}.leanstream.json").read_text())
    kept = sum(end - start for start, end in state["ranges"])
    assert kept >= cut, state
    hub.clear_faults()
    hub.reset_stats()
    model = _load(REPO, cache)
    assert torch.equal(_logits(model), _logits(leanstream.load(source, bits=4, device="cpu")))
    sent = sum(r.bytes_sent for r in _shard_gets(hub, name))
    assert sent == size - kept, "only what was missing is downloaded again"
    assert not list(storage.glob("blobs/*.leanstream*"))


def test_concurrency_stays_within_its_bound(
    hub: HubServer, source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(download, "CONNECTIONS", 2)
    monkeypatch.setattr(download, "CHUNK_BYTES", 32 << 10)
    hub.bandwidth = 512 << 10
    lock, now, most, calls = threading.Lock(), [0], [0], [0]
    both = threading.Barrier(2, timeout=60)  # the first two requests wait for each other
    get = download.HubDownload._get

    def counted(self, *args, **kwargs):
        with lock:
            now[0] += 1
            calls[0] += 1
            first = calls[0] <= 2
            most[0] = max(most[0], now[0])
        try:
            if first:
                both.wait()  # fails (BrokenBarrierError) if they never run at once
            return get(self, *args, **kwargs)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(download.HubDownload, "_get", counted)
    _load(REPO, tmp_path / "cache")
    assert most[0] == 2


def test_a_repo_without_safetensors_is_refused_before_downloading_weights(
    hub: HubServer, source: Path, tmp_path: Path
):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_bytes((source / "config.json").read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(os.urandom(300_000))
    hub.add_repo("org/pickled", pickled)
    with pytest.raises(leanstream.UnsupportedCheckpointError, match=r"pytorch_model\.bin"):
        _load("org/pickled", tmp_path / "cache")
    assert not [r for r in hub.requests if r.filename == "pytorch_model.bin"]


def test_keep_download_false_keeps_no_shard_and_bounds_the_disk(
    hub: HubServer, source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    chunk, window = 16 << 10, 64 << 10
    monkeypatch.setattr(download, "CHUNK_BYTES", chunk)
    monkeypatch.setattr(download, "WINDOW_BYTES", window)
    total = sum((source / n).stat().st_size for n in _shards(source))
    assert total > 3 * window
    peak = [0]
    arrived = download.HubDownload._arrived

    def measured(self, shard, n):
        arrived(self, shard, n)
        on_disk = sum(os.stat(s.partial).st_blocks * 512 for s in self.shards)
        peak[0] = max(peak[0], on_disk)

    monkeypatch.setattr(download.HubDownload, "_arrived", measured)
    cache = tmp_path / "cache"
    model = _load(REPO, cache, keep_download=False)
    assert torch.equal(_logits(model), _logits(leanstream.load(source, bits=4, device="cpu")))
    storage = cache / "models--org--tiny"
    assert not list(storage.glob("blobs/*.leanstream*"))
    assert not list(storage.glob(".leanstream-*"))
    for name in _shards(source):
        assert not (storage / "blobs" / hub.files(REPO)[name].sha256).exists()
        assert not list(storage.glob(f"snapshots/*/{name}"))
    # what is on disk at once: the window, plus the chunks the reader and the hash may
    # always take, plus a page at each end of the ranges still held
    assert 0 < peak[0] <= window + 4 * chunk, (peak[0], total)


def test_two_loads_in_two_threads_share_the_download(hub: HubServer, source: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    hub.bandwidth = 8 << 20
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = _logits(_load(REPO, cache))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    expected = _logits(leanstream.load(source, bits=4, device="cpu"))
    assert torch.equal(results[0], expected) and torch.equal(results[1], expected)


def test_revision_subfolder_variant_and_token(hub: HubServer, source: Path, tmp_path: Path):
    tree = tmp_path / "pipeline"
    (tree / "transformer").mkdir(parents=True)
    for p in source.iterdir():
        (tree / "transformer" / p.name).write_bytes(p.read_bytes())
        if p.suffix == ".safetensors":
            # a second variant next to it: only the one asked for is downloaded
            stem = p.name.replace("model-", "model.fp16-")
            (tree / "transformer" / stem).write_bytes(p.read_bytes())
    index = json.loads((source / "model.safetensors.index.json").read_text())
    index["weight_map"] = {
        k: v.replace("model-", "model.fp16-") for k, v in index["weight_map"].items()
    }
    (tree / "transformer" / "model.safetensors.index.fp16.json").write_text(json.dumps(index))
    hub.add_repo("org/private", tree, branch="dev", token="hf_secret")
    cache = tmp_path / "cache"
    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):  # what the hub says without the token
        _load("org/private", cache, revision="dev", subfolder="transformer", variant="fp16")
    model = _load(
        "org/private",
        cache,
        revision="dev",
        subfolder="transformer",
        variant="fp16",
        token="hf_secret",
    )
    assert torch.equal(_logits(model), _logits(leanstream.load(source, bits=4, device="cpu")))
    fetched = {r.filename for r in hub.requests if r.method == "GET" and r.filename}
    assert any(".fp16-" in (f or "") for f in fetched)
    assert not [f for f in fetched if f.endswith(".safetensors") and ".fp16-" not in f]
    assert (cache / "models--org--private" / "refs" / "dev").is_file()


def test_progress_shows_downloaded_bytes(
    hub: HubServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    leanstream.load(REPO, bits=4, device="cpu", cache_dir=tmp_path / "cache", progress=True)
    err = capsys.readouterr().err
    assert f"download {REPO}" in err
    assert "leanstream" in err


def test_a_wait_for_bytes_is_interrupted_by_ctrl_c(tmp_path: Path):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({"w": torch.ones(1024)}, path)
    size = path.stat().st_size
    arrival = _core.Arrival(size)
    arrival.add(0, size - 4096)  # the header is in, the tensor's end is not
    timer = threading.Timer(0.2, _thread.interrupt_main)
    with _core.Checkpoint(path, arrivals=[(path, arrival)]) as ckpt:
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                ckpt.view("w")
        finally:
            timer.cancel()
        arrival.fail("stopped")
        with pytest.raises(leanstream.DownloadError, match="stopped") as err:
            ckpt.view("w")
        assert err.value.tensor == "w"


def test_ctrl_c_leaves_a_download_the_next_load_resumes(
    hub: HubServer, source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    arrived = download.HubDownload._arrived
    fired = threading.Event()

    def interrupt_midway(self, shard, n):
        arrived(self, shard, n)
        if self.downloaded >= 100_000 and not fired.is_set():
            fired.set()
            _thread.interrupt_main()  # as Ctrl-C: KeyboardInterrupt in the loading thread

    monkeypatch.setattr(download.HubDownload, "_arrived", interrupt_midway)
    hub.bandwidth = 1 << 20
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        _load(REPO, cache)
    storage = cache / "models--org--tiny"
    kept = {}
    for sidecar in storage.glob("blobs/*.leanstream.json"):
        state = json.loads(sidecar.read_text())
        kept[state["etag"]] = sum(end - start for start, end in state["ranges"])
    assert sum(kept.values()) >= 100_000 - (64 << 10), kept
    assert not list(storage.glob(".leanstream-*")), "the staging folder is gone"
    monkeypatch.setattr(download.HubDownload, "_arrived", arrived)
    hub.reset_stats()
    model = _load(REPO, cache)
    assert torch.equal(_logits(model), _logits(leanstream.load(source, bits=4, device="cpu")))
    total = sum((source / n).stat().st_size for n in _shards(source))
    sent = sum(r.bytes_sent for n in _shards(source) for r in _shard_gets(hub, n))
    finished_before = sum(
        (source / n).stat().st_size
        for n in _shards(source)
        if hub.files(REPO)[n].sha256 not in kept
        and (storage / "blobs" / hub.files(REPO)[n].sha256).exists()
        and not list(s for s in _shard_gets(hub, n))
    )
    assert sent == total - sum(kept.values()) - finished_before
    assert not list(storage.glob("blobs/*.leanstream*"))


def test_cli_quantize_streams_a_hub_repo_keeping_no_shard(
    hub: HubServer, source: Path, tmp_path: Path
):
    from safetensors.torch import load_file

    from leanstream.cli import main

    cache = tmp_path / "cache"
    env = {"HF_HUB_CACHE": str(cache)}
    with pytest.MonkeyPatch.context() as mp:
        from huggingface_hub import constants

        mp.setattr(constants, "HF_HUB_CACHE", str(cache))
        for key, value in env.items():
            mp.setenv(key, value)
        code = main(
            ["quantize", REPO, str(tmp_path / "hub"), "--no-keep-download", "--no-progress"]
        )
    assert code == 0
    assert main(["quantize", str(source), str(tmp_path / "local"), "--no-progress"]) == 0
    storage = cache / "models--org--tiny"
    assert (storage / "snapshots").is_dir(), "the configs were fetched into the cache"
    for name in _shards(source):
        assert not (storage / "blobs" / hub.files(REPO)[name].sha256).exists()

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        out = {}
        for shard in sorted(folder.glob("*.safetensors")):
            out.update(load_file(shard))
        return out

    got, expected = tensors(tmp_path / "hub"), tensors(tmp_path / "local")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_load_into_streams_a_hub_repo(hub: HubServer, source: Path, tmp_path: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)

    def build():
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)

    model = leanstream.load_into(
        build, REPO, bits=4, device="cpu", cache_dir=tmp_path / "cache", progress=False
    )
    assert torch.equal(_logits(model), _logits(leanstream.load(source, bits=4, device="cpu")))
    assert [r for r in _shard_gets(hub, _shards(source)[0]) if r.range]


def test_a_corrupted_config_is_refused_too(hub: HubServer, source: Path, tmp_path: Path):
    hub.corrupt("config.json", 10)
    cache = tmp_path / "cache"
    with pytest.raises(leanstream.CorruptDownloadError, match=r"config\.json") as err:
        _load(REPO, cache)
    assert err.value.file == "config.json"
    blob = hub.files(REPO)["config.json"].etag
    storage = cache / "models--org--tiny"
    assert not (storage / "blobs" / blob).exists()
    assert not list(storage.glob("snapshots/*/config.json"))
    hub.clear_faults()
    model = _load(REPO, cache)
    assert torch.equal(_logits(model), _logits(leanstream.load(source, bits=4, device="cpu")))


@pytest.mark.parametrize(
    "record",
    [
        '{"size": 1, "etag": "%(etag)s", "ranges": [[0, 1]]}',  # another file's
        '{"size": %(size)d, "etag": "%(etag)s", "ranges": [["a", null]]}',
        '{"size": %(size)d, "etag": "%(etag)s", "ranges": [[-5, 99999999999]]}',
        '{"size": %(size)d, "etag": "%(etag)s", "ranges": 3}',
        "[1, 2]",
        "{",
    ],
)
def test_a_resume_record_that_does_not_fit_is_not_trusted(
    hub: HubServer, source: Path, tmp_path: Path, record: str
):
    name = _shards(source)[0]
    sha = hub.files(REPO)[name].sha256
    size = (source / name).stat().st_size
    blobs = tmp_path / "cache" / "models--org--tiny" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / f"{sha}.leanstream").write_bytes(b"\xff" * 5000)  # not the shard's bytes
    (blobs / f"{sha}.leanstream.json").write_text(record % {"etag": sha, "size": size})
    model = _load(REPO, tmp_path / "cache")
    assert torch.equal(_logits(model), _logits(leanstream.load(source, bits=4, device="cpu")))


def test_a_resume_record_that_lies_is_caught_by_the_hash(
    hub: HubServer, source: Path, tmp_path: Path
):
    name = _shards(source)[0]
    sha = hub.files(REPO)[name].sha256
    size = (source / name).stat().st_size
    blobs = tmp_path / "cache" / "models--org--tiny" / "blobs"
    blobs.mkdir(parents=True)
    real = (source / name).read_bytes()
    header = 8 + int.from_bytes(real[:8], "little")
    # the header is right (the reader opens the file), the tensors' bytes are not
    (blobs / f"{sha}.leanstream").write_bytes(real[:header] + b"\xff" * (size - header))
    record = {"size": size, "etag": sha, "ranges": [[0, size]]}  # "all written": it is not
    (blobs / f"{sha}.leanstream.json").write_text(json.dumps(record))
    with pytest.raises(leanstream.CorruptDownloadError):
        _load(REPO, tmp_path / "cache")
    assert not (blobs / sha).exists()
    assert not list(blobs.glob(f"{sha}.leanstream*")), "the bad bytes are dropped"
    model = _load(REPO, tmp_path / "cache")  # and the next load downloads it
    assert torch.equal(_logits(model), _logits(leanstream.load(source, bits=4, device="cpu")))


def test_inspect_of_a_hub_repo_fetches_the_headers_only(
    hub: HubServer, source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from huggingface_hub import constants

    from leanstream.cli import inspect_checkpoint

    cache = tmp_path / "cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    got = inspect_checkpoint(REPO)
    expected = inspect_checkpoint(str(source))
    assert got.keys() == expected.keys()
    differ = {k for k in got if got[k] != expected[k]}
    assert differ <= {"source", "folder"}, {k: (got[k], expected[k]) for k in differ}
    for name in _shards(source):
        size = (source / name).stat().st_size
        sent = sum(r.bytes_sent for r in _shard_gets(hub, name))
        header = 8 + int.from_bytes((source / name).read_bytes()[:8], "little")
        assert header <= sent <= min(download.HEADER_GUESS, download.CHUNK_BYTES) < size
    storage = cache / "models--org--tiny"
    assert not list(storage.glob("blobs/*.leanstream*")), "nothing of the shards is kept"
    assert not list(storage.glob(".leanstream-*"))
    assert not [p for p in storage.glob("snapshots/*/*.safetensors")]
