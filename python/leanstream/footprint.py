"""How much memory a loaded model's parameters and buffers take, by kind."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .progress import format_bytes


@dataclass(frozen=True)
class Footprint:
    """Bytes held by a model's parameters and buffers.

    ``by_kind`` keys are dtype names (``"bfloat16"``, ``"float32"``, ...) for
    ordinary tensors, ``"nf4"``/``"fp4"`` for packed 4-bit weights, ``"int8"``
    for LLM.int8 weights, and ``"quant_state"`` for their statistics (absmax,
    code books, SCB) as they are now: a 4-bit weight in bitsandbytes' AVX512-BF16 CPU
    layout (:mod:`leanstream.cpu_layout`) has a bfloat16 ``absmax`` and no double
    quantization.
    """

    total_bytes: int
    by_kind: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        """``"135.6 KiB (bfloat16 80.6 KiB, float32 64 B, nf4 48.0 KiB, ...)"``: binary
        units, as everywhere leanstream prints a size (the repr keeps exact bytes)."""
        rows = ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(self.by_kind.items()))
        return f"{format_bytes(self.total_bytes)} ({rows})"


def footprint(model: nn.Module) -> Footprint:
    """Parameter + buffer bytes of ``model`` by kind (shared tensors counted once).

    >>> import torch
    >>> footprint(torch.nn.Linear(1000, 1000)).total_bytes
    4004000
    """
    by_kind: dict[str, int] = {}
    seen: set[int] = set()

    def add(kind: str, tensor: torch.Tensor | None) -> None:
        if tensor is None or tensor.is_meta:
            return
        key = tensor.data_ptr() if tensor.numel() else id(tensor)
        if key in seen:
            return
        seen.add(key)
        by_kind[kind] = by_kind.get(kind, 0) + tensor.numel() * tensor.element_size()

    for module in model.modules():
        # bitsandbytes' Linear8bitLt moves its row scales (SCB) from the weight into its
        # own state at the first forward (and Embedding8bit from the load): still the
        # weight's statistics
        state = getattr(module, "state", None)
        weight = getattr(module, "weight", None)
        scb = getattr(state, "SCB", None)
        if isinstance(scb, torch.Tensor) and isinstance(weight, torch.Tensor):
            if weight.dtype == torch.int8 and getattr(weight, "SCB", None) is None:
                add("int8", weight)
                add("quant_state", scb)
    for param in model.parameters():
        quant_state = getattr(param, "quant_state", None)
        if quant_state is not None:  # bitsandbytes Params4bit
            add(quant_state.quant_type, param)
            for stat in _quant_state_tensors(quant_state):
                add("quant_state", stat)
        elif param.dtype == torch.int8 and getattr(param, "SCB", None) is not None:
            # bitsandbytes' Int8Params, leanstream's 8-bit QuantizedExperts
            add("int8", param)
            add("quant_state", getattr(param, "SCB", None))
        else:
            add(str(param.dtype).removeprefix("torch."), param)
    for buf in model.buffers():
        add(str(buf.dtype).removeprefix("torch."), buf)
    return Footprint(total_bytes=sum(by_kind.values()), by_kind=by_kind)


def _quant_state_tensors(state: object) -> list[torch.Tensor]:
    tensors = [getattr(state, "absmax", None), getattr(state, "code", None)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        tensors += [getattr(nested, "absmax", None), getattr(nested, "code", None)]
    offset = getattr(state, "offset", None)
    if isinstance(offset, torch.Tensor):
        tensors.append(offset)
    return [t for t in tensors if isinstance(t, torch.Tensor)]


__all__ = ["Footprint", "footprint"]
