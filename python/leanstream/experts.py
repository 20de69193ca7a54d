"""Mixture-of-experts weights held quantized, multiplied by bitsandbytes' kernels.

transformers 5 keeps the experts of a mixture-of-experts layer as 3-D parameters
of one experts module (``MixtralExperts.gate_up_proj [E, 2I, H]``,
``GptOssExperts.gate_up_proj [E, H, 2I]``, ...): not ``nn.Linear`` layers, so
bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` cannot hold them.
:class:`QuantizedExperts` is such a 3-D parameter held as bitsandbytes holds a
linear weight (4-bit packed bytes with a ``QuantState``, or LLM.int8's ``CB`` and
``SCB``). ``qe.linear(e, x)`` is ``F.linear(x, W_e)`` computed by bitsandbytes on
expert ``e``'s share of that storage, as its own layer holding the expert would
compute it; ``qe[e]`` is expert ``e``'s weight, dequantized.

The classes transformers decorates with ``use_experts_implementation`` dispatch
their forward on ``config._experts_implementation`` (default ``"grouped_mm"``,
which reads the whole 3-D tensor) through the registry ``ALL_EXPERTS_FUNCTIONS``,
and describe what an expert computes (``has_gate``, ``_apply_gate``, ``has_bias``,
``is_transposed``, ``has_post_expert_norm``) for the implementations there.
:func:`use_quantized_experts` registers ``"leanstream"`` and selects it for the
configs of the experts modules that hold quantized weights. That implementation
(:func:`experts_forward`) runs, in inference, each routed expert through
bitsandbytes' kernels without a dequantized copy (:func:`matmul_forward`): the
fused AVX512-BF16 4-bit kernel on a CPU that has it (the weight rearranged into its
layout at the first forward, as ``Linear4bit`` does; its GEMV for a decode step),
``matmul_4bit`` on CUDA, LLM.int8's matmul at 8 bits. A 4-bit expert is a quarter of
bf16's bytes, so a decode step, which reads every routed expert once, is faster than
with bf16 experts. Elsewhere (training or an input that wants a gradient: the fused
kernel has no backward; a CPU without the kernel, where bitsandbytes itself
dequantizes; experts stored ``[E, in, out]``, which no bitsandbytes kernel takes) it
runs the class's own eager forward, which only reads ``self.gate_up_proj[expert_idx]``
and ``self.down_proj[expert_idx]`` (``expert_idx`` a 0-dim integer tensor): one expert
dequantized at a time, in the model's dtype, garbage once its two matmuls are done,
and outputs equal, bit for bit, those of the same model with the dequantized weights
as plain parameters and the eager implementation.
"""

from __future__ import annotations

import copy
import functools
import operator
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import _core, cpu_layout

IMPLEMENTATION = "leanstream"
"""The name of the experts implementation in transformers' ``ALL_EXPERTS_FUNCTIONS``."""

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)

KERNEL_ROWS = 48
"""The most rows (tokens routed to one expert) that go through bitsandbytes' fused
AVX512-BF16 CPU kernel; more multiply the expert dequantized by the Rust core
(:meth:`QuantizedExperts.transposed`) in bf16. The kernel decodes the weight again for
every row, so its time grows with the rows (on one core, a 1024 x 1024 expert: 94 us for
1 row against bf16's 200 us, 0.88 ms for 21), where dequantizing (0.23 ms; bitsandbytes'
own takes 0.65 ms) and a bf16 matmul cost about the same for any count. Measured on the
whole benchmark model (``benches/moe.py``'s, 2 threads, 2026-12-06), prefill of 512
tokens (85 rows per expert on average): 1.73 s with the kernel alone, 1.17 s dequantizing
every expert, 1.15 / 1.04 / 1.05 s above 24 / 48 / 96 rows; of 128 tokens (21 on
average): 0.44 s with the kernel alone, 0.37 s above 48."""


