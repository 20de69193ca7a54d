"""Where each module goes: ``device_map`` planned by accelerate on the quantized model.

transformers plans a bitsandbytes model with accelerate's ``infer_auto_device_map``
fed approximate sizes (a 4-bit weight counted as half a byte per element, statistics
left out, a 10 % margin) and must then keep every CPU module unquantized in float32
(``llm_int8_enable_fp32_cpu_offload``). leanstream plans after its layers are replaced
on ``meta``, with each tensor's real size (packed bytes and statistics, what
:func:`leanstream.footprint` will report), by the same planner: for the planner each
tensor of the meta model is briefly swapped for a ``meta`` byte tensor of that size.
CPU modules stay quantized: bitsandbytes runs 4-bit and 8-bit layers on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import cpu_layout as layout
from .errors import ConfigError
from .progress import format_bytes
from .quantize import QuantSpec, kernel_stream

if TYPE_CHECKING:
    from .matching import Target

#: ``device_map`` strategies, as transformers names them
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
#: what a ``device_map`` may be, for messages
EXPECTED = (
    f"expected a strategy ({', '.join(repr(s) for s in STRATEGIES)}), a device ('cpu', "
    "'cuda:0', 0) or a dict of module names to devices"
)


def weight_bytes(
    out_features: int, in_features: int, spec: Any, *, cpu_layout: bool = False
) -> dict[str, int]:
    """Bytes of one ``[out, in]`` weight quantized with ``spec``, by footprint kind;
    ``cpu_layout``: in bitsandbytes' AVX512-BF16 CPU layout (where it applies to such a
    weight), whose ``absmax`` is bfloat16 and never double-quantized (the offset stays)."""
    n = out_features * in_features
    if spec.bits == 8:
        return {"int8": n, "quant_state": out_features * 4}  # SCB, float32
    blocks = -(-n // spec.blocksize)
    stats = 16 * 4  # quant_map: 16 float32
    if cpu_layout and layout.fits(out_features, in_features, spec.blocksize):
        stats += blocks * 2 + (4 if spec.double_quant else 0)
    elif spec.double_quant:  # uint8 absmax, float32 nested absmax/map, offset
        stats += blocks + -(-blocks // 256) * 4 + 256 * 4 + 4
    else:
        stats += blocks * 4
    return {spec.quant_type: (n + 1) // 2, "quant_state": stats}


def tensor_sizes(
    model: nn.Module,
    spec: Any,
    dtype_of: Callable[[str, str, torch.Tensor], torch.dtype],
    experts: Mapping[str, tuple[int, ...]] = (),  # type: ignore[assignment]
    *,
    cpu_layout: bool = False,
) -> dict[str, int]:
    """Bytes each parameter and buffer of ``model`` (layers replaced, on ``meta``) will
    take once loaded: quantized weights (bitsandbytes layers, experts weights) with
    their statistics, others in the dtype ``dtype_of(module_name, attr, tensor)``. A
    tensor registered under several names (tied weights) is listed under the first.
    ``cpu_layout``: as loaded on this CPU, 4-bit linears that take bitsandbytes'
    AVX512-BF16 layout in it (:mod:`leanstream.cpu_layout`); plans are made without it,
    with the plain layout every device starts from."""
    import bitsandbytes as bnb

    quantized = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt, bnb.nn.Embedding4bit)
    quantized += (bnb.nn.Embedding8bit,)
    sizes: dict[str, int] = {}
    seen: set[int] = set()  # a tied tensor is counted once, under its first name
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        for attr, param in module._parameters.items():
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            name = prefix + attr
            if attr == "weight" and isinstance(module, quantized) and spec.quantized:
                out, inp = _matrix(module)
                packed = (
                    cpu_layout
                    and isinstance(module, bnb.nn.Linear4bit)
                    and bool(getattr(module, "support_avx512bf16_for_cpu", False))
                )
                sizes[name] = sum(weight_bytes(out, inp, spec, cpu_layout=packed).values())
            elif name in experts:
                count, rows, cols = experts[name]
                sizes[name] = sum(weight_bytes(count * rows, cols, spec).values())
            else:
                sizes[name] = param.numel() * dtype_of(module_name, attr, param).itemsize
        for attr, buf in module._buffers.items():
            if buf is not None and id(buf) not in seen:
                seen.add(id(buf))
                if attr in module._non_persistent_buffers_set:  # kept as built
                    sizes[prefix + attr] = buf.numel() * buf.element_size()
                else:  # loaded like a parameter
                    sizes[prefix + attr] = buf.numel() * dtype_of(module_name, attr, buf).itemsize
    return sizes


def _matrix(module: nn.Module) -> tuple[int, int]:
    if hasattr(module, "out_features"):
        return int(module.out_features), int(module.in_features)
    return int(module.num_embeddings), int(module.embedding_dim)


@contextlib.contextmanager
def _sized(model: nn.Module, sizes: Mapping[str, int]) -> Iterator[None]:
    """Within the block every parameter and buffer of ``model`` is a ``meta`` uint8
    tensor of its loaded size (shared ones stay shared), as accelerate's planner needs."""
    saved: list[tuple[dict[str, Any], str, Any]] = []
    proxies: dict[int, Any] = {}
    try:
        for module_name, module in model.named_modules(remove_duplicate=False):
            prefix = f"{module_name}." if module_name else ""
            for table, wrap in ((module._parameters, True), (module._buffers, False)):
                for attr, tensor in list(table.items()):
                    if tensor is None:
                        continue
                    proxy = proxies.get(id(tensor))
                    if proxy is None:
                        empty = torch.empty(sizes[prefix + attr], dtype=torch.uint8, device="meta")
                        proxy = nn.Parameter(empty, requires_grad=False) if wrap else empty
                        proxies[id(tensor)] = proxy
                    saved.append((table, attr, tensor))
                    table[attr] = proxy
        yield
    finally:
        for table, attr, tensor in reversed(saved):
            table[attr] = tensor


