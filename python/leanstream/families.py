"""Which library a model comes from, and what that changes in a load.

The streaming and quantization are the same for every ``nn.Module``; what differs is
the library's own conventions, which a user of that library observes:

- ``"transformers"`` (a ``PreTrainedModel``): transformers' bitsandbytes rules
  (``lm_head``, tied weights and the last module kept in full precision, its
  ``modules_to_not_convert`` matching), its renaming and MoE conversion rules, its
  markers (``hf_quantizer``, ``is_loaded_in_4bit``, ...) and ``config.quantization_config``.
- ``"diffusers"`` (a diffusers ``ModelMixin``): diffusers' bitsandbytes rules (every
  ``nn.Linear`` quantized except ``_keep_in_fp32_modules`` and ``skip_modules``, with
  diffusers' own name matching; ``_keep_in_fp32_modules`` parameters in float32), its
  markers and ``config.quantization_config`` (a ``diffusers.BitsAndBytesConfig``), so
  that ``save_pretrained`` / ``from_pretrained`` of diffusers read the result.
- ``"module"`` (any other ``nn.Module``): every ``nn.Linear`` quantized except
  ``skip_modules``, ``_keep_in_fp32_modules`` when the class has it, and linears whose
  weight is shared with another module (a tied weight cannot be both); the settings
  are recorded as ``model.quantization_config`` (a transformers ``BitsAndBytesConfig``).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

from .quantize import QuantSpec, default_skip_modules, expert_params, matches_any

Family = Literal["transformers", "diffusers", "module"]


def family(model: nn.Module) -> Family:
    """The library ``model`` comes from (see the module docstring)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return "transformers"
    diffusers = sys.modules.get("diffusers")  # a diffusers model means diffusers is imported
    if diffusers is not None and isinstance(model, diffusers.ModelMixin):
        return "diffusers"
    return "module"


def fp32_patterns(model: nn.Module) -> list[str]:
    """The class's ``_keep_in_fp32_modules`` (and transformers' ``_strict`` ones)."""
    return _listed(model, "_keep_in_fp32_modules") + _listed(model, "_keep_in_fp32_modules_strict")


def _listed(model: nn.Module, attr: str) -> list[str]:
    value = getattr(model, attr, None) or []
    return [value] if isinstance(value, str) else sorted(value)


def fp32_rule(model: nn.Module, kind: Family, dtype: torch.dtype) -> Callable[[str, str], bool]:
    """``keep(module_name, attr)``: whether this parameter is loaded in float32 when the
    model's dtype is ``dtype``. transformers upcasts ``_keep_in_fp32_modules`` only in
    a float16 model (against bf16 -> fp16 overflow), ``_keep_in_fp32_modules_strict`` in
    float16 and bfloat16 ones; diffusers always upcasts its ``_keep_in_fp32_modules``.

    transformers matches an entry anywhere in the parameter's full name (its loader's
    regex search, ``*`` a wildcard), so that an entry names a module (``"moe_statics"``)
    or a parameter (Ernie4.5-MoE's ``"gate.weight"``) alike: the same plan
    (``_get_dtype_plan``) and the same regex (``build_glob_alternation``) here."""
    if kind == "transformers":
        from transformers.core_model_loading import build_glob_alternation

        plan = [p for p, d in model._get_dtype_plan(dtype).items() if d == torch.float32]
        if not plan:
            return lambda module_name, attr: False
        regex = build_glob_alternation(plan)[0]
        return lambda module_name, attr: (
            regex.search(f"{module_name}.{attr}" if module_name else attr) is not None
        )
    patterns = fp32_patterns(model)
    if not patterns:
        return lambda module_name, attr: False
    if kind == "diffusers":
        # diffusers' load_model_dict_into_meta: a pattern equal to any part of the name
        return lambda module_name, attr: any(
            p in f"{module_name}.{attr}".split(".") for p in patterns
        )
    return lambda module_name, attr: matches_any(module_name, patterns)


def default_skip(model: nn.Module, kind: Family) -> set[str]:
    """Modules the library keeps out of quantization by default (as patterns)."""
    if kind == "transformers":
        return default_skip_modules(model)
    if kind == "diffusers":  # its _keep_in_fp32_modules, matched as diffusers does
        return resolve_skip(model, kind, fp32_patterns(model))
    return set(fp32_patterns(model)) | {exact_pattern(name) for name in _shared_weights(model)}


def exact_patterns(kind: Family, names: Iterable[str]) -> set[str]:
    """Skip patterns for exactly the modules ``names``: their full names for a
    transformers model (readable in ``llm_int8_skip_modules``, and matched from the start
    as transformers matches its list), anchored regular expressions otherwise."""
    if kind == "transformers":
        return set(names)
    return {exact_pattern(name) for name in names}


