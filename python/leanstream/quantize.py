"""Layer replacement and per-tensor quantization with bitsandbytes.

Two halves, used in this order by the loader:

1. :func:`replace_linears` swaps ``nn.Linear`` (and subclasses, and GPT-2's
   ``Conv1D``) for ``bnb.nn.Linear4bit`` / ``bnb.nn.Linear8bitLt`` while the model
   is still on ``meta``: nothing is allocated.
2. :func:`materialize` receives one full-precision tensor at a time (a view of
   the mapped checkpoint) and turns it into the module's final parameter on the
   target device: quantized for a replaced linear's weight, copied otherwise.
   The full-precision tensor is garbage as soon as it returns.

Quantization goes through the same bitsandbytes calls transformers makes
(``Params4bit(...).to(device)``, ``Int8Params(...)._quantize``), so the packed
bytes, ``absmax``, ``quant_map`` and ``SCB`` are bit-identical to
``from_pretrained(quantization_config=BitsAndBytesConfig(...))``. On the CPU the
weights are quantized by the Rust core instead (``_core.quantize_4bit`` /
``_core.quantize_int8``, same arithmetic as bitsandbytes' CPU kernels, bit for
bit, tens of times faster), straight from the mapped bytes into ``torch.empty``
outputs; the ``QuantState`` around them is built with bitsandbytes' own calls.
``QuantSpec(native=False)`` (``load(..., native_quantizer=False)``) keeps
bitsandbytes' kernels.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from . import _core
from .errors import ConfigError

QuantType = Literal["nf4", "fp4"]


@dataclass(frozen=True)
class QuantSpec:
    """What to do to linear layers: ``bits`` 4 (nf4/fp4), 8 (LLM.int8), or 16 (none)."""

    bits: int = 4
    quant_type: QuantType = "nf4"
    double_quant: bool = False
    compute_dtype: torch.dtype | None = None
    blocksize: int = 64
    quant_storage: torch.dtype = torch.uint8
    threshold: float = 6.0
    native: bool = True  # quantize CPU weights with the Rust kernels, not bitsandbytes'

    def __post_init__(self) -> None:
        if self.bits not in (4, 8, 16):
            raise ConfigError(f"bits must be 4, 8 or 16 (None), got {self.bits!r}")
        if self.quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ConfigError(f"blocksize must be a power of two in 32..4096, got {self.blocksize}")

    @property
    def quantized(self) -> bool:
        return self.bits in (4, 8)

    def config(self, skip_modules: Iterable[str], compute_dtype: torch.dtype) -> Any:
        """The ``BitsAndBytesConfig`` that describes this spec (for ``model.config``)."""
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=self.bits == 4,
            load_in_8bit=self.bits == 8,
            llm_int8_threshold=self.threshold,
            llm_int8_skip_modules=sorted(skip_modules),
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_quant_storage=self.quant_storage,
        )


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """transformers' rule for ``modules_to_not_convert``: a pattern matches a module
    name from its start up to a module boundary (``layer.1`` matches ``layer.1.attn``,
    not ``layer.11``), as a regex with the same boundary, or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    return any(re.match(rf"(?:{p}){boundary}", name) or name.endswith(p) for p in patterns)


