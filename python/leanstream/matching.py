"""Which checkpoint tensor fills which model tensor: the plan a load makes before it
reads a byte.

Checkpoint names become model names (``load_into``'s ``key_map``, then transformers'
renaming and MoE merge rules), every model tensor must come from the checkpoint and
every checkpoint tensor must find a place (:class:`~leanstream.MismatchError`
otherwise), except what ``init_missing`` names (made by the modules' own
initialization) and what ``ignore_unexpected`` names.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import _core
from .errors import ConfigError, MismatchError, UnsupportedCheckpointError, checkpoint_error
from .families import family, shared_parameters

if TYPE_CHECKING:
    from .prequantized import Prequantized


@dataclass(frozen=True)
class Target:
    """One checkpoint tensor and where it goes."""

    key: str  # name in the checkpoint
    name: str  # name in the model
    module: nn.Module
    attr: str
    dtype: torch.dtype | None
    transpose: bool
    buffer: bool
    # pre-quantized weight: the (stat, checkpoint key) pairs streamed just before it
    stats: tuple[tuple[str, str], ...] | None = None
    # one expert's piece of a merged 3-D experts weight (transformers' MoE conversion)
    piece: Piece | None = None


@dataclass(frozen=True)
class Piece:
    """Where one checkpoint tensor goes in a 3-D experts parameter ``[E, R, C]`` that
    transformers merges on load (``MergeModulelist(dim=0)``, then for gate + up
    ``Concatenate(dim=1)``): expert ``expert``'s ``part``-th of ``parts`` row blocks,
    i.e. rows ``part * R // parts`` to ``(part + 1) * R // parts`` of ``[expert]``."""

    expert: int
    part: int
    parts: int


#: ``load_into``'s ``key_map``
KeyMap = Mapping[str, str] | Sequence[tuple[str, str]] | Callable[[str], str] | None


@dataclass(frozen=True)
class Names:
    """How checkpoint names meet the model's: ``load_into``'s ``key_map``, and the
    patterns of missing tensors to initialize and of extra tensors to leave out."""

    key_map: KeyMap = None
    init_missing: list[str] | None = None
    ignore_unexpected: list[str] | None = None

    def map(self, key: str) -> str:
        """The model name of checkpoint tensor ``key``."""
        key_map = self.key_map
        if key_map is None:
            return key
        if isinstance(key_map, Mapping):
            name = key_map.get(key, key)
        elif callable(key_map):
            name = key_map(key)
        else:
            name = key
            for pattern, replacement in key_map:
                name = re.sub(pattern, replacement, name)
        if not isinstance(name, str):
            raise ConfigError(f"key_map gave {name!r} for checkpoint tensor {key!r}, not a str")
        return name


def expected_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of every parameter and persistent buffer before layers are replaced."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, buf in module._buffers.items():
            if buf is not None and attr not in module._non_persistent_buffers_set:
                shapes[f"{module_name}.{attr}" if module_name else attr] = tuple(buf.shape)
    return shapes


