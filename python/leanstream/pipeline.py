"""The overlapped load: Rust readers → a ring of (pinned) host buffers → device.

:class:`DeviceStream` turns the checkpoint tensors named, in order, into fresh
tensors on the target device, one at a time, while the next ones are already
being read and copied:

- Rust worker threads (:meth:`leanstream._core.Checkpoint.pipeline`, no GIL)
  ``pread`` each tensor, in chunks of at most one slot, into a ring of
  ``slots`` host buffers: on CUDA pinned (page-locked) memory from torch, so
  that copies out of it are true asynchronous DMA. Up to ``slots`` chunks are
  in flight; a large tensor never waits for itself to be read whole.
- As each chunk lands, its copy into the tensor's device buffer is queued with
  ``non_blocking=True`` on a side CUDA stream, followed by an event. The slot
  goes back to the readers when its event has completed (polled without
  blocking; waited for only when the readers need that very slot).
- When a tensor's last chunk is queued, the compute stream (the stream
  current when the pipeline was created: the loader makes it the stream that
  runs bitsandbytes' kernels) waits on its event (the GPU waits, not the host)
  and the tensor is handed out: quantization is queued on the compute stream
  behind the copy while the host goes on with the next chunks. The device
  buffer is allocated on the compute stream, where the tensor lives (a kept
  tensor, such as a norm or the embeddings, stays in that stream's pool; a
  freed one is reused there): the side stream first waits for the compute
  stream's work queued so far (which may still read memory freed into that
  pool: the caching allocator hands it out at once) and is recorded as a user
  of the buffer, so the allocator never gives the memory away while a copy
  into it is pending.
- The next device tensor's buffer is allocated before the current tensor is
  handed out, so that wait never includes the current tensor's quantization
  (queued only once it is handed out, its temporaries freed into the pool
  then): tensor N+1 is copied while tensor N is quantized. A buffer is
  allocated only once the full-precision tensors still in use on the device
  (handed out, their quantization not known to have run: the oldest is waited
  for) leave room for it within ``device_budget`` bytes, so the GPU never holds
  more than the final model plus that budget (plus the quantizer's own
  temporaries). The default budget is the largest two consecutive device
  tensors together: room for the one being quantized and the next. With a
  budget too small for two, the next buffer is allocated only once the
  current tensor was handed out, and its copies then wait for its
  quantization.
- Names in ``host`` (small statistics of pre-quantized weights, which are
  parsed or packed on the host) are copied out of the ring into ordinary host
  memory instead: no device allocation, copy or event of their own.
- Closing joins the readers, waits for the copies still reading the ring, and
  lets the ring go; on CUDA the pinned blocks torch cached for it are handed
  back to the driver (:func:`empty_pinned_cache`), so rings do not pile up
  from load to load. The ring goes, and the cache is emptied, even when
  joining the readers or waiting for the copies raises.

On the CPU the same pipeline runs with ordinary memory and synchronous copies
(the default CPU load maps the file and quantizes from the mapping instead,
which copies less): it yields the same bytes, which is how the pipeline's
bit-identity is tested without a GPU; its asynchronous bookkeeping (slots
released only once copied, the device budget) is tested there with a
:class:`Copies` whose copies run late, in order, as on a CUDA stream.

Host memory: the ring (``slots * slot_bytes``) and nothing else; the
checkpoint is read with ``pread`` and never mapped into the resident set.
Device memory: the tensors handed out, plus at most ``device_budget`` bytes of
full-precision tensors in flight.
"""

from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import torch

from . import _core
from .errors import UnsupportedCheckpointError, checkpoint_error
from .reader import DTYPES

__all__ = [
    "DEFAULT_SLOTS",
    "DEFAULT_SLOT_BYTES",
    "Copies",
    "CudaCopies",
    "DeviceStream",
    "copies_for",
    "default_threads",
    "empty_pinned_cache",
]

DEFAULT_SLOT_BYTES = 8 << 20
"""Size of one ring buffer (the largest chunk), in bytes. 8 MiB: large enough
for full-speed host-to-device copies and few Python steps per GiB, small
enough to stay in the CPU's caches while ``pread`` fills them (2-core CPU,
warm page cache: 16 GB/s into 8 MiB slots, 9 GB/s into 32 MiB ones)."""
DEFAULT_SLOTS = 16
"""Number of ring buffers (chunks in flight): 16 x 8 MiB = 128 MiB of pinned
host memory at most."""