class QuantizedExperts(nn.Parameter):
    """A 3-D expert weight ``[E, R, C]`` held quantized; ``qe[e]`` is expert ``e``
    dequantized to ``[R, C]`` in :attr:`dequant_dtype`, on the storage's device.

    4-bit: the tensor is bitsandbytes' packed bytes of the row-major flattened
    weight (uint8 ``[E*R*C // 2, 1]``) and :attr:`quant_state` a ``QuantState``
    of ``shape`` ``[E, R, C]`` (``absmax`` per block, or with double quantization
    its uint8 codes, ``offset`` and ``state2``). 8-bit: the tensor is LLM.int8's
    ``CB`` (int8 ``[E, R, C]``) and :attr:`SCB` its row scales (float32 ``[E*R]``).
    Make one with :meth:`four_bit` or :meth:`eight_bit`.

    The tensor itself (``shape``, ``dtype``, ``state_dict``) is the stored bytes, as
    for bitsandbytes' ``Params4bit`` / ``Int8Params``; :attr:`shape3` is the
    weight's shape. Indexing takes one expert (an int or a 0-dim integer tensor)
    and nothing else: the eager forwards index nothing else.
    """

    quant_state: Any
    SCB: torch.Tensor | None
    threshold: float = 6.0
    """LLM.int8's outlier threshold for :meth:`linear` at 8 bits (``llm_int8_threshold``,
    transformers' default 6.0; :func:`use_quantized_experts` sets the model's)."""

    def __new__(
        cls,
        data: torch.Tensor,
        *,
        quant_state: Any = None,
        scb: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> QuantizedExperts:
        if quant_state is not None:
            data = _check_four_bit(data, quant_state)
            scb, dtype = None, quant_state.dtype
        else:
            if scb is None or dtype is None:
                raise TypeError(
                    "QuantizedExperts needs quant_state (4-bit) or scb and dtype (8-bit)"
                )
            scb = _check_eight_bit(data, scb, dtype)
        self = torch.Tensor._make_subclass(cls, data, False)
        self.quant_state = quant_state
        self.SCB = scb
        self._dequant_dtype = dtype
        return self

    @classmethod
    def four_bit(cls, packed: torch.Tensor, quant_state: Any) -> QuantizedExperts:
        """From bitsandbytes' 4-bit quantization of the flattened weight: ``packed``
        (uint8, ``E*R*C // 2`` bytes) and its ``QuantState``, whose ``shape`` is
        ``[E, R, C]`` and ``dtype`` the dtype experts dequantize to.
        ``R*C`` must be a multiple of the block size: no block spans two experts."""
        return cls(packed, quant_state=quant_state)

    @classmethod
    def eight_bit(cls, cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> QuantizedExperts:
        """From LLM.int8's quantization of the weight as ``E*R`` rows: ``cb`` (int8
        ``[E, R, C]``), ``scb`` (float32 row scales, ``E*R``), experts dequantized
        to ``dtype``."""
        return cls(cb, scb=scb, dtype=dtype)

    # --- what it holds ---------------------------------------------------------------

    @property
    def bits(self) -> int:
        return 4 if self.quant_state is not None else 8

    @property
    def shape3(self) -> tuple[int, int, int]:
        """The weight's shape ``(E, R, C)``."""
        shape = self.quant_state.shape if self.quant_state is not None else self.data.shape
        e, r, c = (int(n) for n in shape)
        return e, r, c

    @property
    def num_experts(self) -> int:
        return self.shape3[0]

    @property
    def expert_shape(self) -> tuple[int, int]:
        """One expert's shape ``(R, C)``."""
        return self.shape3[1:]

    @property
    def dequant_dtype(self) -> torch.dtype:
        """The dtype experts dequantize to (the model's dtype)."""
        return self._dequant_dtype

    @property
    def cpu_layout(self) -> bool:
        """Whether the 4-bit bytes are in bitsandbytes' AVX512-BF16 CPU layout (see
        :meth:`use_cpu_layout`)."""
        return self.quant_state is not None and cpu_layout.is_packed(self.quant_state)

    def plain(self) -> tuple[torch.Tensor, Any]:
        """The stored form: ``(bytes, quant_state)`` at 4 bits (bitsandbytes' plain
        layout of the flattened weight, as saved), ``(CB, SCB)`` at 8. In the CPU layout,
        new tensors (this one is not changed): the bytes put back in order (exact) and
        the bfloat16 scales the fused kernel uses as float32 (exact), double-quantized
        again where the weight was, as bitsandbytes' own inverse does for a linear."""
        if self.quant_state is None:
            return self.data, self.SCB
        return self._plain(double_quant=bool(getattr(self.quant_state, "original_nested", False)))

    def _plain(self, *, double_quant: bool) -> tuple[torch.Tensor, Any]:
        """:meth:`plain` at 4 bits, the scales double-quantized or not (in the CPU
        layout: the weight the kernel uses is the one without)."""
        state = self.quant_state
        if not self.cpu_layout:
            return self.data, state
        from .quantize import quant_state_4bit

        e, r, c = self.shape3
        data = cpu_layout._plain_bytes(self.data.view(e * r, c // 2), e * r, c).reshape(-1, 1)
        absmax = state.absmax.transpose(1, 2).reshape(-1).to(torch.float32)
        fresh = quant_state_4bit(
            absmax,
            torch.Size((e, r, c)),
            self._dequant_dtype,
            state.blocksize,
            state.quant_type,
            double_quant,
        )
        fresh.code = state.code
        return data, fresh

    # --- dequantization --------------------------------------------------------------

    def __getitem__(self, index: Any) -> torch.Tensor:
        """Expert ``index`` (an int, or a 0-dim integer tensor as the eager forwards
        pass: read on the host, like their own ``expert_idx == num_experts``),
        dequantized to ``[R, C]``."""
        e = self._expert(index)
        if self.quant_state is None:
            return self._expert_8bit(e)
        return self._expert_4bit(e)

    def dequantize(self) -> torch.Tensor:
        """The whole weight ``[E, R, C]`` in :attr:`dequant_dtype` (tests, debugging)."""
        import bitsandbytes.functional as F

        e, r, c = self.shape3
        if self.quant_state is None:
            rows = F.int8_vectorwise_dequant(self.data.reshape(e * r, c), self.SCB)
            return rows.reshape(e, r, c).to(self._dequant_dtype)
        data, state = self._plain(double_quant=False)
        flat = copy.copy(state)  # see _expert_4bit
        flat.shape = torch.Size((e * r * c,))
        return F.dequantize_4bit(data, flat).reshape(e, r, c)

    def _expert(self, index: Any) -> int:
        if isinstance(index, torch.Tensor):
            if index.dim() != 0 or index.dtype.is_floating_point or index.dtype == torch.bool:
                raise TypeError(
                    f"QuantizedExperts takes one expert, an int or a 0-dim integer tensor, "
                    f"not a {tuple(index.shape)} {index.dtype} tensor: dequantize() gives the "
                    f"whole [E, R, C] weight"
                )
            e = int(index)
        elif not isinstance(index, bool) and hasattr(type(index), "__index__"):
            e = operator.index(index)
        else:
            raise TypeError(
                f"QuantizedExperts takes one expert, an int or a 0-dim integer tensor, not "
                f"{type(index).__name__} {index!r}: dequantize() gives the whole [E, R, C] weight"
            )
        n = self.num_experts
        if not -n <= e < n:
            raise IndexError(f"expert {e} is out of range for {n} experts")
        return e % n

    def _expert_4bit(self, e: int) -> torch.Tensor:
        import bitsandbytes.functional as F

        r, c = self.expert_shape
        packed, absmax = self._plain_expert(e)
        # flat: bitsandbytes' CPU kernel reads a 2-D shape's absmax as whole blocks per
        # row, wrong when c is not a multiple of the block size (the blocks run across
        # rows); on the flat values every kernel is right, and the same where c is
        expert = self._expert_state(absmax, torch.Size((r * c,)))
        return F.dequantize_4bit(packed, expert).reshape(r, c)

    def _plain_expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert ``e``'s plain packed bytes and float32 scales, in either layout."""
        state = self.quant_state
        r, c = self.expert_shape
        size = r * c
        if self.cpu_layout:
            packed = cpu_layout._plain_bytes(self.data.view(-1, r, c // 2)[e], r, c)
            return packed, state.absmax[e].T.reshape(-1).to(torch.float32)
        blocks = size // state.blocksize
        packed = self.data[e * size // 2 : (e + 1) * size // 2]
        return packed, self._absmax(e * blocks, (e + 1) * blocks)

    def _expert_state(self, absmax: torch.Tensor, shape: torch.Size) -> Any:
        """A plain ``QuantState`` of one expert of ``shape`` with these scales."""
        import bitsandbytes.functional as F

        state = self.quant_state
        return F.QuantState(
            absmax=absmax,
            shape=shape,
            code=state.code,
            blocksize=state.blocksize,
            quant_type=state.quant_type,
            dtype=self._dequant_dtype,
        )

    def _absmax(self, start: int, end: int) -> torch.Tensor:
        """The float32 ``absmax`` entries ``[start, end)``; with double quantization,
        dequantized from the nested blocks that cover them only (the values
        ``dequantize_4bit`` computes for the whole tensor, same operations)."""
        import bitsandbytes.functional as F

        state = self.quant_state
        if not state.nested:
            return state.absmax[start:end]
        nested = state.state2
        first = start // nested.blocksize
        last = -(-end // nested.blocksize)
        covering = F.QuantState(
            absmax=nested.absmax[first:last],
            code=nested.code,
            blocksize=nested.blocksize,
            dtype=torch.float32,
        )
        lo = first * nested.blocksize
        absmax = F.dequantize_blockwise(state.absmax[lo:end], covering)
        absmax += state.offset
        return absmax[start - lo :]

    def _expert_8bit(self, e: int) -> torch.Tensor:
        import bitsandbytes.functional as F

        r = self.expert_shape[0]
        rows = F.int8_vectorwise_dequant(self.data[e], self.SCB[e * r : (e + 1) * r])
        return rows.to(self._dequant_dtype)

    # --- bitsandbytes' matmuls, one expert at a time -----------------------------------

    def fused(self, x: torch.Tensor) -> bool:
        """Whether :meth:`linear` runs ``x`` through a bitsandbytes kernel that reads the
        quantized expert (no dequantized copy): in inference (no gradient wanted) at 4
        bits on the CPU where bitsandbytes has its AVX512-BF16 kernel and the expert fits
        its layout, or on a CUDA device with whole blocks per row; at 8 bits wherever
        LLM.int8 runs. Otherwise :meth:`linear` dequantizes the expert."""
        wants_grad = x.requires_grad or (torch.is_grad_enabled() and self.requires_grad)
        if x.device != self.device or wants_grad:
            return False
        if self.quant_state is None:
            return True
        r, c = self.expert_shape
        blocksize = self.quant_state.blocksize
        if x.device.type == "cpu":
            return self.cpu_layout or (
                cpu_layout.detected() and cpu_layout.fits(r, c, blocksize) and cpu_layout.agrees()
            )
        return x.device.type == "cuda" and c % blocksize == 0

    def linear(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """``torch.nn.functional.linear(x, self[e])`` (``x`` ``[M, C]``, out ``[M, R]``)
        computed by bitsandbytes on expert ``e``'s share of the quantized storage where
        :meth:`fused` says so: its fused 4-bit kernel (the AVX512-BF16 CPU kernel on the
        CPU layout, made here at the first call; ``matmul_4bit`` on CUDA, its GEMV for
        one row), or LLM.int8's matmul with :attr:`threshold` as ``Linear8bitLt`` runs
        it. The result is the dequantized expert's product within the kernel's own
        rounding (bfloat16 scales and accumulation on the CPU, int8 activations at 8
        bits)."""
        if not self.fused(x):
            return torch.nn.functional.linear(x, self[e])
        return self.kernel()(e, x)

    def kernel(self) -> Callable[..., torch.Tensor]:
        """``f(e, x, out=None)``: :meth:`linear` without its checks (the caller made them,
        with :meth:`fused`, once for many experts), into ``out`` (``[M, R]``, rows
        contiguous) when given; at 4 bits on the CPU the weight is put in the CPU layout
        first."""
        if self.quant_state is None:
            return _into(self._linear_8bit)
        r, c = self.expert_shape
        if self.device.type != "cpu":
            return _into(self._linear_4bit)
        self.use_cpu_layout()
        state = self.quant_state
        weights, absmax, code = self.data.view(-1, r, c // 2), state.absmax, state.code
        gemv, blocksize, shape = torch.ops.bitsandbytes.gemv_4bit.default, state.blocksize, [r, c]
        native = _native_gemv(state.quant_type)
        scratch: list[torch.Tensor] = []  # one expert's dequantized weight, reused

        def cpu(e: int, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
            if x.shape[0] > KERNEL_ROWS:  # the kernel decodes the weight once per row
                if x.dtype == torch.bfloat16 == self._dequant_dtype:
                    if not scratch:  # (a fresh 2 MiB buffer per expert: page faults)
                        scratch.append(torch.empty((c, r), dtype=torch.bfloat16))
                    w = self._transposed_into(e, scratch[0])
                    return torch.matmul(x, w, out=out) if out is not None else x @ w
                return _put(torch.nn.functional.linear(x, self[e]), out)
            if x.stride(-1) != 1:  # the kernel reads rows as contiguous
                x = x.contiguous()
            if native is not None and x.dtype == torch.bfloat16:
                if out is None or out.stride(-1) != 1 or out.dtype != torch.bfloat16:
                    return _put(native(x, weights[e], absmax[e], r, c, blocksize), out)
                return native(x, weights[e], absmax[e], r, c, blocksize, out)
            return _put(gemv(x, weights[e], shape, absmax[e], code, blocksize).to(x.dtype), out)

        return cpu

    def transposed(self, e: int) -> torch.Tensor:
        """Expert ``e``'s weight transposed, ``[C, R]`` bfloat16: ``self[e].T`` with the
        same values, dequantized by the Rust core straight from the CPU layout (which
        holds 32 rows of a column together: a transposed output is written in contiguous
        runs), several times faster than bitsandbytes' CPU dequantization. For a weight in
        the CPU layout (:attr:`cpu_layout`) whose dtype is bfloat16 only."""
        if not self.cpu_layout or self._dequant_dtype != torch.bfloat16:
            raise ValueError("transposed() takes a bfloat16 weight in the CPU layout")
        r, c = self.expert_shape
        return self._transposed_into(self._expert(e), torch.empty((c, r), dtype=torch.bfloat16))

    def _transposed_into(self, e: int, out: torch.Tensor) -> torch.Tensor:
        """:meth:`transposed` into ``out`` (bfloat16 ``[C, R]``, contiguous), unchecked."""
        state = self.quant_state
        r, c = self.expert_shape
        packed, absmax = self.data.view(-1, r, c // 2)[e], state.absmax[e]
        code = state.code.to(torch.float32).contiguous()  # the buffers need them held
        _core.dequantize_4bit_cpu_layout(
            cpu_layout.byte_buffer(packed),
            cpu_layout.byte_buffer(absmax),
            cpu_layout.byte_buffer(code, "f"),
            cpu_layout.byte_buffer(out),
            rows=r,
            cols=c,
            blocksize=state.blocksize,
            threads=torch.get_num_threads(),
        )
        return out

    def _linear_4bit(self, e: int, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        packed, absmax = self._plain_expert(e)
        expert = self._expert_state(absmax, torch.Size(self.expert_shape))
        return bnb.matmul_4bit(x, packed, expert).to(x.dtype)

    def _linear_8bit(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """LLM.int8's inference matmul (``x`` ``[M, C]``) on expert ``e``: the operations
        ``bnb.matmul`` runs for a ``Linear8bitLt`` in inference (``MatMul8bitLt.forward``
        without a gradient: the input rounded to float16 and quantized row-wise with
        :attr:`threshold`'s outlier columns held back, the int8 product scaled, the
        outliers' product added), called directly: the same values, without the autograd
        wrapper and without its warning about the float16 cast, which it logs at every
        call, for every expert (a fifth of an int8 prefill's time on a 2-core CPU, and
        hundreds of lines a forward)."""
        r = self.expert_shape[0]
        cb, scb = self.data[e], self.SCB[e * r : (e + 1) * r]
        if x.numel() == 0:
            return torch.empty((*x.shape[:-1], r), dtype=x.dtype, device=x.device)
        ops = torch.ops.bitsandbytes
        ca, sca, outliers = ops.int8_vectorwise_quant.default(x.to(torch.float16), self.threshold)
        if self.threshold > 0.0:
            out, _ = ops.int8_mixed_scaled_mm.default(x, ca, cb, sca, scb, outliers, None)
        else:
            out = ops.int8_scaled_mm.default(ca, cb, sca, scb, bias=None, dtype=x.dtype)
        return out.to(x.dtype)

    def use_cpu_layout(self) -> None:
        """Put the 4-bit bytes in bitsandbytes' AVX512-BF16 CPU layout, in place, as
        ``Linear4bit`` does at its first CPU forward: each expert's ``[R, C/2]`` bytes
        rearranged 32 rows at a time (by the Rust core), its scales as a transposed
        bfloat16 ``[C / blocksize, R]`` (double quantization undone: the kernel needs
        plain scales). :meth:`plain` gives the stored form back. Idempotent; a no-op
        where :meth:`fused` would not use it."""
        if self.cpu_layout or self.quant_state is None or self.device.type != "cpu":
            return
        with _CPU_LAYOUT_LOCK:
            if self.cpu_layout:
                return
            state = self.quant_state
            e, r, c = self.shape3
            if not (cpu_layout.fits(r, c, state.blocksize) and cpu_layout.agrees()):
                return
            absmax = self._absmax(0, e * r * c // state.blocksize)  # double quant undone
            absmax = absmax.float().view(e, r, c // state.blocksize).transpose(1, 2)
            packed = copy.copy(state)
            packed.absmax = absmax.to(torch.bfloat16).contiguous()
            packed.nested, packed.offset, packed.state2 = False, None, None
            packed.original_nested = state.nested
            packed.packing_format_for_cpu = True
            _pack_in_place(self.data.view(e * r, c // 2), r, c)
            self.quant_state = packed

    # --- module machinery ------------------------------------------------------------

    def _with_data(self, data: torch.Tensor, stats_fn: Callable[[Any], Any]) -> QuantizedExperts:
        """A QuantizedExperts around ``data`` with this one's statistics passed
        through ``stats_fn`` (a move, a deep copy)."""
        if self.quant_state is not None:
            new = type(self)(data, quant_state=stats_fn(self.quant_state))
        else:
            new = type(self)(data, scb=stats_fn(self.SCB), dtype=self._dequant_dtype)
        new.threshold = self.threshold
        return new

    @property  # type: ignore[override]
    def data(self) -> torch.Tensor:
        return torch._C.TensorBase.data.__get__(self)  # type: ignore[attr-defined]

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        # nn.Module.to()/cuda()/cpu() keep the parameter object and set its data to
        # what our to() returned: take that one's (moved) statistics with it
        torch._C.TensorBase.data.__set__(self, value)  # type: ignore[attr-defined]
        if isinstance(value, QuantizedExperts):
            self.quant_state = value.quant_state
            self.SCB = value.SCB
            self._dequant_dtype = value._dequant_dtype

    def to(self, *args: Any, **kwargs: Any) -> QuantizedExperts:  # type: ignore[override]
        """A copy on another device: the bytes and the statistics move together
        (this one is left as it is). The stored dtype is fixed: a floating dtype
        other than it is refused (``nn.Module.to(dtype)`` passes none for
        integer tensors)."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype != self.data.dtype:
            raise TypeError(
                f"QuantizedExperts holds quantized {self.data.dtype} bytes and cannot be cast "
                f"to {dtype}; dequantize() gives the weight in {self._dequant_dtype}"
            )
        if device is None or device == self.device:
            return self
        if self.cpu_layout:  # the layout is the CPU kernel's: the stored form moves
            return self._stored().to(device, non_blocking=non_blocking)
        return self._with_data(
            self.data.to(device, non_blocking=non_blocking),
            functools.partial(_moved, device=device, non_blocking=non_blocking),
        )

    def cpu(self) -> QuantizedExperts:  # type: ignore[override]
        return self.to("cpu")

    def cuda(  # type: ignore[override]
        self, device: int | str | torch.device | None = None, non_blocking: bool = False
    ) -> QuantizedExperts:
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif isinstance(device, int):
            device = torch.device("cuda", device)
        return self.to(device, non_blocking=non_blocking)

    def __deepcopy__(self, memo: dict[int, Any]) -> QuantizedExperts:
        if id(self) in memo:
            return memo[id(self)]
        if self.cpu_layout:  # the same layout and scales: the copy computes the same
            new = torch.Tensor._make_subclass(type(self), self.data.clone(), False)
            new.quant_state = copy.deepcopy(self.quant_state, memo)
            new.SCB, new._dequant_dtype, new.threshold = None, self._dequant_dtype, self.threshold
        else:
            new = self._with_data(self.data.clone(), lambda stats: copy.deepcopy(stats, memo))
        memo[id(self)] = new
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        data, stats = self.plain()
        state, scb = (stats, None) if self.quant_state is not None else (None, stats)
        return (_rebuild, (data, state, scb, self._dequant_dtype, self.threshold))

    def _stored(self) -> QuantizedExperts:
        """A QuantizedExperts of :meth:`plain`'s stored form (new tensors in the CPU
        layout, this one otherwise)."""
        if not self.cpu_layout:
            return self
        data, state = self.plain()
        new = type(self)(data, quant_state=state)
        new.threshold = self.threshold
        return new

    def __repr__(self) -> str:  # type: ignore[override]
        e, r, c = self.shape3
        if self.quant_state is not None:
            state = self.quant_state
            kind = f"4-bit {state.quant_type}, blocksize={state.blocksize}"
            if state.nested:
                kind += ", double_quant"
            if self.cpu_layout:
                kind += ", cpu layout"
        else:
            kind = "8-bit LLM.int8"
        return (
            f"QuantizedExperts({kind}, experts={e}, expert_shape=({r}, {c}), "
            f"dtype={self._dequant_dtype}, device={self.device})"
        )


def _rebuild(
    data: torch.Tensor,
    quant_state: Any,
    scb: torch.Tensor | None,
    dtype: torch.dtype,
    threshold: float = QuantizedExperts.threshold,
) -> QuantizedExperts:
    if quant_state is not None:
        new = QuantizedExperts(data, quant_state=quant_state)
    else:
        new = QuantizedExperts(data, scb=scb, dtype=dtype)
    new.threshold = threshold
    return new


def _put(value: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """``value``, copied into ``out`` when given."""
    if out is None:
        return value
    out.copy_(value)
    return out


def _into(f: Callable[[int, torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``f(e, x)`` as a :meth:`QuantizedExperts.kernel`, ``out`` taken."""

    def kernel(e: int, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return _put(f(e, x), out)

    return kernel


@functools.cache
def _native_gemv(quant_type: str) -> Callable[..., torch.Tensor] | None:
    """bitsandbytes' AVX512-BF16 CPU GEMV for ``quant_type``, called as its
    ``gemv_4bit`` CPU op calls it (``gemv_4bit_inference_cpu_{nf4,fp4}_bf16`` of its
    native library, on bfloat16 rows), without the op's dispatch and Python wrapper: a
    third of a decode step's time per expert (94 us against 59 us for a 1024 x 1024
    expert). None where the op would not call it (kernels-community's kernel loaded,
    no such function): the op is used then."""
    import ctypes

    try:
        import bitsandbytes.backends.cpu.ops as ops
        from bitsandbytes.cextension import lib
        from bitsandbytes.functional import get_ptr

        if getattr(ops, "gemm_4bit_forward_kernel", None) is not None:
            return None
        fn = getattr(lib, f"gemv_4bit_inference_cpu_{quant_type}_bf16")
    except (ImportError, AttributeError):
        return None
    i64 = ctypes.c_int64

    def gemv(
        x: torch.Tensor,
        w: torch.Tensor,
        absmax: torch.Tensor,
        r: int,
        c: int,
        blocksize: int,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if out is None:
            out = torch.empty((x.shape[0], r), dtype=torch.bfloat16)
        fn(i64(x.shape[0]), i64(r), i64(c), get_ptr(x), get_ptr(w), get_ptr(absmax),
           get_ptr(out), i64(blocksize), i64(x.stride(0)), i64(out.stride(0)))  # fmt: skip
        return out

    return gemv


_CPU_LAYOUT_LOCK = threading.Lock()

_PACK_CHUNK = 16 << 20
"""Bytes of experts rearranged at a time by :func:`_pack_in_place` (its transient copy)."""


def _pack_in_place(data: torch.Tensor, rows: int, cols: int) -> None:
    """Rearrange ``data`` (``[E*rows, cols/2]`` plain 4-bit bytes, CPU) into the CPU
    layout in place, a few experts at a time through a bounded copy (the layout
    rearranges each 32 rows on their own, so experts convert independently)."""
    per_expert = rows * cols // 2
    experts = data.shape[0] // rows
    step = max(1, _PACK_CHUNK // per_expert)
    for first in range(0, experts, step):
        part = data[first * rows : min(experts, first + step) * rows]
        source = part.clone()  # held until the call returns: the buffer does not hold it
        _core.pack_4bit_cpu_layout(
            cpu_layout.byte_buffer(source),
            cpu_layout.byte_buffer(part),
            rows=part.shape[0],
            cols=cols,
            threads=torch.get_num_threads(),
        )


def _moved(stats: Any, *, device: torch.device, non_blocking: bool) -> Any:
    """``stats`` (a ``QuantState`` or ``SCB``) on ``device``, as a copy: the
    original is not changed (``QuantState.to`` moves in place)."""
    if isinstance(stats, torch.Tensor):
        return stats.to(device, non_blocking=non_blocking)
    state = copy.copy(stats)
    state.absmax = stats.absmax.to(device, non_blocking=non_blocking)
    state.code = stats.code.to(device, non_blocking=non_blocking)
    if stats.nested:
        state.offset = stats.offset.to(device, non_blocking=non_blocking)
        state.state2 = _moved(stats.state2, device=device, non_blocking=non_blocking)
    return state


def _check_four_bit(packed: torch.Tensor, state: Any) -> torch.Tensor:
    """``packed`` as ``[E*R*C // 2, 1]``, after checking it and ``state`` agree."""
    import bitsandbytes.functional as F

    if not isinstance(state, F.QuantState):
        raise TypeError(
            f"quant_state must be a bitsandbytes QuantState, got {type(state).__name__}"
        )
    shape = tuple(state.shape or ())
    if len(shape) != 3:
        raise ValueError(f"quant_state.shape must be [E, R, C], got {list(shape)}")
    e, r, c = shape
    if state.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {state.quant_type!r}")
    if state.dtype not in _FLOATS:
        raise ValueError(
            f"quant_state.dtype must be bfloat16, float16 or float32, got {state.dtype}"
        )
    blocksize = state.blocksize
    if (r * c) % blocksize:
        raise ValueError(
            f"an expert of {r}x{c} = {r * c} values is not a whole number of {blocksize}-value "
            f"blocks: quantize with a blocksize that divides {r * c}"
        )
    if packed.dtype != torch.uint8 or packed.numel() * 2 != e * r * c:
        raise ValueError(
            f"packed must be uint8 with {e * r * c // 2} bytes for [{e}, {r}, {c}], "
            f"got {packed.dtype} {list(packed.shape)}"
        )
    if not packed.is_contiguous():
        raise ValueError("packed must be contiguous")
    blocks = e * r * c // blocksize
    absmax_dtype = torch.uint8 if state.nested else torch.float32
    if state.absmax.dtype != absmax_dtype or state.absmax.numel() != blocks:
        raise ValueError(
            f"quant_state.absmax must be {absmax_dtype} with {blocks} entries, "
            f"got {state.absmax.dtype} {list(state.absmax.shape)}"
        )
    if state.nested:
        nested = -(-blocks // state.state2.blocksize)
        if state.offset is None or state.state2.absmax.numel() != nested:
            raise ValueError(
                f"double quantization needs offset and {nested} nested absmax entries, "
                f"got {state.state2.absmax.numel()}"
            )
    if state.absmax.device != packed.device:
        raise ValueError(
            f"packed is on {packed.device} but quant_state.absmax on {state.absmax.device}"
        )
    return packed.reshape(-1, 1)


def _check_eight_bit(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``scb`` as ``[E*R]``, after checking it, ``cb`` and ``dtype`` agree."""
    if cb.dtype != torch.int8 or cb.dim() != 3:
        raise ValueError(f"cb must be int8 [E, R, C], got {cb.dtype} {list(cb.shape)}")
    e, r, _ = cb.shape
    if scb.dtype != torch.float32 or scb.numel() != e * r:
        raise ValueError(
            f"scb must be float32 with {e * r} row scales, got {scb.dtype} {list(scb.shape)}"
        )
    if dtype not in _FLOATS:
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
    if scb.device != cb.device:
        raise ValueError(f"cb is on {cb.device} but scb on {scb.device}")
    return scb.reshape(-1)


# --- the experts implementation --------------------------------------------------------


@functools.cache
def _dispatching_code() -> Any:
    """The code of the forward ``use_experts_implementation`` puts on a class (the
    one that dispatches on ``config._experts_implementation``)."""
    from transformers.integrations.moe import use_experts_implementation

    probe = type("_Probe", (nn.Module,), {"forward": lambda self: None})
    return use_experts_implementation(probe).forward.__code__


def eager_forward(cls: type[nn.Module]) -> Callable[..., Any]:
    """``cls``'s own forward, under any dispatching forward of
    ``use_experts_implementation`` (which ``functools.wraps`` it: the original is
    ``__wrapped__``; a class decorated again, or a subclass of a decorated one,
    may stack several)."""
    forward = cls.forward
    while getattr(forward, "__code__", None) is _dispatching_code():
        forward = forward.__wrapped__  # type: ignore[attr-defined]
    return forward


def experts_forward(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The ``"leanstream"`` experts implementation. Where bitsandbytes has a kernel for
    the experts' matmuls (:meth:`QuantizedExperts.fused`) and transformers describes
    the module's computation (:func:`matmul_forward`), each routed expert goes through
    that kernel on its share of the quantized storage; otherwise the module class's
    eager forward runs, taking ``self.gate_up_proj[expert_idx]`` (dequantized by
    :class:`QuantizedExperts`) per routed expert."""
    out = matmul_forward(module, *args, **kwargs)
    if out is not None:
        return out
    return eager_forward(type(module))(module, *args, **kwargs)


def matmul_forward(module: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor | None:
    """The experts of ``module`` run one routed expert at a time through
    :meth:`QuantizedExperts.linear` (bitsandbytes' kernels, no dequantized copy), or
    ``None`` where that does not apply.

    It applies to the classes transformers decorates with ``use_experts_implementation``
    (their ``forward(hidden_states, top_k_index, top_k_weights)``), whose weights are
    ``[E, out, in]`` (not ``is_transposed``) and held as :class:`QuantizedExperts`, in
    inference. What each expert computes is what transformers' own ``grouped_mm`` and
    ``batched_mm`` implementations read from the module: ``gate_up_proj`` and the
    class's ``_apply_gate`` (or ``up_proj`` and ``act_fn`` without a gate), the
    optional biases and ``post_expert_norm``, then ``down_proj``; the routed outputs
    are weighted and summed into each token as the eager forwards do (``index_add_``
    into zeros, expert by expert, in the hidden states' dtype).
    """
    names = ("hidden_states", "top_k_index", "top_k_weights")
    if len(args) + len(kwargs) != 3 or set(kwargs) - set(names[len(args) :]):
        return None
    values = dict(zip(names, args, strict=False), **kwargs)
    hidden, index, weights = (values[n] for n in names)
    has_gate = getattr(module, "has_gate", None)
    if (
        has_gate is None
        or getattr(module, "is_transposed", True)
        or getattr(module, "_is_expert_parallel", False)
        or module.training
        or not isinstance(hidden, torch.Tensor)
        or hidden.dim() != 2
    ):
        return None
    first = getattr(module, "gate_up_proj" if has_gate else "up_proj", None)
    down = getattr(module, "down_proj", None)
    if not (
        isinstance(first, QuantizedExperts)
        and isinstance(down, QuantizedExperts)
        and first.fused(hidden)
        and down.fused(hidden)
    ):
        return None
    bias = getattr(module, "has_bias", False)
    first_bias = getattr(module, "gate_up_proj_bias" if has_gate else "up_proj_bias", None)
    down_bias = getattr(module, "down_proj_bias", None)
    post_norm = getattr(module, "post_expert_norm", None)
    if not getattr(module, "has_post_expert_norm", False):
        post_norm = None

    up, down_kernel = first.kernel(), down.kernel()
    n = first.num_experts
    routing = weights.reshape(-1)
    top_k = index.shape[-1]
    flat = index.reshape(-1)
    if hidden.shape[0] == 1:  # a decode step: the routed experts in order, no gathering
        chosen = sorted((e, k) for k, e in enumerate(flat.tolist()) if e < n)
        pairs = torch.tensor([k for _, k in chosen], device=hidden.device)
        runs = [(e, i, i + 1) for i, (e, _) in enumerate(chosen)]
        x = hidden.expand(len(chosen), -1)
    else:
        # several tokens: the (token, expert) pairs sorted by expert, each expert's run
        # of rows multiplied at once (index_add_ per expert costs 0.4 ms a call on the CPU)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=n)[:n].tolist()
        pairs = order[: sum(counts)]  # pairs of an index >= n (expert parallelism) last
        x = hidden[pairs // top_k]
        runs, start = [], 0
        for expert, count in enumerate(counts):
            if count:
                runs.append((expert, start, start + count))
                start += count
    # one buffer per projection, each expert's rows written in place by its kernel; the
    # gate and the routing weights applied to all rows at once
    like = dict(dtype=hidden.dtype, device=hidden.device)
    up_out = torch.empty((len(pairs), first.expert_shape[0]), **like)
    for expert, a, b in runs:
        up(expert, x[a:b], out=up_out[a:b])
        if bias:
            up_out[a:b] += first_bias[expert]
    h = module._apply_gate(up_out) if has_gate else module.act_fn(up_out)
    down_out = torch.empty((len(pairs), down.expert_shape[0]), **like)
    for expert, a, b in runs:
        down_kernel(expert, h[a:b], out=down_out[a:b])
        if bias:
            down_out[a:b] += down_bias[expert]
    if post_norm is not None:
        down_out = post_norm(down_out)
    weighted = (down_out * routing[pairs, None]).float()
    if hidden.shape[0] == 1:  # summed over top-k in float32, as grouped_mm
        return weighted.sum(dim=0, keepdim=True).to(hidden.dtype)
    summed = torch.zeros(
        (flat.shape[0], weighted.shape[-1]), dtype=torch.float32, device=hidden.device
    )
    summed[pairs] = weighted
    return summed.view(-1, top_k, weighted.shape[-1]).sum(dim=1).to(hidden.dtype)


def register() -> None:
    """Register :func:`experts_forward` as ``"leanstream"`` in transformers'
    ``ALL_EXPERTS_FUNCTIONS`` (for every ``ExpertsInterface``). Idempotent."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, experts_forward)


def quantized_experts_modules(model: nn.Module) -> list[str]:
    """The names of the modules that hold a :class:`QuantizedExperts` parameter."""
    return [
        name
        for name, module in model.named_modules()
        if any(isinstance(p, QuantizedExperts) for p in module.parameters(recurse=False))
    ]


def use_quantized_experts(model: nn.Module, *, threshold: float | None = None) -> list[str]:
    """Make ``model``'s experts modules that hold :class:`QuantizedExperts` run
    their eager forward: register ``"leanstream"`` and select it for their configs.

    transformers reads ``module.config._experts_implementation`` at every forward
    of a class decorated with ``use_experts_implementation``; that config is the
    model's or one of its sub-configs. The selection goes through the model's
    ``set_experts_implementation`` (with the current implementation of every other
    config, so nothing else changes), and is then set on any config that it does
    not reach (one that is not a sub-model's, a model whose source transformers
    cannot inspect). Other configs keep their implementation; a model without
    :class:`QuantizedExperts` is not touched. ``threshold``: LLM.int8's outlier
    threshold for 8-bit experts (:attr:`QuantizedExperts.threshold`; default: left as
    it is). Returns the names of the experts modules that hold them.
    """
    names = quantized_experts_modules(model)
    if threshold is not None:
        for name in names:
            for param in model.get_submodule(name).parameters(recurse=False):
                if isinstance(param, QuantizedExperts):
                    param.threshold = float(threshold)
    configs: dict[int, Any] = {}
    for name in names:
        module = model.get_submodule(name)
        config = getattr(module, "config", None)
        if config is not None and eager_forward(type(module)) is not type(module).forward:
            configs[id(config)] = config
    if not configs:
        return names  # nothing dispatches: the forwards index the parameters directly
    register()
    if hasattr(model, "set_experts_implementation") and hasattr(
        model, "get_experts_implementation"
    ):
        requested = model.get_experts_implementation()
        for key in requested:
            config = model.config if key == "" else getattr(model.config, key, None)
            if id(config) in configs:
                requested[key] = IMPLEMENTATION
        model.set_experts_implementation(requested)
    for config in configs.values():
        if getattr(config, "_experts_implementation", None) == IMPLEMENTATION:
            continue
        if isinstance(getattr(type(config), "_experts_implementation", None), property):
            # what set_experts_implementation sets: this config only, not its sub-configs
            config._experts_implementation_internal = IMPLEMENTATION
        else:
            config._experts_implementation = IMPLEMENTATION
    return names


__all__ = [
    "IMPLEMENTATION",
    "KERNEL_ROWS",
    "QuantizedExperts",
    "eager_forward",
    "experts_forward",
    "matmul_forward",
    "quantized_experts_modules",
    "register",
    "use_quantized_experts",
]