def plan_targets(
    model: Any,
    ckpt: _core.Checkpoint,
    folder: Path,
    expected: dict[str, tuple[int, ...]],
    replaced: dict[str, bool],
    model_dtype: torch.dtype,
    keep_fp32: Callable[[str, str], bool],
    renamed: tuple[dict[str, str], dict[str, list[tuple[str, Piece]]]],
    initialized: set[str],
    names: Names,
    prequantized: Prequantized | None = None,
) -> tuple[list[Target], dict[str, str]]:
    """Decide, before reading a byte, which checkpoint tensor fills which model
    tensor, in module traversal order; raise :class:`MismatchError` for missing,
    unexpected or mis-shaped tensors. Returns the targets and the ties to make
    afterwards (``{tied_name: loaded_name}``). With ``prequantized``, a replaced
    layer's weight, and a quantized experts weight, also claims its statistics tensors
    (and its shape is the stored one). ``initialized``: tensors made by
    ``init_missing``, not expected from the checkpoint."""
    by_name, merged = renamed
    experts = prequantized.experts_shapes(model, expected) if prequantized is not None else {}
    ties: dict[str, str] = {}
    tied = {
        **(getattr(model, "all_tied_weights_keys", None) or {}),
        **({} if family(model) == "transformers" else shared_parameters(model)),
    }
    for target, source in tied.items():
        if source in by_name and target in by_name:
            continue  # both stored: load both, like transformers does when they differ
        if target in by_name and source not in by_name:
            target, source = source, target
        ties[target] = source

    targets: list[Target] = []
    seen: set[str] = set()
    mismatched = []
    claimed: set[str] = set()  # pre-quantized statistics, loaded with their weight
    missing_stats: list[str] = []
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        entries = [(a, False) for a, p in module._parameters.items() if p is not None]
        entries += [
            (a, True)
            for a, b in module._buffers.items()
            if b is not None and a not in module._non_persistent_buffers_set
        ]
        for attr, is_buffer in entries:
            name = prefix + attr
            if name in seen or name in ties or name in initialized:
                continue
            seen.add(name)
            dtype = torch.float32 if keep_fp32(module_name, attr) else model_dtype
            if name in merged and name in experts:
                # listed as stored quantized, but stored as one tensor per expert
                _, absent = prequantized.experts_stats(name, by_name)  # type: ignore[union-attr]
                missing_stats += [name, *absent]
                continue
            if name in merged:
                pieces, wrong = _pieces(name, expected[name], merged[name], ckpt)
                mismatched += wrong
                targets += [
                    Target(
                        key=key,
                        name=name,
                        module=module,
                        attr=attr,
                        dtype=dtype,
                        transpose=False,
                        buffer=False,
                        piece=piece,
                    )
                    for key, piece in pieces
                ]
                continue
            key = by_name.get(name)
            if key is None:
                continue
            shape, want = tuple(ckpt[key].shape), expected[name]
            stats = None
            if prequantized is not None and module_name in replaced and attr == "weight":
                stats, absent = prequantized.stats(module_name, by_name)
                claimed.update(prefix + stat for stat, _ in stats)
                missing_stats += absent
                want = prequantized.weight_shape(module, key, ckpt[key])
            elif prequantized is not None and name in experts:
                stats, absent = prequantized.experts_stats(name, by_name)
                claimed.update(f"{name}.{stat}" for stat, _ in stats)
                missing_stats += absent
                want = prequantized.experts_shape(want, key, ckpt[key])
            if shape != want:
                mismatched.append((name, shape, want))
            targets.append(
                Target(
                    key=key,
                    name=name,
                    module=module,
                    attr=attr,
                    dtype=dtype,
                    transpose=replaced.get(module_name, False) and attr == "weight",
                    buffer=is_buffer,
                    stats=stats,
                )
            )
    ignore_missing = _regex(getattr(model, "_keys_to_ignore_on_load_missing", None))
    missing = [
        n
        for n in expected
        if n not in by_name
        and n not in merged
        and n not in ties
        and n not in initialized
        and not (ignore_missing and ignore_missing.search(n))
    ]
    missing += [
        f"{name} (expert {expert}, part {part + 1} of {parts})"
        for name, found in merged.items()
        if name in expected
        for expert, part, parts in _absent_pieces(expected[name], found)
    ]
    missing += missing_stats
    unexpected_patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])
    # transformers' own additions: old checkpoints stored these buffers
    unexpected_patterns |= {r"rotary_emb\.inv_freq", r"(^|\.)position_ids$"}
    ignore_unexpected = _regex(unexpected_patterns)
    asked = _regex(names.ignore_unexpected)  # the caller's, searched in checkpoint names too
    # (checkpoint key, model name) of every tensor the model has no place for
    extra = [
        (key, name) for name, key in by_name.items() if name not in expected and name not in claimed
    ]
    pieces = [
        (key, key)
        for name, found in merged.items()
        if name not in expected or name in experts
        for key, _ in found
    ]
    _check_ignore_unexpected(names.ignore_unexpected, extra + pieces, folder)
    unexpected = [
        key
        for key, name in extra
        if not (ignore_unexpected and ignore_unexpected.search(name))
        and not (asked and (asked.search(key) or asked.search(name)))
    ]
    unexpected += [key for key, _ in pieces if not (asked and asked.search(key))]
    if missing or unexpected or mismatched:
        built = f"the model built is a {type(model).__name__}"
        if unexpected:
            hint = (
                f"{built}: to leave the extra tensors out pass ignore_unexpected=[patterns]; "
                "to build a model that has them, pass model_class= (load) or build it "
                "(load_into)"
            )
        else:
            hint = (
                f"{built}: if the checkpoint holds another class, pass model_class= (load) "
                "or build that class (load_into)"
            )
        raise MismatchError(
            str(folder), missing=missing, unexpected=unexpected, mismatched=mismatched, hint=hint
        )
    return targets, ties


def _check_ignore_unexpected(
    patterns: list[str] | None, extra: list[tuple[str, str]], folder: Path
) -> None:
    """An ``ignore_unexpected`` pattern that leaves out no tensor (none of the
    checkpoint's ``extra`` tensors, ``(key, model name)``, matches it) does nothing: a
    typo, refused."""
    if not patterns:
        return
    idle = [
        p
        for p in patterns
        if not any(re.search(p, key) or re.search(p, name) for key, name in extra)
    ]
    if idle:
        what = (
            f"its extra tensors are {sorted(k for k, _ in extra)[:3]}" if extra else "it has none"
        )
        raise ConfigError(
            f"ignore_unexpected {idle} match no extra tensor of the checkpoint in {folder} ({what})"
        )


