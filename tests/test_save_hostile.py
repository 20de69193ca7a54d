"""What a hostile model folder, or a bad target, can make ``save`` and ``quantize`` do
(issue 24, the write side): tokenizer symlinks that point elsewhere, a save that fails
where hard links are unavailable, a source renamed in its config, targets that cannot be
written."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_cli import run
from test_save import _add_user_files, _checkpoint_copy, _files, _load, _save, save_module

import leanstream

SECRET = b"hf_leanstream_test_secret_token"


def _with_tokenizer(sources: dict[str, Path], folder: Path) -> Path:
    """A copy of the tiny llama checkpoint (with its tokenizer) at ``folder``."""
    shutil.copytree(sources["llama"], folder)
    return folder


def _holds_secret(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.is_file() and SECRET in p.read_bytes()]


# --- 1. tokenizer files: known names, inside the folder, regular files --------------------


@pytest.mark.parametrize("name", ["tokenizer.model", "tokenizer.json"])
def test_tokenizer_symlink_outside_the_folder_is_not_copied_regression_issue_24(
    sources: dict[str, Path], tmp_path: Path, name: str
) -> None:
    """``tokenizer.model -> /elsewhere/secret``: the save copied the file it points to."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    src = _with_tokenizer(sources, tmp_path / "src")
    (src / name).unlink(missing_ok=True)
    (src / name).symlink_to(secret)
    model = _load(sources["llama"])
    with pytest.warns(UserWarning, match=rf"{name}.*outside") as info:
        out = _save(model, tmp_path / "out", tokenizer_from=src)
    assert str(src / name) in str(info[0].message)
    assert not (out / name).exists() and _holds_secret(out) == []
    assert (out / "tokenizer_config.json").exists()  # the others still come along
    # the model's own folder (no tokenizer_from) is held to the same rule
    hostile = _with_tokenizer(sources, tmp_path / "hostile")
    (hostile / name).unlink(missing_ok=True)
    (hostile / name).symlink_to(secret)
    with pytest.warns(UserWarning, match=rf"{name}.*outside"):
        out = _save(_load(hostile), tmp_path / "out2")
    assert not (out / name).exists() and _holds_secret(out) == []


def test_tokenizer_symlink_to_proc_environ_is_not_copied_regression_issue_24(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ln -s /proc/self/environ src/tokenizer.model; HF_TOKEN=... leanstream quantize src
    out`` exited 0 with the environment in out/tokenizer.model."""
    monkeypatch.setenv("HF_TOKEN", SECRET.decode())
    src = _with_tokenizer(sources, tmp_path / "src")
    (src / "tokenizer.model").symlink_to("/proc/self/environ")
    out = tmp_path / "out"
    result = run(
        "quantize", str(src), str(out), "--bits", "4", "--device", "cpu", "--no-progress",
        "--max-shard-size", "40KB",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "tokenizer.model" in result.stderr and "outside" in result.stderr
    assert "leanstream: warning: " in result.stderr and "UserWarning" not in result.stderr
    assert not (out / "tokenizer.model").exists() and _holds_secret(out) == []
    assert (out / "tokenizer.json").exists()
    # in-process, through leanstream.save
    with pytest.warns(UserWarning, match=r"tokenizer\.model.*outside"):
        out = _save(_load(sources["llama"]), tmp_path / "out2", tokenizer_from=src)
    assert not (out / "tokenizer.model").exists() and _holds_secret(out) == []


def test_only_tokenizer_file_names_are_copied_regression_issue_24(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    """The ``tokenizer*`` pattern copied any file so named (``tokenizer_secret.pem``); now
    only the names transformers' tokenizers read and write."""
    src = _with_tokenizer(sources, tmp_path / "src")
    odd = ["tokenizer_secret.pem", "tokenizer.py", "tokenizer-backup.json", "id_rsa.model"]
    for name in odd:
        (src / name).write_bytes(SECRET)
    known = {
        "special_tokens_map.json": b"{}",
        "added_tokens.json": b"{}",
        "vocab.json": b"{}",
        "merges.txt": b"#version: 0.2\n",
        "chat_template.jinja": b"{{ messages }}",
        "spiece.model": b"sp",
        "sentencepiece.bpe.model": b"sp",
        "qwen.tiktoken": b"IQ== 0\n",
    }
    for name, data in known.items():
        (src / name).write_bytes(data)
    out = _save(_load(sources["llama"]), tmp_path / "out", tokenizer_from=src)
    assert _holds_secret(out) == []
    for name in odd:
        assert not (out / name).exists(), name
    for name, data in {**known, "tokenizer.json": None, "tokenizer_config.json": None}.items():
        assert (out / name).read_bytes() == (data or (src / name).read_bytes()), name
    copied = {p.name for p in save_module.tokenizer_files(src)}
    assert copied == {*known, "tokenizer.json", "tokenizer_config.json"}


def _vocab_file_names() -> set[str]:
    """Every ``VOCAB_FILES_NAMES`` value of transformers' tokenizer modules (a sweep of
    their source: importing every tokenizer class would import every model)."""
    import ast

    import transformers

    root = Path(transformers.__file__).parent
    names: set[str] = set()
    for path in [*root.glob("models/*/tokenization_*.py"), *root.glob("tokenization_*.py")]:
        tree = ast.parse(path.read_text())
        constants = {
            t.id: node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            for t in node.targets
            if isinstance(t, ast.Name)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Assign)
                and any(
                    isinstance(t, ast.Name) and t.id == "VOCAB_FILES_NAMES" for t in node.targets
                )
                and isinstance(node.value, ast.Dict)
            ):
                for value in node.value.values:
                    if isinstance(value, ast.Constant):
                        names.add(value.value)
                    elif isinstance(value, ast.Name):
                        names.add(constants[value.id])
    return names