def plan(
    model: nn.Module,
    sizes: Mapping[str, int],
    device_map: str | Mapping[str, Any],
    max_memory: Mapping[Any, int | str] | None,
) -> dict[str, str | int]:
    """The ``device_map`` (module name -> ``"cpu"`` or a CUDA index) for ``model``.

    A strategy (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``) is
    planned by accelerate as transformers does (``get_balanced_memory`` then
    ``infer_auto_device_map``, with the model's ``_no_split_modules`` and tied
    parameters kept together), on ``sizes``. A dict is checked: it must place every
    tensor. Entries on ``"disk"``, and plans that do not fit ``max_memory``, are a
    :class:`ConfigError` saying how much is missing where.
    """
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    if isinstance(device_map, Mapping):
        result = {str(k): _device_entry(v) for k, v in device_map.items()}
        _check_covers(model, result)
        _refuse_disk(result, sizes, None)
        return result
    if device_map not in STRATEGIES:
        raise ConfigError(f"device_map={device_map!r}: {EXPECTED}")
    budget = _max_memory(max_memory)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    with _sized(model, sizes), _quiet_absent_devices():
        if device_map != "sequential":
            budget = get_balanced_memory(
                model,
                max_memory=budget,
                no_split_module_classes=no_split,
                low_zero=device_map == "balanced_low_0",
            )
        budget = get_max_memory(budget)
        result = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split)
    result = {name: _device_entry(device) for name, device in result.items()}
    _refuse_disk(result, sizes, _max_memory(max_memory))
    return result


class _DropAbsentDevice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "is not available, available devices are" not in str(record.msg)


@contextlib.contextmanager
def _quiet_absent_devices() -> Iterator[None]:
    """Within the block, accelerate's planner does not warn (at each of its calls) that
    a device of ``max_memory`` is absent: it plans for it all the same, and a load
    refuses it once (:meth:`Placing.plan`)."""
    logger = logging.getLogger("accelerate.utils.modeling")
    drop = _DropAbsentDevice()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _max_memory(max_memory: Mapping[Any, int | str] | None) -> dict[Any, int | str] | None:
    """``max_memory`` with CUDA devices as indices (``"cuda:1"`` -> 1), or None for
    what accelerate finds free."""
    if max_memory is None:
        return None
    budget: dict[Any, int | str] = {}
    for key, value in max_memory.items():
        entry = _device_entry(key)
        if entry == "disk":
            raise ConfigError("max_memory: 'disk' offload is not supported by leanstream")
        budget[entry] = value
    return budget