def _regex(patterns: Any) -> re.Pattern[str] | None:
    patterns = list(patterns or [])
    return re.compile("|".join(f"({p})" for p in patterns)) if patterns else None


def rename_keys(
    model: Any,
    ckpt: _core.Checkpoint,
    folder: Path,
    expected: dict[str, tuple[int, ...]],
    names: Names | None = None,
) -> tuple[dict[str, str], dict[str, list[tuple[str, Piece]]]]:
    """Map model names to checkpoint keys: ``load_into``'s ``key_map`` first, then, for
    a transformers model, transformers' own renaming rules (legacy ``gamma``/``beta``,
    per-model conversion mappings, adding or removing ``base_model_prefix``). Returns
    ``{name: key}`` and, for the 3-D experts parameters transformers merges from one
    tensor per expert (its ``MergeModulelist(dim=0)`` / ``Concatenate(dim=1)``
    converters), ``{name: [(key, piece), ...]}``: each piece is streamed and quantized
    into its place, the merged tensor never exists. Other conversions that merge or
    split tensors cannot be streamed tensor by tensor and are refused."""
    names = names or Names()
    keys = ckpt.keys()
    mapped = {key: names.map(key) for key in keys}
    if family(model) != "transformers" or all(mapped[key] in expected for key in keys):
        # already the model's own names (what save_pretrained writes): nothing to
        # rename, and no need for transformers' conversion tables (0.15 s to build)
        by_name: dict[str, str] = {}
        for key in keys:
            if mapped[key] in by_name:
                raise MismatchError(str(folder), unexpected=[key], file=ckpt[key].file)
            by_name[mapped[key]] = key
        return by_name, {}
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        apply_renamings,
        rename_source_key,
    )

    transforms = get_model_conversion_mapping(model)
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None) or None
    present = dict.fromkeys(expected, True)
    by_name = {}
    merged: dict[str, list[tuple[str, Piece]]] = {}
    for key in keys:
        name, pattern = rename_source_key(mapped[key], renamings, converters, prefix, present)
        if pattern is not None:
            converter = next(c for c in converters if pattern in c.source_patterns)
            piece = _merge_piece(apply_renamings(mapped[key], renamings), pattern, converter)
            if piece is None:
                raise checkpoint_error(
                    UnsupportedCheckpointError,
                    f"{ckpt[key].file}: tensor {key!r} must be converted to fit "
                    f"{type(model).__name__} (transformers pattern {pattern!r}, "
                    f"{[type(op).__name__ for op in converter.operations]}); only merges of "
                    "one tensor per expert can be streamed tensor by tensor",
                    file=ckpt[key].file,
                    tensor=key,
                )
            merged.setdefault(name, []).append((key, piece))
            continue
        if name in by_name:
            raise MismatchError(str(folder), unexpected=[key], file=ckpt[key].file)
        by_name[name] = key
    return by_name, merged


