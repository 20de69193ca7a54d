"""The torch facade of the Rust reader: safetensors dtypes and zero-copy tensors.

:class:`leanstream._core.TensorView` exports a tensor's bytes as a read-only
buffer straight from the shard's mapping; :func:`as_tensor` wraps it as a
``torch.Tensor`` without copying.

>>> from leanstream import _core
>>> from leanstream.reader import as_tensor
>>> with _core.Checkpoint("path/to/model") as ckpt:  # doctest: +SKIP
...     w = as_tensor(ckpt.view("lm_head.weight"))
"""

from __future__ import annotations

import warnings

import torch

from leanstream import _core
from leanstream.errors import UnsupportedCheckpointError, checkpoint_error

__all__ = ["DTYPES", "as_tensor"]

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "C64": torch.complex64,
}
"""safetensors dtype string → torch dtype (the dtypes torch has an element type for)."""

if hasattr(torch, "float8_e8m0fnu"):
    DTYPES["F8_E8M0"] = torch.float8_e8m0fnu

# torch.frombuffer warns once per process (TORCH_WARN_ONCE) that "The given
# buffer is not writable". Our buffers are read-only on purpose: shards are
# mapped PROT_READ, and the tensors we hand out are only ever read. Trigger that
# single warning here, on a tiny read-only buffer, and swallow it, so that it
# never surfaces later (pytest runs with filterwarnings=error).
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.frombuffer(b"\0", dtype=torch.uint8)


def as_tensor(view: _core.TensorView) -> torch.Tensor:
    """Wrap ``view`` as a CPU tensor of its dtype and shape, without copying.

    The tensor shares the mapping's memory and keeps ``view`` (and so the
    mapping) alive. It must be treated as read-only: writing to it is refused
    by the operating system (the pages are mapped ``PROT_READ``). A safetensors
    dtype torch has no element type for (``F4``, ``F6_*``) raises
    :class:`UnsupportedCheckpointError`.
    """
    dtype = DTYPES.get(view.dtype)
    if dtype is None:
        raise checkpoint_error(
            UnsupportedCheckpointError,
            f"{view.file}: tensor '{view.name}': dtype {view.dtype} has no torch equivalent",
            file=view.file,
            tensor=view.name,
        )
    shape = view.shape
    if len(view) == 0:
        # frombuffer refuses empty buffers; an empty tensor has no bytes to share.
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(view, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)