def resolve_skip(model: nn.Module, kind: Family, patterns: Iterable[str]) -> set[str]:
    """``patterns`` as the loader's matching (transformers' rule) reads them. diffusers
    matches its own way (``name`` equal to a module's own name or its full name, or
    ``name + "."`` anywhere in the full name): those modules are named exactly."""
    patterns = list(patterns)
    if kind != "diffusers":
        return set(patterns)
    found = set()
    for name, _ in model.named_modules():
        short = name.rpartition(".")[2]
        if any(short == p or name == p or f"{p}." in name for p in patterns):
            found.add(exact_pattern(name))
    return found


def exact_pattern(name: str) -> str:
    """A pattern that :func:`leanstream.quantize.matches_any` matches to ``name`` only."""
    return f"{re.escape(name)}$"


def _shared_weights(model: nn.Module) -> list[str]:
    """Names of the modules whose ``weight`` is another module's too."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(name)
    return [name for names in owners.values() if len(names) > 1 for name in names]


def shared_parameters(model: nn.Module) -> dict[str, str]:
    """``{name: first_name}`` for every parameter registered under several names
    (a weight tied by assignment in a plain module): loaded once, shared after."""
    first: dict[int, str] = {}
    ties = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            ties[name] = first[id(param)]
        else:
            first[id(param)] = name
    return ties


def quantized_experts(
    model: nn.Module,
    kind: Family,
    skip: Iterable[str],
    prequantized: Any,
    expected: Mapping[str, tuple[int, ...]],
) -> dict[str, tuple[int, ...]]:
    """``{name: (E, R, C)}`` of the 3-D experts weights a load quantizes, or that a
    pre-quantized checkpoint (``prequantized``) stores quantized; transformers' experts
    modules only."""
    if kind != "transformers":
        return {}
    if prequantized is not None:
        return prequantized.experts_shapes(model, expected)
    return expert_params(model, skip)


def quantization_config(
    kind: Family, spec: QuantSpec, skip: Iterable[str], compute: torch.dtype
) -> Any:
    """The config object the library uses to describe ``spec``."""
    config = spec.config(skip, compute)
    if kind != "diffusers":
        return config
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig.from_dict(config.to_dict())


def record(model: Any, kind: Family, config: Any, skip: list[str], pre_quantized: bool) -> None:
    """Leave on ``model`` what its library's bitsandbytes loading leaves (``config`` and
    markers), so that its guards and ``save_pretrained`` treat it as their own."""
    if kind == "transformers":
        model.config.quantization_config = config
        _mark_transformers(model, skip, pre_quantized)
    elif kind == "diffusers":
        _mark_diffusers(model, config, skip, pre_quantized)
    else:
        model.quantization_config = config


def _mark_transformers(model: Any, skip: list[str], pre_quantized: bool) -> None:
    """What transformers' bitsandbytes quantizer leaves on the model it loads:
    ``hf_quantizer`` (the quantizer itself, built from the model's
    ``quantization_config``), ``is_quantized``, ``quantization_method``,
    ``config._is_quantized``, and ``is_loaded_in_4bit`` or ``is_loaded_in_8bit``
    (only the one that is true, as transformers). transformers' guards read them:
    ``Trainer`` refuses a purely quantized model, ``.half()`` / ``.to(dtype)`` refuse
    to cast it."""
    from transformers.quantizers.auto import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(
        model.config.quantization_config, pre_quantized=pre_quantized
    )
    quantizer.modules_to_not_convert = skip
    model.is_quantized = True  # as HfQuantizer.preprocess_model
    model.quantization_method = quantizer.quantization_config.quant_method
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)


def _mark_diffusers(model: Any, config: Any, skip: list[str], pre_quantized: bool) -> None:
    """What diffusers' ``from_pretrained`` with a ``BitsAndBytesConfig`` leaves:
    ``config.quantization_config`` (also in the saved ``config.json``), ``is_quantized``,
    ``quantization_method``, ``is_loaded_in_4bit`` / ``is_loaded_in_8bit``,
    ``is_4bit_serializable`` / ``is_8bit_serializable`` and ``hf_quantizer``."""
    from diffusers.configuration_utils import FrozenDict
    from diffusers.quantizers import DiffusersAutoQuantizer

    model._internal_dict = FrozenDict({**model._internal_dict, "quantization_config": config})
    quantizer = DiffusersAutoQuantizer.from_config(config, pre_quantized=pre_quantized)
    quantizer.modules_to_not_convert = skip
    model.is_quantized = True
    model.quantization_method = config.quant_method
    if config.load_in_4bit:
        model.is_loaded_in_4bit = True
    else:
        model.is_loaded_in_8bit = True
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer


__all__ = [
    "Family",
    "default_skip",
    "exact_pattern",
    "exact_patterns",
    "family",
    "fp32_patterns",
    "fp32_rule",
    "quantization_config",
    "quantized_experts",
    "record",
    "resolve_skip",
    "shared_parameters",
]
