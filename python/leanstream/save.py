"""``save()``: write a (quantized) model as a checkpoint folder that transformers loads.

The folder is what ``PreTrainedModel.save_pretrained`` writes for a bitsandbytes
model: safetensors shards whose keys are bitsandbytes' own serialization
(``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4|fp4``;
LLM.int8: ``weight``, ``SCB``, ``weight_format``), tied weights stored once,
``model.safetensors.index.json`` when there are several shards, ``config.json``
with a ``quantization_config``, ``generation_config.json``, and the tokenizer
files of the folder the model was loaded from.

Atomic: everything is written into a fresh hidden folder next to the target,
which replaces the target only once complete (an atomic exchange where the
kernel offers one). Streamed: tensors are copied to the CPU one shard at a time.
"""

from __future__ import annotations

import copy
import ctypes
import errno
import functools
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .progress import byte_progress

#: Files copied from the source folder along with the weights (tokenizer and chat template).
TOKENIZER_PATTERNS = (
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.*",
)

_INDEX = "model.safetensors.index.json"


def save(
    model: Any,
    folder: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "4GB",
    tokenizer_from: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Path:
    """Save ``model`` (quantized by :func:`leanstream.load`, or any transformers
    model, bitsandbytes-quantized or not) as a safetensors checkpoint folder.

    The result loads with ``AutoModelForCausalLM.from_pretrained(folder)`` and with
    :func:`leanstream.load` (which streams the quantized tensors straight into the
    bitsandbytes layers).

    Args:
        model: a ``transformers.PreTrainedModel``; its ``config.quantization_config``
            must describe its bitsandbytes layers (``leanstream.load`` sets it).
        folder: the checkpoint folder to write. If it exists it is replaced as a
            whole, atomically, only once the new one is complete (a failure, even a
            killed process, leaves it as it was; a killed process also leaves a
            hidden ``.NAME.*.leanstream-tmp`` folder beside it). A non-empty folder
            that holds neither ``config.json`` nor ``*.safetensors`` is refused
            (:class:`ConfigError`), so that a wrong path cannot delete a directory.
        max_shard_size: largest shard, in bytes or as ``"4GB"``, ``"500MB"``.
        tokenizer_from: folder whose tokenizer files are copied; default: the folder
            the model was loaded from (``model.config.name_or_path``), when it exists.
        progress: show a progress bar (bytes written).

    Returns:
        The absolute path of the written folder.

    Example:
        >>> model = leanstream.load("meta-llama/Llama-3.2-1B-Instruct", bits=4)  # doctest: +SKIP
        >>> leanstream.save(model, "llama-1b-nf4")  # doctest: +SKIP
        >>> leanstream.load("llama-1b-nf4")  # streams the packed NF4 tensors  # doctest: +SKIP
    """
    target = Path(folder).expanduser().absolute()
    parse_size(max_shard_size)
    _check_replaceable(target)
    config = _config_to_save(model)
    state = _state_dict(model)
    split = _split(state, max_shard_size)
    tokenizer_source = _tokenizer_source(model, tokenizer_from)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.leanstream-tmp")
    tmp.mkdir()
    try:
        _write_shards(state, split, tmp, model, progress)
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and _can_generate(model):
            model.generation_config.save_pretrained(tmp)
        if tokenizer_source is not None:
            _copy_tokenizer(tokenizer_source, tmp)
        _replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _check_replaceable(target: Path) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise ConfigError(f"{target}: exists and is not a folder; choose a folder to save into")
    entries = [p.name for p in target.iterdir()]
    if (
        entries
        and "config.json" not in entries
        and not any(e.endswith(".safetensors") for e in entries)
    ):
        raise ConfigError(
            f"{target}: refusing to replace a non-empty folder that is not a checkpoint "
            f"(no config.json, no *.safetensors; holds {', '.join(sorted(entries)[:3])}...); "
            "choose a new or empty folder"
        )


def _bnb_layers(model: Any) -> tuple[int, int]:
    """Numbers of bitsandbytes 4-bit and 8-bit layers in ``model``."""
    import bitsandbytes as bnb

    four = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    eight = sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    return four, eight


def _config_to_save(model: Any) -> Any:
    """A copy of ``model.config`` as transformers would write it, checked against the layers."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ConfigError(
            f"save() needs a transformers model with a config, got {type(model).__name__}"
        )
    four, eight = _bnb_layers(model)
    quant = getattr(config, "quantization_config", None)
    if four or eight:
        described = _quant_field(quant, "quant_method") == "bitsandbytes" and bool(
            _quant_field(quant, "load_in_4bit") if four else _quant_field(quant, "load_in_8bit")
        )
        if not described or (four and eight):
            kind = "4-bit" if four else "8-bit"
            raise ConfigError(
                f"the model has bitsandbytes {kind} layers but model.config.quantization_config "
                f"({quant!r}) does not describe them; set it to the BitsAndBytesConfig the model "
                "was quantized with (leanstream.load does)"
            )
    elif quant is not None:
        raise ConfigError(
            "model.config.quantization_config is set but the model has no bitsandbytes layers; "
            "save() writes bitsandbytes or unquantized models only"
        )
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]
    extra = leanstream_extras(quant)
    if extra:
        # transformers cannot load bitsandbytes embeddings (nor a quantized lm_head): a
        # quant_method of its own makes from_pretrained refuse the folder by name
        fields = _quant_dict(quant)
        config.quantization_config = {
            **fields,
            **extra,
            "quant_method": LEANSTREAM_METHOD,
            # transformers still parses this as a BitsAndBytesConfig (load_in_4bit/8bit) and
            # fails on this field, naming it: "module 'torch' has no attribute '<REFUSAL>'"
            "bnb_4bit_compute_dtype": REFUSAL,
            "leanstream_compute_dtype": str(fields.get("bnb_4bit_compute_dtype")),
        }
    if getattr(config, "dtype", None) is None:
        config.dtype = getattr(model, "dtype", None)
    return config


#: ``quant_method`` of a folder whose embeddings or lm_head are quantized (leanstream format).
LEANSTREAM_METHOD = "leanstream"
#: What transformers' ``from_pretrained`` reports on such a folder (as an AttributeError).
REFUSAL = (
    "saved_by_leanstream_with_quantized_embeddings_or_lm_head"
    "__transformers_cannot_load_it__use_leanstream_load"
)
_EXTRA_FIELDS = ("leanstream_quantized_embeddings", "leanstream_quantized_lm_head")


def leanstream_extras(quant: Any) -> dict[str, list[str]]:
    """The quantized embeddings / lm_head recorded in a quantization config (empty: none)."""
    extra = {name: list(_quant_field(quant, name) or []) for name in _EXTRA_FIELDS}
    return extra if any(extra.values()) else {}


def _quant_dict(quant: Any) -> dict[str, Any]:
    return dict(quant) if isinstance(quant, dict) else dict(quant.to_dict())


def _quant_field(quant: Any, name: str) -> Any:
    if isinstance(quant, dict):
        return quant.get(name)
    value = getattr(quant, name, None)
    return getattr(value, "value", value)  # QuantizationMethod enum → "bitsandbytes"


def _state_dict(model: Any) -> dict[str, torch.Tensor]:
    """bitsandbytes' serialization of ``model``, tied weights once, names as transformers
    writes them. Tensors are references to the model's own (no copy)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    _fix_cpu_packed_absmax(model)
    state = model.state_dict()
    meta = [name for name, t in state.items() if isinstance(t, torch.Tensor) and t.is_meta]
    if meta:
        raise ConfigError(
            f"the model has tensors on 'meta' (not loaded): {', '.join(meta[:5])}"
            + (f" and {len(meta) - 5} more" if len(meta) > 5 else "")
        )
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    # a quantized lm_head tied to a quantized embedding: its statistics are the
    # embedding's, stored once with the shared weight
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        prefix = target.removesuffix("weight")
        if _is_bnb(model, prefix.rstrip(".")) and model.get_parameter(
            target
        ) is model.get_parameter(source):
            for key in [k for k in state if k.startswith(f"{prefix}weight.")]:
                del state[key]
            state.pop(f"{prefix}SCB", None)
            state.pop(f"{prefix}weight_format", None)
    state = remove_tied_weights_from_state_dict(state, model)
    return dict(revert_weight_conversion(model, state))


def _is_bnb(model: Any, module_name: str) -> bool:
    import bitsandbytes as bnb

    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    return isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)