def test_tokenizer_patterns_name_what_transformers_reads_and_writes() -> None:
    """The names :data:`TOKENIZER_PATTERNS` lists are transformers' own: its tokenizers'
    files (``PreTrainedTokenizerBase``) and every tokenizer class's vocabulary files."""
    from fnmatch import fnmatchcase

    from transformers import tokenization_utils_base as base
    from transformers.utils import hub

    own = {
        base.FULL_TOKENIZER_FILE,
        base.TOKENIZER_CONFIG_FILE,
        base.SPECIAL_TOKENS_MAP_FILE,
        base.ADDED_TOKENS_FILE,
        hub.CHAT_TEMPLATE_FILE,
        hub.LEGACY_PROCESSOR_CHAT_TEMPLATE_FILE,
    }
    vocab = _vocab_file_names()
    assert len(vocab) > 20 and {"tokenizer.json", "vocab.json", "spiece.model"} <= vocab
    patterns = save_module.TOKENIZER_PATTERNS
    missing = [n for n in sorted(own | vocab) if not any(fnmatchcase(n, p) for p in patterns)]
    assert missing == []


def test_tokenizer_symlink_inside_the_folder_is_copied(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    """A tokenizer name pointing at another file of the same folder is copied: it is the
    folder's own content (transformers reads it too), so nothing outside it leaks."""
    src = _with_tokenizer(sources, tmp_path / "src")
    (src / "tokenizers").mkdir()
    (src / "tokenizer.json").rename(src / "tokenizers" / "real.json")
    (src / "tokenizer.json").symlink_to(Path("tokenizers") / "real.json")
    (src / "notes.txt").write_bytes(b"the folder's own")
    (src / "vocab.txt").symlink_to(src / "notes.txt")  # absolute, still inside
    out = _save(_load(sources["llama"]), tmp_path / "out", tokenizer_from=src)
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizers" / "real.json").read_bytes()
    assert not (out / "tokenizer.json").is_symlink()
    assert (out / "vocab.txt").read_bytes() == b"the folder's own"


def test_tokenizer_names_that_are_not_regular_files_are_skipped(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    """A FIFO (reading it would block the save), a folder: skipped, and said so."""
    src = _with_tokenizer(sources, tmp_path / "src")
    os.mkfifo(src / "tokenizer.model")
    (src / "vocab.json").mkdir()
    (src / "merges.txt").symlink_to(src / "missing.txt")  # dangling
    with pytest.warns(UserWarning, match="not a regular file") as info:
        out = _save(_load(sources["llama"]), tmp_path / "out", tokenizer_from=src)
    said = " ".join(str(w.message) for w in info)
    assert all(name in said for name in ("tokenizer.model", "vocab.json", "merges.txt"))
    assert {p.name for p in out.iterdir()} >= {"tokenizer.json", "tokenizer_config.json"}
    assert not {"tokenizer.model", "vocab.json", "merges.txt"} & {p.name for p in out.iterdir()}


def _hub_snapshot(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """A huggingface_hub cache entry: ``models--org--name/snapshots/<rev>/<file>`` are
    relative symlinks into ``models--org--name/blobs/<hash>``, as the hub stores them."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / ("ab" * 20)
    (root / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, (name, source) in enumerate(sorted(files.items())):
        blob = root / "blobs" / f"{i:040x}"
        shutil.copyfile(source, blob)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob.name))
    return snapshot


def test_hub_cache_snapshot_tokenizer_is_copied(sources: dict[str, Path], tmp_path: Path) -> None:
    """Every file of a hub snapshot is a symlink into the repo's ``blobs/``: copied, by
    save (the model's own folder, and tokenizer_from) and by ``quantize``; a symlink into
    another repo's blobs, or a blob that is itself a link to elsewhere, is not."""
    cache = tmp_path / "hub"
    snapshot = _hub_snapshot(
        cache, "org/tiny", {p.name: p for p in sources["llama"].iterdir() if p.is_file()}
    )
    expected = (sources["llama"] / "tokenizer.json").read_bytes()
    model = leanstream.load(snapshot, bits=4, device="cpu", progress=False)
    out = _save(model, tmp_path / "out")
    assert (out / "tokenizer.json").read_bytes() == expected
    out = _save(_load(sources["gpt2"]), tmp_path / "out2", tokenizer_from=snapshot)
    assert (out / "tokenizer.json").read_bytes() == expected
    result = run("quantize", str(snapshot), str(tmp_path / "out3"), "--device", "cpu",
                 "--no-progress", "--max-shard-size", "40KB")  # fmt: skip
    assert result.returncode == 0 and "Warning" not in result.stderr, result.stderr
    assert (tmp_path / "out3" / "tokenizer.json").read_bytes() == expected
    # another repo's blob, a blob linking out
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    other = _hub_snapshot(cache, "org/other", {"vocab.json": secret})
    (snapshot / "vocab.json").symlink_to(os.path.relpath(other / "vocab.json", snapshot))
    blob = snapshot.parent.parent / "blobs" / ("f" * 40)
    blob.symlink_to(secret)
    (snapshot / "merges.txt").symlink_to(Path("..", "..", "blobs", blob.name))
    with pytest.warns(UserWarning, match="outside") as info:
        out = _save(_load(sources["gpt2"]), tmp_path / "out4", tokenizer_from=snapshot)
    said = " ".join(str(w.message) for w in info)
    assert "vocab.json" in said and "merges.txt" in said
    assert _holds_secret(out) == [] and (out / "tokenizer.json").read_bytes() == expected


# --- 2. a failed save is undone, with hard links or without -------------------------------


def _failing_rename(step: int, when: str, error: type[BaseException], log: list[str]) -> Any:
    """``save._rename`` that raises ``error`` at its ``step``-th call, ``before`` or
    ``after`` doing the rename (an interrupt right after one), logging every call."""
    real = save_module._rename

    def rename(source: Path, dest: Path) -> None:
        log.append(f"{source.name} -> {dest.parent.name}/{dest.name}")
        fail = len(log) == step
        if fail and when == "before":
            raise _failure(error)
        real(source, dest)
        if fail and when == "after":
            raise _failure(error)

    return rename


def _failure(error: type[BaseException]) -> BaseException:
    if error is KeyboardInterrupt:
        return KeyboardInterrupt()
    return OSError(errno.EIO, "Input/output error (simulated)")


@pytest.mark.parametrize("links", ["hard links", "no hard links"])
@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_failed_commit_is_undone_without_hard_links_regression_issue_24(
    sources: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    links: str,
    error: type[BaseException],
) -> None:
    """Where ``os.link`` fails (some network and FUSE file systems), a replaced file was
    not kept: an int8 save over an NF4 save failing half way left the new config.json
    beside the old shards; and an interrupt right after a rename left it done. Every
    rename, failing before or right after it is done, is undone: the folder is byte for
    byte as before and the hidden folder gone."""
    folder = tmp_path / "out"
    _add_user_files(folder)
    _save(_load(sources["llama"]), folder)  # nf4, 40KB shards
    before = _files(folder)
    int8 = _load(sources["llama"], "int8")
    if links == "no hard links":

        def no_link(*args: Any, **kwargs: Any) -> None:
            raise PermissionError(errno.EPERM, "Operation not permitted (simulated)")

        monkeypatch.setattr(os, "link", no_link)
    raised = KeyboardInterrupt if error is KeyboardInterrupt else leanstream.CheckpointError
    step, finished = 0, False
    while not finished:
        step += 1
        for when in ("before", "after"):
            log: list[str] = []
            monkeypatch.setattr(save_module, "_rename", _failing_rename(step, when, error, log))
            try:
                _save(int8, folder, max_shard_size="100KB")
            except raised:
                assert _files(folder) == before, f"failed {when} rename {step}: {log}"
            else:
                assert len(log) < step  # fewer renames than that: the save went through
                finished = True
                break
    # shards, replaced ones (moved aside without hard links), the index, stale shards,
    # config, generation config, tokenizer
    assert step > 10
    assert not [p for p in folder.iterdir() if p.name.startswith(".leanstream")]
    assert leanstream.load(folder, device="cpu", progress=False).is_loaded_in_8bit


# --- 3. the source folder, whatever its name_or_path says ---------------------------------


@pytest.mark.parametrize("name_or_path", ["someone/else", "elsewhere"])
def test_refuses_the_source_whatever_name_or_path_says_regression_issue_24(
    sources: dict[str, Path], tmp_path: Path, name_or_path: str
) -> None:
    """With ``model.config.name_or_path`` changed, a save onto the source folder replaced
    its shards: the source is what the loader read (``model._leanstream_source``)."""
    folder = _checkpoint_copy(sources, tmp_path)
    before = _files(folder)
    model = _load(folder)
    assert model._leanstream_source == folder.resolve()  # recorded by the loader
    (tmp_path / "elsewhere").mkdir()
    model.config.name_or_path = (
        name_or_path if "/" in name_or_path else str(tmp_path / name_or_path)
    )
    with pytest.raises(leanstream.ConfigError, match="loaded from this folder") as info:
        _save(model, folder)
    assert str(folder) in str(info.value)
    assert _files(folder) == before
    # load_into records it too
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    into = leanstream.load_into(
        lambda: AutoModelForCausalLM.from_config(config), folder, device="cpu", progress=False
    )
    into.config.name_or_path = str(tmp_path / "elsewhere")
    with pytest.raises(leanstream.ConfigError, match="loaded from this folder"):
        _save(into, folder)
    assert _files(folder) == before
    # the default tokenizer source is the folder read too
    other = _save(model, tmp_path / "other")
    assert (other / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()


# --- 4. targets that cannot be written ----------------------------------------------------


def test_target_under_a_file_regression_issue_24(sources: dict[str, Path], tmp_path: Path) -> None:
    """A target whose parent is a file raised a raw NotADirectoryError."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    model = _load(sources["llama"])
    for target in (blocker / "out", blocker / "a" / "b"):
        with pytest.raises(leanstream.ConfigError, match="not a folder") as info:
            _save(model, target)
        assert str(blocker) in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert blocker.read_text() == "x"


def _file_size_limit(tensors: dict[str, Any], path: Path) -> None:
    """A write that really fails inside safetensors: past ``RLIMIT_FSIZE`` (EFBIG, as
    ENOSPC fails a write on a full disk), for this one shard."""
    import resource
    import signal

    from safetensors.torch import save_file

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
    try:
        save_file(tensors, path, metadata={"format": "pt"})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def _safetensors_enospc(tensors: dict[str, Any], path: Path) -> None:
    from safetensors import SafetensorError

    # what safetensors' binding raises on a full disk (Rust's io::Error, formatted)
    raise SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )


def _enospc(tensors: dict[str, Any], path: Path) -> None:
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


@pytest.mark.parametrize(
    "writer",
    [_file_size_limit, _safetensors_enospc, _enospc],
    ids=["file-size-limit", "safetensors-enospc", "os-enospc"],
)
def test_full_disk_regression_issue_24(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: Any
) -> None:
    """A full disk raised safetensors' raw SafetensorError; now a leanstream error naming
    the folder, the file and the cause, the folder as it was."""
    folder = tmp_path / "out"
    _add_user_files(folder)
    _save(_load(sources["llama"]), folder)
    before = _files(folder)
    monkeypatch.setattr(save_module, "_write_shard", writer)
    with pytest.raises(leanstream.CheckpointError, match=r"No space left|too large") as info:
        _save(_load(sources["llama"], "int8"), folder)
    message = str(info.value)
    assert str(folder) in message and "model-00001-of-" in message, message
    assert info.value.file is not None and "model-00001-of-" in info.value.file
    assert _files(folder) == before
    with pytest.raises(leanstream.CheckpointError, match=r"No space left|too large"):
        _save(_load(sources["llama"], "int8"), tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_folder_in_the_way_of_a_file(sources: dict[str, Path], tmp_path: Path) -> None:
    """A folder named like a file the save writes (``config.json/``): refused by name
    (was a raw IsADirectoryError), nothing moved, the folder as it was."""
    folder = tmp_path / "out"
    _add_user_files(folder)
    (folder / "config.json").mkdir()
    (folder / "config.json" / "keep").write_text("mine")
    before = _files(folder)
    with pytest.raises(leanstream.ConfigError, match=r"config\.json: a folder has the name"):
        _save(_load(sources["llama"]), folder)
    assert _files(folder) == before
