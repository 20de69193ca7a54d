"""``load()`` and ``load_into()``: the one pipeline that ties checkpoint, meta model,
reader and quantizer.

Before a byte is read, :mod:`leanstream.matching` decides which checkpoint tensor
fills which model tensor and :mod:`leanstream.placement` where each goes (one device,
or a ``device_map``). Once the shards are validated, and while ``config.json`` is
parsed and the meta model built, a Rust thread already reads the tensors most likely needed first
into the page cache (:meth:`leanstream._core.Checkpoint.warm`).
Then, in module traversal order, one of two sources delivers each tensor:

- mapped (the default on the CPU): Rust reader (validated headers, ordered
  zero-copy views, read-ahead) → :func:`leanstream.reader.as_tensor`;
- pipelined (the default on a GPU): Rust reader threads → a ring of pinned
  buffers → asynchronous copies on a side stream
  (:class:`leanstream.pipeline.DeviceStream`);

→ :func:`leanstream.quantize.materialize` → the module's parameter on the
target device. At any time at most one full-precision tensor is in hand
outside the file (plus, pipelined, the next one being copied).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import gc
import os
import re
import threading
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch
from torch import nn

from . import _core, cpu_layout, options
from .checkpoint import (
    load_config,
    read_config_dict,
    read_json,
)
from .download import HubDownload, locate
from .errors import (
    ConfigError,
    MismatchError,
    PlacementError,
)
from .families import (
    family,
    fp32_rule,
    quantization_config,
    record,
)
from .layers import plan_layers
from .matching import (
    KeyMap,
    Names,
    Target,
    expected_shapes,
    initialize,
    plan_targets,
    rename_keys,
    to_initialize,
)
from .meta import build_diffusers_model, build_empty_model, empty_parameters, meta_tensors
from .pipeline import DEFAULT_SLOT_BYTES, DEFAULT_SLOTS, DeviceStream, empty_pinned_cache
from .placement import Placing, Where, as_device, entry_of, misplaced, place_buffers, runs
from .prequantized import Prequantized
from .progress import byte_progress
from .quantize import (
    ExpertsQuantizer,
    QuantSpec,
    QuantType,
    materialize,
    replace_embeddings,
    replace_linears,
    replace_root,
)
from .reader import DTYPES, as_tensor


def load(
    source: str | os.PathLike[str],
    *,
    bits: int | Literal["auto"] | None = "auto",
    quant_type: QuantType = options.LEFT_OUT["quant_type"],
    double_quant: bool = options.LEFT_OUT["double_quant"],
    compute_dtype: torch.dtype | str | None = None,
    blocksize: int = options.LEFT_OUT["blocksize"],
    quant_storage: torch.dtype = options.LEFT_OUT["quant_storage"],
    threshold: float = options.LEFT_OUT["threshold"],
    skip_modules: list[str] | None = None,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    window: int = _core.DEFAULT_WINDOW,
    native_quantizer: bool = True,
    cpu_kernel: Literal["auto", "plain"] = "auto",
    quantize_embeddings: bool = False,
    quantize_lm_head: bool = False,
    pipeline: bool | None = None,
    threads: int | None = None,
    ring_bytes: int = DEFAULT_SLOTS * DEFAULT_SLOT_BYTES,
    torch_dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    quantization_config: Any = None,
    load_in_4bit: bool | None = None,
    load_in_8bit: bool | None = None,
    low_cpu_mem_usage: bool | None = None,
    device_map: Any = None,
    max_memory: dict[Any, int | str] | None = None,
    subfolder: str | None = None,
    variant: str | None = None,
    model_class: Any = None,
    ignore_unexpected: list[str] | None = None,
    keep_download: bool = True,
) -> Any:
    """Load a safetensors model, quantizing each linear weight as it streams in.

    A transformers checkpoint (``config.json`` with a ``model_type``) is built as a
    causal LM, or as ``model_class``; a diffusers model folder (``config.json`` with a
    ``_class_name``: a pipeline's ``transformer``, ``unet``, ...) as the diffusers class
    it names, quantized by diffusers' bitsandbytes rules.

    Args:
        source: a local folder, or a Hugging Face hub repo id (fetched with
            ``huggingface_hub``; ``revision``, ``token``, ``cache_dir``,
            ``local_files_only`` and ``HF_HUB_OFFLINE`` are honoured).
        bits: 4 (bitsandbytes ``Linear4bit``), 8 (LLM.int8 ``Linear8bitLt``), or
            16 / None (no quantization, streamed the same way). ``"auto"`` (the
            default): 4, or for a pre-quantized bitsandbytes checkpoint what it
            stores (its packed tensors are loaded as they are; an explicit ``bits``
            that differs from the checkpoint's is a :class:`ConfigError`, as are
            non-default ``quant_type``/``double_quant``/``blocksize``/``quant_storage``
            that disagree with it and any ``skip_modules``).
        quant_type: ``"nf4"`` or ``"fp4"`` (4-bit only).
        double_quant: quantize the 4-bit absmax statistics too.
        compute_dtype: dtype of 4-bit matmuls; default: the model's dtype.
        blocksize: 4-bit quantization block size.
        quant_storage: storage dtype of packed 4-bit weights.
        threshold: LLM.int8 outlier threshold.
        skip_modules: module names (or patterns, as transformers'
            ``llm_int8_skip_modules``) kept in full precision, in addition to
            ``lm_head``, tied weights and ``_keep_in_fp32_modules``.
        dtype: dtype of unquantized tensors; ``"auto"`` takes ``config.json``'s
            ``dtype``, else the checkpoint's.
        device: where the model lives and quantization runs; default ``"cuda"``
            when available, else ``"cpu"``.
        trust_remote_code: allow custom modeling code from the checkpoint.
        progress: show a progress bar (bytes, with rate).
        window: read-ahead window of the Rust reader (mapped, not pipelined), in bytes.
        native_quantizer: on the CPU, quantize with leanstream's Rust kernels
            (bit-identical to bitsandbytes', much faster); False: bitsandbytes' own.
        cpu_kernel: which bitsandbytes kernel 4-bit layers on the CPU run. ``"auto"``
            (the default): where bitsandbytes detects AVX512-BF16 it runs a fused
            kernel on weights it rearranges at their first forward; leanstream writes
            that layout while loading (bit-identical to bitsandbytes' conversion, with
            ``absmax`` in bfloat16 as it keeps it), so the first forward is as fast as
            the next (:mod:`leanstream.cpu_layout`). ``"plain"``: the plain kernel on
            every CPU (the same numerics everywhere; slower where the fused one exists).
        quantize_embeddings: also quantize every ``nn.Embedding`` (exactly that
            class) with bitsandbytes' ``Embedding4bit`` / ``Embedding8bit``.
        quantize_lm_head: also quantize the output embeddings (``lm_head``) as a
            ``Linear4bit`` / ``Linear8bitLt``. When input and output embeddings are
            tied they are one tensor: either flag quantizes it, once, and both
            modules share the quantized weight. Both flags need ``bits`` 4 or 8
            (:class:`ConfigError` otherwise); transformers cannot load such a model
            from disk: :func:`leanstream.save` writes it in leanstream's format.
        pipeline: overlap reading, host-to-device copies and quantization
            (:mod:`leanstream.pipeline`): Rust threads read chunks into a ring of
            pinned buffers, copies run on a side CUDA stream, each tensor is
            quantized on the device as soon as it has landed. ``None`` (the
            default): on for CUDA devices, off on the CPU (where quantizing
            straight from the mapped file copies less). The result is bit for
            bit the same either way.
        threads: reader threads of the pipeline (default: one per core, at most 8).
        ring_bytes: host memory of the pipeline's ring (pinned on CUDA; default
            128 MiB), split into 16 buffers; each is the largest chunk read and
            copied at once.
        torch_dtype: transformers' old name of ``dtype``.
        attn_implementation: passed to the model, as ``from_pretrained`` does
            (``"eager"``, ``"sdpa"``, ...).
        quantization_config: a ``BitsAndBytesConfig`` (or its dict) as the source of
            ``bits``, ``quant_type``, ``double_quant``, ``compute_dtype`` (its own
            default: float32), ``quant_storage``, ``threshold`` and ``skip_modules``;
            an option given explicitly (even as its default: ``quant_type="nf4"``
            against ``bnb_4bit_quant_type="fp4"``) that contradicts it is a
            :class:`ConfigError` naming both values; one that agrees is fine.
        load_in_4bit, load_in_8bit: ``bits=4`` / ``bits=8``.
        low_cpu_mem_usage: accepted and ignored: leanstream always streams.
        device_map: one device (``"cuda:0"``, ``0``, ``{"": "cpu"}``), or modules across
            devices: ``"auto"`` / ``"balanced"`` / ``"balanced_low_0"`` /
            ``"sequential"`` (planned by accelerate on the quantized model, with each
            tensor's real size; :mod:`leanstream.placement`) or a dict of module names
            to devices (``"cpu"``, ``0``, ``"cuda:1"``). CPU modules stay quantized and
            run on the CPU; accelerate's hooks move activations between devices. Plans
            that need ``"disk"`` are a :class:`ConfigError` before a byte is read.
            A plan over several devices is ``model.hf_device_map``, as in transformers.
        max_memory: the most each device may hold (``{0: "22GiB", "cpu": "48GiB"}``),
            as in transformers; default: what accelerate finds free.
        subfolder: the component folder inside ``source`` (a diffusers pipeline's
            ``"transformer"``, ``"unet"``); from the hub, only its files are fetched.
        variant: the weights variant to load (``"fp16"``: ``*.fp16.safetensors`` and
            its index); a folder holding several variants needs one
            (:class:`ConfigError` otherwise, listing them).
        model_class: the transformers class to build: a model class (``BertModel``)
            or an ``Auto*`` class (``AutoModelForSeq2SeqLM``,
            ``AutoModelForImageTextToText``). Default: the first class the config's
            ``architectures`` names (the class the checkpoint was saved from), else
            the config's causal LM class.
        ignore_unexpected: patterns (regular expressions, searched in checkpoint
            names) of checkpoint tensors the model does not have that may be left
            out, e.g. the vision tower of a multimodal checkpoint loaded as a
            text-only model. Any other extra tensor is a :class:`MismatchError`; a
            pattern that matches no extra tensor is a :class:`ConfigError`.
        keep_download: for a hub repo whose shards are not in the cache, which are
            streamed as they download (:mod:`leanstream.download`: each tensor is
            quantized as soon as its bytes are in, every shard checked against the
            hub's sha256). True (the default): the shards end in the hub cache as
            ``snapshot_download`` leaves them, so the next load is local. False: no
            full-precision bytes are kept on disk: each piece is dropped once read and
            hashed, about 1 GiB at most is on disk at once, and a second load downloads
            again (save the quantized model with :func:`leanstream.save` instead).

    Options that would do nothing (4-bit options with ``bits=8``, ``threshold`` with
    ``bits=4``, ``skip_modules`` with ``bits=None`` or matching no layer a load could
    quantize, ``ignore_unexpected`` matching no extra tensor) are a :class:`ConfigError`.

    Which layers are quantized follows the library's rules (transformers':
    ``Conv1D`` and exactly ``nn.Linear``, less ``modules_to_not_convert``), and three of
    leanstream's (:mod:`leanstream.layers`): an ``nn.Linear`` subclass that keeps
    ``nn.Linear``'s forward is quantized too; a layer whose weight a forward reads
    directly (Mamba's ``dt_proj``) stays in full precision; MoE experts weights no load
    can quantize (Llama 4's, used whole; DBRX's, 2-D) stay too, with a ``UserWarning``.
    ``inspect`` lists them all.

    Returns:
        A ``transformers.PreTrainedModel`` in eval mode whose
        ``config.quantization_config`` describes what was done.

    Example:
        >>> model = leanstream.load("meta-llama/Llama-3.2-1B-Instruct", bits=4)  # doctest: +SKIP
        >>> prompt = tokenizer("The meaning of life is", return_tensors="pt")  # doctest: +SKIP
        >>> model.generate(**prompt, max_new_tokens=32)  # doctest: +SKIP
    """
    del low_cpu_mem_usage  # the load always streams
    chosen, spec = _choose(
        dict(
            bits=bits,
            quant_type=quant_type,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
            blocksize=blocksize,
            quant_storage=quant_storage,
            threshold=threshold,
            skip_modules=skip_modules,
            dtype=dtype,
            device=device,
        ),
        torch_dtype=torch_dtype,
        quantization_config=quantization_config,
        load_in_4bit=load_in_4bit,
        load_in_8bit=load_in_8bit,
        device_map=device_map,
        native_quantizer=native_quantizer,
        cpu_kernel=cpu_kernel,
        quantize_embeddings=quantize_embeddings,
        quantize_lm_head=quantize_lm_head,
    )
    folder, weights, download = locate(
        source,
        subfolder=subfolder,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        variant=variant,
        keep=keep_download,
        progress=progress,
    )
    with download or contextlib.nullcontext():
        _refuse_pipeline_folder(folder)
        config_dict = read_config_dict(folder)  # a missing or malformed config.json is named first
        diffusers_class = _diffusers_class(folder, config_dict)

        def build() -> tuple[Any, Any]:
            if diffusers_class is not None:
                if model_class is not None:
                    raise ConfigError(
                        f"model_class={model_class!r}: {folder / 'config.json'} is a diffusers "
                        f"config, built as the class it names ({diffusers_class.__name__})"
                    )
                return (
                    lambda dtype: build_diffusers_model(diffusers_class, folder),
                    _SavedConfig(config_dict),
                )
            config = load_config(folder, trust_remote_code=trust_remote_code)
            return (
                lambda dtype: build_empty_model(
                    config,
                    trust_remote_code=trust_remote_code,
                    attn_implementation=attn_implementation,
                    model_class=model_class,
                    dtype=dtype,
                ),
                config,
            )

        model = _run(
            folder,
            weights,
            build,
            chosen,
            spec,
            progress=progress,
            source=_source(chosen, pipeline, window, threads, ring_bytes, download),
            ignore_unexpected=ignore_unexpected,
            placing=_placing(chosen, max_memory),
        )
        if family(model) == "transformers":
            _load_generation_config(model, folder)
        _record_source(model, folder)
        return model


def load_into(
    model: nn.Module | Callable[[], nn.Module],
    source: str | os.PathLike[str],
    *,
    key_map: KeyMap = None,
    init_missing: list[str] | None = None,
    ignore_unexpected: list[str] | None = None,
    bits: int | Literal["auto"] | None = "auto",
    quant_type: QuantType = options.LEFT_OUT["quant_type"],
    double_quant: bool = options.LEFT_OUT["double_quant"],
    compute_dtype: torch.dtype | str | None = None,
    blocksize: int = options.LEFT_OUT["blocksize"],
    quant_storage: torch.dtype = options.LEFT_OUT["quant_storage"],
    threshold: float = options.LEFT_OUT["threshold"],
    skip_modules: list[str] | None = None,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device | None = None,
    subfolder: str | None = None,
    variant: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    progress: bool = True,
    window: int = _core.DEFAULT_WINDOW,
    native_quantizer: bool = True,
    cpu_kernel: Literal["auto", "plain"] = "auto",
    quantize_embeddings: bool = False,
    pipeline: bool | None = None,
    threads: int | None = None,
    ring_bytes: int = DEFAULT_SLOTS * DEFAULT_SLOT_BYTES,
    quantization_config: Any = None,
    device_map: Any = None,
    max_memory: dict[Any, int | str] | None = None,
    keep_download: bool = True,
) -> Any:
    """Stream a safetensors checkpoint into a model you built, quantizing its linears.

    The model is built on ``meta`` by the caller (parameters on ``meta``; for instance
    under :func:`leanstream.empty_parameters`, or accelerate's ``init_empty_weights``),
    or ``model`` is a zero-argument factory that leanstream calls under
    :func:`leanstream.empty_parameters` (thread-safe, and buffers computed in
    ``__init__`` stay real). Every ``nn.Linear`` is replaced by a bitsandbytes layer
    (``Linear4bit`` / ``Linear8bitLt``) unless ``skip_modules`` names it, and each
    checkpoint tensor is quantized on ``device`` as it streams in. Works for any
    ``nn.Module``: a transformers or diffusers model follows its library's rules and
    gets its markers (see :func:`load`); a plain module records the settings as
    ``model.quantization_config``.

    Args:
        model: the model (parameters on ``meta``; real ones are replaced), or a
            zero-argument callable that builds it.
        source: a safetensors file, an ``*.index.json``, a checkpoint folder, or a
            hub repo id (``subfolder``, ``variant``, ``revision``, ``token``,
            ``cache_dir``, ``local_files_only`` as in :func:`load`).
        key_map: how checkpoint names become the model's parameter names: a dict
            (``{checkpoint_name: model_name}``; names not in it are kept), a list of
            ``(regex, replacement)`` pairs applied in order with ``re.sub``, or a
            function from checkpoint name to model name.
        init_missing: patterns (regular expressions, searched in the model's
            parameter and buffer names) of tensors the checkpoint may lack. They are
            made on ``device`` by their module's ``reset_parameters`` (the outermost
            module made only of such tensors that has one, so a LoRA-like module's own
            zero init applies), or, in a transformers model, by its ``_init_weights``;
            then quantized like loaded ones. Any other missing tensor is a
            :class:`MismatchError`.
        ignore_unexpected: patterns of checkpoint tensors the model lacks that may be
            left out (any other is a :class:`MismatchError`; a pattern matching none
            is a :class:`ConfigError`).
        bits: 4, 8, or None (16: nothing quantized, streamed the same way);
            ``"auto"`` (the default): 4, or what a pre-quantized bitsandbytes
            checkpoint (one whose ``config.json`` says so) stores, loaded as stored.

    The other options are :func:`load`'s.

    Returns:
        ``model`` (or what the factory built), in eval mode, with parameters and
        buffers on ``device``. A model that is itself a layer to quantize (a bare
        ``nn.Linear``; an ``nn.Embedding`` with ``quantize_embeddings=True``) cannot
        replace itself: the bitsandbytes layer that replaces it is returned (the
        module given is left on ``meta``).
    """
    chosen, spec = _choose(
        dict(
            bits=bits,
            quant_type=quant_type,
            double_quant=double_quant,
            compute_dtype=compute_dtype,
            blocksize=blocksize,
            quant_storage=quant_storage,
            threshold=threshold,
            skip_modules=skip_modules,
            dtype=dtype,
            device=device,
        ),
        quantization_config=quantization_config,
        device_map=device_map,
        native_quantizer=native_quantizer,
        cpu_kernel=cpu_kernel,
        quantize_embeddings=quantize_embeddings,
        quantize_lm_head=False,
    )
    if not isinstance(model, nn.Module) and not callable(model):
        raise ConfigError(
            f"load_into takes an nn.Module or a zero-argument callable, not {type(model).__name__}"
        )
    path = Path(os.fspath(source)).expanduser()
    download = None
    if path.is_file():
        if subfolder is not None or variant is not None:
            raise ConfigError(f"{path}: subfolder and variant apply to folders and repos only")
        folder, weights = path.resolve().parent, path.resolve()
    else:
        folder, weights, download = locate(
            source,
            subfolder=subfolder,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            variant=variant,
            keep=keep_download,
            progress=progress,
        )
    with download or contextlib.nullcontext():
        return _load_into(
            model,
            folder,
            weights,
            download,
            chosen,
            spec,
            progress,
            pipeline,
            window,
            threads,
            ring_bytes,
            key_map,
            init_missing,
            ignore_unexpected,
            max_memory,
        )


def _load_into(
    model: Any,
    folder: Path,
    weights: Path | list[Path],
    download: HubDownload | None,
    chosen: dict[str, Any],
    spec: QuantSpec,
    progress: bool,
    pipeline: bool | None,
    window: int,
    threads: int | None,
    ring_bytes: int,
    key_map: KeyMap,
    init_missing: list[str] | None,
    ignore_unexpected: list[str] | None,
    max_memory: dict[Any, int | str] | None,
) -> Any:
    """:func:`load_into` once the checkpoint is located."""
    given = model if isinstance(model, nn.Module) else None
    factory = model

    def build() -> tuple[Any, Any]:
        def make(dtype: torch.dtype) -> nn.Module:
            if given is not None:
                return given
            with empty_parameters():
                built = factory()  # type: ignore[operator]
            if not isinstance(built, nn.Module):
                raise ConfigError(
                    f"the factory given to load_into returned {type(built).__name__}, "
                    "not an nn.Module"
                )
            return built

        return make, _saved_quantization(folder)

    loaded = _run(
        folder,
        weights,
        build,
        chosen,
        spec,
        progress=progress,
        source=_source(chosen, pipeline, window, threads, ring_bytes, download),
        key_map=key_map,
        init_missing=init_missing,
        ignore_unexpected=ignore_unexpected,
        placing=_placing(chosen, max_memory),
    )
    _record_source(loaded, folder)
    return loaded


def _placing(chosen: dict[str, Any], max_memory: dict[Any, int | str] | None) -> Placing | None:
    """What the ``device_map`` (as :func:`options.resolve` kept it) and ``max_memory``
    ask (None: ``device`` only)."""
    device_map = chosen["device_map"]
    if device_map is None:
        if max_memory is not None:
            raise ConfigError("max_memory applies with device_map='auto' (or another plan)")
        return None
    if options.single_device(device_map):
        if max_memory is not None:
            raise ConfigError(f"max_memory has nothing to plan with device_map={device_map!r}")
        return Placing({"": entry_of(chosen["device"])}, None)
    return Placing(device_map, max_memory)


def _choose(given: dict[str, Any], **extra: Any) -> tuple[dict[str, Any], QuantSpec]:
    """The options ``load`` / ``load_into`` resolve (transformers' aliases and
    ``quantization_config`` reconciled), and the :class:`QuantSpec` they give."""
    flags = {
        k: extra.pop(k)
        for k in ("native_quantizer", "cpu_kernel", "quantize_embeddings", "quantize_lm_head")
    }
    chosen = options.resolve(given, **extra)
    bits, compute_dtype = chosen["bits"], chosen["compute_dtype"]
    spec = QuantSpec(
        bits=4 if bits == "auto" else 16 if bits is None else bits,
        quant_type=chosen["quant_type"],
        double_quant=chosen["double_quant"],
        compute_dtype=_as_dtype(compute_dtype, "compute_dtype") if compute_dtype else None,
        blocksize=chosen["blocksize"],
        quant_storage=chosen["quant_storage"],
        threshold=chosen["threshold"],
        native=flags["native_quantizer"],
        cpu_kernel=flags["cpu_kernel"],
        embeddings=flags["quantize_embeddings"],
        lm_head=flags["quantize_lm_head"],
    )
    chosen["device"] = as_device(chosen["device"])
    return chosen, spec


def _source(
    chosen: dict[str, Any],
    pipeline: bool | None,
    window: int,
    threads: int | None,
    ring: int,
    download: HubDownload | None = None,
) -> _Source:
    if ring < DEFAULT_SLOTS:
        raise ConfigError(f"ring_bytes must be at least {DEFAULT_SLOTS}, got {ring}")
    if pipeline is None:
        pipeline = chosen["device"].type == "cuda"
    return _Source(
        pipeline=pipeline, window=window, threads=threads, ring_bytes=ring, download=download
    )


_gc_lock = threading.Lock()
_gc_loads = 0  # loads running, in every thread
_gc_was_enabled = False


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while loads run (in any thread), back as it
    was after the last: a load makes hundreds of thousands of objects (a model's
    modules, parameters, quantization states) that are not garbage, and full collections
    over them took a quarter of a second of a second load of a 1B model in one process."""
    global _gc_loads, _gc_was_enabled
    with _gc_lock:
        if _gc_loads == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_loads += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_loads -= 1
            if _gc_loads == 0 and _gc_was_enabled:
                gc.enable()


def _run(
    folder: Path,
    weights: Path | list[Path],
    build: Callable[[], tuple[Callable[[torch.dtype], nn.Module], Any]],
    chosen: dict[str, Any],
    spec: QuantSpec,
    *,
    progress: bool,
    source: _Source,
    key_map: KeyMap = None,
    init_missing: list[str] | None = None,
    ignore_unexpected: list[str] | None = None,
    placing: Placing | None = None,
) -> Any:
    """Validate the shards, build the model (``build`` returns the model's factory,
    called with the model's dtype, and the config whose ``quantization_config`` says
    whether the checkpoint is pre-quantized), and stream the checkpoint into it."""
    bits, skip_modules = chosen["bits"], chosen["skip_modules"]
    # validate the shards, then read ahead while transformers imports the model's
    # code, parses config.json and builds the empty model (most of a second)
    download = source.download
    arrivals = download.arrivals if download is not None else None
    with (
        _gc_paused(),
        _core.Checkpoint(weights, arrivals=arrivals) as ckpt,
        ckpt.warm(likely_order(ckpt.keys()), budget=_warm_budget()) as warm,
    ):
        if download is not None:
            download.opened()
        make_model, config = build()
        prequantized = None
        if getattr(config, "quantization_config", None) is not None:
            prequantized = Prequantized.from_config(
                config,
                folder,
                bits=bits,
                requested=spec,
                skip_modules=skip_modules,
                compute_dtype_given=chosen["compute_dtype"] is not None,
            )
            spec = prequantized.spec
        else:
            options.check(chosen, spec.bits)
        model_dtype = _model_dtype(chosen["dtype"], config, ckpt)
        model = make_model(model_dtype)
        try:
            model = _fill(
                model,
                ckpt,
                folder,
                spec,
                skip_modules,
                model_dtype,
                chosen["device"],
                progress,
                source,
                prequantized,
                warm,
                Names(key_map, init_missing, ignore_unexpected),
                placing,
            )
            if download is not None:
                download.finish()  # every shard verified (its hash is the hub's), in place
        except BaseException as err:
            # the traceback keeps this frame and those below alive (pytest.raises, a
            # notebook's sys.last_traceback): let it keep neither the partly built model
            # nor views of the mapped shards
            model = None
            traceback.clear_frames(err.__traceback__)
            raise
    return model


def _fill(
    model: Any,
    ckpt: _core.Checkpoint,
    folder: Path,
    spec: QuantSpec,
    skip_modules: list[str] | None,
    model_dtype: torch.dtype,
    device: torch.device,
    progress: bool,
    source: _Source,
    prequantized: Prequantized | None = None,
    warm: _core.Warmup | None = None,
    names: Names | None = None,
    placing: Placing | None = None,
) -> Any:
    """Replace the layers of the meta ``model``, plan where each tensor goes (``device``,
    or ``placing``'s device_map), stream the checkpoint into it, and leave on it what its
    library's bitsandbytes loading leaves. Returns the model: ``model``, or the
    bitsandbytes layer that replaces it when it is itself a layer to quantize."""
    names = names or Names()
    expected = expected_shapes(model)
    plan = plan_layers(model, spec, expected, skip_modules=skip_modules, prequantized=prequantized)
    kind, skip, embeddings, output = plan.kind, plan.skip, plan.embeddings, plan.output
    if spec.quantized:
        _say_kept_experts(model, plan.kept_experts)
    keep_fp32 = fp32_rule(model, kind, model_dtype)
    by_name, merged = rename_keys(model, ckpt, folder, expected, names)
    # tensors the checkpoint lacks that the caller asked to initialize: made now, by the
    # modules as built (before their linears are replaced), quantized below like the rest
    initialized = initialize(
        model,
        to_initialize(model, expected, by_name, merged, names),
        device if placing is None else torch.device("cpu"),  # moved where planned below
    )
    replaced: dict[str, bool] = {}
    if spec.quantized:
        # a bare layer (the model is the Linear) cannot replace itself: its
        # bitsandbytes layer is the model from here on
        model, replaced = replace_root(model, spec, skip, embeddings, model_dtype)
        replaced.update(replace_linears(model, spec, skip))
    if embeddings:
        replace_embeddings(model, spec, embeddings, model_dtype)
        replaced.update(dict.fromkeys(embeddings, False))
    # 3-D experts weights: quantized piece by piece into place (or assembled unquantized),
    # or stored quantized (leanstream format)
    experts = plan.experts
    where = Where(device)
    if placing is not None:
        where = placing.plan(model, spec, experts, keep_fp32, model_dtype)
        device = where.main
    targets, ties = plan_targets(
        model,
        ckpt,
        folder,
        expected,
        replaced,
        model_dtype,
        keep_fp32,
        (by_name, merged),
        set(initialized),
        names,
        prequantized,
    )
    keys = [k for t in targets for k in (*(key for _, key in t.stats or ()), t.key)]
    download = source.download
    if download is not None:
        # download in the order the tensors are read
        download.prioritize([(ckpt[k].file, ckpt[k].start, ckpt[k].end) for k in keys])
    taken = 0
    # pre-quantized statistics are parsed and packed on the host (Prequantized.materialize)
    host = {key for t in targets for _, key in t.stats or ()}
    merging: dict[str, Any] = {}  # name -> ExpertsQuantizer or _Merged, while pieces arrive

    if warm is not None:
        warm.stop()  # the ordered reads start now: the warm-up would compete
    with (
        where.kernel_streams(),
        byte_progress(
            sum(ckpt[key].nbytes for key in keys), f"leanstream {folder.name}", enabled=progress
        ) as bar,
    ):
        trim = _MallocTrim() if "cpu" in {d.type for d in where.devices} else None
        # one stream of tensors per run of consecutive tensors on one device (a single run
        # on one device): a CUDA run through the pipeline when it is on, a CPU run mapped
        for run_device, run in runs(targets, where):
            run_source = source
            if where.several and run_device.type != "cuda":
                run_source = dataclasses.replace(source, pipeline=False)
            run_keys = [k for t in run for k in (*(key for _, key in t.stats or ()), t.key)]
            with run_source.open(ckpt, run_keys, run_device, host & set(run_keys)) as tensors:
                owned = run_source.pipeline
                at = 0
                while at < len(run):
                    if download is None:
                        count, nbytes = _quantize_pieces(
                            run, at, tensors, ckpt, spec, run_device, experts, merging
                        )
                        if count:
                            at += count
                            taken += count
                            bar.update(nbytes)
                            continue
                    target = run[at]
                    at += 1
                    stats, nbytes = {}, 0
                    for stat, stat_key in target.stats or ():
                        stats[stat] = tensors.take(stat_key)
                        nbytes += stats[stat].nbytes
                    tensor = tensors.take(target.key)
                    nbytes += tensor.nbytes
                    _put(
                        target,
                        tensor,
                        stats,
                        run_device,
                        owned,
                        spec,
                        prequantized,
                        experts,
                        merging,
                    )
                    tensors.used()
                    taken += len(target.stats or ()) + 1
                    if download is not None:
                        download.consumed(taken - 1)
                    del tensor, stats
                    bar.update(nbytes)
                    if trim is not None:
                        trim.freed(nbytes)
                tensors.finish()
        # the initialized tensors too: on the stream the kernels run on (kernel_stream)
        for name, tensor in initialized.items():
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            materialize(
                module,
                attr,
                tensor,
                device=where(name),
                dtype=(torch.float32 if keep_fp32(module_name, attr) else model_dtype)
                if tensor.is_floating_point()
                else None,
                spec=spec,
                transpose=replaced.get(module_name, False) and attr == "weight",
                buffer=attr in module._buffers,
                owned=True,
            )
        initialized.clear()
    assert not merging, sorted(merging)
    _tie(model, ties)
    _share_quantized(model, output)
    left = meta_tensors(model)
    if left:
        raise MismatchError(str(folder), missing=left)
    place_buffers(model, where)
    elsewhere = misplaced(model, where)
    if elsewhere:
        raise PlacementError(elsewhere, device if not where.several else None)
    if spec.quantized:
        compute = spec.compute_dtype or model_dtype
        for module in model.modules():
            if hasattr(module, "compute_dtype") and module.compute_dtype is None:
                module.compute_dtype = compute
            if hasattr(module, "compute_type_is_set"):
                # as transformers' layers: the compute dtype is the configured one, not
                # the dtype of the first input (fp32 after prepare_model_for_kbit_training)
                module.compute_type_is_set = True
        config = quantization_config(kind, spec, sorted(skip), compute)
        if experts:
            from .experts import use_quantized_experts

            use_quantized_experts(model, threshold=spec.threshold)
            # quantized with leanstream (transformers + bitsandbytes keep them in bf16)
            config.leanstream_quantized_experts = sorted(experts)
        if embeddings or output:
            # what leanstream.save writes in its own format (transformers cannot load it)
            config.leanstream_quantized_embeddings = sorted(embeddings)
            config.leanstream_quantized_lm_head = sorted(output)
        record(model, kind, config, sorted(skip), prequantized is not None)
    _set_requires_grad(model, kind)
    if kind == "transformers":
        model.config.dtype = model_dtype
    if placing is not None:
        where.dispatch(model)
    # the bitsandbytes layers were created after the model's eval(): LLM.int8 takes
    # another code path in training mode
    return model.eval()


def _say_kept_experts(model: nn.Module, kept: dict[str, str]) -> None:
    """A quantized load of a mixture-of-experts model whose experts stay in full precision
    (``kept``: :func:`leanstream.layers.kept_experts`) says so (a ``UserWarning``): they
    are most of the model."""
    if not kept:
        return
    name, why = next(iter(kept.items()))
    warnings.warn(
        f"leanstream: {len(kept)} experts weights of {type(model).__name__} stay in full "
        f"precision, e.g. {name}: {why.removeprefix('kept: ')} (`leanstream inspect` lists "
        "them all)",
        UserWarning,
        stacklevel=4,
    )


def _put(
    target: Target,
    tensor: torch.Tensor,
    stats: dict[str, torch.Tensor],
    device: torch.device,
    owned: bool,
    spec: QuantSpec,
    prequantized: Prequantized | None,
    experts: dict[str, Any],
    merging: dict[str, Any],
) -> None:
    """Make one streamed checkpoint tensor (with its statistics, pre-quantized) its model
    tensor on ``device``: loaded as stored, quantized, or a piece of a merged weight."""
    if target.stats is not None and prequantized is not None:
        if target.name in experts:
            prequantized.materialize_experts(
                target.name,
                target.module,
                target.attr,
                tensor,
                stats,
                shape=experts[target.name],
                dtype=target.dtype,  # type: ignore[arg-type]
                device=device,
                owned=owned,
            )
        else:
            prequantized.materialize(
                target.name, target.module, tensor, stats, device=device, owned=owned
            )
    elif target.name in experts or target.piece is not None:
        _merge(merging, experts, target, tensor, spec, device, owned)
    else:
        materialize(
            target.module,
            target.attr,
            tensor,
            device=device,
            dtype=target.dtype if tensor.is_floating_point() else None,
            spec=spec,
            transpose=target.transpose,
            buffer=target.buffer,
            owned=owned,
        )


@dataclass(frozen=True)
class _Source:
    """How tensors are delivered: mapped views, or the overlapped pipeline."""

    pipeline: bool
    window: int
    threads: int | None
    ring_bytes: int
    #: the shards still downloading (:mod:`leanstream.download`), if any
    download: HubDownload | None = None

    @contextlib.contextmanager
    def open(
        self, ckpt: _core.Checkpoint, names: list[str], device: torch.device, host: set[str]
    ) -> Iterator[_Mapped | _Pipelined]:
        """The tensors ``names``, in order; pipelined, those in ``host`` stay on the host
        (mapped, every tensor is a host view)."""
        if self.pipeline:
            with DeviceStream(
                ckpt,
                names,
                device,
                slot_bytes=self.ring_bytes // DEFAULT_SLOTS,
                slots=DEFAULT_SLOTS,
                threads=self.threads,
                host=host,
            ) as stream:
                yield _Pipelined(stream)
        else:
            try:
                with ckpt.stream(names, window=self.window) as stream:
                    yield _Mapped(stream)
            finally:
                if device.type == "cuda":
                    # statistics and code tables went to the device from pinned memory
                    # (to_device_at_once, _code): give back the blocks torch cached
                    empty_pinned_cache()


class _Mapped:
    """Zero-copy read-only views of the mapped shards, checked after use."""

    def __init__(self, stream: _core.TensorStream) -> None:
        self.stream = stream
        self.total_bytes = stream.total_bytes

    def take(self, key: str) -> torch.Tensor:
        got, view = next(self.stream)
        assert got == key
        return as_tensor(view)

    def used(self) -> None:
        self.stream.check()  # the file did not shrink under the bytes just used

    def finish(self) -> None:
        assert len(self.stream) == 0


class _Pipelined:
    """Fresh tensors on the device from :class:`DeviceStream` (checked as read)."""

    def __init__(self, stream: DeviceStream) -> None:
        self.tensors = iter(stream)
        self.total_bytes = stream.total_bytes

    def take(self, key: str) -> torch.Tensor:
        got, tensor = next(self.tensors)
        assert got == key
        return tensor

    def used(self) -> None:
        pass

    def finish(self) -> None:
        assert next(self.tensors, None) is None


def _warm_budget() -> int | None:
    """At most a quarter of the memory available now goes into the page cache
    ahead of need: on a small machine, reading further ahead would evict what
    was read first before it is used. None (no limit) where /proc is not."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except (OSError, ValueError, IndexError):
        pass
    return None


def likely_order(keys: list[str]) -> list[str]:
    """Guess, before the model exists, the order in which its tensors will be
    asked for: numbered blocks in numeric order (``layers.2`` before
    ``layers.10``), embeddings first, other unnumbered tensors (final norm,
    ``lm_head``) last. Only a guess for the warm-up: a wrong one costs nothing
    but reading those bytes into the page cache early."""

    def rank(key: str) -> tuple[int, list[tuple[int, str]]]:
        parts = re.split(r"(\d+)", key)
        natural = [(int(p), "") if p.isdigit() else (-1, p) for p in parts if p]
        if any(p.isdigit() for p in parts):
            return 1, natural
        return (0 if "embed" in key or "wte" in key or "wpe" in key else 2), natural

    return sorted(keys, key=rank)


class _MallocTrim:
    """Give freed heap memory back to the OS every ``every`` bytes of input.

    CPU quantization makes large short-lived temporaries; glibc raises its mmap
    threshold after the first large free, so later ones come from the heap and
    stay resident after ``free`` (peak RSS grew by hundreds of MB on a 300 MB
    checkpoint). ``malloc_trim(0)`` returns them. A no-op without glibc.
    """

    def __init__(self, every: int = 32 << 20) -> None:
        self.every = every
        self.pending = 0
        self.trim = _malloc_trim()

    def freed(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.trim is not None and self.pending >= self.every:
            self.pending = 0
            self.trim(0)


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _tie(model: Any, ties: dict[str, str]) -> None:
    """Make each tied name share its source's parameter. Pairs stored twice in the
    checkpoint are tied only when the stored values are equal (as transformers does)."""
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target not in ties and source not in ties:
            a, b = model.get_parameter(target), model.get_parameter(source)
            if a is not b and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b):
                ties[target] = source
    for target, source in ties.items():
        module_name, _, attr = target.rpartition(".")
        model.get_submodule(module_name)._parameters[attr] = model.get_parameter(source)


def _share_quantized(model: Any, output: set[str]) -> None:
    """Let a quantized ``lm_head`` tied to a quantized embedding share its weight safely.

    bitsandbytes' ``Linear4bit`` repacks its weight in place at the first CPU forward
    (AVX512-BF16), which the embedding would then misread: it is switched off for a
    shared weight. ``Linear8bitLt`` moves ``CB``/``SCB`` off the weight into its own
    state at the first forward, which ``Embedding8bit`` needs: done here, keeping ``SCB``.
    """
    import bitsandbytes as bnb

    embedding_weights = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, bnb.nn.Embedding4bit | bnb.nn.Embedding8bit)
    }
    for name in output:
        module = model.get_submodule(name)
        if id(module.weight) not in embedding_weights:
            continue
        if isinstance(module, bnb.nn.Linear4bit):
            if cpu_layout.is_packed(module.weight.quant_state):
                cpu_layout.unpack(module)  # the embedding reads the plain layout
            module.support_avx512bf16_for_cpu = False
        elif isinstance(module, bnb.nn.Linear8bitLt):
            module.state.CB = module.weight.data
            module.state.SCB = module.weight.SCB
            module.weight.CB = None


def _merge(
    merging: dict[str, Any],
    experts: dict[str, tuple[int, int, int]],
    target: Target,
    tensor: torch.Tensor,
    spec: QuantSpec,
    device: torch.device,
    owned: bool,
) -> None:
    """Put one streamed piece (or the whole) of a 3-D experts weight in its place: quantized
    into the parameter's storage (:class:`ExpertsQuantizer`), or, unquantized, copied into
    the merged tensor; the parameter is set once its last piece is in."""
    sink = _sink(merging, experts, target, spec, device)
    if sink.add(tensor, _first_row(target), owned=owned):
        target.module._parameters[target.attr] = sink.result()
        del merging[target.name]


def _sink(
    merging: dict[str, Any],
    experts: dict[str, tuple[int, int, int]],
    target: Target,
    spec: QuantSpec,
    device: torch.device,
) -> ExpertsQuantizer | _Merged:
    """Where the pieces of ``target``'s 3-D experts weight go: made at its first piece."""
    sink = merging.get(target.name)
    if sink is None:
        shape = tuple(int(d) for d in target.module._parameters[target.attr].shape)
        if target.name in experts:
            sink = ExpertsQuantizer(target.name, shape, spec, device, target.dtype)  # type: ignore[arg-type]
        else:
            sink = _Merged(shape, device, target.dtype)
        merging[target.name] = sink
    return sink


def _first_row(target: Target) -> int:
    """The first row of ``target``'s piece in the ``[E * R, C]`` view of its experts
    weight (0 for a weight stored whole)."""
    if target.piece is None:
        return 0
    rows = int(target.module._parameters[target.attr].shape[1])
    return target.piece.expert * rows + target.piece.part * rows // target.piece.parts


#: most bytes of expert pieces quantized by one call (:func:`_quantize_pieces`)
_PIECES_BYTES = 64 << 20


def _quantize_pieces(
    run: list[Target],
    start: int,
    tensors: _Mapped | _Pipelined,
    ckpt: _core.Checkpoint,
    spec: QuantSpec,
    device: torch.device,
    experts: dict[str, tuple[int, int, int]],
    merging: dict[str, Any],
) -> tuple[int, int]:
    """Quantize ``run[start]`` and the pieces of the same experts weight after it (up to
    :data:`_PIECES_BYTES`) straight from the mapped stream, in one Rust call that takes
    whole pieces on each of torch's threads (:meth:`ExpertsQuantizer.add_streamed`):
    thousands of small expert tensors cost no Python each. Returns ``(targets, bytes)``
    taken, ``(0, 0)`` where ``run[start]`` is not such a piece (the caller takes it)."""
    target = run[start]
    if (
        not isinstance(tensors, _Mapped)
        or target.piece is None
        or target.stats is not None
        or target.name not in experts
    ):
        return 0, 0
    sink = _sink(merging, experts, target, spec, device)
    assert isinstance(sink, ExpertsQuantizer)
    pieces: list[tuple[_core.TensorInfo, int]] = []
    nbytes = 0
    for at in range(start, len(run)):
        candidate = run[at]
        info = ckpt[candidate.key]
        if (
            candidate.name != target.name
            or candidate.piece is None
            or candidate.stats is not None
            or not sink.streams(info)
            or (pieces and nbytes + info.nbytes > _PIECES_BYTES)
        ):
            break
        pieces.append((info, _first_row(candidate)))
        nbytes += info.nbytes
    if not pieces:
        return 0, 0
    if sink.add_streamed(tensors.stream, pieces, torch.get_num_threads()):
        target.module._parameters[target.attr] = sink.result()
        del merging[target.name]
    return len(pieces), nbytes


class _Merged:
    """An unquantized merged experts weight, assembled from its pieces in place."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype | None):
        self.tensor = torch.empty(shape, dtype=dtype, device=device)
        self.rows = self.tensor.view(-1, shape[-1])
        self.done = 0

    def add(self, tensor: torch.Tensor, first_row: int, *, owned: bool) -> bool:
        piece = tensor.reshape(-1, self.rows.shape[1])
        self.rows[first_row : first_row + piece.shape[0]].copy_(piece)
        self.done += piece.shape[0]
        return self.done == self.rows.shape[0]

    def result(self) -> nn.Parameter:
        return nn.Parameter(self.tensor, requires_grad=False)


def _set_requires_grad(model: nn.Module, kind: str) -> None:
    """``requires_grad`` as the model's library leaves it: True for every floating-point
    parameter (norms, embeddings, biases, and all of a 16-bit model), False for the
    quantized weights (bitsandbytes' parameters); diffusers also freezes the biases of
    the layers it quantizes (its ``replace_with_bnb_linear``)."""
    import bitsandbytes as bnb

    frozen = set()
    if kind == "diffusers":
        layers = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
        frozen = {id(p) for m in model.modules() if isinstance(m, layers) for p in m.parameters()}
    for param in model.parameters():
        quantized = isinstance(param, bnb.nn.Params4bit | bnb.nn.Int8Params)
        param.requires_grad_(
            param.is_floating_point() and not quantized and id(param) not in frozen
        )


def _model_dtype(dtype: torch.dtype | str, config: Any, ckpt: _core.Checkpoint) -> torch.dtype:
    if dtype != "auto":
        return _as_dtype(dtype, "dtype")
    configured = getattr(config, "dtype", None)
    if configured is not None:
        return _as_dtype(configured, "config.json dtype")
    for key in ckpt.keys():
        if _STATISTICS.search(key):
            continue  # bitsandbytes' float32 statistics are not the model's dtype
        stored = DTYPES.get(ckpt[key].dtype)
        if stored is not None and stored.is_floating_point:
            return stored
    return torch.float32


#: names of bitsandbytes' serialized statistics (pre-quantized checkpoints)
_STATISTICS = re.compile(r"(^|\.)(SCB|weight_format|absmax|quant_map|nested_\w+|quant_state\.\S+)$")


def _as_dtype(value: torch.dtype | str, what: str) -> torch.dtype:
    if isinstance(value, torch.dtype):
        result = value
    else:
        result = getattr(torch, str(value).removeprefix("torch."), None)
    if not isinstance(result, torch.dtype) or not result.is_floating_point:
        raise ConfigError(f"{what} must be a floating-point torch dtype, got {value!r}")
    return result


def _record_source(model: nn.Module, folder: Path) -> None:
    """Remember the folder the weights were read from (``_leanstream_source``), so that
    :func:`leanstream.save` refuses to write over it whatever ``config.name_or_path``
    says by then."""
    model._leanstream_source = folder.resolve()


def _refuse_pipeline_folder(folder: Path) -> None:
    """A diffusers pipeline folder (``model_index.json``, one folder per component) is
    not one model: name its model components and ``subfolder``."""
    index = folder / "model_index.json"
    if (folder / "config.json").exists() or not index.is_file():
        return
    entries = read_json(index)
    components = sorted(
        name
        for name, value in (entries.items() if isinstance(entries, dict) else [])
        if isinstance(value, list) and (folder / name / "config.json").is_file()
    )
    example = components[0] if components else "transformer"
    raise ConfigError(
        f"{folder} is a diffusers pipeline (model_index.json), "
        f"not one model: pass subfolder='{example}' to load one of its components "
        f"({', '.join(components) or 'none found here'})"
    )


def _diffusers_class(folder: Path, config: dict[str, Any]) -> type | None:
    """The diffusers model class a diffusers ``config.json`` names, or None for a
    transformers config."""
    name = config.get("_class_name")
    if "model_type" in config or not isinstance(name, str):
        return None
    try:
        import diffusers
    except ImportError as err:
        raise ConfigError(
            f"{folder / 'config.json'} is a diffusers config ({name}): loading it needs "
            "diffusers (pip install 'leanstream[diffusers]')"
        ) from err
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise ConfigError(
            f"{folder / 'config.json'}: _class_name {name!r} is not a diffusers model class "
            f"(diffusers {diffusers.__version__}); a pipeline folder holds one folder per "
            "component: pass subfolder='transformer' (or 'unet', ...)"
        )
    return cls


class _SavedConfig(SimpleNamespace):
    """What the loader reads of a ``config.json`` it does not build the model from (a
    diffusers component's, or the one beside ``load_into``'s weights): its
    ``quantization_config`` (a pre-quantized checkpoint) and no ``dtype`` (the
    checkpoint's is used)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(quantization_config=config.get("quantization_config"), dtype=None)


def _saved_quantization(folder: Path) -> Any:
    """For ``load_into``: the :class:`_SavedConfig` of the ``config.json`` beside the
    weights, or None."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        config = read_config_dict(folder)
    except ConfigError:
        return None  # not a transformers or diffusers config: not this checkpoint's
    return _SavedConfig(config)


def _load_generation_config(model: Any, folder: Path) -> None:
    """``folder``'s ``generation_config.json`` as ``model.generation_config``. One that
    cannot be used is a warning naming it, and the model keeps the generation config
    made from ``config.json``: what transformers' ``from_pretrained`` falls back on
    (``GenerationMixin.adjust_generation_fn``), a damaged file there is no reason to
    refuse the weights."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return
    from transformers import GenerationConfig

    try:
        config = read_json(path)
        if not isinstance(config, dict):
            raise ConfigError(f"{path}: not a JSON object")
        try:
            model.generation_config = GenerationConfig.from_pretrained(folder)
        except Exception as err:  # whatever a hostile value makes transformers raise
            raise ConfigError(f"{path}: {type(err).__name__}: {err}") from err
    except ConfigError as err:
        warnings.warn(
            f"{err}; ignored: the model keeps the generation config made from config.json",
            UserWarning,
            stacklevel=3,
        )


__all__ = ["KeyMap", "likely_order", "load", "load_into"]