def _fix_cpu_packed_absmax(model: Any) -> None:
    """Work around a bitsandbytes (0.50) bug before calling ``state_dict()``.

    On CPUs with AVX512-BF16, a 4-bit layer's first forward repacks its weight in
    place for the CPU kernel, storing ``absmax`` transposed as ``(in/blocksize, out)``
    bfloat16. ``Linear4bit``'s ``state_dict()`` undoes the repacking, but for weights
    without double quantization leaves ``absmax`` in that layout: the saved checkpoint
    (transformers' ``save_pretrained`` too) and the model itself compute garbage
    afterwards. Putting ``absmax`` back in bitsandbytes' own layout first, as float32,
    keeps both right; its values are the bfloat16 ones the CPU kernel computes with.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if (
            isinstance(module, bnb.nn.Linear4bit)
            and state is not None
            and getattr(state, "packing_format_for_cpu", False)
            and not getattr(state, "original_nested", True)
            and state.absmax.dim() == 2
        ):
            state.absmax = state.absmax.T.reshape(-1).to(torch.float32)


def parse_size(value: int | str) -> int:
    """Bytes from ``4000000``, ``"4GB"``, ``"500MB"``, ``"1.5GB"``, ``"2GiB"`` (decimal
    units as huggingface_hub's, binary ones with ``i``); :class:`ConfigError` otherwise.

    >>> parse_size("4GB")
    4000000000
    """
    if isinstance(value, int) and not isinstance(value, bool):
        number, scale = float(value), 1
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]i?B|B)?\s*", value, re.IGNORECASE)
        if match is None:
            raise ConfigError(
                f"max_shard_size={value!r}: expected bytes or a size like '4GB', '500MB'"
            )
        unit = (match.group(2) or "B").upper()
        power = " KMGT".index(unit[0]) if unit != "B" else 0
        scale = (1024 if "I" in unit else 1000) ** power
        number = float(match.group(1))
    else:
        raise ConfigError(f"max_shard_size must be bytes or a size like '4GB', got {value!r}")
    size = int(number * scale)
    if size <= 0:
        raise ConfigError(f"max_shard_size must be positive, got {value!r}")
    return size


def _split(state: dict[str, torch.Tensor], max_shard_size: int | str) -> Any:
    from huggingface_hub import split_torch_state_dict_into_shards

    return split_torch_state_dict_into_shards(
        state,
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=parse_size(max_shard_size),
    )


def _write_shards(
    state: dict[str, torch.Tensor], split: Any, tmp: Path, model: Any, progress: bool
) -> None:
    """Write each shard in turn; only one shard's CPU copies exist at a time."""
    with byte_progress(
        split.metadata["total_size"],
        f"leanstream save {tmp.name.split('.')[1]}",
        enabled=progress,
    ) as bar:
        for filename, names in split.filename_to_tensors.items():
            shard = {name: _to_cpu(state.pop(name)) for name in names}
            nbytes = sum(t.numel() * t.element_size() for t in shard.values())
            _write_shard(shard, tmp / filename)
            del shard
            bar.update(nbytes)
    if split.is_sharded:
        total = model.num_parameters() if hasattr(model, "num_parameters") else None
        index = {
            "metadata": {"total_parameters": total, **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        (tmp / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _to_cpu(tensor: torch.Tensor) -> torch.Tensor:
    # bitsandbytes' parameter subclasses become plain tensors first: Params4bit.to()
    # would move the quant_state it shares with the model's weight along with it
    return tensor.detach().as_subclass(torch.Tensor).to("cpu").contiguous()


def _write_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one safetensors shard (the one place bytes go to disk)."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})


def _can_generate(model: Any) -> bool:
    can = getattr(model, "can_generate", None)
    return bool(can()) if callable(can) else False


def _tokenizer_source(model: Any, tokenizer_from: str | os.PathLike[str] | None) -> Path | None:
    if tokenizer_from is not None:
        source = Path(tokenizer_from).expanduser()
        if not source.is_dir():
            raise ConfigError(f"tokenizer_from={os.fspath(tokenizer_from)!r}: no such folder")
        return source
    name = getattr(getattr(model, "config", None), "name_or_path", None)
    if name and Path(name).is_dir():
        return Path(name)
    return None


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer (and chat template) files of ``folder``, as :func:`save` copies them."""
    found: dict[str, Path] = {}
    for pattern in TOKENIZER_PATTERNS:
        for path in folder.glob(pattern):
            if path.is_file() and not path.name.endswith((".safetensors", ".index.json")):
                found[path.name] = path
    return [found[name] for name in sorted(found)]


def _copy_tokenizer(source: Path, tmp: Path) -> None:
    for path in tokenizer_files(source):
        if not (tmp / path.name).exists():
            shutil.copyfile(path, tmp / path.name)  # follows hub-cache symlinks


def _replace(tmp: Path, target: Path) -> None:
    """Put the complete folder ``tmp`` at ``target``; remove what was there before."""
    if not target.exists():
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous folder
        return
    old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.leanstream-old")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the platform or file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


@functools.cache
def _renameat2() -> Any:
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


__all__ = ["TOKENIZER_PATTERNS", "parse_size", "save", "tokenizer_files"]
