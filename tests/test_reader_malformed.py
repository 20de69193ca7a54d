"""Every way a checkpoint can be malformed raises its own class, before any
byte is handed out, with the file and the tensor in the message and as
``.file`` / ``.tensor``. Files are generated here: no binary fixtures."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from leanstream import _core

E = _core


def raw_shard(path: Path, header: bytes | str | dict[str, Any], data: bytes = b"") -> Path:
    """Write ``header`` (JSON text, or a dict dumped as JSON) after its 8-byte
    little-endian length, then ``data``."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def entry(dtype: str, shape: list[Any], begin: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def good(path: Path) -> Path:
    """A valid two-tensor shard: a = U8[4] at [0, 4), b = F32[2] at [4, 12)."""
    return raw_shard(path, {"a": entry("U8", [4], 0, 4), "b": entry("F32", [2], 4, 12)}, bytes(12))


def index(folder: Path, weight_map: dict[str, str]) -> None:
    text = json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map})
    (folder / "model.safetensors.index.json").write_text(text)


# Each case writes files under a folder and returns (the path to open, the
# name of the file the error is about, the tensor it is about or None).
Case = Callable[[Path], tuple[Path, str, str | None]]


def single(header: Any, data: bytes = b"", tensor: str | None = None) -> Case:
    def make(folder: Path) -> tuple[Path, str, str | None]:
        path = raw_shard(folder / "model.safetensors", header, data)
        return path, path.name, tensor

    return make


def truncated_header(folder: Path) -> tuple[Path, str, str | None]:
    path = folder / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    return path, path.name, None


def zero_length_file(folder: Path) -> tuple[Path, str, str | None]:
    path = folder / "empty.safetensors"
    path.write_bytes(b"")
    return path, path.name, None


def truncated_data(folder: Path) -> tuple[Path, str, str | None]:
    path = good(folder / "model-00001-of-00001.safetensors")
    path.write_bytes(path.read_bytes()[:-3])
    return path, path.name, "b"


def header_length_over_limit(folder: Path) -> tuple[Path, str, str | None]:
    path = folder / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", _core.MAX_HEADER_SIZE + 1) + b"{}")
    return path, path.name, None


def header_length_past_file(folder: Path) -> tuple[Path, str, str | None]:
    path = folder / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b'{"a": 1}')
    return path, path.name, None


def invalid_utf8(folder: Path) -> tuple[Path, str, str | None]:
    path = raw_shard(folder / "latin1.safetensors", b'{"caf\xe9": {}}')
    return path, path.name, None


def sharded(
    shards: dict[str, dict[str, tuple[int, int]]], weight_map: dict[str, str] | None = None
) -> Callable[[Path], Path]:
    """Shards of U8 tensors ``name: (begin, end)``, plus an index if given."""

    def make(folder: Path) -> Path:
        for file, tensors in shards.items():
            header = {n: entry("U8", [e - b], b, e) for n, (b, e) in tensors.items()}
            size = max((e for _, e in tensors.values()), default=0)
            raw_shard(folder / file, header, bytes(size))
        if weight_map is not None:
            index(folder, weight_map)
        return folder

    return make


TWO = {"s1.safetensors": {"a": (0, 4)}, "s2.safetensors": {"b": (0, 2)}}


def index_missing_shard(folder: Path) -> tuple[Path, str, str | None]:
    sharded(TWO, {"a": "s1.safetensors", "b": "s3.safetensors"})(folder)
    return folder, "s3.safetensors", "b"


def index_wrong_shard(folder: Path) -> tuple[Path, str, str | None]:
    sharded(TWO, {"a": "s2.safetensors", "b": "s1.safetensors"})(folder)
    return folder, "model.safetensors.index.json", "a"


