"""The Rust reader against the reference: checkpoints written by ``safetensors``
and read back with ``safetensors.safe_open`` must match byte for byte."""

from __future__ import annotations

import ctypes
import gc
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from leanstream import _core
from leanstream.errors import UnsupportedCheckpointError
from leanstream.reader import DTYPES, as_tensor

SHAPES = [(4, 3), (5,), (2, 3, 4), (), (0,), (3, 0)]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Random bytes viewed as ``dtype`` (any bit pattern, NaNs included; 0/1 for bool)."""
    n = 1
    for d in shape:
        n *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, dtype=torch.uint8).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape).clone()


def every_dtype() -> dict[str, torch.Tensor]:
    tensors = {}
    for name, dtype in DTYPES.items():
        for shape in SHAPES:
            key = f"{name.lower()}.{'x'.join(map(str, shape)) or 'scalar'}"
            tensors[key] = random_tensor(dtype, shape)
    return tensors


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """Bitwise comparable form (NaN-safe, works for float8 and scalars)."""
    return t.reshape(-1).view(torch.uint8)


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert torch.equal(as_bytes(actual), as_bytes(expected))


def reference(files: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


@pytest.fixture
def single(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(every_dtype(), str(path), metadata={"format": "pt", "note": "single"})
    return path


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    """Three shards written by safetensors plus a hand-written index.json."""
    folder = tmp_path / "sharded"
    folder.mkdir()
    tensors = every_dtype()
    names = sorted(tensors)
    random.shuffle(names)
    weight_map = {}
    total = 0
    for i in range(3):
        file = f"model-{i + 1:05d}-of-00003.safetensors"
        part = {n: tensors[n] for n in names[i::3]}
        save_file(part, str(folder / file), metadata={"format": "pt", f"shard{i}": str(i)})
        weight_map.update(dict.fromkeys(part, file))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total, "nested": {"k": [1, 2.5, None]}}}
    index["weight_map"] = weight_map
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_every_dtype_matches_safetensors(single: Path) -> None:
    expected = reference([str(single)])
    ckpt = _core.Checkpoint(single)
    assert sorted(expected) == ckpt.keys()
    for name in ckpt.keys():
        view = ckpt.view(name)
        assert view.dtype == ckpt[name].dtype
        assert_same(as_tensor(view), expected[name])


def test_stream_matches_safetensors_in_every_order(sharded: Path) -> None:
    ckpt = _core.Checkpoint(sharded)
    expected = reference(ckpt.files)
    names = ckpt.keys()
    random.shuffle(names)
    names += names[:5]  # duplicates, yielded again
    stream = ckpt.stream(names, window=4096)
    assert len(stream) == len(names)
    assert stream.window == 4096
    assert stream.total_bytes == sum(ckpt[n].nbytes for n in names)
    seen = []
    for i, (name, view) in enumerate(stream):
        assert len(stream) == len(names) - i - 1
        assert view.name == name
        assert_same(as_tensor(view), expected[name])
        seen.append(name)
    assert seen == names
    assert len(stream) == 0


def test_sharded_checkpoint_metadata_and_files(sharded: Path) -> None:
    ckpt = _core.Checkpoint(sharded)
    assert [Path(f).name for f in ckpt.files] == [
        f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    assert all(Path(f).is_absolute() for f in ckpt.files)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert ckpt.index_metadata == index["metadata"]
    assert ckpt.total_bytes == index["metadata"]["total_size"]
    assert ckpt.metadata == {"format": "pt", "shard0": "0", "shard1": "1", "shard2": "2"}
    assert len(ckpt) == len(index["weight_map"])
    for name, file in index["weight_map"].items():
        assert name in ckpt
        assert Path(ckpt[name].file).name == file
    assert "nope" not in ckpt
    assert 3 not in ckpt


def test_tensor_info_locates_the_bytes(single: Path) -> None:
    ckpt = _core.Checkpoint(str(single))
    raw = single.read_bytes()
    assert ckpt.metadata == {"format": "pt", "note": "single"}
    assert ckpt.index_metadata is None
    for name in ckpt.keys():
        info = ckpt[name]
        assert info.name == name
        assert info.file == str(single.resolve())
        assert isinstance(info.shape, tuple)
        assert info.end - info.start == info.nbytes
        view = ckpt.view(name)
        assert (view.name, view.dtype, view.shape, view.file, view.nbytes) == (
            info.name,
            info.dtype,
            info.shape,
            info.file,
            info.nbytes,
        )
        assert len(view) == info.nbytes
        assert memoryview(view).tobytes() == raw[info.start : info.end]
    assert repr(ckpt["f32.4x3"]).startswith("TensorInfo(name=")


def test_views_are_zero_copy_and_read_only(single: Path) -> None:
    ckpt = _core.Checkpoint(single)
    a, b = ckpt["f32.4x3"], ckpt["i64.2x3x4"]
    mv = memoryview(ckpt.view(a.name))
    assert mv.readonly
    assert (mv.format, mv.itemsize, mv.ndim, mv.shape, mv.strides) == ("B", 1, 1, (a.nbytes,), (1,))
    # Two views of one tensor share their address, and tensors sit in one
    # mapping of the file at their file offsets: nothing was copied.
    ta, ta2, tb = (as_tensor(ckpt.view(n)) for n in (a.name, a.name, b.name))
    assert ta.data_ptr() == ta2.data_ptr()
    assert tb.data_ptr() - ta.data_ptr() == b.start - a.start


def test_writable_buffer_requests_are_refused(single: Path) -> None:
    view = _core.Checkpoint(single).view("u8.5")
    get_buffer = ctypes.pythonapi.PyObject_GetBuffer
    get_buffer.argtypes = [ctypes.py_object, ctypes.c_void_p, ctypes.c_int]
    release = ctypes.pythonapi.PyBuffer_Release
    release.argtypes = [ctypes.c_void_p]
    buf = ctypes.create_string_buffer(256)  # >= sizeof(Py_buffer)
    pybuf_writable = 0x0001
    with pytest.raises(BufferError, match="read-only"):
        get_buffer(view, ctypes.addressof(buf), pybuf_writable)
    assert get_buffer(view, ctypes.addressof(buf), 0) == 0  # PyBUF_SIMPLE
    release(ctypes.addressof(buf))


def test_views_outlive_stream_checkpoint_and_release(sharded: Path) -> None:
    ckpt = _core.Checkpoint(sharded)
    expected = reference(ckpt.files)
    names = ckpt.keys()
    kept = []
    with ckpt.stream(names, window=1) as stream:
        for name, view in stream:
            kept.append((name, view, as_tensor(view)))
            view.release()
    ckpt.close()
    del ckpt, stream
    gc.collect()
    for name, view, tensor in kept:
        assert_same(tensor, expected[name])
        assert_same(as_tensor(view), expected[name])
        view.release()
        view.release()
        assert_same(tensor, expected[name])
    # A tensor keeps the mapping alive without its view object.
    tensors = [(name, tensor) for name, _, tensor in kept]
    del kept
    gc.collect()
    for name, tensor in tensors:
        assert_same(tensor, expected[name])


def test_closing_a_stream_mid_way(sharded: Path) -> None:
    ckpt = _core.Checkpoint(sharded)
    expected = reference(ckpt.files)
    names = ckpt.keys()
    stream = ckpt.stream(names, window=64)
    name, view = next(stream)
    stream.close()
    stream.close()
    assert list(stream) == []
    assert len(stream) == 0
    assert_same(as_tensor(view), expected[name])


def test_missing_tensor(single: Path) -> None:
    ckpt = _core.Checkpoint(single)
    with pytest.raises(_core.MissingTensorError, match="'nope'") as exc:
        ckpt.stream(["f32.4x3", "nope"])
    assert exc.value.tensor == "nope"
    assert exc.value.file is None
    with pytest.raises(_core.MissingTensorError):
        ckpt.view("nope")
    with pytest.raises(_core.MissingTensorError):
        ckpt["nope"]
    assert isinstance(exc.value, _core.CheckpointError)
    assert isinstance(exc.value, _core.LeanstreamError)


def test_path_forms(single: Path, sharded: Path) -> None:
    index = sharded / "model.safetensors.index.json"
    for path in (single, str(single), single.parent, str(single.parent)):
        assert _core.Checkpoint(path).files == [str(single)]
    assert len(_core.Checkpoint(index).files) == 3
    ckpt = _core.Checkpoint(index)
    shards = ckpt.files
    assert _core.Checkpoint(shards).keys() == ckpt.keys()
    assert _core.Checkpoint(tuple(Path(s) for s in reversed(shards))).files == shards[::-1]
    assert _core.Checkpoint(shards).index_metadata is None
    with pytest.raises(TypeError, match="path"):
        _core.Checkpoint(3)  # type: ignore[arg-type]


def test_folder_without_index_or_model_file_uses_all_shards(tmp_path: Path) -> None:
    save_file({"b": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    save_file({"a": torch.zeros(3)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "notes.txt").write_text("not a shard")
    ckpt = _core.Checkpoint(tmp_path)
    assert [Path(f).name for f in ckpt.files] == ["a.safetensors", "b.safetensors"]
    assert ckpt.keys() == ["a", "b"]
    assert torch.equal(as_tensor(ckpt.view("b")), torch.ones(2))


def test_closed_checkpoint(single: Path) -> None:
    with _core.Checkpoint(single) as ckpt:
        view = ckpt.view("f32.4x3")
    with pytest.raises(ValueError, match="closed"):
        ckpt.view("f32.4x3")
    with pytest.raises(ValueError, match="closed"):
        ckpt.stream(["f32.4x3"])
    assert repr(ckpt) == "Checkpoint(closed)"
    ckpt.close()
    assert memoryview(view).nbytes == 48


def test_window_must_be_positive(single: Path) -> None:
    ckpt = _core.Checkpoint(single)
    for window in (0, -1):
        with pytest.raises(ValueError, match="window"):
            ckpt.stream(ckpt.keys(), window=window)
    assert ckpt.stream([]).window == _core.DEFAULT_WINDOW == 256 * 1024 * 1024
    assert list(ckpt.stream([])) == []


def test_names_must_be_a_sequence_of_str(single: Path) -> None:
    ckpt = _core.Checkpoint(single)
    with pytest.raises(TypeError):
        ckpt.stream("f32.4x3")  # type: ignore[arg-type]


def test_as_tensor_refuses_dtypes_without_torch_equivalent(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}).encode()
    path = tmp_path / "f4.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x12\x34")
    view = _core.Checkpoint(path).view("w")
    assert (view.dtype, view.shape, view.nbytes) == ("F4", (4,), 2)
    with pytest.raises(UnsupportedCheckpointError, match="F4") as exc:
        as_tensor(view)
    assert (exc.value.file, exc.value.tensor) == (str(path), "w")


def test_exception_classes() -> None:
    subclasses = [
        _core.FileNotFoundCheckpointError,
        _core.TruncatedFileError,
        _core.HeaderTooLargeError,
        _core.InvalidHeaderError,
        _core.UnknownDtypeError,
        _core.ShapeError,
        _core.OffsetError,
        _core.OverlapError,
        _core.TrailingDataError,
        _core.DuplicateTensorError,
        _core.IndexMismatchError,
        _core.MissingTensorError,
    ]
    assert issubclass(_core.CheckpointError, _core.LeanstreamError)
    assert issubclass(_core.LeanstreamError, Exception)
    for cls in subclasses:
        assert issubclass(cls, _core.CheckpointError)
        assert cls.__module__ == "leanstream._core"
        err = cls("made in Python")
        assert err.file is None
        assert err.tensor is None
    assert _core.MAX_HEADER_SIZE == 100_000_000
    assert isinstance(_core.__version__, str)
