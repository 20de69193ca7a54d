"""Layer replacement and per-tensor quantization with bitsandbytes.

Two halves, used in this order by the loader:

1. :func:`replace_linears` swaps ``nn.Linear`` (and subclasses, and GPT-2's
   ``Conv1D``) for ``bnb.nn.Linear4bit`` / ``bnb.nn.Linear8bitLt`` while the model
   is still on ``meta``: nothing is allocated.
2. :func:`materialize` receives one full-precision tensor at a time (a view of
   the mapped checkpoint) and turns it into the module's final parameter on the
   target device: quantized for a replaced linear's weight, copied otherwise.
   The full-precision tensor is garbage as soon as it returns.

Quantization runs the same bitsandbytes operations transformers' calls run
(``Params4bit(...).to(device)`` is ``torch.ops.bitsandbytes.quantize_4bit`` and,
with double quantization, ``quantize_blockwise``; ``Int8Params(...)._quantize``),
so the packed bytes, ``absmax``, ``quant_map`` and ``SCB`` are bit-identical to
``from_pretrained(quantization_config=BitsAndBytesConfig(...))``. The 4-bit
operations are called directly, with code tables made once per device:
``bitsandbytes.functional.quantize_4bit`` builds its table from a Python list
on every call, a host-to-device copy and a host sync per weight, which would
stall the overlapped GPU load (:mod:`leanstream.pipeline`). A tensor the loader
owns (a fresh one from the pipeline, or a copy it made) is cast in place when
only the dtype changes between two of one size (bf16 to fp16 for LLM.int8):
no second full-size tensor on the device. On CUDA all of it runs on the
device's default stream, where bitsandbytes' quantize kernels run
(:func:`kernel_stream`). On the CPU the
weights are quantized by the Rust core instead (``_core.quantize_4bit`` /
``_core.quantize_int8``, same arithmetic as bitsandbytes' CPU kernels, bit for
bit, tens of times faster), straight from the mapped bytes into ``torch.empty``
outputs; the ``QuantState`` around them is built with bitsandbytes' own calls.
``QuantSpec(native=False)`` (``load(..., native_quantizer=False)``) keeps
bitsandbytes' kernels.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from . import _core, cpu_layout
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
    embeddings: bool = False  # also quantize every ``nn.Embedding`` (Embedding4bit/8bit)
    lm_head: bool = False  # also quantize the output embeddings (a Linear4bit/8bitLt)
    # "auto": 4-bit CPU weights in bitsandbytes' AVX512-BF16 layout where its detection
    # says so (made at load, :mod:`leanstream.cpu_layout`); "plain": its plain kernel always
    cpu_kernel: Literal["auto", "plain"] = "auto"

    def __post_init__(self) -> None:
        if self.bits not in (4, 8, 16):
            raise ConfigError(f"bits must be 4, 8 or 16 (None), got {self.bits!r}")
        if self.bits == 16 and (self.embeddings or self.lm_head):
            raise ConfigError(
                "quantize_embeddings / quantize_lm_head need bits=4 or bits=8; "
                "with bits=16 (None) nothing is quantized"
            )
        if self.quant_type not in ("nf4", "fp4"):
            raise ConfigError(f"quant_type must be 'nf4' or 'fp4', got {self.quant_type!r}")
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ConfigError(f"blocksize must be a power of two in 32..4096, got {self.blocksize}")
        if self.cpu_kernel not in ("auto", "plain"):
            raise ConfigError(f"cpu_kernel must be 'auto' or 'plain', got {self.cpu_kernel!r}")

    @property
    def quantized(self) -> bool:
        return self.bits in (4, 8)

    def config(self, skip_modules: Iterable[str], compute_dtype: torch.dtype) -> Any:
        """The ``BitsAndBytesConfig`` that describes this spec (for ``model.config``)."""
        from transformers import BitsAndBytesConfig

        if self.bits == 8:  # the 4-bit fields keep their defaults, as in transformers'
            return BitsAndBytesConfig(
                load_in_8bit=True,
                llm_int8_threshold=self.threshold,
                llm_int8_skip_modules=sorted(skip_modules),
            )
        return BitsAndBytesConfig(
            load_in_4bit=True,
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


def extra_modules(model: Any, spec: QuantSpec, skip: Iterable[str]) -> tuple[set[str], set[str]]:
    """The modules ``quantize_embeddings`` / ``quantize_lm_head`` add: ``(embeddings,
    output)``, the names of the ``nn.Embedding`` modules (exactly that class: subclasses
    such as OPT's learned positional embedding have their own forward) and of the
    output embeddings to quantize.

    A tied pair (input embeddings sharing their weight with ``lm_head``) is one tensor:
    either flag quantizes it, and both modules end up sharing the one quantized weight.
    ``skip`` (the user's ``skip_modules`` and ``_keep_in_fp32_modules``) wins.

    A model whose ``get_input_embeddings`` / ``get_output_embeddings`` raises
    ``NotImplementedError`` or ``AttributeError`` (CLIPModel: two towers, no one input
    embedding) has none. With a flag set, that is :class:`ConfigError` where it matters:
    output embeddings it cannot name, or input embeddings it cannot name beside output
    embeddings (a tied pair could not be kept whole). CLIPModel, with no output
    embeddings, quantizes all its ``nn.Embedding`` modules with ``quantize_embeddings``.
    """
    skip = list(skip)
    names = {id(m): n for n, m in model.named_modules()}
    embeddings: set[str] = set()
    output: set[str] = set()
    inp, inp_error = _embedding(model, "get_input_embeddings")
    out, out_error = _embedding(model, "get_output_embeddings")
    if spec.embeddings or spec.lm_head:
        flag = "quantize_lm_head" if spec.lm_head else "quantize_embeddings"
        if out_error is not None:
            _cannot_name(model, flag, "get_output_embeddings", out_error)
        if inp_error is not None and out is not None:
            _cannot_name(model, flag, "get_input_embeddings", inp_error)
    tied = (
        out is not None and inp is not None and _tied(model, names.get(id(inp)), names.get(id(out)))
    )
    if spec.embeddings or (tied and spec.lm_head):
        for name, module in model.named_modules():
            if type(module) is nn.Embedding and not matches_any(name, skip):
                if module is inp or spec.embeddings:
                    embeddings.add(name)
    if out is not None and type(out) is nn.Linear and (spec.lm_head or (tied and spec.embeddings)):
        name = names.get(id(out))
        if name is not None and not matches_any(name, skip):
            if not tied or names.get(id(inp)) in embeddings:
                output.add(name)
    if tied and names.get(id(inp)) in embeddings and not output:
        embeddings.discard(names[id(inp)])  # the pair is quantized as one or not at all
    return embeddings, output


def _embedding(model: Any, method: str) -> tuple[Any, Exception | None]:
    """``model.method()`` (its input or output embeddings; ``None`` without such a
    method) and ``None``, or ``None`` and the error when the method cannot say
    (raises ``NotImplementedError`` or ``AttributeError``)."""
    get = getattr(model, method, None)
    if get is None:
        return None, None
    try:
        return get(), None
    except (NotImplementedError, AttributeError) as err:
        return None, err


def _cannot_name(model: Any, flag: str, method: str, err: Exception) -> None:
    raise ConfigError(
        f"{flag}=True: {type(model).__name__}.{method}() cannot say which module that is "
        f"({type(err).__name__}: {err}), so a tied pair of input and output embeddings "
        f"cannot be kept whole; load without {flag}"
    ) from err


def _tied(model: Any, inp: str | None, out: str | None) -> bool:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    pair = {f"{inp}.weight", f"{out}.weight"}
    return any({target, source} == pair for target, source in tied.items())


def replace_embeddings(
    model: nn.Module, spec: QuantSpec, names: Iterable[str], dtype: torch.dtype
) -> None:
    """Replace the ``nn.Embedding`` modules ``names`` on ``meta`` with bitsandbytes'
    ``Embedding4bit`` / ``Embedding8bit`` (weights in the model's ``dtype`` at forward).
    The model itself (name ``""``) is :func:`replace_root`'s."""
    for name in names:
        if name:
            model.set_submodule(name, _quantized_embedding(model.get_submodule(name), spec, dtype))


def _quantized_embedding(module: nn.Module, spec: QuantSpec, dtype: torch.dtype) -> nn.Module:
    if spec.bits == 4:
        new: nn.Module = embedding4bit_class()(
            module.num_embeddings,
            module.embedding_dim,
            dtype=dtype,
            quant_type=spec.quant_type,
            quant_storage=spec.quant_storage,
            device="meta",
        )
        # its constructor leaves these unset, unlike Linear4bit's
        new.weight.compress_statistics = spec.double_quant
        new.weight.blocksize = spec.blocksize
    else:
        new = embedding8bit_class()(
            module.num_embeddings, module.embedding_dim, device="meta", dtype=dtype
        )
    new.padding_idx = module.padding_idx
    new.requires_grad_(False)
    return new


def replace_root(
    model: nn.Module,
    spec: QuantSpec,
    skip: Iterable[str],
    embeddings: Iterable[str],
    dtype: torch.dtype,
) -> tuple[nn.Module, dict[str, bool]]:
    """The bitsandbytes layer that stands for ``model`` when the model itself is a layer
    to quantize (a bare ``nn.Linear``, or an ``nn.Embedding`` named ``""`` in
    ``embeddings``), with ``{"": transpose}``; otherwise ``model`` and ``{}``.

    A module cannot replace itself in place: the caller goes on with the returned one
    (:func:`replace_linears` and :func:`replace_embeddings` leave the root alone).
    """
    if "" in embeddings:
        return _quantized_embedding(model, spec, dtype), {"": False}
    if _replaceable(model) and not matches_any("", skip):
        return _quantized_linear(model, spec), {"": _is_conv1d(model)}
    return model, {}


@functools.cache
def embedding4bit_class() -> type:
    """bitsandbytes' ``Embedding4bit``, with a fix for double quantization.

    Its forward gathers the rows' ``absmax`` before dequantizing them; with double
    quantization those are uint8 codes whose nested blocks (256 codes each) no
    longer line up once gathered, and the rows come out wrong (bitsandbytes 0.50).
    This subclass dequantizes ``absmax`` first (``num_embeddings * dim / blocksize``
    floats, transient) and gathers the floats.
    """
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    class Embedding4bit(bnb.nn.Embedding4bit):  # type: ignore[misc]
        def _forward_with_partial_dequantize(self, input: torch.Tensor) -> torch.Tensor:
            state = self.weight.quant_state
            if not state.nested:
                return super()._forward_with_partial_dequantize(input)
            flat = copy.copy(state)
            flat.absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
            flat.nested, flat.state2, flat.offset = False, None, None
            self.weight.quant_state = flat
            try:
                return super()._forward_with_partial_dequantize(input)
            finally:
                self.weight.quant_state = state

        def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
            # bitsandbytes refuses; leanstream writes Linear4bit's key scheme
            nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
            for key, value in self.weight.quant_state.as_dict(packed=True).items():
                destination[f"{prefix}weight.{key}"] = value if keep_vars else value.detach()

    Embedding4bit.__module__ = __name__
    return Embedding4bit


@functools.cache
def embedding8bit_class() -> type:
    """bitsandbytes' ``Embedding8bit``, serializable: ``weight`` (int8) and ``SCB``."""
    import bitsandbytes as bnb

    class Embedding8bit(bnb.nn.Embedding8bit):  # type: ignore[misc]
        def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
            nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
            scb = self.weight.SCB
            destination[f"{prefix}SCB"] = scb if keep_vars else scb.detach()

    Embedding8bit.__module__ = __name__
    return Embedding8bit


def is_quantized_module(module: nn.Module, bits: int) -> bool:
    """Whether ``module`` is a bitsandbytes layer of ``bits`` (linear or embedding)."""
    import bitsandbytes as bnb

    if bits == 4:
        return isinstance(module, bnb.nn.Linear4bit | bnb.nn.Embedding4bit)
    return isinstance(module, bnb.nn.Linear8bitLt | bnb.nn.Embedding8bit)


_flattened = threading.local()  # per thread: id(module) -> stack of input shapes


def accept_any_rank(module: nn.Module) -> None:
    """Let a bitsandbytes ``Linear8bitLt`` take inputs of any rank, as ``nn.Linear`` does.

    bitsandbytes 0.50's LLM.int8 matmul flattens 3-D inputs only; a 4-D one (DeepSeek's
    ``kv_b_proj``) fails inside its row-wise quantization, in transformers' model too.
    Forward hooks (the module keeps its class) flatten such an input to 2-D and give the
    output its leading dimensions back."""
    module.register_forward_pre_hook(_flatten_input)
    module.register_forward_hook(_unflatten_output, always_call=True)  # pops on errors too


def _flatten_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    stacks = _flattened.__dict__.setdefault("stacks", {})
    x = args[0] if args else None
    shape = x.shape if isinstance(x, torch.Tensor) and x.dim() > 3 else None
    stacks.setdefault(id(module), []).append(shape)
    if shape is None:
        return None
    return (x.reshape(-1, shape[-1]), *args[1:])


def _unflatten_output(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
    shape = _flattened.stacks[id(module)].pop()
    if shape is None or not isinstance(output, torch.Tensor):
        return None
    return output.reshape(*shape[:-1], output.shape[-1])


def replace_linears(model: nn.Module, spec: QuantSpec, skip: Iterable[str]) -> dict[str, bool]:
    """Replace linear layers on ``meta`` with bitsandbytes layers (the model itself, a
    bare ``nn.Linear``, is :func:`replace_root`'s).

    Returns ``{module_name: transpose}`` for every replaced module, ``transpose``
    being True for ``Conv1D`` (whose weight is stored ``(in, out)``).
    """
    skip = list(skip)
    replaced: dict[str, bool] = {}
    for name, module in list(model.named_modules()):
        if not name or not _replaceable(module) or matches_any(name, skip):
            continue
        model.set_submodule(name, _quantized_linear(module, spec))
        replaced[name] = _is_conv1d(module)
    return replaced


def _replaceable(module: nn.Module) -> bool:
    """transformers' rule: ``Conv1D`` and exactly ``nn.Linear``; and beyond it, a
    subclass of ``nn.Linear`` that provably computes a plain linear (:func:`plain_linear`).
    A subclass with a forward of its own (PhiMoE's and Llama 4's routers, Falcon's
    ``FalconLinear``) stays as it is, in full precision."""
    return _is_conv1d(module) or (isinstance(module, nn.Linear) and plain_linear(module))


def plain_linear(module: nn.Linear) -> bool:
    """``module`` computes ``F.linear(x, weight, bias)`` and nothing else: it is an
    ``nn.Linear``, or a subclass that keeps ``nn.Linear``'s ``forward`` and ``__call__``
    and holds only ``weight`` and ``bias`` (no buffers, no submodules)."""
    cls = type(module)
    if cls is nn.Linear:
        return True
    return (
        cls.forward is nn.Linear.forward
        and cls.__call__ is nn.Linear.__call__
        and set(module._parameters) <= {"weight", "bias"}
        and not module._buffers
        and not module._modules
    )


def quantizable_modules(model: nn.Module) -> list[str]:
    """Names of the modules a load may quantize: the linears :func:`replace_linears`
    replaces unless skipped, and the ``nn.Embedding`` modules (exactly that class)
    ``quantize_embeddings`` / ``quantize_lm_head`` may add."""
    return [
        name
        for name, module in model.named_modules()
        if _replaceable(module) or type(module) is nn.Embedding
    ]


def _quantized_linear(module: nn.Module, spec: QuantSpec) -> nn.Module:
    """The bitsandbytes layer (on ``meta``) that replaces the linear ``module``."""
    import bitsandbytes as bnb

    if _is_conv1d(module):
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
        if spec.cpu_kernel == "plain" or not cpu_layout.fits(
            out_features, in_features, spec.blocksize
        ):
            # bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel at the
            # first CPU forward, and crashes for a layer whose out_features is not a
            # multiple of 32 ("N must be divisible by block_n": a MoE shared-expert
            # gate, Linear(H, 1)) or whose in_features is not whole blocks ("shape
            # '[512, 0]' is invalid": Jamba's dt_proj): those keep the plain kernel
            new.support_avx512bf16_for_cpu = False
        cpu_layout.manage(new)
    else:
        new = bnb.nn.Linear8bitLt(
            in_features,
            out_features,
            has_bias,
            has_fp16_weights=False,
            threshold=spec.threshold,
            device="meta",
        )
        accept_any_rank(new)
    new.requires_grad_(False)
    return new


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
    owned: bool = False,
) -> None:
    """Make ``tensor`` (full precision, possibly a read-only view of the mapped
    file) ``module.<attr>`` on ``device``: quantized if ``module`` is a replaced
    linear and ``attr`` is its weight, else copied with ``dtype`` (None: as is).
    ``owned``: ``tensor`` is the caller's to give away (a fresh tensor from the
    pipeline), so when it already has the right device and dtype it becomes the
    parameter itself instead of being copied, and a change between dtypes of one
    size is made in place (:func:`placed`)."""
    import bitsandbytes as bnb

    if attr == "weight" and isinstance(module, bnb.nn.Linear4bit | bnb.nn.Embedding4bit):
        weight = placed(tensor, device, dtype, owned=owned)
        if transpose:
            weight = weight.t()
        if spec.native and _native_input(weight):
            if cpu_layout.wanted(module, weight.device):
                module.weight = cpu_layout.quantize(
                    module, weight, threads=native_threads(weight.nbytes)
                )
            else:
                module.weight = _native_4bit(module, weight)
            return
        meta = module.weight
        packed, state = quantize_4bit(
            weight.contiguous(),
            blocksize=meta.blocksize,
            quant_type=meta.quant_type,
            quant_storage=meta.quant_storage,
            double_quant=meta.compress_statistics,
        )
        module.weight = params_4bit(module, packed, state)
        if cpu_layout.wanted(module, packed.device):
            cpu_layout.pack(module)
        return
    if attr == "weight" and isinstance(module, bnb.nn.Linear8bitLt | bnb.nn.Embedding8bit):
        weight = placed(tensor, device, dtype, owned=owned)
        fresh = owned or weight is not tensor
        if transpose:
            weight = weight.t()
        if spec.native and weight.dim() == 2 and _native_input(weight):
            module.weight = _native_int8(weight)
            return
        if transpose:
            weight, fresh = weight.contiguous(), True
        if fresh:
            # what Int8Params._quantize converts to, here in place rather than a copy
            weight = placed(weight, device, torch.float16, owned=True)
        param = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        # Int8Params.to() quantizes only from the CPU; _quantize is what it calls
        module.weight = param._quantize(device)
        return
    if owned:
        value = placed(tensor, device, dtype, owned=True)
    elif device.type == "cpu":
        value = host_empty(tensor.shape, dtype or tensor.dtype)
        value.copy_(tensor)
    else:
        value = tensor.to(device=device, dtype=dtype, copy=True)
    if buffer:
        module._buffers[attr] = value
    else:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)


#: outputs at least this large ask for huge pages (:func:`host_empty`)
_HUGE_OUTPUT = 4 << 20


def host_empty(shape: Any, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, for a load's output (a quantized
    weight, a copied embedding): when it is large, transparent huge pages are asked for
    before its first write (``_core.advise_hugepages``), so that writing it takes one page
    fault per 2 MiB instead of per 4 KiB (a quarter of a CPU load's time otherwise)."""
    out = torch.empty(shape, dtype=dtype)
    if out.nbytes >= _HUGE_OUTPUT:
        _core.advise_hugepages(cpu_layout.byte_buffer(out))
    return out


def placed(
    tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None, *, owned: bool
) -> torch.Tensor:
    """``tensor.to(device, dtype)``, in place when ``owned`` (the caller's to overwrite)
    and only the dtype changes between two of one size: no second full-size tensor."""
    if (
        owned
        and dtype is not None
        and dtype != tensor.dtype
        and dtype.itemsize == tensor.dtype.itemsize
        and tensor.device == device
        and tensor.is_contiguous()
        and tensor.numel() > 0
    ):
        out = tensor.view(dtype)
        out.copy_(tensor)  # each element read, then written at the same bytes
        return out
    return tensor.to(device=device, dtype=dtype)


@contextlib.contextmanager
def kernel_stream(device: torch.device) -> Iterator[None]:
    """Queue the block's device work on the stream bitsandbytes' kernels run on.

    bitsandbytes 0.50 launches its CUDA quantize kernels (4-bit and blockwise)
    without a stream: they run on the device's default stream whatever stream
    is current, while the torch operations around them (allocating their
    inputs and outputs, the mean of double quantization) follow the current
    stream. Inside a user's ``with torch.cuda.stream(s):`` the two would race.
    So the load's device work goes to the default stream, after the work
    already queued on the caller's current stream (tensors ``init_missing``
    made there), and the caller's stream then waits for it (the GPU waits, not
    the host). Elsewhere than CUDA: nothing to do.
    """
    if device.type != "cuda":
        yield
        return
    caller = torch.cuda.current_stream(device)
    kernels = torch.cuda.default_stream(device)
    if caller != kernels:
        kernels.wait_stream(caller)
    try:
        with torch.cuda.stream(kernels):
            yield
    finally:
        caller.wait_stream(kernels)


# --- 4-bit quantization without host syncs --------------------------------------------

_CODES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _code(name: str, device: torch.device) -> torch.Tensor:
    """bitsandbytes' code table ``name`` (``"nf4"``, ``"fp4"``, or ``"dynamic"``, the
    8-bit map of double quantization) on ``device``, made once per device and
    copied there without a host sync. Not to be stored: each ``QuantState`` gets
    its own clone, as bitsandbytes' do (transformers refuses to save tensors that
    share memory)."""
    import bitsandbytes.functional as F

    key = (name, device)
    code = _CODES.get(key)
    if code is None:
        # the values bitsandbytes computes (on the CPU, like it does for "dynamic")
        table = F.create_dynamic_map() if name == "dynamic" else F.get_4bit_type(name, "cpu")
        if device.type == "cuda":
            code = table.pin_memory().to(device, non_blocking=True)
        else:
            code = table.to(device)
        _CODES[key] = code
    return code


def quantize_4bit(
    weight: torch.Tensor,
    *,
    blocksize: int,
    quant_type: str,
    quant_storage: torch.dtype,
    double_quant: bool,
) -> tuple[torch.Tensor, Any]:
    """``bitsandbytes.functional.quantize_4bit(weight, ...)``, bit for bit, without
    its per-call host sync: ``(packed, QuantState)``. ``weight`` is contiguous."""
    packed, absmax = torch.ops.bitsandbytes.quantize_4bit.default(
        weight, blocksize, quant_type, quant_storage
    )
    return packed, quant_state_4bit(
        absmax, weight.shape, weight.dtype, blocksize, quant_type, double_quant
    )


def quant_state_4bit(
    absmax: torch.Tensor,
    shape: torch.Size,
    dtype: torch.dtype,
    blocksize: int,
    quant_type: str,
    double_quant: bool,
) -> Any:
    """The ``QuantState`` ``bitsandbytes.functional.quantize_4bit`` builds around the
    per-block ``absmax`` (float32) of a weight of ``shape`` and ``dtype``; with
    ``double_quant``, ``absmax`` is quantized as it does (8-bit blockwise, blocks of
    256, around its mean)."""
    import bitsandbytes.functional as F

    code = _code(quant_type, absmax.device).clone()
    if not double_quant:
        return F.QuantState(
            absmax=absmax,
            shape=shape,
            dtype=dtype,
            blocksize=blocksize,
            code=code,
            quant_type=quant_type,
        )
    offset = absmax.mean()
    dynamic = _code("dynamic", absmax.device)
    qabsmax, absmax2 = torch.ops.bitsandbytes.quantize_blockwise.default(
        absmax - offset, dynamic, 256
    )
    state2 = F.QuantState(absmax=absmax2, code=dynamic.clone(), blocksize=256, dtype=torch.float32)
    return F.QuantState(
        absmax=qabsmax,
        shape=shape,
        dtype=dtype,
        blocksize=blocksize,
        code=code,
        quant_type=quant_type,
        offset=offset,
        state2=state2,
    )


def params_4bit(
    module: nn.Module,
    packed: torch.Tensor,
    state: Any,
    *,
    storage: torch.dtype | None = None,
    nested: bool | None = None,
) -> Any:
    """The ``Params4bit`` bitsandbytes leaves in ``module`` once its weight is quantized
    (``Params4bit._quantize``) or loaded pre-quantized (``Params4bit.from_prequantized``):
    ``packed`` with ``state``, whose settings (block size, double quantization, quant
    type) it carries; its storage dtype is ``storage``, by default ``packed``'s (a
    weight in bitsandbytes' CPU layout is bytes whatever its storage dtype), and its
    ``compress_statistics`` ``nested``, by default the state's (before any conversion
    to the CPU layout, which undoes double quantization)."""
    import bitsandbytes as bnb

    param = bnb.nn.Params4bit(
        packed,
        requires_grad=False,
        quant_state=state,
        blocksize=state.blocksize,
        compress_statistics=(
            getattr(state, "original_nested", state.nested) if nested is None else nested
        ),
        quant_type=state.quant_type,
        quant_storage=storage or packed.dtype,
        module=module,
        bnb_quantized=True,
    )
    module.quant_state = state  # as both do
    return param


# --- mixture-of-experts weights -----------------------------------------------------------


def expert_params(model: nn.Module, skip: Iterable[str]) -> dict[str, tuple[int, int, int]]:
    """The 3-D experts weights to quantize: ``{name: (E, R, C)}`` for every floating-point
    3-D parameter of an experts module (one that has ``num_experts``: transformers 5
    holds each MoE layer's experts as ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``,
    or transposed), unless ``skip`` names the module or its forward uses the whole
    tensor rather than one expert at a time (:func:`leanstream.direct_reads.whole_reads`:
    it stays in full precision, as transformers keeps it). Their biases (2-D) stay as
    they are."""
    from .direct_reads import whole_reads

    skip = list(skip)
    found = {}
    for module_name, module in model.named_modules():
        if not hasattr(module, "num_experts") or matches_any(module_name, skip):
            continue
        whole = whole_reads(type(module))
        for attr, param in module.named_parameters(recurse=False):
            if attr in whole:
                continue  # its forward uses the whole 3-D tensor (Llama 4's bmm)
            if param.dim() == 3 and param.is_floating_point():
                name = f"{module_name}.{attr}" if module_name else attr
                found[name] = tuple(int(d) for d in param.shape)
    return found  # type: ignore[return-value]


class ExpertsQuantizer:
    """Quantizes a 3-D experts weight ``[E, R, C]`` piece by piece, as its pieces stream
    in (row blocks of its row-major ``[E * R, C]`` view: one expert's gate or up
    projection, or the whole tensor when it is stored fused), into storage allocated
    once for the whole parameter: the full-precision merged tensor never exists.

    Blockwise 4-bit quantization of the flattened tensor is the concatenation of its
    pieces' quantizations when each piece's size is a multiple of the block size, and
    LLM.int8 scales are per row: the result is bit-identical to quantizing the merged
    tensor (or each expert matrix) with bitsandbytes. Double quantization of ``absmax``
    runs once, when the last piece is in.
    """

    def __init__(
        self,
        name: str,
        shape: tuple[int, int, int],
        spec: QuantSpec,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        experts, rows, cols = shape
        self.name, self.shape, self.spec, self.device, self.dtype = name, shape, spec, device, dtype
        self.rows = experts * rows  # of the [E * R, C] view
        self.cols = cols
        self.done = 0
        if spec.bits == 4:
            if (rows * cols) % spec.blocksize:
                raise ConfigError(
                    f"{name}: an expert's {rows}x{cols} weight is not a whole number of "
                    f"{spec.blocksize}-value blocks: cannot quantize it per expert; keep it in "
                    "full precision with skip_modules"
                )
            n = experts * rows * cols
            self.packed = _output((n // 2, 1), torch.uint8, device)
            self.absmax = _output(n // spec.blocksize, torch.float32, device)
        else:
            self.cb = _output((self.rows, cols), torch.int8, device)
            self.scb = _output(self.rows, torch.float32, device)
        # the native kernels write into slices of these arrays, made once: a piece costs
        # one Rust call, not two tensor-to-array conversions more
        self.native = spec.native and device.type == "cpu"
        if self.native:
            if spec.bits == 4:
                self.outputs = (self.packed.numpy().reshape(-1), self.absmax.numpy())
            else:
                self.outputs = (self.cb.numpy(), self.scb.numpy())

    def add(self, tensor: torch.Tensor, first_row: int, *, owned: bool) -> bool:
        """Quantize ``tensor`` (``[rows, C]``, or ``[E, R, C]`` whole) into rows
        ``first_row...`` of the ``[E * R, C]`` view; True once every row is in."""
        weight = placed(tensor, self.device, self.dtype, owned=owned).reshape(-1, self.cols)
        rows = weight.shape[0]
        end = first_row + rows
        native = self.native and _native_input(weight)
        if self.spec.bits == 4:
            bs = self.spec.blocksize
            if (rows * self.cols) % bs:
                raise ConfigError(
                    f"{self.name}: a piece of {rows}x{self.cols} values is not a whole number "
                    f"of {bs}-value blocks; keep it in full precision with skip_modules"
                )
            first, last = first_row * self.cols, end * self.cols
            if native:
                packed, absmax = self.outputs
                _core.quantize_4bit(
                    _raw(weight),
                    _NATIVE_DTYPES[weight.dtype],
                    packed[first // 2 : last // 2],
                    absmax[first // bs : last // bs],
                    quant_type=self.spec.quant_type,
                    blocksize=bs,
                    threads=native_threads(weight.nbytes),
                )
            else:
                out, scales = torch.ops.bitsandbytes.quantize_4bit.default(
                    weight.contiguous(), bs, self.spec.quant_type, torch.uint8
                )
                self.packed[first // 2 : last // 2].copy_(out)
                self.absmax[first // bs : last // bs].copy_(scales)
        elif native:
            cb, scb = self.outputs
            _core.quantize_int8(
                _raw(weight),
                _NATIVE_DTYPES[weight.dtype],
                self.cols,
                cb[first_row:end],
                scb[first_row:end],
                threads=native_threads(weight.nbytes),
            )
        else:
            cb, scb = self.cb[first_row:end], self.scb[first_row:end]
            fresh = owned or weight.data_ptr() != tensor.data_ptr()
            half = placed(weight.contiguous(), self.device, torch.float16, owned=fresh)
            out, scales, _ = torch.ops.bitsandbytes.int8_vectorwise_quant.default(half, 0.0)
            cb.copy_(out)
            scb.copy_(scales)
        self.done += rows
        return self.done == self.rows

    def streams(self, info: _core.TensorInfo) -> bool:
        """Whether the piece ``info`` can be quantized straight from the stream by
        :meth:`add_streamed`: native kernels on the CPU, stored in the parameter's dtype
        (nothing to convert first), whole rows, and at 4 bits whole blocks; any other
        piece goes through :meth:`add`."""
        if not self.native or info.dtype != _NATIVE_DTYPES.get(self.dtype):
            return False
        values = math.prod(info.shape)
        return values % self.cols == 0 and (
            self.spec.bits == 8 or values % self.spec.blocksize == 0
        )

    def add_streamed(
        self,
        stream: _core.TensorStream,
        pieces: list[tuple[_core.TensorInfo, int]],
        threads: int,
    ) -> bool:
        """Quantize the stream's next ``len(pieces)`` tensors, ``(info, first_row)`` each,
        into their rows (as :meth:`add` would, each piece for itself: the same bytes) in
        one call: whole pieces on ``threads`` threads (a run of fewer pieces than threads,
        such as one large piece, split over them), each piece's pages released once it is
        in. Every piece must be one :meth:`streams` takes. True once every row is
        in."""
        keys = [info.name for info, _ in pieces]
        if self.spec.bits == 4:
            packed, absmax = self.outputs
            stream.quantize_4bit_next(
                keys,
                [row * self.cols for _, row in pieces],
                packed,
                absmax,
                quant_type=self.spec.quant_type,
                blocksize=self.spec.blocksize,
                threads=threads,
            )
        else:
            cb, scb = self.outputs
            rows = [row for _, row in pieces]
            stream.quantize_int8_next(keys, rows, self.cols, cb.reshape(-1), scb, threads=threads)
        self.done += sum(math.prod(info.shape) for info, _ in pieces) // self.cols
        return self.done == self.rows

    def result(self) -> Any:
        """The quantized parameter (a :class:`leanstream.experts.QuantizedExperts`)."""
        from .experts import QuantizedExperts

        assert self.done == self.rows, (self.name, self.done, self.rows)
        if self.spec.bits == 4:
            state = quant_state_4bit(
                self.absmax,
                torch.Size(self.shape),
                self.dtype,
                self.spec.blocksize,
                self.spec.quant_type,
                self.spec.double_quant,
            )
            return QuantizedExperts.four_bit(self.packed, state)
        return QuantizedExperts.eight_bit(self.cb.view(self.shape), self.scb, self.dtype)


def _output(shape: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An experts weight's output storage: :func:`host_empty` on the CPU (huge pages for
    its first writes), ``torch.empty`` elsewhere."""
    if device.type == "cpu":
        return host_empty(shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)


# --- the native CPU quantizer ------------------------------------------------------

#: a tensor (or piece of one) smaller than this is quantized on one thread
_SPLIT_BYTES = 8 << 20


def native_threads(nbytes: int) -> int:
    """Threads of the native kernels for one streamed tensor of ``nbytes`` input bytes.

    A small one (an attention projection, or one expert's projection, a MiB or so:
    thousands of them in a mixture-of-experts checkpoint) runs on one thread: split,
    each call pays a thread start and join, and waits for its slowest thread whenever
    another core is busy (the mapped load's read-ahead thread faults the next tensors in
    on one; other processes). On 2 cores with one kept busy by another process, loads of
    a checkpoint of 1440 such pieces took about twice as long split as on one thread;
    on 2 idle cores the split saved at most a few percent. (Expert pieces streamed from
    the mapped files go many at a call to :meth:`ExpertsQuantizer.add_streamed`, whose
    threads take whole pieces.) A larger one uses ``torch.get_num_threads()``."""
    return 1 if nbytes < _SPLIT_BYTES else torch.get_num_threads()


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
    (double quantization of ``absmax`` included, by bitsandbytes' own kernel)."""
    meta = module.weight
    n = weight.numel()
    packed = host_empty(((n + 1) // 2, 1), torch.uint8)
    absmax = host_empty(-(n // -meta.blocksize), torch.float32)
    _core.quantize_4bit(
        _raw(weight),
        _NATIVE_DTYPES[weight.dtype],
        packed.numpy(),
        absmax.numpy(),
        quant_type=meta.quant_type,
        blocksize=meta.blocksize,
        threads=native_threads(weight.nbytes),
    )
    if meta.quant_storage != torch.uint8:
        packed = packed.squeeze().view(meta.quant_storage).unsqueeze(1)
    state = quant_state_4bit(
        absmax,
        weight.shape,
        weight.dtype,
        meta.blocksize,
        meta.quant_type,
        meta.compress_statistics,
    )
    return params_4bit(module, packed, state)


def _native_int8(weight: torch.Tensor) -> Any:
    """``Int8Params(weight, has_fp16_weights=False)._quantize("cpu")`` in Rust
    (the cast to float16 included, element by element)."""
    import bitsandbytes as bnb

    rows, cols = weight.shape
    cb = host_empty((rows, cols), torch.int8)
    scb = torch.empty(rows, dtype=torch.float32)
    _core.quantize_int8(
        _raw(weight),
        _NATIVE_DTYPES[weight.dtype],
        cols,
        cb.numpy(),
        scb.numpy(),
        threads=native_threads(weight.nbytes),
    )
    return bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)


__all__ = [
    "ExpertsQuantizer",
    "QuantSpec",
    "default_skip_modules",
    "expert_params",
    "extra_modules",
    "is_quantized_module",
    "kernel_stream",
    "matches_any",
    "materialize",
    "native_threads",
    "params_4bit",
    "placed",
    "quant_state_4bit",
    "quantize_4bit",
    "replace_embeddings",
    "replace_linears",
    "replace_root",
]
