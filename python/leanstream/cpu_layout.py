"""bitsandbytes' AVX512-BF16 CPU layout of 4-bit weights: made at load, kept right after.

On a CPU with AVX512-BF16, bitsandbytes (0.50) gives 4-bit layers a fused kernel
that needs the weight in another layout. ``Linear4bit.forward`` converts each
weight at its first CPU forward in eval mode
(``bitsandbytes.functional._convert_weight_packed_for_cpu``): the packed bytes are
rearranged 32 rows at a time, ``absmax`` becomes a transposed bfloat16
``[in / blocksize, out]`` (double quantization is undone: the kernel needs plain
scales), and the ``QuantState`` is marked ``packing_format_for_cpu``. That
conversion goes through int32 temporaries 8x the packed size and makes the first
forward of a model tens of times slower than the second.

This module makes that layout while the weights stream in instead, bit for bit
what bitsandbytes' first forward makes (the bytes by the Rust core, the
statistics with the same torch operations), and keeps a layer right afterwards,
which bitsandbytes does not:

* a layer in training mode, or given an input that requires grad, gets the plain
  layout back before its forward (bitsandbytes' fused kernel has no backward: its
  input gradient is silently lost), and the fused layout again at the next eval
  forward (our conversion, not bitsandbytes' slow one);
* a layer whose weight left the CPU (``model.to("cuda")``) gets the plain layout
  back before its forward there;
* bitsandbytes' own inverse (``Params4bit.cuda()``, ``Linear4bit._save_to_state_dict``)
  leaves ``absmax`` transposed and in bfloat16 without double quantization: it is put
  back in order (float32, exact) before it is used;
* ``state_dict()`` (``leanstream.save``, ``save_pretrained``) writes the plain layout,
  bitsandbytes' format, without changing the model: the layer keeps its fused layout;
* an input whose last dimension is strided (``x.transpose(1, 2)``) is made
  contiguous first: the fused kernel reads it as contiguous and gives a wrong result.

Where it applies: a ``Linear4bit`` on the CPU whose ``support_avx512bf16_for_cpu``
is set (bitsandbytes' detection, ``has_avx512bf16()``), whose ``out_features`` is a
multiple of 32 and ``in_features`` a multiple of the block size (:func:`fits`:
bitsandbytes' conversion crashes on other shapes, so those layers keep the plain
kernel), when the installed bitsandbytes' conversion is the one this module
reproduces (:func:`agrees`, checked once per process on a probe weight; where it
differs the conversion is left to bitsandbytes, as before).
"""

from __future__ import annotations

import copy
import ctypes
import functools
from typing import Any

import torch
from torch import nn

from . import _core

#: rows the CPU layout packs together (``block_n`` of bitsandbytes' conversion)
BLOCK_N = 32


def byte_buffer(tensor: torch.Tensor, format: str = "B") -> memoryview:
    """A buffer over a contiguous CPU ``tensor``'s bytes, for the Rust core to read or
    write. Not ``tensor.numpy()``, which marks the storage as shared with NumPy (not
    resizable) for good: a model's weights stay torch's own. The buffer does not keep the
    tensor alive: the caller holds it in a variable across the call."""
    assert tensor.is_contiguous() and tensor.device.type == "cpu"
    raw = (ctypes.c_char * tensor.nbytes).from_address(tensor.data_ptr())
    view = memoryview(raw).cast("B")
    return view if format == "B" else view.cast(format)


def fits(out_features: int, in_features: int, blocksize: int) -> bool:
    """Whether a ``[out, in]`` 4-bit weight has the CPU layout: bitsandbytes'
    conversion asserts ``out % 32 == 0`` and reshapes ``absmax`` by
    ``in // blocksize`` rows (a crash, ``shape '[512, 0]' is invalid``, below one
    block, and a wrong layout when a block would straddle two rows)."""
    return (
        out_features > 0
        and in_features > 0
        and out_features % BLOCK_N == 0
        and in_features % blocksize == 0
    )


def detected() -> bool:
    """bitsandbytes' own detection (the function its layers call when built)."""
    import bitsandbytes.nn.modules as modules

    return bool(modules.has_avx512bf16())