def default_threads() -> int:
    """Reader threads: one per core this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def empty_pinned_cache() -> None:
    """Hand the pinned host blocks torch caches and no longer uses back to the driver.

    torch keeps freed pinned blocks for good (``torch._C._host_emptyCache`` is the
    only way to return them), so a load's pinned buffers (the ring, small
    statistics copied from pinned memory) would otherwise stay page-locked after
    it. Blocks still in use, or read by a copy not yet run, stay."""
    empty = getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


class Copies:
    """How chunks get from the ring to the device: here synchronously (the CPU).

    :class:`CudaCopies` makes them asynchronous. A copy returns an event
    (``query()``, ``synchronize()``) after which its slot may be reused, or
    ``None`` when the copy is already done.
    """

    pinned = False
    asynchronous = False

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def allocate(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> Any | None:
        dst.copy_(src)
        return None

    def hand_over(self, flat: torch.Tensor, last: Any) -> None:
        """Make the caller's later work on ``flat`` wait for ``last``, the event of
        its last chunk's copy."""

    def handed_back(self) -> Any | None:
        """An event marking that the work the caller queued on the tensor it was
        handed has run (its memory may be reused), or None if it has."""
        return None

    def synchronize(self) -> None:
        """Wait for every copy queued."""

    def release(self) -> None:
        """Give back host memory kept for the ring once it is dropped."""


class CudaCopies(Copies):
    """Pinned ring, ``non_blocking`` copies on a side stream, CUDA events.

    ``stream`` runs the copies; ``compute`` (the stream current when this object
    is made) is the one the tensors are handed over to, and the one whose pool
    their device memory comes from.
    """

    pinned = True
    asynchronous = True

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.stream = torch.cuda.Stream(device)
        self.compute = torch.cuda.current_stream(device)

    def allocate(self, nbytes: int) -> torch.Tensor:
        # where the tensor lives: see the module's docstring
        with torch.cuda.stream(self.compute):
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        # the memory may have been freed by compute-stream work not yet run: the copies
        # wait for the work queued so far (DeviceStream allocates a tensor before
        # handing out the one before it, so never for that one's quantization)
        self.stream.wait_stream(self.compute)
        # and must not be given away while a copy into it is pending
        buffer.record_stream(self.stream)
        return buffer

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> Any:
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def hand_over(self, flat: torch.Tensor, last: Any) -> None:
        self.compute.wait_event(last)

    def handed_back(self) -> Any:
        event = torch.cuda.Event()
        event.record(self.compute)
        return event

    def synchronize(self) -> None:
        self.stream.synchronize()

    def release(self) -> None:
        # rings of other sizes would pile up: give back the ring's pinned blocks
        empty_pinned_cache()


def copies_for(device: torch.device) -> Copies:
    """The :class:`Copies` for ``device``."""
    return CudaCopies(device) if device.type == "cuda" else Copies(device)