def index_lists_absent_tensor(folder: Path) -> tuple[Path, str, str | None]:
    sharded(TWO, {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors"})(folder)
    return folder, "model.safetensors.index.json", "c"


def shard_tensor_not_in_index(folder: Path) -> tuple[Path, str, str | None]:
    shards = {"s1.safetensors": {"a": (0, 4), "extra": (4, 6)}, "s2.safetensors": {"b": (0, 2)}}
    sharded(shards, {"a": "s1.safetensors", "b": "s2.safetensors"})(folder)
    return folder, "model.safetensors.index.json", "extra"


def index_not_json(folder: Path) -> tuple[Path, str, str | None]:
    sharded(TWO)(folder)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {')
    return folder, "model.safetensors.index.json", None


def index_without_weight_map(folder: Path) -> tuple[Path, str, str | None]:
    sharded(TWO)(folder)
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
    return folder, "model.safetensors.index.json", None


def duplicate_tensor_across_shards(folder: Path) -> tuple[Path, str, str | None]:
    sharded({"s1.safetensors": {"a": (0, 4)}, "s2.safetensors": {"a": (0, 4)}})(folder)
    return folder, "s2.safetensors", "a"


def duplicate_tensor_across_listed_shards(folder: Path) -> tuple[Path, str, str | None]:
    shards = {"s1.safetensors": {"a": (0, 4)}, "s2.safetensors": {"a": (0, 4), "b": (4, 6)}}
    sharded(shards, {"a": "s1.safetensors", "b": "s2.safetensors"})(folder)
    return folder, "s2.safetensors", "a"


def folder_without_safetensors(folder: Path) -> tuple[Path, str, str | None]:
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    return folder, folder.name, None


def missing_path(folder: Path) -> tuple[Path, str, str | None]:
    return folder / "nope", "nope", None


A = {"a": entry("U8", [4], 0, 4)}

CASES: list[tuple[str, Case, type[Exception]]] = [
    ("truncated header", truncated_header, E.TruncatedFileError),
    ("zero-length file", zero_length_file, E.TruncatedFileError),
    ("truncated data", truncated_data, E.TruncatedFileError),
    ("header length > 100MB", header_length_over_limit, E.HeaderTooLargeError),
    ("header length > file", header_length_past_file, E.HeaderTooLargeError),
    ("invalid UTF-8", invalid_utf8, E.InvalidHeaderError),
    ("invalid JSON", single('{"a": {"dtype": "U8",'), E.InvalidHeaderError),
    ("JSON not an object", single("[1, 2, 3]"), E.InvalidHeaderError),
    (
        "duplicate key",
        single('{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "w": {}}', b"x", "w"),
        E.InvalidHeaderError,
    ),
    (
        "duplicate key inside an entry",
        single(
            '{"w": {"dtype": "U8", "dtype": "I8", "shape": [1], "data_offsets": [0, 1]}}', b"x", "w"
        ),
        E.InvalidHeaderError,
    ),
    ("entry not an object", single({"w": [1, 2]}, b"", "w"), E.InvalidHeaderError),
    (
        "missing data_offsets",
        single({"w": {"dtype": "U8", "shape": [1]}}, b"x", "w"),
        E.InvalidHeaderError,
    ),
    (
        "shape not integers",
        single({"w": entry("U8", ["1"], 0, 1)}, b"x", "w"),
        E.InvalidHeaderError,
    ),
    (
        "non-string metadata",
        single({"__metadata__": {"format": "pt", "step": 3}, **A}, bytes(4)),
        E.InvalidHeaderError,
    ),
    ("metadata not an object", single({"__metadata__": "pt", **A}, bytes(4)), E.InvalidHeaderError),
    ("unknown dtype", single({"w": entry("F7", [1], 0, 1)}, b"x", "w"), E.UnknownDtypeError),
    ("lowercase dtype", single({"w": entry("f32", [1], 0, 4)}, bytes(4), "w"), E.UnknownDtypeError),
    ("negative shape", single({"w": entry("U8", [-1], 0, 1)}, b"x", "w"), E.ShapeError),
    (
        "overflowing shape",
        single({"w": entry("F32", [2**32, 2**32], 0, 4)}, bytes(4), "w"),
        E.ShapeError,
    ),
    (
        "shape beyond 64 bits",
        single({"w": entry("U8", [2**70], 0, 4)}, bytes(4), "w"),
        E.ShapeError,
    ),
    (
        "byte-length mismatch",
        single({"w": entry("F32", [2, 2], 0, 15)}, bytes(15), "w"),
        E.ShapeError,
    ),
    ("reversed offsets", single({"w": entry("U8", [0], 4, 0)}, bytes(4), "w"), E.OffsetError),
    ("negative offset", single({"w": entry("U8", [1], -1, 0)}, bytes(4), "w"), E.OffsetError),
    (
        "offsets past end",
        single({**A, "w": entry("U8", [4], 100, 104)}, bytes(4), "w"),
        E.OffsetError,
    ),
    # The data section is exactly the tensors' bytes (safetensors' rule).
    (
        "data not starting at offset 0",
        single({"w": entry("U8", [4], 2, 6)}, bytes(6), "w"),
        E.OffsetError,
    ),
    (
        "gap between two tensors",
        single({**A, "w": entry("U8", [2], 5, 7)}, bytes(7), "w"),
        E.OffsetError,
    ),
    (
        "empty tensor inside another",
        single({**A, "z": entry("F32", [0], 2, 2)}, bytes(4), "z"),
        E.OffsetError,
    ),
    ("bytes after the last tensor", single(A, bytes(5)), E.TrailingDataError),
    ("empty header followed by data", single({}, b"PK\x03\x04payload"), E.TrailingDataError),
    (
        "metadata only, followed by data",
        single({"__metadata__": {"format": "pt"}}, b"\x00"),
        E.TrailingDataError,
    ),
    (
        "overlap",
        single({**A, "w": entry("U8", [2], 3, 5)}, bytes(5), "w"),
        E.OverlapError,
    ),
    ("index names a missing shard", index_missing_shard, E.FileNotFoundCheckpointError),
    ("index puts a tensor in the wrong shard", index_wrong_shard, E.IndexMismatchError),
    ("index lists a tensor no shard has", index_lists_absent_tensor, E.IndexMismatchError),
    ("shard tensor missing from index", shard_tensor_not_in_index, E.IndexMismatchError),
    ("index not JSON", index_not_json, E.IndexMismatchError),
    ("index without weight_map", index_without_weight_map, E.IndexMismatchError),
    ("duplicate tensor across shards", duplicate_tensor_across_shards, E.DuplicateTensorError),
    (
        "duplicate tensor across indexed shards",
        duplicate_tensor_across_listed_shards,
        E.DuplicateTensorError,
    ),
    ("folder without safetensors", folder_without_safetensors, E.FileNotFoundCheckpointError),
    ("missing path", missing_path, E.FileNotFoundCheckpointError),
]


@pytest.mark.parametrize(("make", "cls"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed(tmp_path: Path, make: Case, cls: type[Exception]) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    path, file, tensor = make(folder)
    with pytest.raises(cls) as exc:
        _core.Checkpoint(path)
    err = exc.value
    assert type(err) is cls, f"{type(err).__name__}: {err}"
    message = str(err)
    assert file in message
    assert err.file is not None
    assert Path(err.file).name == file
    assert Path(err.file).is_absolute()
    assert err.tensor == tensor
    if tensor is not None:
        assert f"'{tensor}'" in message


def test_shape_message_names_file_tensor_and_numbers(tmp_path: Path) -> None:
    name = "model.layers.0.mlp.up_proj.weight"
    path = raw_shard(
        tmp_path / "model-00002-of-00003.safetensors",
        {name: entry("BF16", [11008, 4096], 0, 90177534)},
    )
    with pytest.raises(E.ShapeError) as exc:
        _core.Checkpoint(path)
    assert str(exc.value) == (
        f"{path}: tensor '{name}': "
        "shape [11008, 4096] x BF16 needs 90177536 bytes but data_offsets give 90177534"
    )


def test_messages_say_what_is_wrong(tmp_path: Path) -> None:
    def message(header: Any, data: bytes = b"") -> str:
        with pytest.raises(E.CheckpointError) as exc:
            _core.Checkpoint(raw_shard(tmp_path / "m.safetensors", header, data))
        return str(exc.value)

    assert "duplicate" in message('{"w": 1, "w": 2}')
    assert "UTF-8" in message(b"{\xff}")
    assert "not valid JSON" in message("{")
    assert "not an object" in message("[]")
    assert "'F7'" in message({"w": entry("F7", [1], 0, 1)}, b"x")
    assert "overflows" in message({"w": entry("F32", [2**32, 2**32], 0, 4)}, bytes(4))
    assert "reversed" in message({"w": entry("U8", [0], 4, 0)}, bytes(4))
    assert "past the end" in message({**A, "w": entry("U8", [4], 100, 104)}, bytes(4))
    assert "gap" in message({**A, "w": entry("U8", [4], 6, 10)}, bytes(10))
    assert "before the first tensor" in message({"w": entry("U8", [4], 2, 6)}, bytes(6))
    assert "inside tensor 'a'" in message({**A, "z": entry("U8", [0], 2, 2)}, bytes(4))
    assert "3 bytes after the last tensor 'a'" in message(A, bytes(7))
    assert "overlap tensor 'a'" in message({**A, "w": entry("U8", [2], 3, 5)}, bytes(5))
    assert "not a string" in message({"__metadata__": {"k": 1}})


def test_index_mismatch_names_both_files(tmp_path: Path) -> None:
    path, _, _ = index_wrong_shard(tmp_path)
    with pytest.raises(E.IndexMismatchError) as exc:
        _core.Checkpoint(path)
    assert "s1.safetensors" in str(exc.value)
    assert "s2.safetensors" in str(exc.value)


def test_missing_folder_contents_are_listed(tmp_path: Path) -> None:
    path, _, _ = folder_without_safetensors(tmp_path)
    with pytest.raises(E.FileNotFoundCheckpointError) as exc:
        _core.Checkpoint(path)
    assert str(tmp_path) in str(exc.value)
    assert "config.json" in str(exc.value)
    assert "pytorch_model.bin" in str(exc.value)


def test_empty_file_list(tmp_path: Path) -> None:
    with pytest.raises(E.FileNotFoundCheckpointError):
        _core.Checkpoint([])


def test_zero_length_tensors_sit_between_tensors(tmp_path: Path) -> None:
    header = {"s": entry("U8", [0], 0, 0), **A, "z": entry("U8", [0], 4, 4)}
    header |= {"e": entry("F32", [3, 0], 4, 4), "b": entry("U8", [2], 4, 6)}
    ckpt = _core.Checkpoint(raw_shard(tmp_path / "m.safetensors", header, bytes(6)))
    assert ckpt.keys() == ["a", "b", "e", "s", "z"]
    assert len(ckpt.view("z")) == 0
    assert ckpt.view("e").shape == (3, 0)


def test_metadata_null_is_no_metadata(tmp_path: Path) -> None:
    header = {"__metadata__": None, **A}
    ckpt = _core.Checkpoint(raw_shard(tmp_path / "m.safetensors", header, bytes(4)))
    assert ckpt.keys() == ["a"]
    assert ckpt.metadata == {}


def shrink(path: Path, size: int) -> None:
    """Truncate ``path`` keeping its modification time: only the size can tell."""
    stat = path.stat()
    os.truncate(path, size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_file_shrunk_after_open_is_an_error_not_sigbus(tmp_path: Path) -> None:
    path = good(tmp_path / "m.safetensors")
    ckpt = _core.Checkpoint(path)
    early = ckpt.view("b")
    shrink(path, path.stat().st_size - 6)
    with pytest.raises(E.TruncatedFileError, match="shrank") as exc:
        ckpt.view("b")
    assert exc.value.tensor == "b"
    assert exc.value.file == str(path)
    assert len(ckpt.view("a")) == 4
    stream = ckpt.stream(["a", "b"])
    assert next(stream)[0] == "a"
    with pytest.raises(E.TruncatedFileError):
        next(stream)
    stream.close()
    del early  # never read: its pages are gone with the file's tail


def test_file_modified_after_open_is_an_error(tmp_path: Path) -> None:
    """Rewritten in place (same size, a save into the same folder): the bytes may be
    another checkpoint's, so every view is refused, before and after use."""
    path = good(tmp_path / "m.safetensors")
    ckpt = _core.Checkpoint(path)
    view = ckpt.view("a")
    view.check()
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    with pytest.raises(E.TruncatedFileError, match="modified after it was opened") as exc:
        view.check()
    assert (exc.value.file, exc.value.tensor) == (str(path), "a")
    with pytest.raises(E.TruncatedFileError, match="modified"):
        ckpt.view("b")
    with pytest.raises(E.TruncatedFileError, match="modified"), ckpt.stream(["a"]) as stream:
        next(stream)


SECRET = b"AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\nAWS_REGION=eu-west-1\n"


def secret_fragments(secret: bytes) -> list[str]:
    """What an error must not show of ``secret``: any 8 of its characters, and its first
    8 bytes read as a header length (decimal and hex)."""
    text = secret.decode()
    (as_length,) = struct.unpack("<Q", secret[:8])
    chunks = [text[i : i + 8] for i in range(len(text) - 7)]
    return [*chunks, str(as_length), f"{as_length:x}", f"{as_length:X}"]


@pytest.mark.parametrize("how", ["file", "link", "link in folder"])
def test_a_text_file_as_a_shard_is_not_echoed(tmp_path: Path, how: str) -> None:
    """Regression (issue 24): ``model.safetensors`` that is (or links to) a file of
    secrets was refused with "header length 5927657758933604161", its first 8 bytes
    (b"AWS_SECR") as a number. The error names the file and the problem, not the bytes."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shard = folder / "model.safetensors"
    if how == "file":
        shard.write_bytes(SECRET)
    else:
        secrets = tmp_path / "credentials.env"
        secrets.write_bytes(SECRET)
        shard.symlink_to(secrets)
    with pytest.raises(E.HeaderTooLargeError) as exc:
        _core.Checkpoint(folder if how == "link in folder" else shard)
    message = str(exc.value)
    for fragment in secret_fragments(SECRET):
        assert fragment not in message, (fragment, message)
    assert "model.safetensors" in message
    assert Path(exc.value.file).name == "model.safetensors"
    assert "header length" in message and "limit" in message


def test_a_json_file_as_an_index_is_not_echoed(tmp_path: Path) -> None:
    """Regression (issue 24): an index that links to another JSON file (of secrets) is
    refused without quoting its keys or text."""
    secrets = tmp_path / "secrets.json"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "model.safetensors.index.json").symlink_to(secrets)
    for text in ['{"aws_secret_key": "x", "aws_secret_key": "y"}', '{"aws_secret_key": tru}']:
        secrets.write_text(text)
        with pytest.raises(E.IndexMismatchError) as exc:
            _core.Checkpoint(folder)
        assert "aws_secret_key" not in str(exc.value)
        assert "model.safetensors.index.json" in str(exc.value)


def test_json_errors_give_a_position_not_the_text(tmp_path: Path) -> None:
    path = raw_shard(tmp_path / "m.safetensors", '{"aws_secret_key": tru}')
    with pytest.raises(E.InvalidHeaderError) as exc:
        _core.Checkpoint(path)
    assert "aws_secret_key" not in str(exc.value)
    assert "not valid JSON" in str(exc.value)
    assert "line 1 column" in str(exc.value)
