"""The loopback Hub (tests/hubserver.py) against huggingface_hub, its reference client."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
import torch
from hubserver import HubServer, git_blob_sha1, use_endpoint
from huggingface_hub import (
    HfApi,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session
from safetensors.torch import save_file

REPO = "org/tiny"
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def _write_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8}
    (folder / "config.json").write_text(json.dumps(config))
    weight_map = {}
    for i, shard in enumerate(SHARDS):
        tensors = {f"layers.{i}.weight": torch.randn(8, 8), f"layers.{i}.bias": torch.randn(8)}
        save_file(tensors, folder / shard)
        weight_map.update(dict.fromkeys(tensors, shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "transformer").mkdir()
    (folder / "transformer" / "config.json").write_text('{"_class_name": "Tiny"}')
    save_file({"w": torch.randn(4, 4)}, folder / "transformer" / "diffusion.safetensors")
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return _write_checkpoint(tmp_path / "ckpt")


@pytest.fixture
def hub(checkpoint: Path):
    with HubServer() as server:
        server.add_repo(REPO, checkpoint)
        yield server


def _url(hub: HubServer, filename: str, revision: str = "main", repo: str = REPO) -> str:
    return hf_hub_url(repo, filename, revision=revision, endpoint=hub.url)


def test_snapshot_download_is_byte_identical_in_the_standard_cache_layout(
    hub: HubServer, checkpoint: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    folder = Path(snapshot_download(REPO, endpoint=hub.url, cache_dir=cache))
    expected = _files(checkpoint)
    assert _files(folder) == expected

    storage = cache / "models--org--tiny"
    commit = (storage / "refs" / "main").read_text()
    assert folder == storage / "snapshots" / commit
    tree = json.loads((storage / "trees" / f"{commit}.json").read_text())
    assert sorted(tree["files"]) == sorted(expected)
    for name, data in expected.items():
        link = folder / name
        assert link.is_symlink()
        lfs = name.endswith(".safetensors")
        blob = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
        assert link.resolve() == (storage / "blobs" / blob).resolve()
    # LFS bodies came from the "CDN" after a 302, without the token; the rest from /resolve
    gets = {r.filename: r.server for r in hub.requests if r.method == "GET" and r.filename}
    assert gets == {name: "cdn" if name.endswith(".safetensors") else "hub" for name in expected}


def test_git_oids_match_git(tmp_path: Path) -> None:
    git = shutil.which("git")
    if git is None:
        pytest.skip("needs git")
    folder = tmp_path / "repo"
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / "a.json").write_text("{}")
    (folder / "sub" / "b.txt").write_text("bee\n")
    (folder / "sub" / "deeper" / "c.md").write_text("# c\n")
    (folder / "sub.txt").write_text("sorts before sub/ in git's order\n")
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}

    def run(*args: str) -> str:
        return subprocess.run(
            [git, *args], cwd=folder, env=env, check=True, capture_output=True, text=True
        ).stdout

    run("init", "-q")
    run("add", "-A")
    tree = run("write-tree").strip()
    oids = {}
    for line in run("ls-tree", "-r", "-t", tree).splitlines():
        meta, path = line.split("\t")
        oids[path] = meta.split()[2]
    shutil.rmtree(folder / ".git")
    with HubServer() as hub:
        hub.add_repo(REPO, folder)
        listed = HfApi(endpoint=hub.url).list_repo_tree(REPO, recursive=True)
        served = {e.path: getattr(e, "blob_id", None) or e.tree_id for e in listed}
    assert served == oids


def test_calls_without_endpoint_reach_the_server(
    hub: HubServer, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_endpoint(monkeypatch, hub.url)
    cache = tmp_path / "cache"
    path = hf_hub_download(REPO, "config.json", cache_dir=cache)
    assert Path(path).read_bytes() == (checkpoint / "config.json").read_bytes()
    assert Path(snapshot_download(REPO, cache_dir=cache, allow_patterns="transformer/*")).is_dir()
    assert huggingface_hub.model_info(REPO).sha == HfApi().repo_info(REPO).sha
    listed = {e.path for e in huggingface_hub.list_repo_tree(REPO, recursive=True)}
    assert listed == set(_files(checkpoint)) | {"transformer"}
    meta = get_hf_file_metadata(hf_hub_url(REPO, SHARDS[0]))
    assert meta.etag == hashlib.sha256((checkpoint / SHARDS[0]).read_bytes()).hexdigest()
    assert all(r.server in ("hub", "cdn") for r in hub.requests) and hub.requests


def test_model_info_with_files_metadata(hub: HubServer, checkpoint: Path) -> None:
    info = HfApi(endpoint=hub.url).model_info(REPO, files_metadata=True)
    files = _files(checkpoint)
    assert info.id == REPO
    assert len(info.sha) == 40
    assert info.config == {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == set(files)
    for name, data in files.items():
        s = siblings[name]
        assert s.size == len(data)
        if name.endswith(".safetensors"):
            assert s.lfs.sha256 == hashlib.sha256(data).hexdigest()
            assert s.lfs.size == len(data)
        else:
            assert s.lfs is None
            assert s.blob_id == git_blob_sha1(data)
    bare = HfApi(endpoint=hub.url).model_info(REPO, revision=info.sha)
    assert bare.sha == info.sha
    assert {s.rfilename for s in bare.siblings} == set(files)
    assert all(s.size is None for s in bare.siblings)


def test_tree_pagination_and_paths_info(checkpoint: Path) -> None:
    with HubServer(tree_page_size=2) as hub:
        hub.add_repo(REPO, checkpoint)
        api = HfApi(endpoint=hub.url)
        everything = list(api.list_repo_tree(REPO, recursive=True))
        top = list(api.list_repo_tree(REPO))
        sub = list(api.list_repo_tree(REPO, path_in_repo="transformer"))
        info = api.get_paths_info(REPO, ["config.json", "transformer", "missing.bin"])
        pages = [r for r in hub.requests if "recursive=true&" in r.path.lower()]
    files = _files(checkpoint)
    assert sorted(e.path for e in everything) == sorted([*files, "transformer"])
    assert len(pages) == (len(everything) + 1) // 2  # 2 entries a page
    assert {e.path for e in top} == {n for n in files if "/" not in n} | {"transformer"}
    assert [type(e).__name__ for e in top].count("RepoFolder") == 1
    assert {e.path for e in sub} == {"transformer/config.json", "transformer/diffusion.safetensors"}
    assert [(type(e).__name__, e.path) for e in info] == [
        ("RepoFile", "config.json"),
        ("RepoFolder", "transformer"),
    ]


def test_file_metadata_and_redirects(checkpoint: Path) -> None:
    data = (checkpoint / SHARDS[1]).read_bytes()
    config = (checkpoint / "config.json").read_bytes()
    for redirect in (True, False):
        with HubServer(redirect_lfs=redirect) as hub:
            commit = hub.add_repo(REPO, checkpoint)
            lfs = get_hf_file_metadata(_url(hub, SHARDS[1]))
            plain = get_hf_file_metadata(_url(hub, "config.json"))
            cdn = hub.cdn_url
        assert (lfs.commit_hash, lfs.etag, lfs.size) == (
            commit,
            hashlib.sha256(data).hexdigest(),
            len(data),
        )
        assert lfs.location.startswith(cdn) == redirect
        assert (plain.commit_hash, plain.etag, plain.size) == (
            commit,
            git_blob_sha1(config),
            len(config),
        )
        assert plain.location == _url(hub, "config.json")


def test_ranged_gets(hub: HubServer, checkpoint: Path) -> None:
    session = get_session()
    for name in ("config.json", SHARDS[0]):  # a git file, and an LFS one behind a redirect
        data = (checkpoint / name).read_bytes()
        size = len(data)
        url = _url(hub, name)
        for header, (start, end) in {
            "bytes=10-19": (10, 20),
            "bytes=5-": (5, size),
            "bytes=-4": (size - 4, size),
            f"bytes=3-{size + 100}": (3, size),
        }.items():
            r = session.get(url, headers={"Range": header})
            assert r.status_code == 206, header
            assert r.content == data[start:end], header
            assert r.headers["Content-Range"] == f"bytes {start}-{end - 1}/{size}"
            assert r.headers["Content-Length"] == str(end - start)
        r = session.get(url, headers={"Range": f"bytes={size}-"})
        assert r.status_code == 416
        assert r.headers["Content-Range"] == f"bytes */{size}"
        r = session.get(url)
        assert (r.status_code, r.content) == (200, data)
        assert r.headers["Accept-Ranges"] == "bytes"
    head = session.head(_url(hub, SHARDS[0]), follow_redirects=False)
    data = (checkpoint / SHARDS[0]).read_bytes()
    assert head.status_code == 302
    assert head.headers["X-Linked-Size"] == str(len(data))
    assert head.headers["X-Linked-Etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert head.headers["X-Repo-Commit"] == HfApi(endpoint=hub.url).model_info(REPO).sha


def test_named_errors(hub: HubServer, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json", endpoint=hub.url, cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="nope", endpoint=hub.url, cache_dir=tmp_path)
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(REPO, "missing.json", endpoint=hub.url, cache_dir=tmp_path)
    r = get_session().head(_url(hub, "missing.json"))
    assert (r.status_code, r.headers["X-Error-Code"]) == (404, "EntryNotFound")
    assert r.headers["X-Repo-Commit"] == api.model_info(REPO).sha


def test_branches_and_commits(hub: HubServer, checkpoint: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "gpt2"}')
    main = HfApi(endpoint=hub.url).model_info(REPO).sha
    dev = hub.add_repo(REPO, other, branch="dev")
    assert dev != main
    cache = tmp_path / "cache"
    got = hf_hub_download(REPO, "config.json", revision="dev", endpoint=hub.url, cache_dir=cache)
    assert Path(got).read_text() == '{"model_type": "gpt2"}'
    got = hf_hub_download(REPO, "config.json", revision=main, endpoint=hub.url, cache_dir=cache)
    assert Path(got).read_bytes() == (checkpoint / "config.json").read_bytes()
    pinned = "0123456789abcdef0123456789abcdef01234567"
    assert hub.add_repo("org/pinned", other, commit=pinned) == pinned
    assert get_hf_file_metadata(_url(hub, "config.json", repo="org/pinned")).commit_hash == pinned


def test_drop_cuts_the_body_once(hub: HubServer, checkpoint: Path) -> None:
    data = (checkpoint / SHARDS[0]).read_bytes()
    hub.drop(SHARDS[0], after_bytes=100)
    received = bytearray()
    with pytest.raises(httpx2.RemoteProtocolError):  # mid-body
        with get_session().stream("GET", _url(hub, SHARDS[0])) as r:
            assert r.status_code == 200
            for chunk in r.iter_bytes():
                received += chunk
    assert bytes(received) == data[:100]
    assert [r.dropped for r in hub.requests if r.server == "cdn"] == [True]
    assert get_session().get(_url(hub, SHARDS[0])).content == data  # it fired once


def test_drop_counts_only_ranges_that_hold_the_offset(hub: HubServer, checkpoint: Path) -> None:
    data = (checkpoint / "config.json").read_bytes()
    hub.drop("config.json", after_bytes=10)
    r = get_session().get(_url(hub, "config.json"), headers={"Range": "bytes=20-"})
    assert r.content == data[20:]
    with pytest.raises(httpx2.RemoteProtocolError):
        get_session().get(_url(hub, "config.json"), headers={"Range": "bytes=5-"})


def test_hf_hub_download_resumes_after_a_drop(
    hub: HubServer, checkpoint: Path, tmp_path: Path
) -> None:
    data = (checkpoint / SHARDS[1]).read_bytes()
    hub.drop(SHARDS[1], after_bytes=100)
    path = hf_hub_download(REPO, SHARDS[1], endpoint=hub.url, cache_dir=tmp_path)
    assert Path(path).read_bytes() == data
    # its 10 MiB read chunks never handed over the 100 bytes, so it fetched everything again
    gets = [(r.bytes_sent, r.dropped) for r in hub.requests if r.method == "GET"]
    assert gets == [(100, True), (len(data), False)]


def test_corrupt_flips_one_byte(hub: HubServer, checkpoint: Path) -> None:
    data = (checkpoint / SHARDS[0]).read_bytes()
    hub.corrupt(SHARDS[0], offset=200)
    for _ in range(2):  # persistent by default
        got = get_session().get(_url(hub, SHARDS[0])).content
        assert got[200] == data[200] ^ 0xFF
        assert got[:200] + got[201:] == data[:200] + data[201:]
    ranged = get_session().get(_url(hub, SHARDS[0]), headers={"Range": "bytes=190-209"}).content
    assert ranged[10] == data[200] ^ 0xFF
    hub.clear_faults()
    hub.corrupt("config.json", offset=0, times=1)
    config = (checkpoint / "config.json").read_bytes()
    assert get_session().get(_url(hub, "config.json")).content[0] == config[0] ^ 0xFF
    assert get_session().get(_url(hub, "config.json")).content == config


def test_error_answers_gets_with_a_status(hub: HubServer, checkpoint: Path, tmp_path: Path) -> None:
    hub.error(SHARDS[0], status=503, times=2)
    assert get_session().head(_url(hub, SHARDS[0])).status_code == 200  # HEAD is not touched
    assert get_session().get(_url(hub, SHARDS[0])).status_code == 503
    with pytest.raises(HfHubHTTPError) as info:
        hf_hub_download(REPO, SHARDS[0], endpoint=hub.url, cache_dir=tmp_path)
    assert info.value.response.status_code == 503
    path = hf_hub_download(REPO, SHARDS[0], endpoint=hub.url, cache_dir=tmp_path)
    assert Path(path).read_bytes() == (checkpoint / SHARDS[0]).read_bytes()


def test_bandwidth_throttles_bodies(tmp_path: Path) -> None:
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "blob.bin").write_bytes(os.urandom(1_000_000))
    with HubServer(bandwidth=10_000_000) as hub:
        hub.add_repo(REPO, folder)
        url = _url(hub, "blob.bin")
        t0 = time.perf_counter()
        body = get_session().get(url).content
        elapsed = time.perf_counter() - t0
        assert len(body) == 1_000_000
        assert hub.bytes_sent == 1_000_000
    assert elapsed >= 0.08  # (1 MB - one 64 KiB burst) / 10 MB/s; no upper bound


def test_concurrent_gets_are_counted(tmp_path: Path) -> None:
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("a.bin", "b.bin"):
        (folder / name).write_bytes(os.urandom(256 * 1024))
    with HubServer(bandwidth=1_000_000) as hub:  # each body takes >= 0.19 s
        hub.add_repo(REPO, folder)
        session = get_session()
        with session.stream("GET", _url(hub, "a.bin")) as a:
            with session.stream("GET", _url(hub, "b.bin")) as b:
                assert len(b.read()) == 256 * 1024
            assert len(a.read()) == 256 * 1024
        assert hub.max_concurrent_gets == 2
        hub.reset_stats()
        assert (hub.max_concurrent_gets, hub.bytes_sent, hub.requests) == (0, 0, [])
        hub.bandwidth = None
        session.get(_url(hub, "a.bin"))
        assert hub.max_concurrent_gets == 1


def test_token_guards_a_repo(checkpoint: Path, tmp_path: Path) -> None:
    with HubServer() as hub:
        hub.add_repo(REPO, checkpoint, token="hf_secret")
        api = HfApi(endpoint=hub.url)
        with pytest.raises(RepositoryNotFoundError):  # 401 without a token, as a private repo
            api.model_info(REPO, token=False)
        for token in (False, "hf_wrong"):
            with pytest.raises(HfHubHTTPError) as info:
                api.model_info(REPO, token=token)
            assert info.value.response.status_code == 401
            with pytest.raises(HfHubHTTPError) as info:
                hf_hub_download(REPO, SHARDS[0], endpoint=hub.url, cache_dir=tmp_path, token=token)
            assert info.value.response.status_code == 401
        assert get_session().get(_url(hub, "config.json")).status_code == 401
        assert api.model_info(REPO, token="hf_secret").id == REPO
        folder = snapshot_download(
            REPO, endpoint=hub.url, cache_dir=tmp_path / "cache", token="hf_secret"
        )
        assert _files(Path(folder)) == _files(checkpoint)


def test_threads_stop_with_the_context(checkpoint: Path) -> None:
    with HubServer() as hub:
        hub.add_repo(REPO, checkpoint)
        url = _url(hub, "config.json")
        assert get_session().get(url).status_code == 200  # leaves a keep-alive connection
        threads = [t for t in threading.enumerate() if t.name.startswith("hubserver")]
        assert hub.running and threads
    assert not hub.running
    assert not any(t.is_alive() for t in threads)
    port = int(url.split(":")[2].split("/")[0])
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass


def test_idle_timeout_stops_the_server() -> None:
    with HubServer(idle_timeout=0.2) as hub:
        deadline = time.monotonic() + 5
        while hub.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not hub.running
        assert hub.stopped_reason == "idle for 0.2 s"
