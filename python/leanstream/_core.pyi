"""Type stubs for ``leanstream._core``, the Rust reader of safetensors checkpoints
and native CPU quantizer.

The native module handles bytes only: it maps shard files, validates every
header before handing out a byte, and yields tensors as zero-copy read-only
buffers. Turning those bytes into torch tensors is ``leanstream.reader``'s job.

Lifetime story: a :class:`TensorView` keeps its shard's mapping alive for as
long as the view (or any buffer exported from it, e.g. a ``torch.frombuffer``
tensor) exists. Shards are mapped ``MAP_SHARED`` and read-only, so pages the
stream has *released* (``madvise(MADV_DONTNEED)``) are simply faulted in again
from the page cache when touched: a released view is slower, never invalid.
"""

import os
from collections.abc import Iterator, Sequence
from typing import Literal, final

from typing_extensions import Buffer

__version__: str

DEFAULT_WINDOW: int
"""Default read-ahead window of :meth:`Checkpoint.stream`, in bytes (256 MiB)."""

MAX_HEADER_SIZE: int
"""Largest accepted safetensors header, in bytes (100 MB)."""

MAX_INDEX_SIZE: int
"""Largest ``*.safetensors.index.json`` the reader reads, in bytes (100 MB)."""

class LeanstreamError(Exception):
    """Base class of every error leanstream raises."""

class CheckpointError(LeanstreamError):
    """A checkpoint file or folder is malformed or inconsistent.

    ``file`` and ``tensor`` name the shard and the tensor concerned (``None``
    when the problem is not about one file or tensor); the message names them too.
    """

    file: str | None
    tensor: str | None

class FileNotFoundCheckpointError(CheckpointError):
    """The path, a shard named by the index, or any safetensors file is missing."""

class TruncatedFileError(CheckpointError):
    """The file is shorter than its header says (or shorter than 8 bytes), or
    shrank or was rewritten after it was opened (also while its bytes were read:
    see :meth:`TensorView.check`)."""

class HeaderTooLargeError(CheckpointError):
    """The 8-byte header length exceeds ``MAX_HEADER_SIZE`` or the file."""

class InvalidHeaderError(CheckpointError):
    """The header is not UTF-8, not JSON, not an object of tensor entries, has a
    duplicate key, or an entry lacks/mistypes ``dtype``/``shape``/``data_offsets``."""

class UnknownDtypeError(CheckpointError):
    """A tensor has a dtype string that safetensors does not define."""

class ShapeError(CheckpointError):
    """``prod(shape) * itemsize`` overflows or differs from the tensor's byte length."""

class OffsetError(CheckpointError):
    """A tensor's ``data_offsets`` are reversed, point past the end of the file, leave a
    gap in the data section (before the first tensor or between two), or put an empty
    tensor inside another one."""

class OverlapError(CheckpointError):
    """Two tensors of one shard share bytes."""

class TrailingDataError(CheckpointError):
    """A shard has bytes after its last tensor's data, which no tensor describes
    (safetensors refuses such a file too: a polyglot file hides a second payload there)."""

class DuplicateTensorError(CheckpointError):
    """The same tensor name appears in two shards."""

class IndexMismatchError(CheckpointError):
    """``model.safetensors.index.json`` is invalid or disagrees with the shards:
    a tensor in the wrong shard, a tensor missing from its shard, or a shard
    tensor the index does not list."""

class MissingTensorError(CheckpointError):
    """A name given to :meth:`Checkpoint.stream`, :meth:`Checkpoint.view` or
    ``Checkpoint[name]`` is not in the checkpoint."""

class AmbiguousCheckpointError(CheckpointError):
    """A folder holds several checkpoints (variants such as ``fp16``, or several
    indexes) and nothing says which one to open: open one index or file explicitly."""

class DownloadError(CheckpointError):
    """A file streamed from the hub could not be downloaded completely and correctly:
    a server that keeps failing, bytes that do not hash to the hub's sha256, an
    interrupted load. Raised by every wait for that file's bytes once its download failed."""

