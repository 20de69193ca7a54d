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
- When a tensor's last chunk is queued, the compute stream waits on its event
  (the GPU waits, not the host) and the tensor is handed out: quantization is
  queued on the compute stream behind the copy while the host goes on with
  the next chunks. The device buffer was allocated on the side stream and is
  marked used by the compute stream (``record_stream``), so the caching
  allocator never gives its memory to a later copy before the quantization
  that reads it has run. A new tensor's buffer is allocated only once the
  full-precision tensors still in use on the device (handed out, their
  quantization not yet run) leave room for it within ``device_budget`` bytes
  (default: the largest tensor), so the GPU never holds more than the final
  model plus that budget (plus the quantizer's own temporaries).

On the CPU the same pipeline runs with ordinary memory and synchronous copies
(the default CPU load maps the file and quantizes from the mapping instead,
which copies less): it yields the same bytes, which is how the pipeline's
bit-identity is tested without a GPU.

Host memory: the ring (``slots * slot_bytes``) and nothing else; the
checkpoint is read with ``pread`` and never mapped into the resident set.
Device memory: the tensors handed out, plus at most ``device_budget`` bytes of
full-precision tensors in flight.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from . import _core
from .errors import UnsupportedCheckpointError, checkpoint_error
from .reader import DTYPES

__all__ = ["DEFAULT_SLOTS", "DEFAULT_SLOT_BYTES", "DeviceStream", "default_threads"]

DEFAULT_SLOT_BYTES = 32 << 20
"""Size of one ring buffer (the largest chunk), in bytes."""
DEFAULT_SLOTS = 8
"""Number of ring buffers: 8 x 32 MiB = 256 MiB of pinned host memory at most."""


def default_threads() -> int:
    """Reader threads: one per core this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


class DeviceStream:
    """Iterator over ``(name, tensor)``, the checkpoint tensors ``names`` in that
    order, each a fresh tensor on ``device`` owned by the caller (its dtype and
    shape as stored), produced by the pipeline described in this module.

    The ring is never larger than the bytes to read: a small checkpoint gets
    small slots. Use it as a context manager (or call :meth:`close`): closing
    joins the reader threads and waits for copies still reading the ring.
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
    ) -> None:
        if slot_bytes < 1 or slots < 1:
            raise ValueError(f"slot_bytes and slots must be positive, not {slot_bytes}, {slots}")
        self.names = list(names)
        self.device = device
        infos = [ckpt[name] for name in self.names]
        self._layouts: list[tuple[torch.dtype, tuple[int, ...], int]] = []
        for info in infos:
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
        slot_bytes = max(1, min(slot_bytes, largest, -(-total // slots)))
        self._cuda = device.type == "cuda"
        self._ring = [
            torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=self._cuda) for _ in range(slots)
        ]
        self._copy: Any = torch.cuda.Stream(device) if self._cuda else None
        self._pending: collections.deque[tuple[int, Any]] = collections.deque()
        # tensors handed out whose device memory may still be read: (event, bytes)
        self._budget = largest if device_budget is None else device_budget
        self._inflight: collections.deque[tuple[Any, int]] = collections.deque()
        self._inflight_bytes = 0
        self._reader = ckpt.pipeline(
            self.names,
            [buf.numpy() for buf in self._ring],
            threads=threads or default_threads(),
        )
        self.total_bytes: int = self._reader.total_bytes

    @property
    def ring_bytes(self) -> int:
        """Host memory held by the ring."""
        return sum(buf.numel() for buf in self._ring)

    @property
    def reader(self) -> _core.TensorPipeline:
        return self._reader

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self._tensors()

    def _tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        slots = len(self._ring)
        flat: torch.Tensor | None = None
        for seq, item, offset, nbytes, slot in self._reader:
            dtype, shape, total = self._layouts[item]
            if offset == 0:
                flat = self._allocate(total)
            assert flat is not None
            if nbytes:
                src = self._ring[slot][:nbytes]
                if self._cuda:
                    with torch.cuda.stream(self._copy):
                        flat[offset : offset + nbytes].copy_(src, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(self._copy)
                    self._pending.append((seq, event))
                else:
                    flat[offset : offset + nbytes].copy_(src)
                    self._reader.release(seq)
            else:
                self._reader.release(seq)
            # the next chunk's slot must be free before we wait for that chunk
            self._retire(need=seq + 1 - slots)
            if offset + nbytes == total:
                if self._cuda and self._pending and total:
                    compute = torch.cuda.current_stream(self.device)
                    compute.wait_event(self._pending[-1][1])
                    flat.record_stream(compute)
                if total:
                    tensor = flat.view(dtype).reshape(shape)
                else:
                    tensor = torch.empty(shape, dtype=dtype, device=self.device)
                flat = None
                yield self.names[item], tensor
                del tensor
                if self._cuda and total:
                    # what the caller queued on the compute stream has read it after this
                    done = torch.cuda.Event()
                    done.record(torch.cuda.current_stream(self.device))
                    self._inflight.append((done, total))

    def _allocate(self, nbytes: int) -> torch.Tensor:
        if self._cuda:
            # wait until the tensors in flight leave room within the budget
            while self._inflight and self._inflight_bytes + nbytes > self._budget:
                done, size = self._inflight.popleft()
                done.synchronize()
                self._inflight_bytes -= size
            self._inflight_bytes += nbytes
            # allocated on the side stream: see the module's docstring
            with torch.cuda.stream(self._copy):
                return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

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
        """Join the reader threads; on CUDA, wait for copies still reading the ring."""
        self._reader.close()
        if self._cuda:
            self._copy.synchronize()
        self._pending.clear()

    def __enter__(self) -> DeviceStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