def default_skip_modules(model: Any) -> set[str]:
    """Modules transformers keeps in full precision: the output embeddings, every
    tied weight, the module of the last parameter, ``_keep_in_fp32_modules`` and the
    config's own ``modules_to_not_convert``."""
    skip: set[str] = set()
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in tied.items():
        skip.update({target.removesuffix(".weight"), source.removesuffix(".weight")})
    params = list(model.named_parameters())
    if params:
        skip.add(params[-1][0].removesuffix(".weight"))
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None:
        skip.update(name for name, module in model.named_modules() if module is output)
    skip.update(getattr(model, "_keep_in_fp32_modules", None) or [])
    skip.update(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    skip.update(getattr(model.config, "modules_to_not_convert", None) or [])
    return skip


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def replace_linears(model: nn.Module, spec: QuantSpec, skip: Iterable[str]) -> dict[str, bool]:
    """Replace linear layers on ``meta`` with bitsandbytes layers.

    Returns ``{module_name: transpose}`` for every replaced module, ``transpose``
    being True for ``Conv1D`` (whose weight is stored ``(in, out)``).
    """
    import bitsandbytes as bnb

    skip = list(skip)
    replaced: dict[str, bool] = {}
    for name, module in list(model.named_modules()):
        conv1d = _is_conv1d(module)
        if not (conv1d or isinstance(module, nn.Linear)) or matches_any(name, skip):
            continue
        if conv1d:
            in_features, out_features = module.weight.shape
        else:
            in_features, out_features = module.in_features, module.out_features
        has_bias = module.bias is not None
        if spec.bits == 4:
            new: nn.Module = bnb.nn.Linear4bit(
                in_features,
                out_features,
                has_bias,
                spec.compute_dtype,
                compress_statistics=spec.double_quant,
                quant_type=spec.quant_type,
                quant_storage=spec.quant_storage,
                device="meta",
            )
            new.weight.blocksize = spec.blocksize
        else:
            new = bnb.nn.Linear8bitLt(
                in_features,
                out_features,
                has_bias,
                has_fp16_weights=False,
                threshold=spec.threshold,
                device="meta",
            )
        new.requires_grad_(False)
        model.set_submodule(name, new)
        replaced[name] = conv1d
    return replaced


def materialize(
    module: nn.Module,
    attr: str,
    tensor: torch.Tensor,
    *,
    device: torch.device,
    dtype: torch.dtype | None,
    spec: QuantSpec,
    transpose: bool = False,
    buffer: bool = False,
) -> None:
    """Make ``tensor`` (full precision, possibly a read-only view of the mapped
    file) ``module.<attr>`` on ``device``: quantized if ``module`` is a replaced
    linear and ``attr`` is its weight, else copied with ``dtype`` (None: as is)."""
    import bitsandbytes as bnb

    if attr == "weight" and isinstance(module, bnb.nn.Linear4bit):
        weight = tensor.to(device=device, dtype=dtype)
        if transpose:
            weight = weight.t()
        if spec.native and _native_input(weight):
            module.weight = _native_4bit(module, weight)
            return
        param = bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            blocksize=module.weight.blocksize,
            compress_statistics=module.weight.compress_statistics,
            quant_type=module.weight.quant_type,
            quant_storage=module.weight.quant_storage,
            module=module,
        )
        module.weight = param.to(device)
        return
    if attr == "weight" and isinstance(module, bnb.nn.Linear8bitLt):
        weight = tensor.to(dtype=dtype)
        if transpose:
            weight = weight.t()
        if spec.native and device.type == "cpu" and weight.dim() == 2 and _native_input(weight):
            module.weight = _native_int8(weight)
            return
        param = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        # Int8Params.to() quantizes only from the CPU; _quantize is what it calls
        module.weight = param._quantize(device)
        return
    value = tensor.to(device=device, dtype=dtype, copy=True)
    if buffer:
        module._buffers[attr] = value
    else:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)


# --- the native CPU quantizer ------------------------------------------------------

_NATIVE_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def _native_input(weight: torch.Tensor) -> bool:
    """Whether the Rust kernels take ``weight``: a non-empty BF16/F16/F32 CPU tensor."""
    return weight.device.type == "cpu" and weight.dtype in _NATIVE_DTYPES and weight.numel() > 0


def _raw(weight: torch.Tensor) -> Any:
    """``weight``'s bytes as a buffer, without a copy unless it is not contiguous."""
    return weight.contiguous().reshape(-1).view(torch.uint8).numpy()


def _native_4bit(module: nn.Module, weight: torch.Tensor) -> Any:
    """``Params4bit(weight, ...).to("cpu")`` with the packing done in Rust: the
    ``QuantState`` is built as ``bitsandbytes.functional.quantize_4bit`` builds it
    (double quantization of ``absmax`` included, by bitsandbytes itself)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    meta = module.weight
    n = weight.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.empty(-(n // -meta.blocksize), dtype=torch.float32)
    _core.quantize_4bit(
        _raw(weight),
        _NATIVE_DTYPES[weight.dtype],
        packed.numpy(),
        absmax.numpy(),
        quant_type=meta.quant_type,
        blocksize=meta.blocksize,
        threads=torch.get_num_threads(),
    )
    if meta.quant_storage != torch.uint8:
        packed = packed.squeeze().view(meta.quant_storage).unsqueeze(1)
    code = F.get_4bit_type(meta.quant_type, device=weight.device)
    if meta.compress_statistics:
        offset = absmax.mean()
        qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
        state = F.QuantState(
            absmax=qabsmax,
            shape=weight.shape,
            dtype=weight.dtype,
            blocksize=meta.blocksize,
            code=code,
            quant_type=meta.quant_type,
            offset=offset,
            state2=state2,
        )
    else:
        state = F.QuantState(
            absmax=absmax,
            shape=weight.shape,
            dtype=weight.dtype,
            blocksize=meta.blocksize,
            code=code,
            quant_type=meta.quant_type,
        )
    param = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=meta.blocksize,
        compress_statistics=meta.compress_statistics,
        quant_type=meta.quant_type,
        quant_storage=meta.quant_storage,
        module=module,
        bnb_quantized=True,
    )
    module.quant_state = state  # as Params4bit._quantize does
    return param


def _native_int8(weight: torch.Tensor) -> Any:
    """``Int8Params(weight, has_fp16_weights=False)._quantize("cpu")`` in Rust
    (the cast to float16 included, element by element)."""
    import bitsandbytes as bnb

    rows, cols = weight.shape
    cb = torch.empty((rows, cols), dtype=torch.int8)
    scb = torch.empty(rows, dtype=torch.float32)
    _core.quantize_int8(
        _raw(weight),
        _NATIVE_DTYPES[weight.dtype],
        cols,
        cb.numpy(),
        scb.numpy(),
        threads=torch.get_num_threads(),
    )
    return bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)


__all__ = ["QuantSpec", "default_skip_modules", "matches_any", "materialize", "replace_linears"]
