"""Pre-quantized bitsandbytes checkpoints: the loader's sink for already-packed tensors.

A checkpoint saved from a bitsandbytes model (by :func:`leanstream.save` or
transformers' ``save_pretrained``) has a ``quantization_config`` with
``quant_method: "bitsandbytes"`` in its ``config.json``, and stores each quantized
linear weight as several tensors:

- 4-bit: ``weight`` (packed), ``weight.absmax``, ``weight.quant_map``, with double
  quantization ``weight.nested_absmax`` and ``weight.nested_quant_map``, and
  ``weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``: the JSON of the rest);
- LLM.int8: ``weight`` (int8), ``SCB``, and optionally ``weight_format`` (0: row-major).

leanstream's own format (``quant_method: "leanstream"``, written by :func:`leanstream.save`)
adds quantized embeddings and lm_head, stored the same way, and quantized 3-D
mixture-of-experts weights ``<m>.<attr>`` (``leanstream_quantized_experts``): the
stored bytes under that name and the statistics as ``<m>.<attr>.absmax`` ... (4-bit,
the suffixes above without ``weight.``) or ``<m>.<attr>.SCB`` (8-bit), which become a
:class:`leanstream.experts.QuantizedExperts`.

:func:`leanstream.load` streams them like any checkpoint (one pipeline: the same
plan, reader and progress bar). :class:`Prequantized` tells the loader which layers
to replace (``llm_int8_skip_modules`` as transformers reads it), which extra tensors
each quantized weight consumes, and turns them into bitsandbytes parameters with
bitsandbytes' own constructors (``QuantState.from_dict``, ``Params4bit``,
``Int8Params``), as transformers' ``Bnb4bitDeserialize`` / ``Bnb8bitDeserialize`` do
(through ``Params4bit.from_prequantized``): nothing is dequantized or requantized,
the bytes are copied once to the target device. The statistics are parsed and
checked on the host, and each weight's go to the device in one copy. One layout is
not bitsandbytes' own: a plain ``absmax`` saved transposed, as bfloat16
``[in // blocksize, out]``, by a model that ran a forward on an AVX512-BF16 CPU
before ``save_pretrained``; it is put back in order (:func:`_unpack_cpu_absmax`).

>>> model = leanstream.load("someone/llama-3.2-1b-nf4")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import cpu_layout
from .checkpoint import parse_json
from .errors import ConfigError, MismatchError, UnsupportedCheckpointError, checkpoint_error
from .quantize import QuantSpec, default_skip_modules, params_4bit
from .save import LEANSTREAM_METHOD, leanstream_extras

#: Statistics of a 4-bit weight, relative to the module (``<module>.weight.absmax`` ...).
STATS_4BIT = (
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
)
#: The packed JSON of a 4-bit weight's other statistics, one per quant type.
QUANT_STATE_4BIT = ("weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4")
#: Statistics of an LLM.int8 weight, relative to the module.
STATS_8BIT = ("SCB", "weight_format")
#: Statistics of a quantized 3-D experts weight ``<m>.<attr>`` (leanstream format), relative
#: to the weight: a 4-bit linear's weight's suffixes, or LLM.int8's row scales.
STATS_EXPERTS_4BIT = tuple(s.removeprefix("weight.") for s in STATS_4BIT)
QUANT_STATE_EXPERTS = tuple(s.removeprefix("weight.") for s in QUANT_STATE_4BIT)
STATS_EXPERTS_8BIT = ("SCB",)
#: Fields of ``quantization_config`` that list module names: transformers'
#: (``BitsAndBytesConfig`` refuses anything but a list) and leanstream's own (see
#: :func:`leanstream.save`).
MODULE_LISTS = (
    "llm_int8_skip_modules",
    "leanstream_quantized_embeddings",
    "leanstream_quantized_lm_head",
    "leanstream_quantized_experts",
)

_DEFAULT = QuantSpec()


def quantization_dict(config: Any) -> dict[str, Any] | None:
    """``config.quantization_config`` as a plain dict (transformers keeps a dict or an object)."""
    quant = getattr(config, "quantization_config", None)
    if quant is None or isinstance(quant, dict):
        return quant
    if hasattr(quant, "to_dict"):
        return dict(quant.to_dict())
    return {"quant_method": str(getattr(quant, "quant_method", type(quant).__name__))}


def check_module_lists(quant: Mapping[str, Any], config_file: str) -> None:
    """Refuse a ``quantization_config`` whose :data:`MODULE_LISTS` fields are not lists
    of module names (strings): :class:`ConfigError` naming ``config_file`` and the field."""
    for field in MODULE_LISTS:
        value = quant.get(field)
        if value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            continue
        raise ConfigError(
            f"{config_file}: quantization_config.{field} must be a list of module names "
            f"(strings), got {_short(value)}"
        )


def describe(quant: Mapping[str, Any], config_file: str = "config.json") -> str:
    """``"bitsandbytes 4-bit nf4, double quant"``, ``"bitsandbytes 8-bit"``, ``"awq"``...
    (:func:`check_module_lists` first: ``config_file`` names the config in its error)."""
    method = str(quant.get("quant_method", "unknown method"))
    if method not in ("bitsandbytes", LEANSTREAM_METHOD):
        return method
    check_module_lists(quant, config_file)
    extra = leanstream_extras(quant)
    more = ""
    if extra:
        names = [*extra["leanstream_quantized_embeddings"], *extra["leanstream_quantized_lm_head"]]
        experts = len(extra["leanstream_quantized_experts"])
        if experts:
            names.append(f"{experts} mixture-of-experts weight{'s' if experts > 1 else ''}")
        more = f", also {', '.join(names)} (leanstream format)"
    if quant.get("load_in_4bit"):
        text = f"bitsandbytes 4-bit {quant.get('bnb_4bit_quant_type', 'fp4')}"
        return text + (", double quant" if quant.get("bnb_4bit_use_double_quant") else "") + more
    if quant.get("load_in_8bit"):
        return "bitsandbytes 8-bit (LLM.int8)" + more
    return "bitsandbytes (neither load_in_4bit nor load_in_8bit)"


@dataclass(frozen=True)
class Prequantized:
    """A bitsandbytes checkpoint's quantization, and how its tensors fill a model.

    Built by :meth:`from_config`; used by the loader in three places: :meth:`skip`
    (before layers are replaced), :meth:`stats` and :meth:`weight_shape` (while
    planning, before a byte is read), :meth:`materialize` (per streamed weight); for
    quantized experts weights :meth:`experts_shapes`, :meth:`experts_stats`,
    :meth:`experts_shape` and :meth:`materialize_experts`.
    """

    spec: QuantSpec
    skip_modules: tuple[str, ...] | None
    config_file: str
    #: quantized ``nn.Embedding`` modules and output embeddings (leanstream format)
    embeddings: tuple[str, ...] = ()
    lm_head: tuple[str, ...] = ()
    #: quantized 3-D mixture-of-experts weights ``<m>.<attr>`` (leanstream format)
    experts: tuple[str, ...] = ()

    @classmethod
    def from_config(
        cls,
        config: Any,
        folder: Path,
        *,
        bits: int | str | None,
        requested: QuantSpec,
        skip_modules: list[str] | None,
        compute_dtype_given: bool,
    ) -> Prequantized:
        """Read the checkpoint's ``quantization_config`` and reconcile ``load()``'s options.

        ``bits="auto"`` takes the checkpoint's; an explicit ``bits`` (4, 8, or 16/None)
        that differs is a :class:`ConfigError` (leanstream never dequantizes). The
        other quantization options must be left at their defaults or agree with the
        checkpoint; ``compute_dtype`` and ``threshold`` are runtime choices and
        override the checkpoint's. Methods other than bitsandbytes are refused with
        :class:`UnsupportedCheckpointError`.
        """
        path = str(folder / "config.json")
        quant = quantization_dict(config) or {}
        what = describe(quant, path)
        if quant.get("quant_method") not in ("bitsandbytes", LEANSTREAM_METHOD) or not (
            quant.get("load_in_4bit") or quant.get("load_in_8bit")
        ):
            raise checkpoint_error(
                UnsupportedCheckpointError,
                f"{path}: the checkpoint is already quantized ({what}); leanstream loads "
                "pre-quantized checkpoints of bitsandbytes 4-bit or 8-bit only",
                file=path,
            )
        stored_bits = 4 if quant.get("load_in_4bit") else 8
        if quant.get("quant_method") == LEANSTREAM_METHOD:  # see leanstream.save
            quant = {**quant, "bnb_4bit_compute_dtype": quant.get("leanstream_compute_dtype")}
        if bits != "auto" and (16 if bits is None else bits) != stored_bits:
            raise ConfigError(
                f"{path}: the checkpoint is pre-quantized ({what}) but bits={bits!r} was asked; "
                "leanstream does not dequantize or requantize: pass bits='auto' (the default) "
                f"or bits={stored_bits}, or load the original full-precision checkpoint"
            )
        stored = {
            "quant_type": quant.get("bnb_4bit_quant_type", "fp4"),
            "double_quant": bool(quant.get("bnb_4bit_use_double_quant", False)),
            "quant_storage": _dtype(quant.get("bnb_4bit_quant_storage", "uint8"), path),
        }
        if stored_bits == 4:
            for option, value in stored.items():
                asked = getattr(requested, option)
                if asked != getattr(_DEFAULT, option) and asked != value:
                    raise ConfigError(
                        f"{path}: the checkpoint is pre-quantized ({what}) but {option}={asked!r} "
                        f"was asked; it stores {option}={value!r}: leave {option} out"
                    )
        extra = leanstream_extras(quant)
        embeddings = tuple(extra.get("leanstream_quantized_embeddings", ()))
        lm_head = tuple(extra.get("leanstream_quantized_lm_head", ()))
        experts = tuple(extra.get("leanstream_quantized_experts", ()))
        for flag, asked, have in (
            ("quantize_embeddings", requested.embeddings, embeddings),
            ("quantize_lm_head", requested.lm_head, lm_head),
        ):
            if asked and not have:
                raise ConfigError(
                    f"{path}: {flag}=True was asked but the checkpoint is pre-quantized ({what}) "
                    "without it; leanstream does not requantize: load the original checkpoint"
                )
        if skip_modules:
            raise ConfigError(
                f"{path}: skip_modules cannot apply to a pre-quantized checkpoint ({what}): "
                "which layers are quantized was decided when it was saved"
            )
        compute = requested.compute_dtype
        if not compute_dtype_given and stored_bits == 4:
            compute = _dtype(quant.get("bnb_4bit_compute_dtype"), path)
        threshold = requested.threshold
        if threshold == _DEFAULT.threshold:
            threshold = float(quant.get("llm_int8_threshold", threshold))
        spec = dataclasses.replace(
            requested,
            bits=stored_bits,
            compute_dtype=compute,
            threshold=threshold,
            **(stored if stored_bits == 4 else {}),
        )
        skip = quant.get("llm_int8_skip_modules")
        return cls(
            spec=spec,
            skip_modules=None if skip is None else tuple(skip),
            config_file=path,
            embeddings=embeddings,
            lm_head=lm_head,
            experts=experts,
        )

    def extra_modules(self, model: Any) -> tuple[set[str], set[str]]:
        """The embeddings and output embeddings stored quantized (leanstream format)."""
        return set(self.embeddings), set(self.lm_head)

    def skip(self, model: Any) -> set[str]:
        """Modules kept in full precision, by transformers' rule: the checkpoint's
        ``llm_int8_skip_modules`` if set (else the default ones), plus the model's
        ``_keep_in_fp32_modules``."""
        if self.skip_modules is None:
            return default_skip_modules(model)
        skip = set(self.skip_modules)
        skip.update(getattr(model, "_keep_in_fp32_modules", None) or [])
        skip.update(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
        return skip

    def stats(
        self, module_name: str, by_name: Mapping[str, str]
    ) -> tuple[tuple[tuple[str, str], ...], list[str]]:
        """The statistics tensors the weight of replaced module ``module_name`` is
        made of: ``((stat, checkpoint_key), ...)`` with ``stat`` relative to the
        module, in a fixed order, and the model names of required ones missing."""
        prefix = f"{module_name}." if module_name else ""
        if self.spec.bits == 4:
            return self._stats(prefix, by_name, STATS_4BIT, QUANT_STATE_4BIT)
        return self._stats(prefix, by_name, STATS_8BIT, ())

    def experts_shapes(
        self, model: nn.Module, expected: Mapping[str, tuple[int, ...]]
    ) -> dict[str, tuple[int, ...]]:
        """``{name: (E, R, C)}`` of the experts weights stored quantized, from the
        model's ``expected`` shapes; :class:`ConfigError` if the config names anything
        else."""
        wrong = [n for n in self.experts if len(expected.get(n, ())) != 3]
        if wrong:
            raise ConfigError(
                f"{self.config_file}: leanstream_quantized_experts names "
                f"{', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}, not a 3-D experts "
                f"weight of {type(model).__name__}"
            )
        return {name: tuple(expected[name]) for name in self.experts}

    def experts_stats(
        self, name: str, by_name: Mapping[str, str]
    ) -> tuple[tuple[tuple[str, str], ...], list[str]]:
        """:meth:`stats` for the quantized experts weight ``name`` (``<m>.<attr>``):
        ``stat`` relative to the weight (``absmax``, ``quant_state.bitsandbytes__nf4``,
        ``SCB``)."""
        if self.spec.bits == 4:
            return self._stats(f"{name}.", by_name, STATS_EXPERTS_4BIT, QUANT_STATE_EXPERTS)
        return self._stats(f"{name}.", by_name, STATS_EXPERTS_8BIT, ())

    def _stats(
        self,
        prefix: str,
        by_name: Mapping[str, str],
        stats: tuple[str, ...],
        quant_state: tuple[str, ...],
    ) -> tuple[tuple[tuple[str, str], ...], list[str]]:
        """``stats`` (4-bit: absmax, quant_map, nested_absmax, nested_quant_map; 8-bit:
        SCB, weight_format) and ``quant_state`` (4-bit's JSON, one per quant type)
        found under ``prefix``, and the required ones missing."""
        if self.spec.bits == 4:
            required = list(stats[:4] if self.spec.double_quant else stats[:2])
        else:
            required = [stats[0]]
        candidates = [*stats, *quant_state]
        found = tuple((s, by_name[prefix + s]) for s in candidates if prefix + s in by_name)
        missing = [prefix + s for s in required if prefix + s not in by_name]
        if quant_state and not any(s in quant_state for s, _ in found):
            missing.append(prefix + quant_state[self.spec.quant_type == "fp4"])
        return found, missing

    def weight_shape(self, module: nn.Module, key: str, info: Any) -> tuple[int, ...]:
        """The shape the stored quantized weight of ``module`` must have (checked by
        the loader's plan like any other shape). Refuses an LLM.int8 weight that is
        not int8 (a 4-bit weight's storage dtype is checked when it is loaded)."""
        out_features, in_features = _features(module)
        if self.spec.bits == 8:
            if info.dtype != "I8":
                raise checkpoint_error(
                    UnsupportedCheckpointError,
                    f"{info.file}: tensor {key!r} is {info.dtype}; an LLM.int8 weight is I8 "
                    f"({self.config_file} says the checkpoint is 8-bit)",
                    file=info.file,
                    tensor=key,
                )
            return (out_features, in_features)
        # bitsandbytes packs two 4-bit values per byte of the storage dtype
        per_element = 2 * self.spec.quant_storage.itemsize
        return ((out_features * in_features + 1) // per_element, 1)

    def experts_shape(self, shape: tuple[int, ...], key: str, info: Any) -> tuple[int, ...]:
        """The shape the stored quantized experts weight of ``shape`` ``[E, R, C]`` must
        have: 4-bit, uint8 ``[E*R*C // 2, 1]`` (leanstream packs experts in uint8
        whatever ``bnb_4bit_quant_storage``); 8-bit, int8 ``[E, R, C]``. Another dtype
        is refused."""
        want = "U8" if self.spec.bits == 4 else "I8"
        if info.dtype != want:
            kind = "a 4-bit experts weight is U8" if want == "U8" else "an 8-bit one is I8"
            raise checkpoint_error(
                UnsupportedCheckpointError,
                f"{info.file}: tensor {key!r} is {info.dtype}; {kind} "
                f"({self.config_file} says the checkpoint is {self.spec.bits}-bit)",
                file=info.file,
                tensor=key,
            )
        if self.spec.bits == 8:
            return tuple(shape)
        count = 1
        for size in shape:
            count *= size
        return (count // 2, 1)

    def materialize(
        self,
        name: str,
        module: nn.Module,
        weight: torch.Tensor,
        stats: Mapping[str, torch.Tensor],
        *,
        device: torch.device,
        owned: bool = False,
    ) -> None:
        """Make ``module.weight`` the bitsandbytes parameter stored as ``weight`` and
        ``stats``. ``weight`` is copied once to ``device`` (``owned``: a fresh tensor
        of the caller's, used as it is when already there). ``stats`` are host tensors
        (read-only views of the mapped file, or the pipeline's host copies): they are
        parsed and checked on the host, then sent to ``device`` together, in one
        allocation and one copy (:func:`to_device_at_once`): no host sync, and no
        device allocation, copy or event per tiny tensor."""
        import bitsandbytes as bnb

        if isinstance(module, bnb.nn.Linear4bit | bnb.nn.Embedding4bit):
            if weight.dtype != self.spec.quant_storage:
                raise checkpoint_error(
                    UnsupportedCheckpointError,
                    f"{self.config_file}: {name!r} is stored as {weight.dtype}, but "
                    f"bnb_4bit_quant_storage is {self.spec.quant_storage}",
                    file=self.config_file,
                    tensor=name,
                )
            # what Params4bit.from_prequantized does, on the host
            state = self._quant_state(name, stats)
            _check_4bit(self.config_file, name, state)
            _unpack_cpu_absmax(state)
            expected = _features(module)
            if tuple(state.shape) != expected:
                raise MismatchError(
                    self.config_file, mismatched=[(name, tuple(state.shape), expected)]
                )
            self._check_blocksize(name, state)
            _state_to(state, device)
            if cpu_layout.wanted(module, device):
                # bitsandbytes' AVX512-BF16 CPU layout, made from the stored bytes
                module.weight = cpu_layout.from_plain(module, weight, state)
                return
            data = weight.to(device=device, copy=not owned)
            module.weight = params_4bit(module, data, state)
            return
        data = weight.to(device=device, copy=not owned)
        if isinstance(module, bnb.nn.Linear8bitLt | bnb.nn.Embedding8bit):
            layout = stats.get("weight_format")
            if layout is not None and int(layout.item()) != 0:
                raise checkpoint_error(
                    UnsupportedCheckpointError,
                    f"{self.config_file}: {name!r} has weight_format {int(layout.item())}; "
                    "only row-major (0) LLM.int8 weights are supported",
                    file=self.config_file,
                    tensor=name,
                )
            scb, rows, scb_name = stats["SCB"], _features(module)[0], f"{name[:-6]}SCB"
            if tuple(scb.shape) != (rows,):
                raise MismatchError(
                    self.config_file, mismatched=[(scb_name, tuple(scb.shape), (rows,))]
                )
            if not scb.is_floating_point():
                raise checkpoint_error(
                    UnsupportedCheckpointError,
                    f"{self.config_file}: {scb_name!r} is {scb.dtype}; LLM.int8 row scales "
                    "are floating point",
                    file=self.config_file,
                    tensor=scb_name,
                )
            _check_finite(self.config_file, scb_name, scb)
            param = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
            param.CB = param.data
            (param.SCB,) = to_device_at_once([scb], device)
            module.weight = param
            return
        raise TypeError(f"{name}: not a bitsandbytes layer: {type(module).__name__}")

    def materialize_experts(
        self,
        name: str,
        module: nn.Module,
        attr: str,
        stored: torch.Tensor,
        stats: Mapping[str, torch.Tensor],
        *,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        owned: bool = False,
    ) -> None:
        """Make ``module.<attr>`` the :class:`~leanstream.experts.QuantizedExperts`
        stored as ``stored`` and ``stats`` (see :meth:`experts_stats`), of weight shape
        ``shape`` ``[E, R, C]`` and dequantized to ``dtype`` (the model's, as when it
        was quantized on load; the 4-bit JSON's ``dtype`` says the same for a folder
        saved from such a model). As :meth:`materialize`: ``stored`` copied once to
        ``device``, ``stats`` parsed and checked on the host, then sent at once."""
        from .experts import QuantizedExperts

        data = stored.to(device=device, copy=not owned)
        if self.spec.bits == 4:
            state = self._quant_state(name, stats)
            _check_4bit(self.config_file, name, state, rank=3)
            if tuple(state.shape) != tuple(shape):
                raise MismatchError(
                    self.config_file, mismatched=[(name, tuple(state.shape), tuple(shape))]
                )
            _, r, c = shape
            if (r * c) % state.blocksize:
                raise checkpoint_error(
                    UnsupportedCheckpointError,
                    f"{self.config_file}: the quantization statistics of {name!r} are invalid: "
                    f"an expert of {r}x{c} values is not a whole number of "
                    f"{state.blocksize}-value blocks",
                    file=self.config_file,
                    tensor=name,
                )
            self._check_blocksize(name, state)
            state.dtype = dtype
            _state_to(state, device)
            param = QuantizedExperts.four_bit(data, state)
        else:
            scb, scb_name = stats["SCB"], f"{name}.SCB"
            rows = shape[0] * shape[1]
            if tuple(scb.shape) != (rows,):
                raise MismatchError(
                    self.config_file, mismatched=[(scb_name, tuple(scb.shape), (rows,))]
                )
            if scb.dtype != torch.float32:
                raise checkpoint_error(
                    UnsupportedCheckpointError,
                    f"{self.config_file}: {scb_name!r} is {scb.dtype}; LLM.int8 row scales "
                    "of experts are float32",
                    file=self.config_file,
                    tensor=scb_name,
                )
            _check_finite(self.config_file, scb_name, scb)
            (scb,) = to_device_at_once([scb], device)
            param = QuantizedExperts.eight_bit(data, scb, dtype)
        module._parameters[attr] = param

    def _quant_state(self, name: str, stats: Mapping[str, torch.Tensor]) -> Any:
        """The host ``QuantState`` of 4-bit statistics (what ``Params4bit.from_prequantized``
        builds); :class:`UnsupportedCheckpointError` naming ``name`` if malformed. The
        packed JSON is parsed here (:func:`_unpack_quant_state`), not by bitsandbytes."""
        import bitsandbytes.functional as F

        def invalid(what: str) -> UnsupportedCheckpointError:
            return checkpoint_error(
                UnsupportedCheckpointError,
                f"{self.config_file}: the quantization statistics of {name!r} are invalid ({what})",
                file=self.config_file,
                tensor=name,
            )

        items: dict[str, Any] = dict(stats)
        packed = [key for key in items if "quant_state" in key]
        if len(packed) == 1:  # else QuantState.from_dict says what is wrong
            try:
                items.update(_unpack_quant_state(items.pop(packed[0])))
            except ValueError as err:
                raise invalid(f"{packed[0]}: {err}") from err
        try:
            return F.QuantState.from_dict(qs_dict=items, device=torch.device("cpu"))
        except (ValueError, KeyError, AssertionError, TypeError, AttributeError) as err:
            raise invalid(f"{type(err).__name__}: {err}") from err

    def _check_blocksize(self, name: str, state: Any) -> None:
        asked = self.spec.blocksize
        if asked != _DEFAULT.blocksize and asked != state.blocksize:
            raise ConfigError(
                f"{self.config_file}: {name!r} is stored with blocksize "
                f"{state.blocksize} but blocksize={asked} was asked: "
                "leave blocksize out for a pre-quantized checkpoint"
            )


def to_device_at_once(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``[t.to(device, copy=True) for t in tensors]`` for small host tensors, in one
    allocation and one copy: on CUDA a ``non_blocking`` copy from pinned memory (no
    host sync). Each result is a view of its own bytes (disjoint, 64-byte aligned:
    transformers' ``save_pretrained`` saves disjoint views of one storage as
    separate tensors)."""
    starts, total = [], 0
    for tensor in tensors:
        total = -(-total // 64) * 64
        starts.append(total)
        total += tensor.nbytes
    host = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=device.type == "cuda")
    for tensor, start in zip(tensors, starts, strict=True):
        raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        host[start : start + tensor.nbytes].copy_(raw)
    packed = host.to(device, non_blocking=True)
    return [
        packed[start : start + t.nbytes].view(t.dtype).reshape(t.shape)
        for t, start in zip(tensors, starts, strict=True)
    ]


def _state_to(state: Any, device: torch.device) -> None:
    """Move a host ``QuantState``'s tensors to ``device`` at once (in place)."""
    nested = state.state2
    tensors = [state.absmax, state.code]
    if nested is not None:
        tensors += [state.offset, nested.absmax, nested.code]
    moved = to_device_at_once(tensors, device)
    state.absmax, state.code = moved[:2]
    if nested is not None:
        state.offset, nested.absmax, nested.code = moved[2:]


def _check_4bit(config_file: str, name: str, state: Any, *, rank: int = 2) -> None:
    """Refuse 4-bit statistics that bitsandbytes would accept but read out of bounds
    (or misread) at the first matmul: every length follows from the shape and block
    sizes, and the values' types from the format (``QuantState.from_dict`` checks none);
    no floating-point statistic holds a NaN or an infinity (NaN outputs). The JSON's
    dtypes and ``nested_offset`` were checked by :func:`_unpack_quant_state`.
    ``rank``: 2 for a linear's or embedding's weight, 3 for an experts weight."""

    def invalid(what: str) -> UnsupportedCheckpointError:
        return checkpoint_error(
            UnsupportedCheckpointError,
            f"{config_file}: the quantization statistics of {name!r} are invalid: {what}",
            file=config_file,
            tensor=name,
        )

    def block(size: Any, what: str) -> int:
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size & (size - 1):
            raise invalid(f"{what} {size!r} is not a positive power of two")
        return size

    if state.quant_type not in ("nf4", "fp4"):
        raise invalid(f"quant_type {state.quant_type!r} is neither 'nf4' nor 'fp4'")
    shape = tuple(state.shape or ())
    if len(shape) != rank or not all(isinstance(d, int) and d > 0 for d in shape):
        raise invalid(f"shape {list(shape)} is not {rank} positive sizes")
    stat = f"{name}."
    expected = [(stat + "quant_map", state.code, (16,), torch.float32)]
    values = 1
    for size in shape:
        values *= size
    count = -(-values // block(state.blocksize, "blocksize"))
    if state.nested:
        nested = state.state2
        inner = -(-count // block(nested.blocksize, "nested blocksize"))
        expected += [
            (stat + "absmax", state.absmax, (count,), torch.uint8),
            (stat + "nested_absmax", nested.absmax, (inner,), torch.float32),
            (stat + "nested_quant_map", nested.code, (256,), torch.float32),
        ]
    elif rank == 2 and state.absmax.dim() == 2 and shape[1] % state.blocksize == 0:
        # saved after a CPU forward: see _unpack_cpu_absmax
        layout = (shape[1] // state.blocksize, shape[0])
        expected.append((stat + "absmax", state.absmax, layout, torch.bfloat16))
    else:
        expected.append((stat + "absmax", state.absmax, (count,), torch.float32))
    mismatched = [
        (key, tuple(t.shape), want) for key, t, want, _ in expected if tuple(t.shape) != want
    ]
    if mismatched:
        raise MismatchError(config_file, mismatched=mismatched)
    for key, tensor, _, dtype in expected:
        if tensor.dtype != dtype:
            raise invalid(f"{key} is {tensor.dtype}, not {dtype}")
        if tensor.is_floating_point():
            _check_finite(config_file, key, tensor)


def _unpack_quant_state(packed: torch.Tensor) -> dict[str, Any]:
    """The JSON of a 4-bit weight's packed quant state (``quant_state.bitsandbytes__nf4``,
    what bitsandbytes' ``unpack_tensor_to_dict`` reads), parsed with leanstream's limits
    (:func:`~leanstream.checkpoint.parse_json`), with the values ``QuantState.from_dict``
    converts unchecked checked first: ``dtype`` and ``nested_dtype`` (``getattr(torch,
    ...)``) name floating-point dtypes, ``nested_offset`` (``float(...)``) is a finite
    number. ``ValueError`` saying what is wrong."""
    raw = packed.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    items = parse_json(raw)
    if not isinstance(items, dict):
        raise ValueError("not a JSON object")
    for key in ("dtype", "nested_dtype"):
        value = items.get(key)
        dtype = getattr(torch, value, None) if isinstance(value, str) else None
        if key in items and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            shown = dtype if isinstance(dtype, torch.dtype) else _short(value)
            raise ValueError(f"{key} {shown} is not a floating-point torch dtype")
    if "nested_offset" in items and not _finite(items["nested_offset"]):
        raise ValueError(f"nested_offset {_short(items['nested_offset'])} is not a finite number")
    return items


def _finite(value: Any) -> bool:
    """Whether a JSON value is a finite number (``10**400`` is not: no float holds it)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_finite(config_file: str, key: str, tensor: torch.Tensor) -> None:
    """Refuse floating-point statistics with a NaN or an infinity (NaN outputs at the
    first forward): :class:`UnsupportedCheckpointError` naming ``key``."""
    if not bool(torch.isfinite(tensor).all()):
        raise checkpoint_error(
            UnsupportedCheckpointError,
            f"{config_file}: {key!r} holds NaN or infinite values",
            file=config_file,
            tensor=key,
        )


def _unpack_cpu_absmax(state: Any) -> None:
    """Put back in bitsandbytes' order the absmax of a 4-bit weight saved after a
    forward on an AVX512-BF16 CPU (in place; ``state`` checked by :func:`_check_4bit`).

    That forward repacks the layer for the CPU kernel (``bitsandbytes.functional.
    _convert_weight_packed_for_cpu``: the weight regrouped, double quantization
    undone, absmax as bfloat16 ``[in // blocksize, out]``, i.e. transposed), and
    ``Linear4bit._save_to_state_dict`` undoes it before saving
    (``_convert_weight_packed_for_cpu_inverse``) but only partly: the weight is
    back in its layout (and double-quantized statistics are re-quantized), but a
    plain absmax stays transposed and bfloat16, and the JSON says nothing of it.
    transformers loads that tensor as it is, which bitsandbytes reads as a flat
    ``[out * in // blocksize]`` one: the rows' scales are mixed up wherever
    ``in > blocksize``. Here it is transposed back, as the inverse does for the
    double-quantized case (``absmax.T.reshape(-1)``), in float32 (exact): the
    original absmax rounded to bfloat16.
    """
    if state.absmax.dim() == 2:
        state.absmax = state.absmax.T.reshape(-1).to(torch.float32)


def _features(module: nn.Module) -> tuple[int, int]:
    """``(rows, columns)`` of a quantized weight: a linear's ``(out, in)``, an embedding's
    ``(num_embeddings, embedding_dim)``."""
    if isinstance(module, nn.Embedding):
        return int(module.num_embeddings), int(module.embedding_dim)
    return int(module.out_features), int(module.in_features)


def _dtype(value: Any, path: str) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    result = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(result, torch.dtype):
        raise ConfigError(f"{path}: quantization_config names an unknown dtype {value!r}")
    return result


__all__ = [
    "QUANT_STATE_4BIT",
    "QUANT_STATE_EXPERTS",
    "STATS_4BIT",
    "STATS_8BIT",
    "STATS_EXPERTS_4BIT",
    "STATS_EXPERTS_8BIT",
    "Prequantized",
    "describe",
    "to_device_at_once",
]
