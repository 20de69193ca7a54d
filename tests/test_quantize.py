"""The native CPU quantizer (``_core.quantize_4bit`` / ``_core.quantize_int8``) against
bitsandbytes' CPU kernels: bit-identical packed bytes, absmax and SCB (NaN payloads
included) over seeded random shapes, values, dtypes, block sizes and code books."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch
from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

import leanstream
from leanstream import _core
from leanstream.quantize import QuantSpec, materialize
from models import write_model

# the outcome depends on bitsandbytes' CPU 4-bit kernel (tests/cpu_kernel.py)
pytestmark = pytest.mark.cpu_kernel


DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
QUANT_TYPES = ["nf4", "fp4"]


def raw(w: torch.Tensor) -> Any:
    return w.contiguous().reshape(-1).view(torch.uint8).numpy()


def bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's bit patterns, so that NaNs compare by payload."""
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def ours_4bit(
    w: torch.Tensor, blocksize: int, quant_type: str, threads: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    n = w.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.empty(-(n // -blocksize), dtype=torch.float32)
    _core.quantize_4bit(
        raw(w),
        DTYPES[w.dtype],
        packed.numpy(),
        absmax.numpy(),
        quant_type=quant_type,
        blocksize=blocksize,
        threads=threads,
    )
    return packed, absmax


def bnb_4bit(w: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    packed, state = F.quantize_4bit(
        w, blocksize=blocksize, quant_type=quant_type, compress_statistics=False
    )
    return packed, state.absmax


def ours_int8(w: torch.Tensor, threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    cb = torch.empty((rows, cols), dtype=torch.int8)
    scb = torch.empty(rows, dtype=torch.float32)
    _core.quantize_int8(raw(w), DTYPES[w.dtype], cols, cb.numpy(), scb.numpy(), threads=threads)
    return cb, scb


def bnb_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
    return cb, scb


def assert_same_4bit(w: torch.Tensor, blocksize: int, quant_type: str, why: str) -> None:
    want_packed, want_absmax = bnb_4bit(w, blocksize, quant_type)
    got_packed, got_absmax = ours_4bit(w, blocksize, quant_type)
    assert got_packed.shape == want_packed.shape, why
    assert torch.equal(got_packed, want_packed), f"{why}: {(got_packed != want_packed).sum()} bytes"
    assert torch.equal(bits(got_absmax), bits(want_absmax)), why


def assert_same_int8(w: torch.Tensor, why: str) -> None:
    want_cb, want_scb = bnb_int8(w)
    got_cb, got_scb = ours_int8(w)
    assert torch.equal(got_cb, want_cb), f"{why}: {(got_cb != want_cb).sum()} values"
    assert torch.equal(bits(got_scb), bits(want_scb)), why


# --- random inputs ------------------------------------------------------------------


def random_nan_bits(gen: torch.Generator, count: int, dtype: torch.dtype) -> torch.Tensor:
    """NaN bit patterns of ``dtype``: random sign and payload, quiet or signaling."""
    mantissa_bits = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    total = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 32}[dtype]
    exponent = ((1 << (total - 1)) - 1) ^ ((1 << mantissa_bits) - 1)
    payload = torch.randint(1, 1 << mantissa_bits, (count,), generator=gen, dtype=torch.int64)
    sign = torch.randint(0, 2, (count,), generator=gen, dtype=torch.int64) << (total - 1)
    value = sign | exponent | payload
    value = torch.where(value >= 1 << (total - 1), value - (1 << total), value)
    return value.to(INT_VIEW[dtype])


def random_values(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Normal values at a random scale (subnormal to near overflow), with zeros,
    constant runs, denormals, ±inf and NaNs sprinkled in."""
    n = math.prod(shape)
    info = torch.finfo(dtype)
    log_lo, log_hi = math.log10(info.smallest_normal) - 3, math.log10(info.max) - 1
    scale = 10 ** (log_lo + (log_hi - log_lo) * torch.rand((), generator=gen).item())
    kind = torch.randint(0, 4, (), generator=gen).item()
    if kind == 0:  # ordinary weights
        scale = 0.02
    w = (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype)
    if n == 0:
        return w.reshape(shape)
    runs = torch.randint(0, 4, (), generator=gen).item()
    for _ in range(runs):  # zero or constant stretches (all-zero / all-equal blocks)
        start = torch.randint(0, n, (), generator=gen).item()
        length = torch.randint(1, 300, (), generator=gen).item()
        value = [0.0, -0.0, 1.5, -3.0, info.tiny / 4][torch.randint(0, 5, (), generator=gen)]
        w[start : start + length] = value
    if torch.rand((), generator=gen).item() < 0.5:
        count = max(1, n // 200)
        where = torch.randint(0, n, (count,), generator=gen)
        special = torch.tensor(
            [math.inf, -math.inf, 0.0, -0.0, info.tiny / 8, -info.tiny / 2, info.max, -info.max],
            dtype=dtype,
        )
        w[where] = special[torch.randint(0, len(special), (count,), generator=gen)]
    if torch.rand((), generator=gen).item() < 0.4:
        count = max(1, n // 500)
        where = torch.randint(0, n, (count,), generator=gen)
        w.view(INT_VIEW[dtype])[where] = random_nan_bits(gen, count, dtype)
    return w.reshape(shape)


def random_4bit_shape(gen: torch.Generator, blocksize: int) -> tuple[int, ...]:
    pick = torch.randint(0, 6, (), generator=gen).item()
    if pick == 0:
        return ((0,), (1,), (2,), (3,), (0, 5), (1, 1))[torch.randint(0, 6, (), generator=gen)]
    if pick == 1:  # around a block boundary
        blocks = torch.randint(1, 5, (), generator=gen).item()
        return (blocks * blocksize + torch.randint(-2, 3, (), generator=gen).item(),)
    if pick == 2:  # exactly whole blocks
        return (torch.randint(1, 17, (), generator=gen).item() * blocksize,)
    rows = torch.randint(1, 200, (), generator=gen).item()
    cols = torch.randint(1, 300, (), generator=gen).item()
    return (rows, cols)


# --- 4-bit --------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_codebook_is_bitsandbytes(quant_type: str) -> None:
    code, bounds, order = _core.codebook(quant_type)
    want_bounds, want_order = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
    assert torch.equal(bits(torch.tensor(code)), bits(F.get_4bit_type(quant_type, device="cpu")))
    assert torch.equal(bits(torch.tensor(bounds)), bits(want_bounds))
    assert order == want_order.tolist()


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_4bit_bit_identical_random(dtype: torch.dtype, quant_type: str) -> None:
    gen = torch.Generator().manual_seed(
        10 * list(DTYPES).index(dtype) + QUANT_TYPES.index(quant_type)
    )
    for case in range(160):
        blocksize = BLOCKSIZES[case % len(BLOCKSIZES)]
        shape = random_4bit_shape(gen, blocksize)
        w = random_values(gen, shape, dtype)
        assert_same_4bit(w, blocksize, quant_type, f"case {case}: {shape} bs={blocksize}")


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_4bit_special_blocks(dtype: torch.dtype, quant_type: str, blocksize: int) -> None:
    """Every kind of awkward block, each once in a full and once in the partial block."""
    info = torch.finfo(dtype)
    nan = torch.tensor([0x7FC1, 0x7F81, -0x003F], dtype=torch.int16)  # bf16: quiet, sNaN, -NaN
    if dtype == torch.float16:
        nan = torch.tensor([0x7E11, 0x7C01, -0x01EF], dtype=torch.int16)
    if dtype == torch.float32:
        nan = torch.tensor([0x7FC12345, 0x7F800001, -0x003EDCBB], dtype=torch.int32)
    blocks = {
        "zeros": torch.zeros(blocksize, dtype=dtype),
        "negative zeros": torch.full((blocksize,), -0.0, dtype=dtype),
        "all equal": torch.full((blocksize,), 0.3, dtype=dtype),
        "all equal negative": torch.full((blocksize,), -7.0, dtype=dtype),
        "denormals": torch.full((blocksize,), info.tiny / 4, dtype=dtype),
        "max": torch.full((blocksize,), info.max, dtype=dtype),
        "inf": torch.cat([torch.ones(blocksize - 1, dtype=dtype), torch.tensor([math.inf])]).to(
            dtype
        ),
        "-inf": torch.cat([torch.tensor([-math.inf]), torch.ones(blocksize - 1)]).to(dtype),
        "ramp": torch.linspace(-1, 1, blocksize).to(dtype),
    }
    for i, payload in enumerate(nan.tolist()):
        block = torch.linspace(-2, 2, blocksize).to(dtype)
        block.view(INT_VIEW[dtype])[(i * 7) % blocksize] = payload
        block.view(INT_VIEW[dtype])[(i * 7 + 3) % blocksize] = nan[(i + 1) % 3]
        blocks[f"nan {i}"] = block
    ordinary = torch.randn(blocksize).to(dtype)
    for name, block in blocks.items():
        assert_same_4bit(torch.cat([ordinary, block]), blocksize, quant_type, f"full {name}")
        for rem in (1, 2, 3, blocksize // 2 + 1, blocksize - 1):
            w = torch.cat([ordinary, block[:rem]])
            assert_same_4bit(w, blocksize, quant_type, f"partial {name} ({rem})")


def test_4bit_llama_shapes() -> None:
    gen = torch.Generator().manual_seed(5)
    for shape in [(2048, 2048), (512, 2048), (8192, 2048)]:
        w = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        for quant_type in QUANT_TYPES:
            assert_same_4bit(w, 64, quant_type, str(shape))


def test_4bit_thread_count_does_not_change_the_result() -> None:
    w = random_values(torch.Generator().manual_seed(3), (700, 1111), torch.bfloat16)
    one = ours_4bit(w, 64, "nf4", threads=1)
    for threads in (2, 3, 7, None):
        got = ours_4bit(w, 64, "nf4", threads=threads)
        assert torch.equal(got[0], one[0]) and torch.equal(bits(got[1]), bits(one[1]))


def test_4bit_reads_a_tensor_view(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    w = torch.randn(96, 70).to(torch.bfloat16)
    save_file({"w": w}, tmp_path / "m.safetensors")
    with _core.Checkpoint(tmp_path / "m.safetensors") as ckpt:
        view = ckpt.view("w")
        packed = torch.empty((w.numel() // 2, 1), dtype=torch.uint8)
        absmax = torch.empty(-(w.numel() // -64))
        _core.quantize_4bit(
            view, view.dtype, packed.numpy(), absmax.numpy(), quant_type="nf4", blocksize=64
        )
    want_packed, want_absmax = bnb_4bit(w, 64, "nf4")
    assert torch.equal(packed, want_packed) and torch.equal(absmax, want_absmax)


def _stream_folder(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "m.safetensors")
    return tmp_path / "m.safetensors"


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
def test_stream_quantizes_a_run_of_tensors_as_bitsandbytes_does_each(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    """``TensorStream.quantize_4bit_next`` / ``quantize_int8_next``: many tensors in one
    call, each where it is asked to go, each as bitsandbytes quantizes it alone; what no
    tensor is asked to cover is left as it was."""
    gen = torch.Generator().manual_seed(7)
    rows = [3, 1, 4, 1, 5, 9, 2, 6]
    tensors = {f"e{i}": random_values(gen, (r, 128), dtype) for i, r in enumerate(rows)}
    path = _stream_folder(tmp_path, tensors)
    names = list(tensors)
    order = [5, 0, 7, 2, 6, 1, 4, 3]  # output rows in another order, a gap of 2 rows at 0
    first_rows, at = [0] * len(rows), 2
    for i in order:
        first_rows[i], at = at, at + rows[i]
    total = at * 128
    with _core.Checkpoint(path) as ckpt, ckpt.stream(names) as stream:
        packed = torch.full((total // 2,), 0xAA, dtype=torch.uint8)
        absmax = torch.full((total // 64,), -1.0)
        got = stream.quantize_4bit_next(
            names, [r * 128 for r in first_rows], packed.numpy(), absmax.numpy(),
            quant_type="nf4", blocksize=64, threads=3,
        )  # fmt: skip
        assert got == sum(t.nbytes for t in tensors.values())
        assert len(stream) == 0
    for name, first in zip(names, first_rows, strict=True):
        want_packed, want_absmax = bnb_4bit(tensors[name], 64, "nf4")
        n = tensors[name].numel()
        assert torch.equal(packed[first * 64 : first * 64 + n // 2], want_packed.reshape(-1))
        assert torch.equal(bits(absmax[first * 2 : first * 2 + n // 64]), bits(want_absmax))
    assert (packed[:128] == 0xAA).all() and (absmax[:4] == -1).all()

    with _core.Checkpoint(path) as ckpt, ckpt.stream(names) as stream:
        cb = torch.full((at, 128), 7, dtype=torch.int8)
        scb = torch.full((at,), -1.0)
        stream.quantize_int8_next(names, first_rows, 128, cb.numpy(), scb.numpy(), threads=2)
    for name, first in zip(names, first_rows, strict=True):
        want_cb, want_scb, _ = F.int8_vectorwise_quant(tensors[name].half())
        r = tensors[name].shape[0]
        assert torch.equal(cb[first : first + r], want_cb), name
        assert torch.equal(bits(scb[first : first + r]), bits(want_scb)), name
    assert (cb[:2] == 7).all() and (scb[:2] == -1).all()


def test_stream_run_refusals_name_the_tensor(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(2, 64).bfloat16(), "b": torch.randn(2, 64).bfloat16()}
    path = _stream_folder(tmp_path, tensors)
    packed, absmax = torch.zeros(128, dtype=torch.uint8), torch.zeros(4)
    with _core.Checkpoint(path) as ckpt:
        with ckpt.stream(["a", "b"]) as stream:
            # b's range overlaps a's
            with pytest.raises(leanstream.LeanstreamError, match=r"tensor 'b'.*overlaps.*'a'"):
                stream.quantize_4bit_next(
                    ["a", "b"], [0, 64], packed.numpy(), absmax.numpy(),
                    quant_type="nf4", blocksize=64,
                )  # fmt: skip
            assert not packed.any() and not absmax.any()
        with ckpt.stream(["a", "b"]) as stream:
            with pytest.raises(leanstream.LeanstreamError, match="not the ones named"):
                stream.quantize_4bit_next(
                    ["b", "a"], [0, 128], packed.numpy(), absmax.numpy(),
                    quant_type="nf4", blocksize=64,
                )  # fmt: skip
        with ckpt.stream(["a", "b"]) as stream:
            frozen = torch.zeros(128, dtype=torch.uint8).numpy()
            frozen.flags.writeable = False
            with pytest.raises(BufferError, match="packed must be a writable buffer"):
                stream.quantize_4bit_next(
                    ["a", "b"], [0, 128], frozen, absmax.numpy(), quant_type="nf4", blocksize=64
                )
            with pytest.raises(ValueError, match="cols=64"):
                stream.quantize_int8_next(
                    ["a", "b"], [0, 2], 64, torch.zeros(4, 64, dtype=torch.int8).numpy(),
                    torch.zeros(3).numpy(),
                )  # fmt: skip
            # nothing was taken by the refused calls: the stream goes on
            assert [name for name, _ in stream] == ["a", "b"]


# --- int8 ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
def test_int8_bit_identical_random(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(100 + list(DTYPES).index(dtype))
    for case in range(150):
        pick = case % 5
        if pick == 0:
            shape = ((1, 1), (0, 7), (1, 5000), (3, 1), (8, 8), (9, 4))[case // 5 % 6]
        else:
            shape = (
                torch.randint(1, 260, (), generator=gen).item(),
                torch.randint(1, 260, (), generator=gen).item(),
            )
        w = random_values(gen, shape, dtype)
        assert_same_int8(w, f"case {case}: {shape}")


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES.values()))
def test_int8_special_rows(dtype: torch.dtype) -> None:
    """Zero rows, rows with inf (or values that overflow float16), NaN rows, ties."""
    info = torch.finfo(dtype)
    rows = [
        [0.0] * 6,
        [-0.0] * 6,
        [1.0, math.inf, 2.0, -1.0, 0.5, 3.0],
        [1.0, 2.0, -math.inf, 0.0, 1.0, 1.0],
        [1e-3, 2e-3, 3e-3, 0.0, -1e-3, 4e-3],
        [254.0, 1.0, 3.0, 5.0, -1.0, 127.0],  # ties at .5 round to even
        [info.max, 1.0, 0.0, 0.0, 0.0, 1.0],
        [info.tiny / 4, info.tiny / 8, 0.0, 0.0, 0.0, 0.0],
        [7.0] * 6,
    ]
    for count in (9, 16, 17, 24):  # the SCB of rows % 8 tail rows: torch's scalar NaN
        w = torch.tensor((rows * 3)[:count], dtype=torch.float64).to(dtype)
        nan_rows = list(range(1, count, 4))
        for i, r in enumerate(nan_rows):
            w.view(INT_VIEW[dtype])[r, (i * 5) % 6] = random_nan_bits(
                torch.Generator().manual_seed(i), 1, dtype
            )
        assert_same_int8(w, f"{count} rows")


def test_int8_thread_count_does_not_change_the_result() -> None:
    w = random_values(torch.Generator().manual_seed(4), (1003, 257), torch.float32)
    one = ours_int8(w, threads=1)
    for threads in (2, 5, None):
        got = ours_int8(w, threads=threads)
        assert torch.equal(got[0], one[0]) and torch.equal(bits(got[1]), bits(one[1]))


# --- errors -------------------------------------------------------------------------


def test_bad_arguments_are_refused() -> None:
    w = raw(torch.zeros(128, dtype=torch.bfloat16))
    packed, absmax = torch.empty((64, 1), dtype=torch.uint8), torch.empty(2)

    def q4(**kwargs: Any) -> None:
        args = dict(
            data=w, dtype="BF16", packed=packed.numpy(), absmax=absmax.numpy(), blocksize=64
        )
        args.update(quant_type="nf4")
        args.update(kwargs)
        _core.quantize_4bit(**args)

    q4()
    with pytest.raises(ValueError, match="only BF16, F16 and F32"):
        q4(dtype="F64")
    with pytest.raises(ValueError, match="unknown dtype"):
        q4(dtype="float")
    with pytest.raises(ValueError, match="quant_type"):
        q4(quant_type="int4")
    with pytest.raises(ValueError, match="blocksize"):
        q4(blocksize=48)
    with pytest.raises(ValueError, match="absmax must have 2 elements, not 3"):
        q4(absmax=torch.empty(3).numpy())
    with pytest.raises(ValueError, match="packed output must have 64 elements"):
        q4(packed=torch.empty((65, 1), dtype=torch.uint8).numpy())
    with pytest.raises(ValueError, match="whole number of BF16"):
        q4(data=b"\0" * 255, packed=torch.empty(64, dtype=torch.uint8).numpy())
    with pytest.raises(BufferError, match="writable"):
        q4(packed=bytes(64))
    with pytest.raises(BufferError):  # format: float64 is not float32
        q4(absmax=torch.empty(2, dtype=torch.float64).numpy())
    with pytest.raises(BufferError, match="C-contiguous"):
        q4(packed=torch.empty((64, 2), dtype=torch.uint8).numpy()[:, 0])
    shared = torch.empty(64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="must not share memory"):
        q4(packed=shared.numpy(), absmax=shared[56:].view(torch.float32).numpy())
    with pytest.raises(ValueError, match="must not share memory"):
        data = torch.zeros(256, dtype=torch.uint8)
        q4(data=data.numpy(), packed=data[:64].numpy())
    with pytest.raises(TypeError):
        q4(data=object())


def test_bad_int8_arguments_are_refused() -> None:
    w = raw(torch.zeros(4, 6, dtype=torch.float32))
    cb, scb = torch.empty(24, dtype=torch.int8), torch.empty(4)
    _core.quantize_int8(w, "F32", 6, cb.numpy(), scb.numpy())
    with pytest.raises(ValueError, match="not a whole number of rows of 5 columns"):
        _core.quantize_int8(w, "F32", 5, cb.numpy(), scb.numpy())
    with pytest.raises(ValueError, match="rows of 0 columns"):
        _core.quantize_int8(w, "F32", 0, cb.numpy(), scb.numpy())
    with pytest.raises(ValueError, match="row statistics must have 4 elements"):
        _core.quantize_int8(w, "F32", 6, cb.numpy(), torch.empty(3).numpy())
    with pytest.raises(BufferError):  # uint8 is not int8
        _core.quantize_int8(w, "F32", 6, cb.view(torch.uint8).numpy(), scb.numpy())


# --- integration --------------------------------------------------------------------


def _linear4bit(spec: QuantSpec, shape: tuple[int, int]) -> Any:
    module = bnb.nn.Linear4bit(
        shape[1],
        shape[0],
        False,
        torch.bfloat16,
        compress_statistics=spec.double_quant,
        quant_type=spec.quant_type,
        quant_storage=spec.quant_storage,
        device="meta",
    )
    module.weight.blocksize = spec.blocksize
    return module


def _assert_same_4bit(got: Any, want: Any) -> None:
    assert type(got) is type(want) and got.dtype == want.dtype
    assert got.shape == want.shape and got.bnb_quantized and got.module is not None
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    a, b = got.quant_state.as_dict(packed=True), want.quant_state.as_dict(packed=True)
    assert a.keys() == b.keys()
    for key, value in b.items():
        assert torch.equal(a[key], value) if torch.is_tensor(value) else a[key] == value, key


@pytest.mark.parametrize("owned", [False, True])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    ("source", "dtype", "transpose"),
    [
        (torch.bfloat16, torch.bfloat16, False),
        (torch.float32, torch.bfloat16, False),
        (torch.bfloat16, torch.float16, False),  # owned: cast in place
        (torch.float16, torch.float16, True),
        (torch.float32, torch.float32, False),
    ],
)
def test_materialize_4bit_equals_bitsandbytes(
    double_quant: bool,
    quant_storage: torch.dtype,
    source: torch.dtype,
    dtype: torch.dtype,
    transpose: bool,
    owned: bool,
) -> None:
    """Both quantizers (Rust, and bitsandbytes' op called directly) against what
    transformers runs: ``Params4bit(weight, ...).to(device)``."""
    shape = (96, 160)
    tensor = torch.randn(shape[::-1] if transpose else shape).to(source)
    quant_type = "fp4" if transpose else "nf4"
    weight = tensor.to(dtype).t() if transpose else tensor.to(dtype)
    want = bnb.nn.Params4bit(
        weight,
        requires_grad=False,
        blocksize=128,
        compress_statistics=double_quant,
        quant_type=quant_type,
        quant_storage=quant_storage,
        module=_linear4bit(QuantSpec(bits=4), shape),
    ).to("cpu")
    for native in (True, False):
        spec = QuantSpec(
            bits=4,
            quant_type=quant_type,
            double_quant=double_quant,
            quant_storage=quant_storage,
            blocksize=128,
            native=native,
        )
        module = _linear4bit(spec, shape)
        materialize(
            module,
            "weight",
            tensor.clone() if owned else tensor,
            device=torch.device("cpu"),
            dtype=dtype,
            spec=spec,
            transpose=transpose,
            owned=owned,
        )
        assert module.quant_state is module.weight.quant_state
        _assert_same_4bit(module.weight, want)


@pytest.mark.parametrize("owned", [False, True])
@pytest.mark.parametrize(
    ("source", "dtype", "transpose"),
    [
        (torch.bfloat16, torch.bfloat16, False),
        (torch.float32, torch.bfloat16, True),
        (torch.float16, torch.float16, False),
        (torch.float32, torch.float32, False),
    ],
)
def test_materialize_int8_equals_bitsandbytes(
    source: torch.dtype, dtype: torch.dtype, transpose: bool, owned: bool
) -> None:
    """Both quantizers against ``Int8Params(weight, ...).to(device)``; an owned bf16
    tensor is converted to float16 in place before bitsandbytes' kernel."""
    tensor = (torch.randn(64, 40) * 50).to(source)
    tensor_in = tensor.t().contiguous() if transpose else tensor
    want = bnb.nn.Int8Params(tensor.to(dtype), requires_grad=False, has_fp16_weights=False)
    want = want.to("cpu")
    for native in (True, False):
        spec = QuantSpec(bits=8, native=native)
        module = bnb.nn.Linear8bitLt(40, 64, False, has_fp16_weights=False, device="meta")
        materialize(
            module,
            "weight",
            tensor_in.clone() if owned else tensor_in,
            device=torch.device("cpu"),
            dtype=dtype,
            spec=spec,
            transpose=transpose,
            owned=owned,
        )
        got = module.weight
        assert type(got) is type(want) and got.dtype == torch.int8 and not got.has_fp16_weights
        assert torch.equal(got, want) and got.CB.data_ptr() == got.data_ptr()
        assert torch.equal(got.SCB, want.SCB)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_4bit_equals_bitsandbytes_functional(
    double_quant: bool, quant_type: str, quant_storage: torch.dtype, dtype: torch.dtype
) -> None:
    """The op-level quantizer (no host sync on a GPU) is ``F.quantize_4bit`` bit for bit,
    and every QuantState owns its code tables (none shared with another state or with
    the per-device cache: transformers refuses to save tensors that share memory)."""
    from leanstream.quantize import _CODES, quantize_4bit

    weight = torch.randn(300, 70).to(dtype)  # 21000: a partial last block at 64 and 256
    states = []
    for _ in range(2):
        packed, state = quantize_4bit(
            weight,
            blocksize=64,
            quant_type=quant_type,
            quant_storage=quant_storage,
            double_quant=double_quant,
        )
        want, want_state = F.quantize_4bit(
            weight,
            blocksize=64,
            compress_statistics=double_quant,
            quant_type=quant_type,
            quant_storage=quant_storage,
        )
        assert packed.dtype == want.dtype and packed.shape == want.shape
        assert torch.equal(packed.view(torch.uint8), want.view(torch.uint8))
        a, b = state.as_dict(packed=True), want_state.as_dict(packed=True)
        assert a.keys() == b.keys()
        for key, value in b.items():
            assert torch.equal(a[key], value) if torch.is_tensor(value) else a[key] == value, key
        states.append(state)
    codes = [s.code for s in states] + [s.state2.code for s in states if s.state2 is not None]
    codes += list(_CODES.values())
    pointers = [c.untyped_storage().data_ptr() for c in codes]
    assert len(set(pointers)) == len(pointers)


def test_placed_casts_an_owned_tensor_in_place() -> None:
    from leanstream.quantize import placed

    cpu = torch.device("cpu")
    source = (torch.randn(33, 7) * 1000).to(torch.bfloat16)
    want = source.to(torch.float16)
    owned = source.clone()
    got = placed(owned, cpu, torch.float16, owned=True)
    assert got.dtype == torch.float16 and torch.equal(got, want)
    assert got.data_ptr() == owned.data_ptr()  # the same bytes, converted
    # not owned, or of another size: a new tensor, the source untouched
    kept = source.clone()
    got = placed(kept, cpu, torch.float16, owned=False)
    assert torch.equal(got, want) and got.data_ptr() != kept.data_ptr()
    assert torch.equal(kept, source)
    got = placed(kept, cpu, torch.float32, owned=True)
    assert torch.equal(got, source.float()) and torch.equal(kept, source)
    assert placed(kept, cpu, torch.bfloat16, owned=True) is kept


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("ckpt") / "llama", "llama")


@pytest.mark.parametrize(
    "settings",
    [
        dict(bits=4, quant_type="nf4"),
        dict(bits=4, quant_type="fp4", double_quant=True, blocksize=32),
        dict(bits=8),
    ],
    ids=["nf4", "fp4-dq-32", "int8"],
)
def test_load_native_equals_bitsandbytes(
    llama: Path, settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_load import assert_same_weights

    reference = leanstream.load(
        llama, device="cpu", progress=False, native_quantizer=False, **settings
    )

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the native path must not call bitsandbytes' quantizer")

    monkeypatch.setattr(F, "quantize_4bit", refuse)
    monkeypatch.setattr(F, "int8_vectorwise_quant", refuse)
    native = leanstream.load(llama, device="cpu", progress=False, **settings)
    assert assert_same_weights(reference, native) > 0


def test_large_outputs_ask_for_huge_pages() -> None:
    """``host_empty``: a CPU tensor (huge pages asked for when it is large: advice only,
    granted or not by the kernel's settings); the advice needs a writable buffer."""
    import ctypes

    from leanstream import _core
    from leanstream.quantize import host_empty

    small, large = host_empty((3, 5), torch.float32), host_empty((8 << 20,), torch.uint8)
    assert small.shape == (3, 5) and large.numel() == 8 << 20 and large.device.type == "cpu"
    assert large.untyped_storage().resizable()  # torch's own storage (no NumPy export)
    large.fill_(7)
    assert _core.advise_hugepages(bytearray(100)) is False  # no aligned 2 MiB inside
    raw = (ctypes.c_char * large.nbytes).from_address(large.data_ptr())
    assert isinstance(_core.advise_hugepages(memoryview(raw).cast("B")), bool)
    assert bool((large == 7).all())  # advice never changes contents
    with pytest.raises(BufferError):
        _core.advise_hugepages(bytes(4 << 20))