@final
class Arrival:
    """Which bytes of a shard still being downloaded are in its file.

    The downloader sizes the file first, writes the header, then writes ranges in
    any order, calling :meth:`add` after each write. A :class:`Checkpoint` opened with
    ``arrivals=`` hands out a tensor (:meth:`Checkpoint.view`, each item of
    :meth:`Checkpoint.stream`) only once all its bytes have arrived, waiting without
    the GIL (Ctrl-C interrupts the wait); after :meth:`fail`, every wait raises
    :class:`DownloadError` with that message.
    """

    def __init__(self, length: int) -> None: ...
    @property
    def length(self) -> int:
        """The file's length in bytes."""
    @property
    def arrived(self) -> int:
        """Bytes arrived so far."""
    @property
    def failure(self) -> str | None:
        """The message given to :meth:`fail`, or ``None``."""
    def add(self, start: int, end: int) -> None:
        """Bytes ``[start, end)`` were written to the file."""
    @property
    def contiguous(self) -> int:
        """Where the bytes arrived from the start of the file end (0: none yet)."""
    def covers(self, start: int, end: int) -> bool:
        """Whether all of ``[start, end)`` has arrived."""
    def ranges(self) -> list[tuple[int, int]]:
        """The arrived ranges ``(start, end)``, sorted and merged."""
    def missing(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` that have not arrived, in order."""
    def fail(self, message: str) -> None:
        """The download failed: every wait for this file's bytes raises
        :class:`DownloadError` with ``message`` (the first failure is kept)."""

@final
class TensorInfo:
    """Where one tensor lives: dtype, shape, file and absolute byte range."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str:
        """The safetensors dtype string, e.g. ``"BF16"``, ``"F8_E4M3"``."""
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def file(self) -> str:
        """Absolute path of the shard."""
    @property
    def start(self) -> int:
        """Absolute offset of the first byte in the file (header included)."""
    @property
    def end(self) -> int:
        """Absolute offset one past the last byte."""
    @property
    def nbytes(self) -> int: ...

@final
class TensorView:
    """A read-only, zero-copy view of one tensor's bytes (buffer protocol, format ``B``).

    ``memoryview(view)`` or ``torch.frombuffer(view, dtype=torch.uint8)`` wraps
    it without copying. The view keeps its shard mapped while it or any buffer
    exported from it lives.
    """

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def file(self) -> str: ...
    @property
    def nbytes(self) -> int: ...
    def __len__(self) -> int: ...
    def release(self) -> None:
        """Tell the reader these bytes are consumed: their pages leave the
        process's resident set. The view stays valid (pages are faulted in
        again from the page cache if touched)."""
    def check(self) -> None:
        """Raise :class:`TruncatedFileError` if the file shrank under these bytes
        while they were mapped (the lost pages read as zeros instead of crashing
        the process with SIGBUS), or was modified since it was opened. Call it
        after the bytes were used (copied, quantized)."""

@final
class TensorStream:
    """Iterator over ``(name, TensorView)`` in the order given to :meth:`Checkpoint.stream`.

    A background thread (no GIL) pre-faults up to ``window`` bytes ahead of the
    consumer. When the next item is requested, the previous one is released
    (see :meth:`TensorView.release`), so resident memory stays near ``window``
    plus the tensor in hand, however large the checkpoint. ``close()`` (or
    leaving a ``with`` block, or garbage collection) stops and joins the thread.
    """

    @property
    def window(self) -> int: ...
    @property
    def total_bytes(self) -> int:
        """Sum of the byte sizes of all tensors requested."""
    def __iter__(self) -> Iterator[tuple[str, TensorView]]: ...
    def __next__(self) -> tuple[str, TensorView]: ...
    def __len__(self) -> int:
        """Number of tensors not yet yielded."""
    def check(self) -> None:
        """:meth:`TensorView.check` the views yielded since the last check. Asking
        for the next item (or the end) checks the previous one too."""
    def quantize_4bit_next(
        self,
        keys: list[str],
        firsts: list[int],
        packed: Buffer,
        absmax: Buffer,
        *,
        quant_type: Literal["nf4", "fp4"],
        blocksize: int,
        threads: int | None = None,
    ) -> int:
        """Quantize the next ``len(keys)`` tensors of the stream (which must be
        ``keys``, in order; BF16, F16 or F32) in one call, as :func:`quantize_4bit`
        quantizes each alone: tensor ``i`` into values ``firsts[i]...`` of the flattened
        output (``packed`` bytes ``firsts[i] // 2...``, ``absmax`` from ``firsts[i] //
        blocksize``). ``threads`` (default 1) workers take whole tensors in order (fewer
        tensors than threads: each split over the spare ones), and release each tensor's
        pages once it is in; the views are checked after use.
        Each range starts and ends on a block, lies inside the output and overlaps no
        other, else ``LeanstreamError`` naming the tensor, and nothing is written.
        Waits for bytes still downloading (without seeing Ctrl-C). Returns the bytes
        read."""
    def quantize_int8_next(
        self,
        keys: list[str],
        first_rows: list[int],
        cols: int,
        out: Buffer,
        scb: Buffer,
        *,
        threads: int | None = None,
    ) -> int:
        """:meth:`quantize_4bit_next` for LLM.int8 (:func:`quantize_int8`): tensor ``i``
        (whole rows of ``cols``) into rows ``first_rows[i]...`` of ``out`` (int8, rows
        of ``cols``) and ``scb`` (one float32 a row)."""
    def close(self) -> None:
        """Stop and join the read-ahead thread and release what it prefetched
        for items not yet yielded; iteration then ends. Idempotent."""
    def __enter__(self) -> TensorStream: ...
    def __exit__(self, *exc: object) -> None: ...

@final
class TensorPipeline:
    """Chunks of tensors, read by Rust worker threads (no GIL) into a ring of
    caller-owned buffers: the host side of :func:`leanstream.load`'s overlapped
    GPU pipeline (see :meth:`Checkpoint.pipeline`).

    Each tensor is cut into chunks of at most ``slot_bytes``; chunk ``seq``
    always lands in slot ``seq % slots``, and is read (``pread``, so the
    checkpoint never enters the process's resident set) as soon as the chunk
    before it in that slot was released. Iteration waits for the next chunk and
    yields ``(seq, item, offset, nbytes, slot)``: bytes ``[offset, offset +
    nbytes)`` of tensor ``names[item]`` are in ``slots[slot][:nbytes]`` until
    :meth:`release` (seq) is called. Asking for a chunk whose slot still holds an
    unreleased one raises :class:`LeanstreamError` instead of waiting forever.
    A file that was cut short or rewritten raises :class:`TruncatedFileError`
    naming the file and tensor.
    """

    @property
    def total_bytes(self) -> int:
        """Sum of the byte sizes of all tensors requested."""
    @property
    def slot_bytes(self) -> int:
        """Largest chunk: the smallest slot's length."""
    @property
    def slots(self) -> int: ...
    @property
    def chunks(self) -> int:
        """Number of chunks in all (an empty tensor is one chunk of 0 bytes)."""
    @property
    def bytes_read(self) -> int:
        """Bytes the workers have read so far."""
    @property
    def threads_alive(self) -> bool:
        """Whether a worker thread is still running."""
    def __iter__(self) -> Iterator[tuple[int, int, int, int, int]]: ...
    def __next__(self) -> tuple[int, int, int, int, int]: ...
    def __len__(self) -> int:
        """Number of chunks not yet yielded."""
    def release(self, seq: int) -> None:
        """Let chunk ``seq``'s slot be overwritten (its bytes were consumed; on a
        GPU, the copy out of it has finished). Idempotent."""
    def close(self) -> None:
        """Stop and join the workers (each finishes its current read): no slot is
        written after this returns, and the slots' buffers are let go (this object
        no longer keeps the caller's ring alive). Idempotent; iteration then ends."""
    def __enter__(self) -> TensorPipeline: ...
    def __exit__(self, *exc: object) -> None: ...

@final
class Warmup:
    """A background thread reading tensors into the page cache (not into this
    process's memory) ahead of need, e.g. while the model is still being built.
    Read errors end it quietly: the real read reports them."""

    @property
    def bytes_read(self) -> int: ...
    @property
    def running(self) -> bool: ...
    def stop(self) -> int:
        """Stop after the read in progress (at most 4 MiB) and join; returns the
        bytes read. Idempotent."""
    def __enter__(self) -> Warmup: ...
    def __exit__(self, *exc: object) -> None: ...

@final
class Checkpoint:
    """One safetensors checkpoint: a set of shards, validated completely on open.

    ``path`` is a folder (``model.safetensors.index.json`` if present, else the one
    ``*.safetensors.index.json``, else ``model.safetensors``, else every
    ``*.safetensors`` in it if they are all one variant: several variants, such as
    ``x.safetensors`` and ``x.fp16.safetensors``, or several indexes raise
    :class:`AmbiguousCheckpointError`), a single ``.safetensors`` file, an
    ``*.index.json`` file, or a sequence of shard files.

    >>> ckpt = Checkpoint("path/to/model")          # doctest: +SKIP
    >>> for name, view in ckpt.stream(ckpt.keys()):  # doctest: +SKIP
    ...     print(name, view.dtype, view.shape)
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        arrivals: Sequence[tuple[str | os.PathLike[str], Arrival]] | None = None,
    ) -> None:
        """``arrivals``: ``(shard path as opened, Arrival)`` for shards still being
        downloaded (their headers already written); their tensors are handed out once
        their bytes have arrived."""
    @property
    def files(self) -> list[str]:
        """Absolute shard paths, in the order they were opened."""
    @property
    def metadata(self) -> dict[str, str]:
        """The union of the shards' ``__metadata__`` entries."""
    @property
    def index_metadata(self) -> dict[str, object] | None:
        """The ``metadata`` object of ``model.safetensors.index.json``, if any."""
    @property
    def total_bytes(self) -> int:
        """Sum of all tensors' byte sizes."""
    def keys(self) -> list[str]:
        """All tensor names, sorted."""
    def __len__(self) -> int: ...
    def __contains__(self, name: object) -> bool: ...
    def __getitem__(self, name: str) -> TensorInfo: ...
    def view(self, name: str) -> TensorView:
        """Random access to one tensor, without read-ahead.

        Like each item of :meth:`stream`, checks first (``fstat``) that the file
        did not shrink since it was opened: :class:`TruncatedFileError`.
        """
    def stream(self, names: Sequence[str], *, window: int = ...) -> TensorStream:
        """Yield the named tensors in this order (duplicates allowed).

        Raises :class:`MissingTensorError` before anything is read if a name is
        unknown. ``window`` (bytes, > 0) bounds the read-ahead.
        """
    def pipeline(
        self, names: Sequence[str], slots: Sequence[Buffer], *, threads: int = 4
    ) -> TensorPipeline:
        """Read the named tensors, in this order (duplicates allowed), in chunks
        into ``slots``: writable C-contiguous byte buffers (``numpy`` views of
        pinned ``torch`` tensors in :func:`leanstream.load`), kept alive by the
        pipeline until it is closed, and not written by the caller meanwhile.
        ``threads`` workers (clamped to ``1..len(slots)``) read in parallel.

        Raises :class:`MissingTensorError` before anything is read if a name is
        unknown, ``ValueError`` without slots or with an empty one, and
        ``BufferError`` for a read-only or non-contiguous slot.
        """
    def warm(self, names: Sequence[str], *, budget: int | None = None) -> Warmup:
        """Start reading the named tensors, in this order, into the page cache in
        a background thread, up to ``budget`` bytes (default: all of them)."""
    def close(self) -> None:
        """Drop this object's mappings (live views keep theirs). Any later use
        of this object but ``close()`` raises ``ValueError``."""
    def __enter__(self) -> Checkpoint: ...
    def __exit__(self, *exc: object) -> None: ...

# --- native CPU quantizer ------------------------------------------------------------
#
# Zero-copy both ways: ``data`` is any C-contiguous byte buffer (a TensorView, or a
# tensor's bytes as ``t.view(torch.uint8).numpy()``) read element by element; the
# outputs are writable C-contiguous buffers the caller allocates, in leanstream the
# ``.numpy()`` views of ``torch.empty`` tensors, so the results are torch tensors
# with no copy. The GIL is released while the kernel runs, on ``threads`` threads
# (default: all cores); the buffers must not be resized or written meanwhile.
# Bad arguments (dtype, sizes, a read-only or shared output) raise ValueError or
# BufferError before anything is written.

def quantize_4bit(
    data: Buffer,
    dtype: Literal["BF16", "F16", "F32"],
    packed: Buffer,
    absmax: Buffer,
    *,
    quant_type: Literal["nf4", "fp4"],
    blocksize: int,
    threads: int | None = None,
) -> None:
    """Blockwise 4-bit quantization, bit-identical to bitsandbytes' CPU
    ``quantize_4bit(A, blocksize, quant_type, compress_statistics=False)``.

    ``data`` holds ``n`` little-endian ``dtype`` elements; ``packed`` (uint8) receives
    ``(n + 1) // 2`` bytes and ``absmax`` (float32) ``ceil(n / blocksize)`` values.
    ``blocksize`` is one of 32, 64, ..., 4096.

    >>> w = torch.randn(64, 64, dtype=torch.bfloat16)  # doctest: +SKIP
    >>> packed = torch.empty(w.numel() // 2, 1, dtype=torch.uint8)  # doctest: +SKIP
    >>> absmax = torch.empty(w.numel() // 64)  # doctest: +SKIP
    >>> quantize_4bit(w.reshape(-1).view(torch.uint8).numpy(), "BF16", packed.numpy(),
    ...               absmax.numpy(), quant_type="nf4", blocksize=64)  # doctest: +SKIP
    """

def quantize_int8(
    data: Buffer,
    dtype: Literal["BF16", "F16", "F32"],
    cols: int,
    out: Buffer,
    scb: Buffer,
    *,
    threads: int | None = None,
) -> None:
    """LLM.int8 row-wise quantization of a row-major ``(rows, cols)`` matrix,
    bit-identical to bitsandbytes' CPU ``Int8Params._quantize``, i.e.
    ``int8_vectorwise_quant(A.to(torch.float16))``: ``out`` (int8) receives
    ``rows * cols`` values and ``scb`` (float32) ``rows``."""

def quantize_4bit_cpu_layout(
    data: Buffer,
    dtype: Literal["BF16", "F16", "F32"],
    packed: Buffer,
    absmax: Buffer,
    *,
    rows: int,
    cols: int,
    quant_type: Literal["nf4", "fp4"],
    blocksize: int,
    threads: int | None = None,
    absmax_layout: bool = False,
) -> None:
    """Blockwise 4-bit quantization of a row-major ``(rows, cols)`` weight straight into
    bitsandbytes' AVX512-BF16 CPU layout: bit-identical to :func:`quantize_4bit` followed
    by :func:`pack_4bit_cpu_layout`. ``packed`` (uint8) receives ``rows * cols // 2``
    bytes, ``absmax`` (float32) ``rows * cols // blocksize`` values in bitsandbytes' plain
    (row-major) block order; with ``absmax_layout``, ``absmax`` (bytes) receives them as
    :func:`absmax_to_cpu_layout` would convert them (bfloat16 ``(cols // blocksize,
    rows)``) instead. ``rows`` must be a multiple of 32 and ``cols`` of ``blocksize``;
    ValueError otherwise."""

def pack_4bit_cpu_layout(
    src: Buffer, out: Buffer, *, rows: int, cols: int, threads: int | None = None
) -> None:
    """Plain packed 4-bit bytes of a ``(rows, cols)`` weight (``rows * cols // 2``) to
    bitsandbytes' AVX512-BF16 CPU layout (``_convert_weight_packed_for_cpu``'s bytes):
    for each group of 32 rows and column pair ``kp``, byte ``kp * 32 + 2r + t`` holds
    row ``r``'s value ``2kp + t`` in its low nibble and row ``r + 16``'s in its high one.
    ``rows`` must be a multiple of 32 and ``cols`` even."""

def unpack_4bit_cpu_layout(
    src: Buffer, out: Buffer, *, rows: int, cols: int, threads: int | None = None
) -> None:
    """The inverse of :func:`pack_4bit_cpu_layout` (exact)."""

def absmax_to_cpu_layout(absmax: Buffer, out: Buffer, *, rows: int, per_row: int) -> None:
    """bitsandbytes' AVX512-BF16 CPU-layout ``absmax``: the float32 scales of a weight
    (``rows * per_row``, row-major) transposed to ``[per_row, rows]`` and rounded to
    bfloat16 (``out``: their ``2 * rows * per_row`` bytes), as
    ``absmax.reshape(rows, per_row).T.to(torch.bfloat16).contiguous()``: round to
    nearest even, NaN as ``0xFFFF`` (torch's CPU conversion). Without torch: its
    OpenMP workers would spin after every weight, taking a core from the quantizer."""

def dequantize_4bit_cpu_layout(
    packed: Buffer,
    absmax: Buffer,
    code: Buffer,
    out: Buffer,
    *,
    rows: int,
    cols: int,
    blocksize: int,
    threads: int | None = None,
) -> None:
    """A ``(rows, cols)`` 4-bit weight in bitsandbytes' AVX512-BF16 CPU layout
    (``packed``: its ``rows * cols // 2`` bytes; ``absmax``: its bfloat16
    ``(cols // blocksize, rows)`` scales; ``code``: the 16 float32 code values)
    dequantized **transposed** into ``out``, bfloat16 ``(cols, rows)``: each value
    ``code[q] * scale`` in float32, rounded to nearest even (NaN ``0xFFFF``), as
    bitsandbytes' ``dequantize_4bit`` to bfloat16 gives it. ``x @ out`` is then
    ``F.linear(x, W)``. One thread unless ``threads`` says more. ValueError on a shape
    without the layout or buffers of the wrong size."""

def advise_hugepages(buffer: Buffer) -> bool:
    """``madvise(MADV_HUGEPAGE)`` on the 2 MiB-aligned part of a writable buffer, before
    it is first written: the kernel may then back it with 2 MiB pages, one page fault
    where there would be 512. Advisory; False where refused or too small."""

def codebook(quant_type: Literal["nf4", "fp4"]) -> tuple[list[float], list[float], list[int]]:
    """``(code, bounds, order)``: the 16 code values by 4-bit index, the 15 midpoints
    between the sorted values, and ``argsort(code)``, as the 4-bit quantizer uses them."""
