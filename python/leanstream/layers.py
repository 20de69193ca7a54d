"""Which layers a load quantizes: one plan, made once, read by ``load``, ``load_into``
and ``inspect``.

The rules are the model's library's (:mod:`leanstream.families`): transformers'
``modules_to_not_convert`` (``lm_head``, tied weights, the last module,
``_keep_in_fp32_modules``, the config's list), diffusers' ``_keep_in_fp32_modules``,
a plain module's shared weights; the user's ``skip_modules``; the embeddings and
output embeddings ``quantize_embeddings`` / ``quantize_lm_head`` add; a pre-quantized
checkpoint's own list. Three rules go beyond the libraries, so that a loaded model never
crashes or computes garbage where the library's would:

- an ``nn.Linear`` subclass with a forward of its own (PhiMoE's and Llama 4's routers,
  Falcon's ``FalconLinear``) is not replaced, as in transformers; a subclass that
  provably computes a plain linear (:func:`leanstream.quantize.plain_linear`) is
  quantized, where transformers keeps it;
- a layer whose weight a forward reads directly (:mod:`leanstream.direct_reads`) stays
  in full precision; transformers quantizes it;
- experts weights an experts forward uses whole (Llama 4's ``bmm``) stay in full
  precision, as in transformers, and so do experts held as 2-D tensors (DBRX): a
  quantized load says so (:func:`kept_experts`).

:attr:`LayerPlan.notes` says, layer by layer, where these rules made a difference;
``inspect`` prints them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .direct_reads import read_directly, whole_reads
from .errors import ConfigError
from .families import (
    Family,
    default_skip,
    exact_pattern,
    exact_patterns,
    family,
    fp32_patterns,
    quantized_experts,
    resolve_skip,
    shared_parameters,
)
from .quantize import (
    QuantSpec,
    extra_modules,
    matches_any,
    plain_linear,
    quantizable_modules,
)


@dataclass
class LayerPlan:
    """What a load does to the model's layers.

    Attributes:
        kind: the model's library (:func:`leanstream.families.family`).
        skip: patterns (transformers' matching) of the modules kept in full precision.
        embeddings: names of the ``nn.Embedding`` modules quantized (the flags, or a
            pre-quantized checkpoint storing them quantized).
        output: names of the output embeddings quantized as a linear.
        experts: ``{name: (E, R, C)}`` of the 3-D experts weights quantized.
        kept_experts: ``{name: why}`` of the experts weights no load quantizes
            (:func:`kept_experts`).
        notes: ``{name: why}`` for the linears (and experts weights) the rules beyond
            the library decided: kept (a forward of its own, a weight read directly,
            ``kept_experts``) or quantized where the library keeps it (a subclass that
            is a plain linear).
    """

    kind: Family
    skip: set[str]
    embeddings: set[str] = field(default_factory=set)
    output: set[str] = field(default_factory=set)
    experts: dict[str, tuple[int, ...]] = field(default_factory=dict)
    kept_experts: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def plan_layers(
    model: nn.Module,
    spec: QuantSpec,
    expected: Mapping[str, tuple[int, ...]],
    *,
    skip_modules: Iterable[str] | None = None,
    prequantized: Any = None,
) -> LayerPlan:
    """The :class:`LayerPlan` of a load of ``model`` (built, on ``meta``, not yet
    replaced) with ``spec`` and the user's ``skip_modules`` (a :class:`ConfigError` when
    one matches no layer a load could quantize), or as the pre-quantized checkpoint
    ``prequantized`` stores it."""
    kind = family(model)
    fp32_modules = fp32_patterns(model)
    user = list(skip_modules or [])
    read = read_directly(model, quantizable_modules(model))
    if prequantized is None:
        check_skip_modules(model, user)
        skip = default_skip(model, kind) | resolve_skip(model, kind, user)
        skip |= exact_patterns(kind, read)  # recorded: the library reloads it the same
    elif kind == "transformers":
        skip = prequantized.skip(model)
    else:
        skip = resolve_skip(model, kind, [*(prequantized.skip_modules or []), *fp32_modules])
    if kind == "module":  # a parameter registered twice: both modules keep it as it is
        ties = shared_parameters(model)
        skip |= {_exact_module(name) for pair in ties.items() for name in pair}
    kept = kept_experts(model)
    plan = LayerPlan(kind, skip, kept_experts=kept, notes=notes(model, kind, read, kept))
    if spec.quantized:
        if prequantized is None:
            # never those whose weight a forward reads (Mamba casts to lm_head's dtype)
            never = {*user, *fp32_modules, *map(exact_pattern, read)}
            plan.embeddings, plan.output = extra_modules(model, spec, never)
        else:
            plan.embeddings, plan.output = prequantized.extra_modules(model)
        plan.skip -= plan.output
    if spec.quantized or prequantized is not None:
        plan.experts = quantized_experts(model, kind, plan.skip, prequantized, expected)
    return plan


def notes(
    model: nn.Module, kind: Family, read: Mapping[str, str], kept: Mapping[str, str]
) -> dict[str, str]:
    """``{name: why}`` for the linears (and experts weights) of ``model`` that the rules
    beyond its library (``kind``) decide (see the module docstring); ``read``: the
    layers :func:`leanstream.direct_reads.read_directly` found, ``kept``: the experts
    weights :func:`kept_experts` found, with why."""
    library = "diffusers quantizes" if kind == "diffusers" else "transformers keeps"
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or type(module) is nn.Linear:
            continue  # Conv1D is no nn.Linear: transformers replaces it too
        if _is_bitsandbytes(module):
            continue
        cls = type(module).__name__
        if plain_linear(module):
            if kind != "diffusers":  # diffusers quantizes every subclass
                found[name] = f"quantized: {cls} computes a plain linear ({library} it)"
        else:
            found[name] = f"kept: {cls} has a forward of its own"
            if kind == "diffusers":
                found[name] += f" ({library} it)"
    for name, why in read.items():
        found.setdefault(name, f"kept: {why}")
    found.update(kept)
    return found


def kept_experts(model: nn.Module) -> dict[str, str]:
    """``{parameter name: why}`` for the experts weights no load quantizes: 3-D ones an
    experts forward uses whole (Llama 4's ``bmm``), and experts held as one 2-D
    ``[E * I, H]`` tensor (DBRX's ``w1``/``v1``/``w2``, in an experts module: one whose
    class is named for them), neither linears nor 3-D."""
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        experts = getattr(module, "num_experts", None)
        if not isinstance(experts, int) or experts < 2:
            continue
        prefix = f"{name}." if name else ""
        whole = whole_reads(type(module))
        for attr, param in module.named_parameters(recurse=False):
            if attr in whole and param.dim() == 3 and param.is_floating_point():
                found[prefix + attr] = (
                    f"kept: {type(module).__name__}.forward uses the whole 3-D {attr}, "
                    "not one expert at a time"
                )
        if "Expert" not in type(module).__name__:
            continue  # a model or MoE block with num_experts holds more than experts
        for sub, child in module.named_modules():
            if isinstance(child, nn.Linear):
                continue
            for attr, param in child.named_parameters(recurse=False):
                rows = param.shape[0] if param.dim() == 2 else 0
                if param.is_floating_point() and rows > experts and rows % experts == 0:
                    found[f"{prefix}{sub}.{attr}" if sub else prefix + attr] = (
                        f"kept: {type(child).__name__} holds the {experts} experts as one 2-D "
                        f"{attr} {list(param.shape)}, neither linears nor 3-D experts weights"
                    )
    return found


def check_skip_modules(model: nn.Module, skip_modules: list[str]) -> None:
    """A ``skip_modules`` entry that matches no layer a load could quantize (a linear,
    an embedding, an experts module, or a module holding one) does nothing: a typo,
    refused."""
    if not skip_modules:
        return
    layers = quantizable_modules(model)
    layers += [n for n, m in model.named_modules() if hasattr(m, "num_experts")]
    unmatched = [p for p in skip_modules if not any(matches_any(n, [p]) for n in layers)]
    if unmatched:
        example = layers[-1] if layers else next(reversed(dict(model.named_modules())))
        raise ConfigError(
            f"skip_modules {unmatched} match no layer of {type(model).__name__} a load "
            f"could quantize (layer names look like {example!r})"
        )


def _exact_module(param_name: str) -> str:
    """A skip pattern for exactly the module that holds ``param_name``."""
    return exact_pattern(param_name.rpartition(".")[0])


def _is_bitsandbytes(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes")


__all__ = ["LayerPlan", "check_skip_modules", "kept_experts", "notes", "plan_layers"]