def check_available(entry: str | int, option: str) -> None:
    """Refuse a device_map entry (``"cpu"`` or a CUDA index) that names a CUDA device
    this machine does not have; ``option`` is what the caller passed, for the message."""
    if not isinstance(entry, int):
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"{option}: cuda:{entry} is not available: CUDA is not available")
    count = torch.cuda.device_count()
    if entry >= count:
        raise ConfigError(
            f"{option}: cuda:{entry} is not available: this machine has {count} CUDA "
            f"device{'s' if count != 1 else ''} (0 to {count - 1})"
        )


def _device_entry(device: Any) -> str | int:
    """A device_map value as accelerate writes them: ``"cpu"``, ``"disk"`` or a CUDA index."""
    if isinstance(device, int) and not isinstance(device, bool):
        return device
    if isinstance(device, str) and device.isdigit():
        return int(device)
    if device == "disk":
        return "disk"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device_map: {device!r} is not a device ({err})") from err
    if parsed.type == "cpu":
        return "cpu"
    if parsed.type == "cuda":
        return parsed.index if parsed.index is not None else 0
    raise ConfigError(f"device_map: {device!r}: leanstream places modules on cpu and cuda only")


def _check_covers(model: nn.Module, device_map: Mapping[str, Any]) -> None:
    """Every parameter and buffer is under exactly one entry of ``device_map``."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    unplaced = [n for n in names if device_for(device_map, n) is None]
    if unplaced:
        raise ConfigError(
            f"device_map places no device for {', '.join(unplaced[:5])}"
            + (f" and {len(unplaced) - 5} more" if len(unplaced) > 5 else "")
            + ' (add their modules, or "" for everything else)'
        )


def device_for(device_map: Mapping[str, Any], name: str) -> Any:
    """The device of tensor (or module) ``name``: its longest module prefix's entry."""
    parts = name.split(".")
    for depth in range(len(parts), -1, -1):
        prefix = ".".join(parts[:depth])
        if prefix in device_map:
            return device_map[prefix]
    return None


def _refuse_disk(
    device_map: Mapping[str, Any], sizes: Mapping[str, int], budget: Mapping[Any, Any] | None
) -> None:
    """A plan with ``"disk"`` entries does not fit: say how much is missing per device."""
    disk = [name for name, device in device_map.items() if device == "disk"]
    if not disk:
        return
    on_disk = sum(s for n, s in sizes.items() if device_for(device_map, n) == "disk")
    used = per_device(device_map, sizes)
    shown = ", ".join(
        f"{_label(d)} {format_bytes(used.get(d, 0))}"
        + (f" of {_budget(budget[d])}" if budget and d in budget else "")
        for d in sorted({*used, *(budget or {})} - {"disk"}, key=str)
    )
    raise ConfigError(
        f"the model does not fit: {format_bytes(on_disk)} of it "
        f"({', '.join(name or 'the whole model' for name in disk[:3])}"
        + (f" and {len(disk) - 3} more" if len(disk) > 3 else "")
        + f") would go to disk, which leanstream does not do; planned: {shown}. Raise "
        "max_memory (or load with fewer bits)"
    )


def _budget(value: int | str) -> str:
    return format_bytes(value) if isinstance(value, int) else str(value)


def _label(device: Any) -> str:
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def per_device(device_map: Mapping[str, Any], sizes: Mapping[str, int]) -> dict[Any, int]:
    """Planned bytes on each device of ``device_map``."""
    used: dict[Any, int] = {}
    for name, size in sizes.items():
        device = device_for(device_map, name)
        used[device] = used.get(device, 0) + size
    return used


def torch_device(entry: str | int) -> torch.device:
    """The ``torch.device`` of a device_map entry."""
    return torch.device("cuda", entry) if isinstance(entry, int) else torch.device(entry)