class DeviceStream:
    """Iterator over ``(name, tensor)``, the checkpoint tensors ``names`` in that
    order, each a fresh tensor on ``device`` owned by the caller (its dtype and
    shape as stored), produced by the pipeline described in this module.

    The ring is never larger than the bytes to read: a small checkpoint gets
    small slots. Use it as a context manager (or call :meth:`close`): closing
    joins the reader threads, waits for copies still reading the ring and lets
    the ring go. ``copies`` (default: :func:`copies_for` ``device``) moves the
    chunks. The tensors named in ``host`` are yielded as fresh CPU tensors
    instead (copied out of the ring, never sent to the device).
    """

    def __init__(
        self,
        ckpt: _core.Checkpoint,
        names: Sequence[str],
        device: torch.device,
        *,
        slot_bytes: int = DEFAULT_SLOT_BYTES,
        slots: int = DEFAULT_SLOTS,
        threads: int | None = None,
        device_budget: int | None = None,
        copies: Copies | None = None,
        host: Collection[str] = (),
    ) -> None:
        if slot_bytes < 1 or slots < 1:
            raise ValueError(f"slot_bytes and slots must be positive, not {slot_bytes}, {slots}")
        self.names = list(names)
        self.device = device
        self._host = [name in host for name in self.names]
        self._layouts: list[tuple[torch.dtype, tuple[int, ...], int]] = []
        for info in (ckpt[name] for name in self.names):
            dtype = DTYPES.get(info.dtype)
            if dtype is None:
                raise checkpoint_error(
                    UnsupportedCheckpointError,
                    f"{info.file}: tensor '{info.name}': dtype {info.dtype} has no torch "
                    "equivalent",
                    file=info.file,
                    tensor=info.name,
                )
            self._layouts.append((dtype, tuple(info.shape), info.nbytes))
        largest = max((n for _, _, n in self._layouts), default=0)
        total = sum(n for _, _, n in self._layouts)
        # the device tensors (not on the host, not empty), in order; for each item, the
        # next of them after it (its buffer is allocated before the item is handed out)
        on_device = [i for i, (_, _, n) in enumerate(self._layouts) if n and not self._host[i]]
        self._next_on_device: list[int | None] = [None] * len(self.names)
        for before, after in itertools.pairwise(on_device):
            for i in range(before, after):
                self._next_on_device[i] = after
        slot_bytes = max(1, min(slot_bytes, largest, -(-total // slots)))
        self._copies = copies or copies_for(device)
        self._ring = [
            torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=self._copies.pinned)
            for _ in range(slots)
        ]
        # chunks copied out of the ring, their slot not yet released: (seq, event)
        self._pending: collections.deque[tuple[int, Any]] = collections.deque()
        # tensors handed out whose device memory may still be read: (event, bytes)
        sizes = [self._layouts[i][2] for i in on_device]
        two = max((a + b for a, b in itertools.pairwise(sizes)), default=largest)
        self._budget = two if device_budget is None else device_budget
        self._inflight: collections.deque[tuple[Any, int]] = collections.deque()
        self._inflight_bytes = 0  # allocated, handed back or not
        self._handed_bytes = 0  # of those, in self._inflight
        self._reader = ckpt.pipeline(
            self.names,
            [buf.numpy() for buf in self._ring],
            threads=threads or default_threads(),
        )
        self.total_bytes: int = self._reader.total_bytes
        self._iterators: list[Iterator[tuple[str, torch.Tensor]]] = []

    @property
    def ring_bytes(self) -> int:
        """Host memory held by the ring."""
        return sum(buf.numel() for buf in self._ring)

    @property
    def reader(self) -> _core.TensorPipeline:
        return self._reader

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        iterator = self._tensors()
        self._iterators.append(iterator)
        return iterator

    def _tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        slots = len(self._ring)
        flat: torch.Tensor | None = None
        last: Any = None  # the event of the current tensor's latest chunk copy
        # the next device tensor's buffer, allocated before the one before it was handed
        # out (its copies then need not wait for that one's quantization): (item, buffer)
        ahead: tuple[int, torch.Tensor] | None = None
        for seq, item, offset, nbytes, slot in self._reader:
            dtype, shape, total = self._layouts[item]
            on_host = self._host[item]
            if offset == 0:
                last = None
                if on_host:
                    flat = torch.empty(total, dtype=torch.uint8)
                elif ahead is not None and ahead[0] == item:
                    flat, ahead = ahead[1], None
                else:
                    flat = self._allocate(total)
            assert flat is not None
            event = None
            if nbytes:
                src = self._ring[slot][:nbytes]
                if on_host:
                    flat[offset : offset + nbytes].copy_(src)
                else:
                    event = self._copies.copy(flat[offset : offset + nbytes], src)
            if event is None:
                self._reader.release(seq)
            else:
                self._pending.append((seq, event))
                last = event
            # the next chunk's slot must be free before we wait for that chunk
            self._retire(need=seq + 1 - slots)
            if offset + nbytes < total:
                continue
            if last is not None:
                self._copies.hand_over(flat, last)
            following = self._next_on_device[item]
            if ahead is None and following is not None:
                buffer = self._allocate_ahead(self._layouts[following][2])
                if buffer is not None:
                    ahead = (following, buffer)
            if total:
                tensor = flat.view(dtype).reshape(shape)
            else:
                tensor = torch.empty(shape, dtype=dtype, device="cpu" if on_host else self.device)
            flat = last = None
            yield self.names[item], tensor
            del tensor
            if self._copies.asynchronous and total and not on_host:
                self._inflight.append((self._copies.handed_back(), total))
                self._handed_bytes += total

    def _allocate(self, nbytes: int) -> torch.Tensor:
        """A device buffer of ``nbytes``, once the tensors in flight leave room for it
        within the budget (the oldest handed back waited for first)."""
        if self._copies.asynchronous:
            while self._inflight and self._inflight_bytes + nbytes > self._budget:
                done, size = self._inflight.popleft()
                if done is not None:
                    done.synchronize()
                self._inflight_bytes -= size
                self._handed_bytes -= size
            self._inflight_bytes += nbytes
        return self._copies.allocate(nbytes)

    def _allocate_ahead(self, nbytes: int) -> torch.Tensor | None:
        """The next tensor's buffer, while the current one (not yet handed out, so
        not to be waited for) is still in flight: only if both fit in the budget,
        else None (it is allocated once the current one is handed out). Only
        asynchronous copies need it."""
        if not self._copies.asynchronous:
            return None
        if self._inflight_bytes - self._handed_bytes + nbytes > self._budget:
            return None
        return self._allocate(nbytes)

    def _retire(self, need: int) -> None:
        """Release every chunk whose copy has finished, and wait for those up
        to chunk ``need`` (whose slot the readers need next)."""
        while self._pending:
            seq, event = self._pending[0]
            if seq > need and not event.query():
                break
            event.synchronize()
            self._reader.release(seq)
            self._pending.popleft()

    def close(self) -> None:
        """Join the reader threads, wait for copies still reading the ring, and
        let the ring go (its pinned memory is given back on CUDA): each step runs
        even when one before it raised."""
        try:
            iterators, self._iterators = self._iterators, []
            for iterator in iterators:
                iterator.close()  # type: ignore[attr-defined]
        finally:
            try:
                self._reader.close()
            finally:
                try:
                    self._copies.synchronize()
                finally:
                    self._pending.clear()
                    if self._ring:
                        self._ring.clear()
                        self._copies.release()

    def __enter__(self) -> DeviceStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
