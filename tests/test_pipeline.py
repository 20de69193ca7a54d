"""The overlapped pipeline (Rust reader threads → ring → device) and the warm-up,
on the CPU: same bytes, same model bit for bit, errors named, nothing left running.
Its GPU tests are in tests/test_gpu.py."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import itertools
import json
import os
import struct
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_load import SETTINGS, assert_same_weights, logits, reference

import leanstream
from leanstream import _core
from leanstream.loader import likely_order
from leanstream.pipeline import Copies, CudaCopies, DeviceStream
from models import stored, write_model

# the outcome depends on bitsandbytes' CPU 4-bit kernel (tests/cpu_kernel.py)
pytestmark = pytest.mark.cpu_kernel


ARCHS = ["llama", "llama-tied", "gpt2", "qwen2"]
# 16 slots of 1000 bytes: every weight of the tiny models spans several chunks,
# and chunk boundaries do not fall on row boundaries
SMALL_RING = 16 * 1000


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    return {arch: write_model(root / arch, arch) for arch in ARCHS}


def reader_threads() -> list[str]:
    """Names of this process's leanstream threads (Rust threads included)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            name = Path(f"/proc/self/task/{task}/comm").read_text().strip()
        except OSError:
            continue
        if name.startswith("leanstream"):
            names.append(name)
    return names


