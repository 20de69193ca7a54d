"""Layers whose weight a forward reads directly, not through the layer's own forward.

A bitsandbytes layer computes its output from packed bytes: its ``weight`` is a
``Params4bit`` of shape ``(n * k / 2, 1)`` in ``uint8`` or an ``Int8Params`` in ``int8``.
Code that multiplies by ``self.dt_proj.weight`` (Mamba's slow path), feeds
``self.classifier.weight`` to ``F.linear`` (LongCat-Flash's router) or casts its input
to ``self.lm_head.weight.dtype`` crashes on such a weight at 4 bits and, at 8 bits, may
run and return garbage. transformers quantizes those layers all the same; leanstream
keeps them in full precision, as it keeps ``_keep_in_fp32_modules``.

The reads are found in the source of the modules' classes: every
``self.<path>.weight`` in ``forward`` and in the methods ``forward`` calls on ``self``
(transitively) names the submodule ``<path>``, unless only its ``.device`` is read. A
read the source does not spell that way (``getattr``, a helper function given the
module) is not found; the architecture sweep (``tests/test_sweep.py``) checks the
models transformers ships.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections.abc import Iterable, Iterator

from torch import nn

#: what reading leaves a packed weight harmless for
_HARMLESS = frozenset({"device"})


def read_directly(model: nn.Module, candidates: Iterable[str]) -> dict[str, str]:
    """``{module_name: why}`` for the modules among ``candidates`` (names in
    ``model``) whose ``weight`` a forward in ``model`` reads directly; ``why`` names the
    method that does."""
    wanted = set(candidates)
    found: dict[str, str] = {}
    if not wanted:
        return found
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for path, where in _reads(type(module)).items():
            target = prefix + path
            if target in wanted and target not in found:
                found[target] = f"{where} reads self.{path}.weight"
    return found


@functools.cache
def _reads(cls: type) -> dict[str, str]:
    """``{path: "Class.method"}``: the ``self.<path>.weight`` reads of ``cls.forward``
    and of the methods it calls on ``self``, transitively."""
    reads: dict[str, str] = {}
    for where, node in _forward_nodes(cls):
        for path in _weight_reads(node):
            reads.setdefault(path, where)
    return reads


def whole_reads(cls: type) -> frozenset[str]:
    """Attributes ``x`` that ``cls.forward`` (and what it calls on ``self``) uses as a
    whole tensor: ``self.x`` operated on, passed to a function or read for more than
    its ``.device``, where an experts forward only ever indexes it (``self.x[e]``) or
    compares it with ``None``. Llama 4's experts ``bmm`` the whole 3-D weight."""
    return _whole_reads(cls)


@functools.cache
def _whole_reads(cls: type) -> frozenset[str]:
    found: set[str] = set()
    for _, node in _forward_nodes(cls):
        for child in ast.iter_child_nodes(node):
            if not (
                isinstance(child, ast.Attribute)
                and isinstance(child.value, ast.Name)
                and child.value.id == "self"
            ):
                continue
            if isinstance(node, ast.Attribute) and node.attr not in _HARMLESS:
                found.add(child.attr)
            elif isinstance(node, ast.Call | ast.BinOp | ast.keyword | ast.Starred):
                if not (isinstance(node, ast.Call) and node.func is child):
                    found.add(child.attr)
    return frozenset(found)


def _forward_nodes(cls: type) -> Iterator[tuple[str, ast.AST]]:
    """``("Class.method", node)`` for every syntax node of ``cls.forward`` and of the
    methods it calls on ``self``, transitively (only those are parsed: a causal LM's
    classes hold hundreds of methods, ``generate``'s among them)."""
    methods = _methods(cls)
    seen: set[str] = set()
    todo = ["forward"]
    while todo:
        method = todo.pop()
        if method in seen or method not in methods:
            continue
        seen.add(method)
        owner, function = methods[method]
        tree = _parse(function)
        if tree is None:
            continue
        for node in ast.walk(tree):
            called = _self_call(node)
            if called is not None:
                todo.append(called)
            yield f"{owner}.{method}", node


@functools.cache
def _methods(cls: type) -> dict[str, tuple[str, object]]:
    """``{name: (defining class name, function)}`` of the methods ``cls`` gets from its
    classes but ``nn.Module`` (the most derived definition wins); torch's own count:
    ``nn.MultiheadAttention`` hands ``self.out_proj.weight`` to its kernel."""
    methods: dict[str, tuple[str, object]] = {}
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        for name, value in vars(klass).items():
            if name not in methods and inspect.isfunction(value):
                methods[name] = (klass.__qualname__, value)
    return methods


@functools.cache
def _parse(function: object) -> ast.AST | None:
    try:
        source = inspect.getsource(function)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return None  # no source (compiled, generated): nothing to find
    try:
        return ast.parse(textwrap.dedent(source))
    except SyntaxError:
        return None


def _self_call(node: ast.AST) -> str | None:
    """``method`` for a ``self.method(...)`` call."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        if isinstance(node.func.value, ast.Name) and node.func.value.id == "self":
            return node.func.attr
    return None


def _weight_reads(node: ast.AST) -> Iterator[str]:
    """Every ``path`` of ``self.<path>.weight`` used as more than its ``.device``:
    ``node`` is the expression that uses it (an attribute of it, or anything holding
    it)."""
    if isinstance(node, ast.Attribute) and node.attr in _HARMLESS:
        return
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Attribute) and child.attr == "weight":
            path = _self_path(child.value)
            if path:
                yield path


def _self_path(node: ast.AST) -> str | None:
    """``"a.b"`` for the expression ``self.a.b``."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "self" and parts:
        return ".".join(reversed(parts))
    return None


__all__ = ["read_directly", "whole_reads"]