def runs(targets: list[Target], where: Where) -> Iterator[tuple[torch.device, list[Target]]]:
    """``targets`` cut into runs of consecutive ones on one device, in order."""
    run: list[Target] = []
    device = None
    for target in targets:
        here = where(target.name)
        if run and here != device:
            yield device, run  # type: ignore[misc]
            run = []
        device = here
        run.append(target)
    if run:
        yield device, run  # type: ignore[misc]


def place_buffers(model: nn.Module, where: Where) -> None:
    """Move the buffers not loaded from the checkpoint (non-persistent ones such as
    rotary ``inv_freq``, computed on the CPU by the model's ``__init__``) to their
    device, as transformers does after loading: a forward pass would otherwise copy
    them at every call, or fail (``torch.equal`` with a CPU tensor, CUDA-graph capture)."""
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for attr, buf in module._buffers.items():
            if buf is not None and buf.device != where(prefix + attr):
                module._buffers[attr] = buf.to(where(prefix + attr))


def misplaced(model: nn.Module, where: Where) -> list[str]:
    """Names of parameters and buffers of ``model`` that are not where planned, with
    where they are."""
    tensors = [*model.named_parameters(remove_duplicate=False)]
    tensors += model.named_buffers(remove_duplicate=False)
    return [f"{name} ({t.device})" for name, t in tensors if t.device != where(name)]


class Where:
    """The device of each tensor: one for all (``load(device=...)``), or a device_map's."""

    def __init__(self, main: torch.device, device_map: dict[str, Any] | None = None) -> None:
        self.main = main
        self.device_map = device_map
        # each entry checked and normalized once (a CUDA device must be there)
        self.by_entry = {e: as_device(torch_device(e)) for e in (device_map or {}).values()}
        self.devices = sorted(set(self.by_entry.values()) or {main}, key=str)
        self.several = len(self.devices) > 1

    def __call__(self, name: str) -> torch.device:
        if self.device_map is None:
            return self.main
        return self.by_entry[device_for(self.device_map, name)]

    def kernel_streams(self) -> contextlib.ExitStack:
        """:func:`kernel_stream` for every device of the plan."""
        stack = contextlib.ExitStack()
        for device in self.devices:
            stack.enter_context(kernel_stream(device))
        return stack

    def dispatch(self, model: Any) -> None:
        """Across devices, as transformers (its ``accelerate_dispatch``, only then):
        :func:`attach_hooks` for the plan, recorded as ``hf_device_map``."""
        if not self.several:
            return
        model.hf_device_map = dict(self.device_map)  # type: ignore[arg-type]
        devices = {name: self.by_entry[e] for name, e in self.device_map.items()}  # type: ignore[union-attr]
        attach_hooks(model, devices, self.main)


def attach_hooks(
    model: nn.Module, device_map: Mapping[str, torch.device], main: torch.device
) -> None:
    """Attach accelerate's hooks that run each module of ``device_map`` (names to the
    devices its tensors already are on) on its device: the hooks move activations
    only, never a weight.

    As accelerate's ``dispatch_model`` (what transformers calls): its
    ``attach_align_device_hook_on_blocks`` with an execution device per entry and one
    for the root (``main``, where the model's inputs go and from where its outputs
    return to the caller's device), the root left out of ``offload`` so that its hook
    places no submodule, and the model's ``_skip_keys_device_placement``. Unlike
    ``dispatch_model``, whose CPU entries run on the main device (offloaded, their
    weights copied over at every call), every entry runs where it is, CPU ones
    quantized on the CPU. Entries inside another's module (``{"": 0, "lm_head":
    "cpu"}``) are first split into blocks that do not nest (:func:`_blocks`): accelerate
    would place the outer module's whole subtree on its device, inner ones included.
    """
    from accelerate.hooks import (
        AlignDevicesHook,
        add_hook_to_module,
        attach_align_device_hook_on_blocks,
    )

    skip_keys = getattr(model, "_skip_keys_device_placement", None)
    blocks, split = _blocks(model, device_map)
    attach_align_device_hook_on_blocks(
        model,
        execution_device={"": main, **blocks},
        offload=dict.fromkeys(blocks, False),
        offload_buffers=False,
        weights_map=None,
        skip_keys=skip_keys,
    )
    for name, device in split.items():  # a split module's own tensors (not the root's)
        add_hook_to_module(model.get_submodule(name), AlignDevicesHook(device, skip_keys=skip_keys))