def is_packed(state: Any) -> bool:
    """Whether a ``QuantState`` is in the CPU layout."""
    return bool(getattr(state, "packing_format_for_cpu", False))


def wanted(module: nn.Module, device: torch.device) -> bool:
    """Whether ``module``'s weight, quantized on ``device``, goes to the CPU layout
    at load: a ``Linear4bit`` (not an embedding) on the CPU that bitsandbytes would
    convert at its first forward, with a conversion this module reproduces."""
    import bitsandbytes as bnb

    return (
        device.type == "cpu"
        and isinstance(module, bnb.nn.Linear4bit)
        and bool(getattr(module, "support_avx512bf16_for_cpu", False))
        and fits(module.out_features, module.in_features, module.weight.blocksize)
        and agrees()
    )


# --- the conversion --------------------------------------------------------------------


def _to_cpu_state(
    state: Any, storage: torch.dtype, qshape: torch.Size, *, converted: bool = False
) -> None:
    """Turn ``state`` (plain) into the CPU layout's, as bitsandbytes'
    ``_convert_weight_packed_for_cpu`` does, with the same torch operations.
    ``converted``: its (non-nested) ``absmax`` is already the CPU layout's."""
    import bitsandbytes.functional as F

    if storage != torch.uint8:
        state.original_storage_type = storage
    state.original_dtype = state.dtype
    state.original_nested = state.nested
    state.original_qshape = qshape
    if converted:
        state.dtype = torch.bfloat16
        state.packing_format_for_cpu = True
        return
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
        if absmax.dtype != torch.float32:
            absmax = absmax.float()
        state.absmax = absmax
        state.nested = False
        delattr(state, "state2")
    rows, cols = state.shape
    absmax = state.absmax
    if absmax.device.type == "cpu" and absmax.dtype == torch.float32:
        # the same values in Rust: torch's OpenMP workers would spin after the op, taking
        # a core from the quantizer of the next weight for a while
        source = absmax.contiguous()
        out = torch.empty((cols // state.blocksize, rows), dtype=torch.bfloat16)
        _core.absmax_to_cpu_layout(
            byte_buffer(source, "f"), byte_buffer(out), rows=rows, per_row=cols // state.blocksize
        )
        state.absmax = out
    else:
        state.absmax = absmax.reshape(rows, cols // state.blocksize).T.to(torch.bfloat16)
        state.absmax = state.absmax.contiguous()
    state.dtype = torch.bfloat16
    state.packing_format_for_cpu = True


def _qshape(numel: int, storage: torch.dtype) -> torch.Size:
    """The plain packed weight's shape once viewed as bytes (``original_qshape``)."""
    size = storage.itemsize
    return torch.Size((numel // 2 // size, size) if size > 1 else (numel // 2, 1))


def quantize(module: nn.Module, weight: torch.Tensor, threads: int | None = None) -> Any:
    """``weight`` (a ``[out, in]`` BF16/F16/F32 CPU tensor) quantized by the Rust core
    straight into the CPU layout, with the ``QuantState`` that bitsandbytes' quantization
    and first-forward conversion would give ``module``: a ``Params4bit``."""
    from .quantize import _NATIVE_DTYPES, host_empty, params_4bit, quant_state_4bit

    meta = module.weight
    rows, cols = weight.shape
    packed = host_empty((rows, cols // 2), torch.uint8)
    # without double quantization the scales go straight to the CPU layout's bfloat16;
    # with it they are double-quantized first, as bitsandbytes does, then converted
    direct = not meta.compress_statistics
    if direct:
        absmax = torch.empty((cols // meta.blocksize, rows), dtype=torch.bfloat16)
    else:
        absmax = host_empty(rows * cols // meta.blocksize, torch.float32)
    source = weight.contiguous()  # held until the call returns: the buffer does not hold it
    _core.quantize_4bit_cpu_layout(
        byte_buffer(source),
        _NATIVE_DTYPES[weight.dtype],
        byte_buffer(packed),
        byte_buffer(absmax) if direct else byte_buffer(absmax, "f"),
        rows=rows,
        cols=cols,
        quant_type=meta.quant_type,
        blocksize=meta.blocksize,
        threads=threads or torch.get_num_threads(),
        absmax_layout=direct,
    )
    state = quant_state_4bit(
        absmax,
        weight.shape,
        weight.dtype,
        meta.blocksize,
        meta.quant_type,
        meta.compress_statistics,
    )
    qshape = _qshape(weight.numel(), meta.quant_storage)
    _to_cpu_state(state, meta.quant_storage, qshape, converted=direct)
    return params_4bit(module, packed, state, storage=meta.quant_storage)


def from_plain(module: nn.Module, plain: torch.Tensor, state: Any) -> Any:
    """A plain packed 4-bit weight (``Params4bit`` data: a CPU tensor, e.g. a view of a
    pre-quantized checkpoint) and its plain ``state``, in the CPU layout: a ``Params4bit``
    for ``module`` (``state`` is changed in place, as bitsandbytes changes it)."""
    from .quantize import host_empty, params_4bit

    rows, cols = state.shape
    out = host_empty((rows, cols // 2), torch.uint8)
    source = plain.contiguous()  # held until the call returns: the buffer does not hold it
    _core.pack_4bit_cpu_layout(
        byte_buffer(source),
        byte_buffer(out),
        rows=rows,
        cols=cols,
        threads=torch.get_num_threads(),
    )
    _to_cpu_state(state, plain.dtype, _qshape(rows * cols, plain.dtype))
    return params_4bit(module, out, state, storage=plain.dtype)


def pack(module: nn.Module) -> None:
    """Convert ``module``'s plain 4-bit weight (on the CPU) to the CPU layout in place,
    as its first eval forward would, but with the Rust core's conversion."""
    weight = module.weight
    module.weight = from_plain(module, weight.data, weight.quant_state)


def _plain_bytes(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of the weight conversion: plain packed bytes, ``[rows * cols / 2]``."""
    if packed.device.type == "cpu":
        out = torch.empty(rows * cols // 2, dtype=torch.uint8)
        source = packed.contiguous()  # held until the call returns
        _core.unpack_4bit_cpu_layout(
            byte_buffer(source),
            byte_buffer(out),
            rows=rows,
            cols=cols,
            threads=torch.get_num_threads(),
        )
        return out
    return _plain_bytes_torch(packed, rows, cols)


def _plain_bytes_torch(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """:func:`_plain_bytes` in torch, on any device (a model moved to a GPU)."""
    b = packed.view(torch.uint8).reshape(rows // BLOCK_N, cols // 2, BLOCK_N)
    b0, b1 = b[..., 0::2], b[..., 1::2]  # row r's value in the low nibble, r + 16's high
    top = (b0 << 4) | (b1 & 0x0F)
    bottom = (b0 & 0xF0) | (b1 >> 4)
    return torch.cat([top, bottom], dim=2).transpose(1, 2).reshape(-1)


def unpacked(param: Any, *, double_quant: bool) -> tuple[torch.Tensor, Any]:
    """The plain layout of a 4-bit weight: ``(data, state)``, new objects (``param`` is
    not changed). From the CPU layout, the weight's bytes are exact and ``absmax`` is
    the bfloat16 one the fused kernel used, as float32 (exact); a plain weight is taken
    as it is. With ``double_quant``, ``absmax`` is quantized again as ``quantize_4bit``
    does (8-bit, blocks of 256, around its float32 mean): what a saved checkpoint of a
    double-quantized model holds. bitsandbytes' own inverse instead leaves a plain
    ``absmax`` transposed (the scales then apply to the wrong blocks) and
    double-quantizes in the weight's dtype."""
    from .quantize import quant_state_4bit

    state = param.quant_state
    rows, cols = state.shape
    if is_packed(state):
        data = _plain_bytes(param.data, rows, cols).reshape(state.original_qshape)
        storage = getattr(state, "original_storage_type", None)
        if storage is not None:
            data = data.view(storage)
        absmax, dtype = state.absmax.T.reshape(-1).to(torch.float32), state.original_dtype
    else:
        data, absmax, dtype = param.data, state.absmax, state.dtype
        if state.nested:  # already as saved
            return data, state
    fresh = quant_state_4bit(
        absmax, state.shape, dtype, state.blocksize, state.quant_type, double_quant
    )
    fresh.code = state.code  # as bitsandbytes' inverse: the state's own code book
    return data, fresh


def unpack(module: nn.Module) -> None:
    """Put ``module``'s weight back in the plain layout, in place, without double
    quantization (its scales stay exactly those the fused kernel used, so packing it
    again gives the same weight); ``Params4bit.compress_statistics`` still says how it
    is saved."""
    from .quantize import params_4bit

    weight = module.weight
    data, state = unpacked(weight, double_quant=False)
    module.weight = params_4bit(
        module, data, state, storage=weight.quant_storage, nested=weight.compress_statistics
    )


def repair(state: Any) -> None:
    """Undo what bitsandbytes' own inverse (``Params4bit.cuda()``, its
    ``_save_to_state_dict``) leaves wrong: a plain state whose ``absmax`` is still the
    transposed bfloat16 ``[in / blocksize, out]`` of the CPU layout is put back in
    bitsandbytes' order, as float32 (its values are exact)."""
    absmax = getattr(state, "absmax", None)
    if (
        absmax is not None
        and not is_packed(state)
        and not state.nested
        and absmax.dim() == 2
        and getattr(state, "original_qshape", None) is not None
    ):
        state.absmax = absmax.T.reshape(-1).to(torch.float32)


def order_before_bitsandbytes_inverse(state: Any) -> None:
    """Before bitsandbytes' own inverse of its conversion (``Linear4bit._save_to_state_dict``
    undoes it in place), put a CPU-layout ``absmax`` without double quantization in its
    plain order, as float32 (exact): the inverse leaves it transposed, and the scales would
    apply to the wrong blocks. The inverse then keeps it as it is."""
    if is_packed(state) and not getattr(state, "original_nested", True) and state.absmax.dim() == 2:
        state.absmax = state.absmax.T.reshape(-1).to(torch.float32)


# --- keeping a layer right -------------------------------------------------------------


def manage(module: nn.Module) -> None:
    """Keep ``module`` (a ``Linear4bit``) right in either layout (see the module's
    docstring): hooks before its forward and around its ``state_dict``. Idempotent."""
    if getattr(module, "_leanstream_cpu_layout", False):
        return
    module._leanstream_cpu_layout = True
    module.register_forward_pre_hook(_before_forward)
    module.register_state_dict_pre_hook(_before_state_dict)
    module.register_state_dict_post_hook(_after_state_dict)


def _before_forward(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0] if args else None
    state = getattr(module.weight, "quant_state", None)
    if not isinstance(x, torch.Tensor) or state is None:
        return None
    repair(state)
    cpu = x.device.type == "cpu" and module.weight.device.type == "cpu"
    if agrees():
        fused = (
            cpu
            and bool(getattr(module, "support_avx512bf16_for_cpu", False))
            and not module.training
            and not x.requires_grad
        )
        if is_packed(state) and not fused:
            unpack(module)
        elif fused and not is_packed(state) and fits(*state.shape, state.blocksize):
            pack(module)
    if cpu and x.dim() > 1 and x.stride(-1) != 1:
        return (x.contiguous(), *args[1:])
    return None


def _before_state_dict(module: nn.Module, prefix: str, keep_vars: bool) -> None:
    from .quantize import params_4bit

    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        return
    repair(state)
    nested = bool(weight.compress_statistics)
    if is_packed(state) and not agrees():
        order_before_bitsandbytes_inverse(state)
        return
    if is_packed(state) or (nested and not state.nested):
        # written as bitsandbytes writes a plain weight; the module keeps its own
        data, plain = unpacked(weight, double_quant=nested)
        module.__dict__["_leanstream_kept"] = (weight, module.quant_state)
        module.weight = params_4bit(
            module, data, plain, storage=weight.quant_storage, nested=nested
        )


def _after_state_dict(module: nn.Module, *_: Any) -> None:
    kept = module.__dict__.pop("_leanstream_kept", None)
    if kept is not None:
        module.weight, module.quant_state = kept


# --- is the installed bitsandbytes' conversion ours? ------------------------------------


@functools.cache
def agrees() -> bool:
    """Whether the installed bitsandbytes converts 4-bit weights to its CPU layout the
    way this module does: both conversions are run on a probe weight (nf4 and fp4,
    with and without double quantization, uint8 and bfloat16 storage) and must give
    the same bytes and the same ``QuantState``. Checked once per process. Where they
    differ (another bitsandbytes), leanstream leaves the conversion to bitsandbytes."""
    try:
        import bitsandbytes.functional as F

        convert = F._convert_weight_packed_for_cpu
    except (ImportError, AttributeError):
        return False
    try:
        return all(
            _probe_agrees(convert, qt, dq, storage)
            for qt in ("nf4", "fp4")
            for dq in (False, True)
            for storage in (torch.uint8, torch.bfloat16)
        )
    except Exception:  # any failure of bitsandbytes' conversion: not the one we know
        return False


@functools.cache
def _probe_weight() -> torch.Tensor:
    """The probe weight of :func:`agrees`, ``[64, 256]`` bfloat16: deterministic values (no
    RNG: a user's or a test's seeded generator stays as it was)."""
    rows, cols = 64, 256
    weight = torch.arange(rows * cols, dtype=torch.float32).mul(0.61803).sin()
    scale = torch.linspace(0.01, 3.0, rows * cols, dtype=torch.float32)
    return weight.mul(scale).reshape(rows, cols).to(torch.bfloat16)


def _probe_agrees(convert: Any, quant_type: str, double_quant: bool, storage: torch.dtype) -> bool:
    import bitsandbytes as bnb

    from .quantize import quant_state_4bit

    blocksize = 64
    weight = _probe_weight()
    rows, cols = weight.shape
    # quantized by the Rust core on one thread (bit for bit bitsandbytes' quantize_4bit,
    # whose QuantState is built around it): bitsandbytes' own op is a dozen small torch
    # steps, each a wait on torch's thread pool when another process keeps a core busy
    # (there, about a third of the probe's time, which is paid by a process's first load)
    packed = torch.empty(weight.numel() // 2, dtype=torch.uint8)
    absmax = torch.empty(weight.numel() // blocksize, dtype=torch.float32)
    _core.quantize_4bit(
        byte_buffer(weight),
        "BF16",
        byte_buffer(packed),
        byte_buffer(absmax, "f"),
        quant_type=quant_type,
        blocksize=blocksize,
        threads=1,
    )
    data = packed.view(storage).unsqueeze(1)
    state = quant_state_4bit(
        absmax, weight.shape, weight.dtype, blocksize, quant_type, double_quant
    )
    module = bnb.nn.Linear4bit(
        cols, rows, bias=False, quant_type=quant_type, quant_storage=storage, device="meta"
    )
    module.weight.blocksize = blocksize
    ref_data, ref_state = convert(data.clone(), copy.deepcopy(state))
    ours = from_plain(module, data.clone(), copy.deepcopy(state))
    if not torch.equal(ours.data, ref_data) or ours.data.dtype != ref_data.dtype:
        return False
    if not _same_state(ours.quant_state, ref_state):
        return False
    back, _ = unpacked(ours, double_quant=double_quant)
    return torch.equal(back.view(torch.uint8), data.view(torch.uint8)) and back.dtype == data.dtype


def _same_state(a: Any, b: Any) -> bool:
    """Two ``QuantState`` objects with the same attributes, tensors equal bit for bit."""
    import bitsandbytes.functional as F

    if set(vars(a)) != set(vars(b)):
        return False
    for key, value in vars(a).items():
        other = vars(b)[key]
        if isinstance(value, torch.Tensor):
            if not (
                isinstance(other, torch.Tensor)
                and value.dtype == other.dtype
                and value.shape == other.shape
                and torch.equal(value, other)
            ):
                return False
        elif isinstance(value, F.QuantState):
            if not (isinstance(other, F.QuantState) and _same_state(value, other)):
                return False
        elif value != other:
            return False
    return True


__all__ = [
    "BLOCK_N",
    "agrees",
    "byte_buffer",
    "detected",
    "fits",
    "from_plain",
    "is_packed",
    "manage",
    "order_before_bitsandbytes_inverse",
    "pack",
    "quantize",
    "repair",
    "unpack",
    "unpacked",
    "wanted",
]
