"""Mixture-of-experts weights held quantized, dequantized one expert at a time.

transformers 5 keeps the experts of a mixture-of-experts layer as 3-D parameters
of one experts module (``MixtralExperts.gate_up_proj [E, 2I, H]``,
``GptOssExperts.gate_up_proj [E, H, 2I]``, ...): not ``nn.Linear`` layers, so
bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` cannot hold them.
:class:`QuantizedExperts` is such a 3-D parameter held as bitsandbytes holds a
linear weight (4-bit packed bytes with a ``QuantState``, or LLM.int8's ``CB`` and
``SCB``), and indexing it by an expert gives that expert's weight, dequantized.

The experts modules' eager forwards only ever read ``self.gate_up_proj[expert_idx]``
and ``self.down_proj[expert_idx]``, ``expert_idx`` a 0-dim integer tensor, so they
run unchanged on a :class:`QuantizedExperts`: every architecture's own gating,
biases, transposition and interleaving is reused as written. The classes
decorated with transformers' ``use_experts_implementation`` dispatch their forward
on ``config._experts_implementation`` (default ``"grouped_mm"``, which reads the
whole 3-D tensor) through the registry ``ALL_EXPERTS_FUNCTIONS``;
:func:`use_quantized_experts` registers ``"leanstream"`` there, an implementation
that runs the class's original eager forward, and selects it for the configs of
the experts modules that hold quantized weights.

Why dequantize on use, not a 4-bit matmul: the forwards use the expert weights in
different layouts (``F.linear(x, w)`` on ``[out, in]`` for Mixtral and Qwen,
``x @ w`` on ``[in, out]`` for GPT-OSS), and a dequantized expert is what each of
them expects, so no architecture needs its own quantized kernel call. It costs
what bitsandbytes itself does: ``matmul_4bit`` dequantizes the whole weight and
calls a dense matmul for any input of more than one row (only a single-token
input takes the fused GEMV kernel), and LLM.int8 without outliers is the int8
weight times its row scales. One expert is dequantized at a time, in the model's
dtype, and is garbage once its two matmuls are done: the transient memory is one
expert's weight, never the layer's. The outputs equal, bit for bit, those of the
same model with the dequantized weights as plain parameters and the eager
implementation (the same operations on the same values).
"""

from __future__ import annotations

import copy
import functools
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

IMPLEMENTATION = "leanstream"
"""The name of the experts implementation in transformers' ``ALL_EXPERTS_FUNCTIONS``."""

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


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
        flat = copy.copy(self.quant_state)  # see _expert_4bit
        flat.shape = torch.Size((e * r * c,))
        return F.dequantize_4bit(self.data, flat).reshape(e, r, c)

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

        state = self.quant_state
        r, c = self.expert_shape
        size = r * c
        blocks = size // state.blocksize
        # flat: bitsandbytes' CPU kernel reads a 2-D shape's absmax as whole blocks per
        # row, wrong when c is not a multiple of the block size (the blocks run across
        # rows); on the flat values every kernel is right, and the same where c is
        expert = F.QuantState(
            absmax=self._absmax(e * blocks, (e + 1) * blocks),
            shape=torch.Size((size,)),
            code=state.code,
            blocksize=state.blocksize,
            quant_type=state.quant_type,
            dtype=state.dtype,
        )
        packed = self.data[e * size // 2 : (e + 1) * size // 2]
        return F.dequantize_4bit(packed, expert).reshape(r, c)

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

    # --- module machinery ------------------------------------------------------------

    def _with_data(self, data: torch.Tensor, stats_fn: Callable[[Any], Any]) -> QuantizedExperts:
        """A QuantizedExperts around ``data`` with this one's statistics passed
        through ``stats_fn`` (a move, a deep copy)."""
        if self.quant_state is not None:
            return type(self)(data, quant_state=stats_fn(self.quant_state))
        return type(self)(data, scb=stats_fn(self.SCB), dtype=self._dequant_dtype)

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
        new = self._with_data(self.data.clone(), lambda stats: copy.deepcopy(stats, memo))
        memo[id(self)] = new
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (_rebuild, (self.data, self.quant_state, self.SCB, self._dequant_dtype))

    def __repr__(self) -> str:  # type: ignore[override]
        e, r, c = self.shape3
        if self.quant_state is not None:
            state = self.quant_state
            kind = f"4-bit {state.quant_type}, blocksize={state.blocksize}"
            if state.nested:
                kind += ", double_quant"
        else:
            kind = "8-bit LLM.int8"
        return (
            f"QuantizedExperts({kind}, experts={e}, expert_shape=({r}, {c}), "
            f"dtype={self._dequant_dtype}, device={self.device})"
        )


def _rebuild(
    data: torch.Tensor, quant_state: Any, scb: torch.Tensor | None, dtype: torch.dtype
) -> QuantizedExperts:
    if quant_state is not None:
        return QuantizedExperts(data, quant_state=quant_state)
    return QuantizedExperts(data, scb=scb, dtype=dtype)


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
    """The ``"leanstream"`` experts implementation: the module class's eager
    forward, which takes ``self.gate_up_proj[expert_idx]`` (dequantized by
    :class:`QuantizedExperts`) per routed expert."""
    return eager_forward(type(module))(module, *args, **kwargs)


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


def use_quantized_experts(model: nn.Module) -> list[str]:
    """Make ``model``'s experts modules that hold :class:`QuantizedExperts` run
    their eager forward: register ``"leanstream"`` and select it for their configs.

    transformers reads ``module.config._experts_implementation`` at every forward
    of a class decorated with ``use_experts_implementation``; that config is the
    model's or one of its sub-configs. The selection goes through the model's
    ``set_experts_implementation`` (with the current implementation of every other
    config, so nothing else changes), and is then set on any config that it does
    not reach (one that is not a sub-model's, a model whose source transformers
    cannot inspect). Other configs keep their implementation; a model without
    :class:`QuantizedExperts` is not touched. Returns the names of the experts
    modules that hold them.
    """
    names = quantized_experts_modules(model)
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
    "QuantizedExperts",
    "eager_forward",
    "experts_forward",
    "quantized_experts_modules",
    "register",
    "use_quantized_experts",
]
