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
``from_pretrained(quantization_config=BitsAndBytesConfig(...))``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

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
        param = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        # Int8Params.to() quantizes only from the CPU; _quantize is what it calls
        module.weight = param._quantize(device)
        return
    value = tensor.to(device=device, dtype=dtype, copy=True)
    if buffer:
        module._buffers[attr] = value
    else:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)


__all__ = ["QuantSpec", "default_skip_modules", "matches_any", "materialize", "replace_linears"]