def _merge_piece(renamed: str, pattern: str, converter: Any) -> Piece | None:
    """The :class:`Piece` a checkpoint key (after renamings) is in a supported merge
    (``MergeModulelist(dim=0)``, then ``Concatenate(dim=1)`` if several patterns), or
    None for any other conversion."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = converter.operations
    parts = len(converter.source_patterns)
    if not ops or type(ops[0]) is not MergeModulelist or ops[0].dim != 0:
        return None
    if parts > 1 and not (len(ops) == 2 and type(ops[1]) is Concatenate and ops[1].dim == 1):
        return None
    if parts == 1 and len(ops) != 1:
        return None
    regex = re.escape(pattern).replace(r"\*", r"(\d+)")
    if regex.count(r"(\d+)") != 1:
        return None
    found = re.search(regex, renamed)
    if found is None:
        return None
    return Piece(int(found.group(1)), converter.source_patterns.index(pattern), parts)


def _pieces(
    name: str, shape: tuple[int, ...], found: list[tuple[str, Piece]], ckpt: _core.Checkpoint
) -> tuple[list[tuple[str, Piece]], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """The pieces of merged parameter ``name`` (of ``shape``), in storage order, and the
    mis-shaped ones as ``(key, stored, wanted)``."""
    pieces = sorted(found, key=lambda kp: (kp[1].expert, kp[1].part))
    wrong = []
    for key, piece in pieces:
        want = (shape[1] // piece.parts, *shape[2:]) if len(shape) == 3 else ()
        stored = tuple(ckpt[key].shape)
        if len(shape) != 3 or shape[1] % piece.parts or stored != want:
            wrong.append((key, stored, want))
        elif not 0 <= piece.expert < shape[0]:
            wrong.append((key, stored, want))
    return pieces, wrong


def _absent_pieces(
    shape: tuple[int, ...], found: list[tuple[str, Piece]]
) -> list[tuple[int, int, int]]:
    """``(expert, part, parts)`` of each piece of a merged parameter not in the checkpoint."""
    if not found or len(shape) != 3:
        return []
    parts = found[0][1].parts
    have = {(p.expert, p.part) for _, p in found}
    return [(e, q, parts) for e in range(shape[0]) for q in range(parts) if (e, q) not in have]


def to_initialize(
    model: nn.Module,
    expected: dict[str, tuple[int, ...]],
    by_name: dict[str, str],
    merged: dict[str, list[tuple[str, Piece]]],
    names: Names,
) -> list[str]:
    """The tensors the checkpoint lacks that ``init_missing`` names, and those the
    model's ``_keys_to_ignore_on_load_missing`` says checkpoints leave out (Marian's
    sinusoidal position embeddings, which ``_init_weights`` computes): made as
    transformers makes them."""
    ignored = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
    pattern = _regex([*(names.init_missing or []), *ignored])
    if pattern is None:
        return []
    ties = {
        *(getattr(model, "all_tied_weights_keys", None) or {}),
        *shared_parameters(model),
    }
    return [
        n
        for n in expected
        if n not in by_name and n not in merged and n not in ties and pattern.search(n)
    ]


def initialize(
    model: nn.Module, missing: list[str], device: torch.device
) -> dict[str, torch.Tensor]:
    """Make the tensors ``missing`` (names of parameters and persistent buffers) on
    ``device``, as their modules initialize them, and return them (full precision).

    Each is made by the outermost module around it whose tensors are all missing and
    that has ``reset_parameters`` (so a module's own initialization of its children,
    such as a LoRA-like ``up`` projection set to zero, applies), or by the owner's; in
    a transformers model, by ``_init_weights`` on each module of that subtree. The
    subtree's tensors are made real on ``device`` for the call."""
    if not missing:
        return {}
    from transformers import PreTrainedModel

    wanted = set(missing)
    modules = dict(model.named_modules(remove_duplicate=False))

    @functools.cache  # asked again for each missing tensor inside the same module
    def tensors(module_name: str) -> frozenset[str]:
        module = modules[module_name]
        prefix = f"{module_name}." if module_name else ""
        found = [prefix + n for n, _ in module.named_parameters(remove_duplicate=False)]
        found += [
            f"{prefix}{sub}{'.' if sub else ''}{attr}"
            for sub, m in module.named_modules(remove_duplicate=False)
            for attr, b in m._buffers.items()
            if b is not None and attr not in m._non_persistent_buffers_set
        ]
        return frozenset(found)

    transformers_model = isinstance(model, PreTrainedModel)
    roots: dict[str, None] = {}
    for name in missing:
        owner = name.rpartition(".")[0]
        chosen = None
        parts = owner.split(".") if owner else []
        for depth in range(len(parts), -1, -1):
            candidate = ".".join(parts[:depth])
            if depth < len(parts) and not tensors(candidate) <= wanted:
                break  # the owner itself may hold loaded tensors too (overwritten later)
            if transformers_model or callable(
                getattr(modules[candidate], "reset_parameters", None)
            ):
                chosen = candidate
        if chosen is None:
            raise ConfigError(
                f"init_missing names {name!r}, but neither its module "
                f"({type(modules[owner]).__name__}) nor a module around it made only of "
                "missing tensors has reset_parameters() to initialize it"
            )
        if not any(chosen == r or chosen.startswith(f"{r}.") or not r for r in roots):
            roots[chosen] = None
    made: dict[str, torch.Tensor] = {}
    for root in roots:
        subtree = modules[root]
        for sub in subtree.modules():
            for attr, param in list(sub._parameters.items()):
                if param is not None:
                    real = torch.empty_like(param, device=device)
                    sub._parameters[attr] = nn.Parameter(real, requires_grad=False)
            for attr, buf in list(sub._buffers.items()):
                if buf is not None and buf.is_meta:
                    sub._buffers[attr] = torch.empty_like(buf, device=device)
        with torch.no_grad():
            if transformers_model:
                for sub in subtree.modules():
                    model._init_weights(sub)  # type: ignore[operator]
            else:
                subtree.reset_parameters()  # type: ignore[operator]
        prefix = f"{root}." if root else ""
        for n, param in subtree.named_parameters(remove_duplicate=False):
            if prefix + n in wanted:
                made[prefix + n] = param.detach()
        for n, buf in subtree.named_buffers(remove_duplicate=False):
            if prefix + n in wanted:
                made[prefix + n] = buf
    return made


__all__ = [
    "KeyMap",
    "Names",
    "Piece",
    "Target",
    "expected_shapes",
    "initialize",
    "plan_targets",
    "rename_keys",
    "to_initialize",
]