def lingering_threads() -> list[str]:
    """:func:`reader_threads` left once those just joined are gone: a joined thread's
    task can still be listed in /proc for a moment (the kernel wakes the joining thread
    before it releases the task), longer on a busy machine. Waits up to 5 s for the
    list to empty; what is still there then is a thread that was not stopped."""
    deadline = time.monotonic() + 5
    while (left := reader_threads()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


def load(folder: Path, **kwargs: Any) -> Any:
    return leanstream.load(folder, device="cpu", progress=False, **kwargs)


# --- _core.TensorPipeline --------------------------------------------------------------


@pytest.mark.parametrize(("slots", "slot_bytes", "threads"), [(1, 1, 1), (2, 7, 2), (8, 4096, 4)])
def test_chunks_reassemble_every_tensor(
    checkpoints: dict[str, Path], slots: int, slot_bytes: int, threads: int
) -> None:
    folder = checkpoints["llama"]
    expected = stored(folder)
    names = sorted(expected)[::-1] + sorted(expected)[:3]  # any order, duplicates
    ring = [np.zeros(slot_bytes, dtype=np.uint8) for _ in range(slots)]
    got = {name: bytearray(expected[name].nbytes) for name in names}
    with _core.Checkpoint(folder) as ckpt, ckpt.pipeline(names, ring, threads=threads) as pipe:
        assert pipe.slots == slots and pipe.slot_bytes == slot_bytes
        assert pipe.total_bytes == sum(expected[n].nbytes for n in names)
        count = 0
        for seq, item, offset, nbytes, slot in pipe:
            assert seq == count and slot == seq % slots
            got[names[item]][offset : offset + nbytes] = ring[slot][:nbytes].tobytes()
            pipe.release(seq)
            count += 1
        assert count == pipe.chunks and len(pipe) == 0
        assert pipe.bytes_read == pipe.total_bytes
    for name in names:
        want = expected[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        assert bytes(got[name]) == want, name
    assert not lingering_threads()


def test_pipeline_refuses_bad_slots_and_names(checkpoints: dict[str, Path]) -> None:
    with _core.Checkpoint(checkpoints["llama"]) as ckpt:
        name = ckpt.keys()[0]
        with pytest.raises(ValueError, match="at least one slot"):
            ckpt.pipeline([name], [])
        with pytest.raises(ValueError, match="no empty slot"):
            ckpt.pipeline([name], [np.zeros(0, dtype=np.uint8)])
        with pytest.raises(BufferError, match="writable"):
            ckpt.pipeline([name], [b"read-only bytes"])
        with pytest.raises(BufferError, match="contiguous"):
            ckpt.pipeline([name], [np.zeros(64, dtype=np.uint8)[::2]])
        with pytest.raises(leanstream.MissingTensorError) as err:
            ckpt.pipeline([name, "nope"], [np.zeros(64, dtype=np.uint8)])
        assert err.value.tensor == "nope"


def test_a_slot_never_released_is_an_error_not_a_hang(checkpoints: dict[str, Path]) -> None:
    with _core.Checkpoint(checkpoints["llama"]) as ckpt:
        ring = [np.zeros(16, dtype=np.uint8) for _ in range(2)]
        with ckpt.pipeline(ckpt.keys(), ring, threads=2) as pipe:
            next(pipe)
            next(pipe)
            with pytest.raises(leanstream.LeanstreamError, match="never released"):
                next(pipe)
            assert next(pipe, None) is None
    assert not lingering_threads()


def test_close_stops_the_readers_midway(checkpoints: dict[str, Path]) -> None:
    with _core.Checkpoint(checkpoints["llama"]) as ckpt:
        pipe = ckpt.pipeline(ckpt.keys(), [np.zeros(8, dtype=np.uint8)] * 2, threads=2)
        seq = next(pipe)[0]
        pipe.release(seq)
        assert reader_threads()
        pipe.close()
        assert not pipe.threads_alive
        assert not lingering_threads()
        assert next(pipe, None) is None
        pipe.close()


@pytest.mark.parametrize("mtime", ["changed", "restored"])
def test_a_shard_cut_while_open_is_truncated_naming_file_and_tensor(
    tmp_path: Path, mtime: str
) -> None:
    """A new mtime fails the first tensor read after it (the file was rewritten); with
    the mtime put back, the tensor whose bytes are gone fails, on its short read."""
    save_file({"a": torch.ones(1000), "b": torch.ones(1000)}, tmp_path / "model.safetensors")
    path = tmp_path / "model.safetensors"
    with _core.Checkpoint(tmp_path) as ckpt:
        stat = path.stat()
        os.truncate(path, stat.st_size - 100)
        # the truncation's own mtime may equal the write's (a coarse clock tick apart):
        # set the one each case is about
        later = stat.st_mtime_ns + (5_000_000_000 if mtime == "changed" else 0)
        os.utime(path, ns=(stat.st_atime_ns, later))
        with ckpt.pipeline(["a", "b"], [np.zeros(4096, dtype=np.uint8)] * 2) as pipe:
            with pytest.raises(leanstream.TruncatedFileError) as err:
                for seq, *_ in pipe:
                    pipe.release(seq)
    assert err.value.file == str(path)
    if mtime == "changed":
        assert err.value.tensor == "a" and "modified" in str(err.value)
    else:
        assert err.value.tensor == "b" and "ended" in str(err.value)


# --- DeviceStream ----------------------------------------------------------------------


@pytest.mark.parametrize("slot_bytes", [1, 100, 1 << 20])
def test_device_stream_yields_each_tensor_as_stored(
    checkpoints: dict[str, Path], slot_bytes: int
) -> None:
    folder = checkpoints["qwen2"]
    expected = stored(folder)
    names = likely_order(list(expected))
    with (
        _core.Checkpoint(folder) as ckpt,
        DeviceStream(ckpt, names, torch.device("cpu"), slot_bytes=slot_bytes, slots=3) as stream,
    ):
        assert stream.ring_bytes <= 3 * slot_bytes
        got = list(stream)
    assert [name for name, _ in got] == names
    for name, tensor in got:
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
        assert tensor.is_contiguous()
    assert not lingering_threads()


def test_device_stream_empty_tensors_and_dtypes(tmp_path: Path) -> None:
    tensors = {
        "empty": torch.zeros(0, 3),
        "i64": torch.arange(5),
        "f16": torch.randn(7, 3).half(),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    with (
        _core.Checkpoint(tmp_path) as ckpt,
        DeviceStream(ckpt, list(tensors), torch.device("cpu"), slot_bytes=4, slots=2) as stream,
    ):
        got = dict(stream)
    for name, tensor in tensors.items():
        assert got[name].shape == tensor.shape and torch.equal(got[name], tensor), name


class NoCopies(Copies):
    """A device that keeps nothing (``meta``): counts the copies it is asked for."""

    def __init__(self) -> None:
        super().__init__(torch.device("meta"))
        self.copied = 0
        self.released = 0

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        assert dst.is_meta
        self.copied += 1

    def release(self) -> None:
        self.released += 1


def test_host_tensors_never_reach_the_device(checkpoints: dict[str, Path]) -> None:
    """Names in ``host`` (pre-quantized statistics) come out as CPU tensors, copied out
    of the ring: no device allocation or copy of their own."""
    folder = checkpoints["llama"]
    expected = stored(folder)
    names = likely_order(list(expected))
    host = {name for name in names if "norm" in name}
    copies = NoCopies()
    with (
        _core.Checkpoint(folder) as ckpt,
        DeviceStream(
            ckpt, names, copies.device, slot_bytes=100, slots=3, copies=copies, host=host
        ) as stream,
    ):
        got = dict(stream)
    assert host and got.keys() == set(names)
    for name, tensor in got.items():
        if name in host:
            assert tensor.device.type == "cpu" and torch.equal(tensor, expected[name]), name
        else:
            assert tensor.is_meta and tensor.shape == expected[name].shape, name
    device_bytes = sum(expected[n].nbytes for n in names if n not in host)
    assert copies.copied == sum(-(-expected[n].nbytes // 100) for n in names if n not in host)
    assert device_bytes > 0


def test_closing_lets_the_ring_go(checkpoints: dict[str, Path]) -> None:
    """Once closed, nothing keeps the ring (pinned memory on CUDA) alive: not the Rust
    readers, not an unfinished iterator, not the stream object itself."""
    folder = checkpoints["llama"]
    names = likely_order(list(stored(folder)))
    copies = NoCopies()
    with _core.Checkpoint(folder) as ckpt:
        stream = DeviceStream(ckpt, names, copies.device, slot_bytes=100, slots=3, copies=copies)
        ring = [weakref.ref(buffer) for buffer in stream._ring]
        tensors = iter(stream)
        next(tensors)
        stream.close()
        assert [r() for r in ring] == [None] * 3
        assert stream.ring_bytes == 0 and copies.released == 1
        stream.close()  # idempotent
        assert copies.released == 1
        assert next(tensors, None) is None


class EmptyingCopies(NoCopies):
    """:class:`NoCopies` that lets the ring go as :class:`CudaCopies` does."""

    release = CudaCopies.release


class FailingClose:
    """A reader whose ``close`` joins the threads, then raises."""

    def __init__(self, reader: _core.TensorPipeline) -> None:
        self.reader = reader

    def close(self) -> None:
        self.reader.close()
        raise OSError("close failed")


def test_a_failing_close_still_lets_the_ring_go(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 25, item 5): when the reader's ``close`` raised, the ring was
    kept and the pinned cache not emptied (128 MiB page-locked for good on CUDA)."""
    emptied: list[None] = []
    monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: emptied.append(None), raising=False)
    folder = checkpoints["llama"]
    names = likely_order(list(stored(folder)))
    copies = EmptyingCopies()
    with _core.Checkpoint(folder) as ckpt:
        stream = DeviceStream(ckpt, names, copies.device, slot_bytes=100, slots=3, copies=copies)
        ring = [weakref.ref(buffer) for buffer in stream._ring]
        next(iter(stream))
        stream._reader = FailingClose(stream._reader)  # type: ignore[assignment]
        with pytest.raises(OSError, match="close failed"):
            stream.close()
        assert [r() for r in ring] == [None] * 3
        assert stream.ring_bytes == 0 and len(emptied) == 1
    assert not lingering_threads()


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("ending", ["finished", "interrupted"])
def test_a_mapped_cuda_run_empties_the_pinned_cache(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch, device: str, ending: str
) -> None:
    """Regression (issue 25, item 5): the mapped path on CUDA copies statistics and code
    tables from pinned memory (``to_device_at_once``, ``_code``); torch kept those blocks
    page-locked for good. Its run now empties the cache when it ends, however it ends
    (no CUDA needed: the run only takes host views here)."""
    from leanstream.loader import _Source

    emptied: list[None] = []
    monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: emptied.append(None), raising=False)
    source = _Source(pipeline=False, window=2, threads=None, ring_bytes=SMALL_RING)
    with _core.Checkpoint(checkpoints["llama"]) as ckpt:
        names = likely_order(ckpt.keys())
        with contextlib.ExitStack() as stack:
            if ending == "interrupted":
                stack.enter_context(pytest.raises(KeyboardInterrupt))
            with source.open(ckpt, names, torch.device(device), set()) as tensors:
                for name in names:
                    tensors.take(name)
                    tensors.used()
                    if ending == "interrupted":
                        raise KeyboardInterrupt
                assert not emptied
                tensors.finish()
    assert len(emptied) == (device == "cuda")


# --- asynchronous copies, emulated on the CPU -------------------------------------------


class Deferred:
    """An event of :class:`DeferredCopies`: reports done only after ``polls`` queries."""

    def __init__(self, copies: DeferredCopies, polls: int) -> None:
        self.copies, self.left, self.done = copies, polls, False

    def query(self) -> bool:
        if not self.done:
            self.left -= 1
            if self.left <= 0:
                self.copies.run_upto(self)
        return self.done

    def synchronize(self) -> None:
        self.copies.run_upto(self)


class DeferredCopies(Copies):
    """Copies that run late and in order, as on a CUDA stream: the bytes leave the
    slot only when the copy's event is polled enough, waited for, or a later copy
    is. A slot handed back to the readers before its copy ran is overwritten by a
    later chunk, and the tensor comes out wrong."""

    asynchronous = True

    def __init__(self, device: torch.device, polls: int = 3) -> None:
        super().__init__(device)
        self.polls = polls
        self.queue: collections.deque[tuple[Deferred, torch.Tensor, torch.Tensor]] = (
            collections.deque()
        )

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> Deferred:
        event = Deferred(self, self.polls)
        self.queue.append((event, dst, src))
        return event

    def run_upto(self, event: Deferred) -> None:
        while self.queue and not event.done:
            done, dst, src = self.queue.popleft()
            dst.copy_(src)
            done.done = True

    def hand_over(self, flat: torch.Tensor, last: Any) -> None:
        self.run_upto(last)  # the host plays the compute stream: it waits here

    def handed_back(self) -> Deferred | None:
        # the compute stream's work so far waited for every copy queued: it is done
        # once they have run
        return self.queue[-1][0] if self.queue else None

    def synchronize(self) -> None:
        while self.queue:
            self.run_upto(self.queue[-1][0])


class Careless(DeviceStream):
    """A broken pipeline that hands slots back without waiting for their copies."""

    def _retire(self, need: int) -> None:
        while self._pending:
            self._reader.release(self._pending.popleft()[0])


@pytest.mark.parametrize("budget", [None, 10**12])
@pytest.mark.parametrize("polls", [1, 3, 10**9])
@pytest.mark.parametrize("slots", [1, 2, 5])
def test_deferred_copies_release_slots_only_once_copied(
    checkpoints: dict[str, Path], polls: int, slots: int, budget: int | None
) -> None:
    """Also with an unlimited device budget (issue 25, item 6): a budget's waits for
    earlier tensors' work (which waited for their copies) would hide a missing wait."""
    folder = checkpoints["llama"]
    expected = stored(folder)
    names = likely_order(list(expected))
    copies = DeferredCopies(torch.device("cpu"), polls)
    with (
        _core.Checkpoint(folder) as ckpt,
        DeviceStream(
            ckpt,
            names,
            torch.device("cpu"),
            slot_bytes=300,
            slots=slots,
            device_budget=budget,
            copies=copies,
        ) as stream,
    ):
        for name, tensor in stream:
            assert torch.equal(tensor, expected[name]), name
    assert not copies.queue


def test_a_slot_released_before_its_copy_ran_corrupts_the_tensor(
    checkpoints: dict[str, Path],
) -> None:
    """The control for the test above: it can fail."""
    folder = checkpoints["llama"]
    expected = stored(folder)
    name = "model.layers.0.mlp.up_proj.weight"
    cpu = torch.device("cpu")
    with (
        _core.Checkpoint(folder) as ckpt,
        Careless(ckpt, [name], cpu, slot_bytes=300, slots=1, copies=DeferredCopies(cpu)) as stream,
    ):
        ((_, tensor),) = list(stream)
    assert not torch.equal(tensor, expected[name])


class Done:
    """The event :class:`Budgeted` hands back: the caller's work on a tensor has run
    (its device memory is free) only once this is waited for."""

    def __init__(self, copies: Budgeted, nbytes: int) -> None:
        self.copies, self.nbytes = copies, nbytes

    def query(self) -> bool:
        return False

    def synchronize(self) -> None:
        self.copies.live -= self.nbytes
        self.nbytes = 0


class Budgeted(DeferredCopies):
    """Counts the full-precision bytes live on the "device": allocated, and the
    work queued on them not known to have run."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.live = self.peak = 0
        self.sizes: collections.deque[int] = collections.deque()

    def allocate(self, nbytes: int) -> torch.Tensor:
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self.sizes.append(nbytes)
        return super().allocate(nbytes)

    def handed_back(self) -> Done:
        return Done(self, self.sizes.popleft())


def two_in_flight(sizes: list[int]) -> int:
    """The default device budget: the largest two consecutive tensors together."""
    return max((a + b for a, b in itertools.pairwise(sizes)), default=max(sizes))


@pytest.mark.parametrize("budget", ["default", "largest", "unlimited"])
def test_full_precision_bytes_in_flight_stay_within_the_budget(
    checkpoints: dict[str, Path], budget: str
) -> None:
    """Default budget: room for two consecutive tensors (one quantized while the next
    is copied). A budget of one tensor holds too; an unbounded one is the control:
    the bytes in flight then grow past both."""
    folder = checkpoints["llama"]
    expected = stored(folder)
    names = likely_order(list(expected))
    largest = max(t.nbytes for t in expected.values())
    default = two_in_flight([expected[name].nbytes for name in names])
    given = {"default": None, "largest": largest, "unlimited": 10**12}[budget]
    cpu = torch.device("cpu")
    copies = Budgeted(cpu)
    with (
        _core.Checkpoint(folder) as ckpt,
        DeviceStream(
            ckpt, names, cpu, slot_bytes=300, slots=4, device_budget=given, copies=copies
        ) as stream,
    ):
        for name, tensor in stream:
            assert torch.equal(tensor, expected[name]), name
    if budget == "default":
        assert largest < copies.peak <= default
    elif budget == "largest":
        assert copies.peak <= largest
    else:
        assert copies.peak > 2 * default


class Logged(Budgeted):
    """:class:`Budgeted` that logs, in order, what the pipeline does on the "device":
    ``("alloc", k, h)``, tensor k's buffer allocated when h tensors had been handed
    out (on CUDA the copies into it wait for the work queued on those: the allocation's
    ``wait_stream``); ``("copy", k)``; ``("waited", k)``, the host waited for the work
    on tensor k (its quantization). The caller logs ``("quantize", k)``."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.log: list[tuple[Any, ...]] = []
        self.buffers: list[int] = []  # data pointer of tensor k's buffer
        self.handed = 0

    def allocate(self, nbytes: int) -> torch.Tensor:
        buffer = super().allocate(nbytes)
        self.log.append(("alloc", len(self.buffers), self.handed))
        self.buffers.append(buffer.data_ptr())
        return buffer

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> Deferred:
        # the latest buffer at that address (a freed one's may be reused)
        base = dst.untyped_storage().data_ptr()
        self.log.append(("copy", len(self.buffers) - 1 - self.buffers[::-1].index(base)))
        return super().copy(dst, src)

    def handed_back(self) -> Done:
        k = self.handed
        self.handed += 1
        copies = self

        class Waited(Done):
            def synchronize(self) -> None:
                copies.log.append(("waited", k))
                super().synchronize()

        return Waited(self, self.sizes.popleft())


def test_the_next_tensor_is_copied_while_one_is_quantized(
    checkpoints: dict[str, Path],
) -> None:
    """Regression (issue 25, item 4): tensor N+1's buffer was allocated after tensor N
    was handed out, so its copies waited (on the GPU) for N's quantization, and with a
    budget of one tensor the host waited for it too: copy N, quantize N, copy N+1. Now
    N+1's buffer is allocated before N is handed out, and the host waits for N's work
    only after queueing N+1's copies (here each tensor is one chunk: slots of 1 MiB)."""
    folder = checkpoints["llama"]
    expected = stored(folder)
    names = likely_order(list(expected))
    copies = Logged(torch.device("cpu"))
    with (
        _core.Checkpoint(folder) as ckpt,
        DeviceStream(ckpt, names, copies.device, slot_bytes=1 << 20, slots=4, copies=copies) as s,
    ):
        for k, (name, tensor) in enumerate(s):
            assert torch.equal(tensor, expected[name]), name
            copies.log.append(("quantize", k))
    log = copies.log
    assert [e[1] for e in log if e[0] == "alloc"] == list(range(len(names)))
    for k in range(1, len(names)):
        alloc = next(e for e in log if e[:2] == ("alloc", k))
        # the copies into k wait for the work on tensors 0..k-2 at most, never k-1's
        assert alloc[2] <= k - 1, alloc
        # and the host queues them before it waits for k-1's quantization, if ever
        if ("waited", k - 1) in log:
            assert log.index(("copy", k)) < log.index(("waited", k - 1))
    default = two_in_flight([expected[name].nbytes for name in names])
    assert copies.peak <= default


def test_pipelined_load_with_deferred_copies_is_bit_identical(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import leanstream.pipeline

    made: list[DeferredCopies] = []

    def deferred(device: torch.device) -> DeferredCopies:
        made.append(DeferredCopies(device, polls=2))
        return made[-1]

    folder = checkpoints["llama"]
    simple = load(folder, bits=4, double_quant=True)
    monkeypatch.setattr(leanstream.pipeline, "copies_for", deferred)
    piped = load(folder, bits=4, double_quant=True, pipeline=True, ring_bytes=SMALL_RING)
    assert made and not made[0].queue
    assert assert_same_weights(simple, piped) > 0


# --- load(pipeline=True) ---------------------------------------------------------------

LOADS = {
    **SETTINGS,
    "bf16": dict(bits=None),
    "nf4-embeddings": dict(bits=4, quantize_embeddings=True, quantize_lm_head=True),
    "int8-embeddings": dict(bits=8, quantize_embeddings=True, quantize_lm_head=True),
}


@pytest.mark.parametrize("setting", list(LOADS))
@pytest.mark.parametrize("arch", ARCHS)
def test_pipelined_load_is_bit_identical(
    checkpoints: dict[str, Path], arch: str, setting: str
) -> None:
    folder = checkpoints[arch]
    simple = load(folder, **LOADS[setting])
    piped = load(folder, **LOADS[setting], pipeline=True, ring_bytes=SMALL_RING, threads=3)
    assert assert_same_weights(simple, piped) == assert_same_weights(piped, simple)
    if arch == "llama-tied":
        assert piped.lm_head.weight is piped.model.embed_tokens.weight
    assert torch.equal(logits(simple), logits(piped))
    assert not lingering_threads()


@pytest.mark.parametrize("setting", ["nf4", "nf4-dq", "fp4", "int8"])
def test_pipelined_load_with_bitsandbytes_kernels_equals_transformers(
    checkpoints: dict[str, Path], setting: str
) -> None:
    """The path a GPU takes, on the CPU: tensors owned by the loader (cast in place
    when only the dtype changes), bitsandbytes' quantize ops called directly."""
    folder = checkpoints["llama"]
    ref = reference(folder, SETTINGS[setting])
    extra = {"compute_dtype": torch.bfloat16} if SETTINGS[setting]["bits"] == 4 else {}
    got = load(
        folder,
        **SETTINGS[setting],
        **extra,
        pipeline=True,
        ring_bytes=SMALL_RING,
        native_quantizer=False,
    )
    assert assert_same_weights(ref, got) > 0
    assert torch.equal(logits(ref), logits(got))


def test_pipelined_load_of_a_prequantized_checkpoint(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    for setting in ("nf4-dq", "int8"):
        model = load(checkpoints["llama"], **SETTINGS[setting])
        folder = leanstream.save(model, tmp_path / setting, progress=False)
        simple = load(folder)
        piped = load(folder, pipeline=True, ring_bytes=SMALL_RING)
        assert assert_same_weights(simple, piped) > 0
        assert torch.equal(logits(simple), logits(piped))


def test_pipelined_load_converts_dtype(checkpoints: dict[str, Path]) -> None:
    simple = load(checkpoints["llama"], bits=4, dtype=torch.float16)
    piped = load(checkpoints["llama"], bits=4, dtype=torch.float16, pipeline=True)
    assert piped.model.norm.weight.dtype == torch.float16
    assert assert_same_weights(simple, piped) > 0


def test_pipelined_load_of_a_cut_shard_names_file_and_tensor(
    checkpoints: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import leanstream.loader

    folder = tmp_path / "cut"
    shutil.copytree(checkpoints["llama"], folder)
    shards = sorted(folder.glob("*.safetensors"))
    victim = shards[len(shards) // 2]
    build = leanstream.loader.build_empty_model

    def build_then_cut(*args: Any, **kwargs: Any) -> Any:
        # the checkpoint is open and validated: the file shrinks under it
        model = build(*args, **kwargs)
        os.truncate(victim, victim.stat().st_size - 64)
        return model

    monkeypatch.setattr(leanstream.loader, "build_empty_model", build_then_cut)
    with pytest.raises(leanstream.TruncatedFileError) as err:
        load(folder, pipeline=True, ring_bytes=SMALL_RING)
    assert err.value.file == str(victim)
    assert err.value.tensor is not None and err.value.tensor in str(err.value)
    assert not lingering_threads()


def test_an_interrupted_pipelined_load_leaves_nothing_running(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import leanstream.loader

    calls = 0
    materialize = leanstream.loader.materialize

    def interrupted(*args: Any, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise KeyboardInterrupt
        materialize(*args, **kwargs)

    monkeypatch.setattr(leanstream.loader, "materialize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load(checkpoints["llama"], pipeline=True, ring_bytes=SMALL_RING)
    assert calls == 5
    assert not lingering_threads()


def test_two_pipelined_loads_in_two_threads(checkpoints: dict[str, Path]) -> None:
    reference = load(checkpoints["llama"])
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = load(checkpoints["llama"], pipeline=True, ring_bytes=SMALL_RING)
        except BaseException as err:  # reported below
            errors.append(err)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    for model in results.values():
        assert assert_same_weights(reference, model) > 0


@pytest.mark.parametrize("pipeline", [False, True])
def test_initialized_tensors_are_quantized_in_the_kernel_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pipeline: bool
) -> None:
    """Regression (issue 25, item 3): tensors made by ``init_missing`` were quantized
    after the load's ``kernel_stream`` had exited: on CUDA, under a user's stream,
    bitsandbytes' kernels (on the default stream) then raced the user's stream."""
    from test_load_into import Net, NetWithAdapters, random_state

    import leanstream.loader
    import leanstream.placement

    path = tmp_path / "net.safetensors"
    save_file(random_state(Net()), path)
    depth = 0
    kernel_stream = leanstream.placement.kernel_stream

    @contextlib.contextmanager
    def counted(device: torch.device) -> Iterator[None]:
        nonlocal depth
        with kernel_stream(device):
            depth += 1
            try:
                yield
            finally:
                depth -= 1

    seen: list[tuple[torch.nn.Module, str, bool]] = []
    materialize = leanstream.loader.materialize

    def spied(module: torch.nn.Module, attr: str, *args: Any, **kwargs: Any) -> Any:
        seen.append((module, attr, depth > 0))
        return materialize(module, attr, *args, **kwargs)

    monkeypatch.setattr(leanstream.placement, "kernel_stream", counted)
    monkeypatch.setattr(leanstream.loader, "materialize", spied)
    model = leanstream.load_into(
        NetWithAdapters,
        path,
        init_missing=[r"^adapters\.", r"^new_head\."],
        bits=4,
        device="cpu",
        progress=False,
        pipeline=pipeline,
        ring_bytes=SMALL_RING,
    )
    names = {module: name for name, module in model.named_modules()}
    inside = {f"{names[module]}.{attr}": within for module, attr, within in seen}
    assert {"new_head.weight", "adapters.0.down.weight", "blocks.0.fc1.weight"} <= set(inside)
    assert all(inside.values()), sorted(n for n, within in inside.items() if not within)


def test_kernel_stream_waits_for_the_callers_stream_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (issue 25, item 3): tensors ``init_missing`` made on the device were
    initialized on the caller's stream before the load's work moved to the kernels'
    stream, which did not wait for it: their quantization could read them unwritten.
    The kernels' stream now waits for the caller's on entry (on the GPU), as the
    caller's waits for it on exit. Fake streams: no CUDA needed."""
    from leanstream.quantize import kernel_stream

    log: list[Any] = []

    class Stream:
        def __init__(self, name: str) -> None:
            self.name = name

        def wait_stream(self, other: Stream) -> None:
            log.append(f"{self.name} waits for {other.name}")

    caller, kernels = Stream("caller"), Stream("kernels")

    @contextlib.contextmanager
    def current(stream: Stream) -> Iterator[None]:
        log.append(f"on {stream.name}")
        yield
        log.append(f"off {stream.name}")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    monkeypatch.setattr(torch.cuda, "default_stream", lambda device=None: kernels)
    monkeypatch.setattr(torch.cuda, "stream", current)
    with kernel_stream(torch.device("cuda")):
        log.append("work")
    assert log == [
        "kernels waits for caller",
        "on kernels",
        "work",
        "off kernels",
        "caller waits for kernels",
    ]


def test_ring_bytes_must_hold_the_slots(checkpoints: dict[str, Path]) -> None:
    with pytest.raises(leanstream.ConfigError, match="ring_bytes"):
        load(checkpoints["llama"], pipeline=True, ring_bytes=4)


# --- the warm-up -----------------------------------------------------------------------


def test_likely_order_is_module_order_for_decoders() -> None:
    keys = [
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.10.mlp.up_proj.weight",
        "model.layers.2.mlp.up_proj.weight",
        "model.layers.2.input_layernorm.weight",
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.q_proj.weight",
    ]
    order = likely_order(keys)
    assert order[0] == "model.embed_tokens.weight"
    assert order[1:5] == [
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.2.input_layernorm.weight",
        "model.layers.2.mlp.up_proj.weight",
        "model.layers.10.mlp.up_proj.weight",
    ]
    assert set(order[5:]) == {"lm_head.weight", "model.norm.weight"}
    assert sorted(order) == sorted(keys)


MIB = 1 << 20
#: Warm-up tests lay their tensors out with this much never-read room around them:
#: more than the kernel reads around a page fault (the header parse's, mlock's: at
#: most ``read_ahead_kb``, 8 MiB on some virtual disks, on either side) or ahead of
#: a read. Holes in a sparse file: it costs neither disk nor memory.
PAD = 32 * MIB
#: What the warm-up reads at a time (``WARMUP_PIECE`` in rust/pipeline.rs).
PIECE = 4 * MIB


def write_sparse(path: Path, tensors: list[tuple[str, int]]) -> Path:
    """A shard of U8 tensors ``(name, nbytes)``, in this order, whose data section is
    a hole (the file is extended past its header with ``ftruncate``): all zeros, and
    no byte of it was ever written or read, so none of it can be in the page cache
    before something reads it, whatever the kernel or memory pressure do. Unlike an
    eviction (``posix_fadvise(DONTNEED)`` promises nothing), a deterministic state."""
    header, end = {}, 0
    for name, nbytes in tensors:
        header[name] = {"dtype": "U8", "shape": [nbytes], "data_offsets": [end, end + nbytes]}
        end += nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + end)
    return path


@contextlib.contextmanager
def locked(view: _core.TensorView) -> Iterator[None]:
    """Keep ``view``'s pages resident (``mlock`` on its mapping: faulted in, and never
    reclaimed until unlocked), or skip where this process may not lock memory."""
    data = np.frombuffer(view, dtype=np.uint8)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mlock.argtypes = libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    if libc.mlock(data.ctypes.data, data.nbytes) != 0:
        err = ctypes.get_errno()
        if err in (errno.EPERM, errno.ENOMEM):
            pytest.skip(f"mlock refused ({os.strerror(err)}): needs CAP_IPC_LOCK or RLIMIT_MEMLOCK")
        raise OSError(err, os.strerror(err))
    try:
        yield
    finally:
        libc.munlock(data.ctypes.data, data.nbytes)


def finish(warm: _core.Warmup) -> int:
    """Let the warm-up run to its end (a minute is a hang, not a slow machine)."""
    deadline = time.monotonic() + 60
    while warm.running:
        assert time.monotonic() < deadline, "the warm-up hangs"
        time.sleep(0.001)
    return warm.stop()


def test_warmup_reads_all_that_was_never_read(tmp_path: Path) -> None:
    # One piece per tensor, warmed in reverse file order: the kernel reads ahead of a
    # read, never behind it, so none of the warm-up's reads brings in a piece it has
    # yet to look at. The header page (read at open) is PAD away.
    names = ["a", "b", "c"]
    path = write_sparse(
        tmp_path / "m.safetensors", [("pad0", PAD), *((n, PIECE) for n in names), ("pad1", PAD)]
    )
    with _core.Checkpoint(path) as ckpt:
        assert finish(ckpt.warm(names[::-1])) == 3 * PIECE
    assert not lingering_threads()


def test_warmup_skips_what_is_resident(tmp_path: Path) -> None:
    # hot: two pieces, within the 8 MiB an unprivileged process may lock by default
    layout = [("pad0", PAD), ("cold", PIECE), ("pad1", PAD), ("hot", PIECE + MIB), ("pad2", PAD)]
    path = write_sparse(tmp_path / "m.safetensors", layout)
    with _core.Checkpoint(path) as ckpt, locked(ckpt.view("hot")):
        assert finish(ckpt.warm(["hot"])) == 0
        # the cold tensor is read, the locked one still skipped
        assert finish(ckpt.warm(["hot", "cold"])) == PIECE
    assert not lingering_threads()


def test_warmup_reads_up_to_its_budget(tmp_path: Path) -> None:
    layout = [("pad0", PAD), ("a", PIECE), ("b", PIECE), ("c", PIECE), ("pad1", PAD)]
    path = write_sparse(tmp_path / "m.safetensors", layout)
    with _core.Checkpoint(path) as ckpt:
        # never read, read back to front (see above): the budget is all that stops it
        assert finish(ckpt.warm(["c", "b"], budget=PIECE + 1000)) == PIECE + 1000
        assert finish(ckpt.warm(["a"], budget=1000)) == 1000
    assert not lingering_threads()


def test_warmup_stops_and_joins(tmp_path: Path) -> None:
    path = write_sparse(tmp_path / "m.safetensors", [("pad0", PAD), ("a", 16 * PIECE)])
    with _core.Checkpoint(path) as ckpt:
        with ckpt.warm(["a"]) as warm:
            read = warm.stop()
            assert not warm.running
            # stopped between two pieces, whenever that was
            assert read % PIECE == 0 and read <= 16 * PIECE
            assert warm.stop() == warm.bytes_read == read
        with pytest.raises(leanstream.MissingTensorError):
            ckpt.warm(["nope"])
    assert not lingering_threads()


def test_load_warms_while_building_and_stops_before_streaming(
    checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import leanstream.loader

    seen: list[list[str]] = []
    build = leanstream.loader.build_empty_model

    def build_and_look(*args: Any, **kwargs: Any) -> Any:
        seen.append(reader_threads())
        return build(*args, **kwargs)

    monkeypatch.setattr(leanstream.loader, "build_empty_model", build_and_look)
    load(checkpoints["llama"])
    # the warm-up thread was started before the build (it may already be done)
    assert seen and all(name == "leanstream-warm" for name in seen[0])
    assert not lingering_threads()