def _blocks(
    model: nn.Module, device_map: Mapping[str, torch.device]
) -> tuple[dict[str, torch.device], dict[str, torch.device]]:
    """``device_map`` as blocks that do not nest (module name -> device, no block
    inside another), and the modules split between blocks that hold tensors of their
    own, with the device of those (all on one device; the root is left to its hook)."""
    blocks: dict[str, torch.device] = {}
    split: dict[str, torch.device] = {}

    def visit(name: str, module: nn.Module) -> None:
        prefix = f"{name}." if name else ""
        if not any(key.startswith(prefix) and key != name for key in device_map):
            device = device_for(device_map, name)
            if device is not None:  # else it holds no tensor (the plan covers them all)
                blocks[name] = device
            return
        own = {device_for(device_map, prefix + attr) for attr, _ in _own_tensors(module)}
        if name and len(own) == 1:
            split[name] = own.pop()
        for child_name, child in module.named_children():
            visit(prefix + child_name, child)

    visit("", model)
    return blocks, split


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    tensors = [(a, t) for a, t in module._parameters.items() if t is not None]
    return tensors + [(a, t) for a, t in module._buffers.items() if t is not None]


def entry_of(device: torch.device) -> str | int:
    """The device_map entry of a ``torch.device`` (``"cpu"``, or a CUDA index)."""
    return device.index if device.type == "cuda" else device.type


@dataclass(frozen=True)
class Placing:
    """``load(device_map=..., max_memory=...)`` across devices: planned by accelerate on
    the quantized meta model (:mod:`leanstream.placement`). The load streams each run of
    consecutive tensors on one device through its own source: a CUDA device's through
    the pipeline (its side stream and device budget; one ring at a time), the CPU's from
    the mapped file."""

    device_map: str | dict[str, Any]
    max_memory: dict[Any, int | str] | None

    def plan(
        self,
        model: nn.Module,
        spec: QuantSpec,
        experts: dict[str, tuple[int, ...]],
        keep_fp32: Callable[[str, str], bool],
        model_dtype: torch.dtype,
    ) -> Where:
        def dtype_of(module_name: str, attr: str, tensor: torch.Tensor) -> torch.dtype:
            if not tensor.is_floating_point():
                return tensor.dtype
            return torch.float32 if keep_fp32(module_name, attr) else model_dtype

        sizes = tensor_sizes(model, spec, dtype_of, experts)
        device_map = plan(model, sizes, self.device_map, self.max_memory)
        # plan() plans for any devices, present or not (inspect predicts plans for
        # GPUs elsewhere); a load needs them here
        for key in self.max_memory or {}:
            check_available(_device_entry(key), f"max_memory={self.max_memory!r}")
        for entry in device_map.values():
            check_available(entry, f"device_map={self.device_map!r}")
        where = Where(as_device(torch_device(_main_entry(device_map))), device_map)
        return where


def _main_entry(device_map: dict[str, Any]) -> Any:
    """The device of the model's first planned module on an accelerator (else the CPU):
    where its inputs go, as accelerate's ``dispatch_model`` chooses."""
    for entry in device_map.values():
        if entry not in ("cpu", "disk"):
            return entry
    return "cpu"


def as_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        result = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device: {err}") from err
    if result.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available")
    if result.type == "meta":
        raise ConfigError("device='meta' would load nothing")
    # the device tensors on it report (load() checks every tensor is there)
    if result.type == "cpu":
        result = torch.device("cpu")  # "cpu:0" is "cpu"
    elif result.type == "cuda" and result.index is None:
        result = torch.device("cuda", torch.cuda.current_device())  # the current one
    return result


__all__ = [
    "STRATEGIES",
    "Placing",
    "Where",
    "as_device",
    "attach_hooks",
    "check_available",
    "device_for",
    "entry_of",
    "misplaced",
    "per_device",
    "place_buffers",
    "plan",
    "runs",
    "tensor_sizes",
    "torch_device",
    "weight_bytes",
]
