"""``save()``: write a (quantized) model as a checkpoint folder that transformers loads.

The folder is what ``PreTrainedModel.save_pretrained`` writes for a bitsandbytes
model: safetensors shards whose keys are bitsandbytes' own serialization
(``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4|fp4``;
LLM.int8: ``weight``, ``SCB``, ``weight_format``), tied weights stored once,
``model.safetensors.index.json`` when there are several shards, ``config.json``
with a ``quantization_config``, ``generation_config.json``, and the tokenizer
files of the folder the model was loaded from.

Quantized embeddings, lm_head and mixture-of-experts weights, which transformers
cannot load, make it leanstream's format: ``quant_method: "leanstream"`` and the
modules listed (``leanstream_quantized_embeddings``, ``leanstream_quantized_lm_head``,
``leanstream_quantized_experts``); ``from_pretrained`` refuses it by name. An experts
weight ``<m>.<attr>`` ([E, R, C]) is stored under its model name with the statistics
a 4-bit linear's weight has, as ``<m>.<attr>.absmax`` ... (:func:`_experts_state`).

Only its own files: like ``save_pretrained``, a save into an existing folder (a
cloned hub repo, a previous save) replaces the files it writes and removes only
stale weight files of its own naming; ``.git``, ``README.md``, ``LICENSE`` and
everything else stay as they were. Each file is written under a temporary name,
synced, and renamed into place only once all of them are complete, so a failure
leaves the previous content whole. Streamed: tensors are copied to the CPU one
shard at a time.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from . import cpu_layout
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
    bitsandbytes layers). A model with quantized embeddings, lm_head or
    mixture-of-experts weights is saved in leanstream's format (see the module's
    docstring), which only :func:`leanstream.load` reads (``from_pretrained`` refuses
    it, naming ``saved_by_leanstream_with_quantized_..._use_leanstream_load``).

    Args:
        model: a ``transformers.PreTrainedModel``; its ``config.quantization_config``
            must describe its bitsandbytes layers (``leanstream.load`` sets it).
        folder: the checkpoint folder to write, created if needed. An existing folder
            keeps every file this save does not write (see *Existing folders*).
        max_shard_size: largest shard, in bytes or as ``"4GB"``, ``"500MB"``.
        tokenizer_from: folder whose tokenizer files are copied; default: the folder
            the model was loaded from (``model.config.name_or_path``), when it exists.
        progress: show a progress bar (bytes written).

    Existing folders, as ``save_pretrained`` treats them:

    * Written: the shards (``model.safetensors``, or ``model-00001-of-0000N.safetensors``
      and ``model.safetensors.index.json``), ``config.json``, ``generation_config.json``
      (a model that generates) and the tokenizer files copied; same-named files are
      replaced.
    * Removed: only stale weight files of those names that the new save does not
      write: other ``model-NNNNN-of-NNNNN.safetensors`` shards (as ``save_pretrained``
      removes them), and ``model.safetensors`` or the index left by a save with the
      other layout (``save_pretrained`` leaves them, and transformers would then load
      the stale single file, leanstream the stale index). Nothing else is ever deleted:
      ``.git/``, ``README.md``, ``LICENSE``, other tokenizer files, ``*.safetensors``
      of other names, a stale ``generation_config.json``.
    * Order: every file is first written completely, and synced, into a hidden
      ``.leanstream-tmp-*`` folder inside ``folder``; then each is renamed over its
      name (an atomic replace; readers see the old file or the new one), shards
      first, then the index, then stale weights are moved out, then ``config.json``,
      ``generation_config.json`` and the tokenizer files. A failure or Ctrl-C at any
      point, renames included, leaves the previous content as it was (the renames
      done are undone: a replaced file is kept as a hard link until the end, on file
      systems that have them); a killed process may leave the hidden folder, holding
      the new files and, during the renames, the previous ones (recoverable).
    * Refused (:class:`ConfigError`), the folder untouched: the folder the model was
      loaded from (``model.config.name_or_path``, compared with ``os.path.samefile``),
      even though a leanstream model no longer reads it, because the save would
      replace the source checkpoint (its ``config.json`` and weights); a folder whose
      files the model's tensors are still memory-mapped from (a transformers model
      loaded on the CPU, under any name); and a non-empty folder that is not a
      checkpoint (no ``config.json``, no ``*.safetensors``, no ``.git``), so that a
      wrong path cannot scatter checkpoint files into it or overwrite its files.
      Save to another folder.

    Returns:
        The absolute path of the written folder.

    Example:
        >>> model = leanstream.load("meta-llama/Llama-3.2-1B-Instruct", bits=4)  # doctest: +SKIP
        >>> leanstream.save(model, "llama-1b-nf4")  # doctest: +SKIP
        >>> leanstream.load("llama-1b-nf4")  # streams the packed NF4 tensors  # doctest: +SKIP
    """
    target = Path(folder).expanduser().absolute()
    parse_size(max_shard_size)
    _check_target(target, model)
    diffusers = _is_diffusers(model)
    if diffusers:
        _check_described(model, getattr(model.config, "quantization_config", None))
        names = _DIFFUSERS
        state = _module_state_dict(model)
        write_config = model.save_config  # config.json with its quantization_config
        tokenizer_source = None
    else:
        names = _TRANSFORMERS
        config = _config_to_save(model)
        state = _state_dict(model)
        write_config = config.save_pretrained
        tokenizer_source = _tokenizer_source(model, tokenizer_from)
    split = _split(state, max_shard_size, names)

    created = not target.exists()
    target.mkdir(parents=True, exist_ok=True)
    tmp = target / f".leanstream-tmp-{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir()
        _write_shards(state, split, tmp, model, progress, target.name, names)
        write_config(tmp)
        if getattr(model, "generation_config", None) is not None and _can_generate(model):
            model.generation_config.save_pretrained(tmp)
        if tokenizer_source is not None:
            _copy_tokenizer(tokenizer_source, tmp)
        _commit(tmp, target, set(split.filename_to_tensors), names)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # only this save's files (and undone backups)
        if created:
            with contextlib.suppress(OSError):
                target.rmdir()  # only if empty
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # the replaced and stale files moved aside
    return target


def _check_target(target: Path, model: Any) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise ConfigError(f"{target}: exists and is not a folder; choose a folder to save into")
    source = _source_folder(model)
    if source is not None and os.path.samefile(source, target):
        raise ConfigError(
            f"{target}: the model was loaded from this folder ({source}); saving would "
            "replace the checkpoint it came from (its config.json and weights). "
            "Save to another folder"
        )
    mapped = _mapped_files(model, target)
    if mapped:
        raise ConfigError(
            f"{target}: the model's tensors are memory-mapped from "
            f"{', '.join(mapped[:3])}{' ...' if len(mapped) > 3 else ''} in this folder (the "
            "checkpoint it was loaded from); saving would replace them. Save to another folder"
        )
    entries = [p.name for p in target.iterdir()]
    if (
        entries
        and "config.json" not in entries
        and ".git" not in entries
        and not any(e.endswith(".safetensors") for e in entries)
    ):
        raise ConfigError(
            f"{target}: refusing to save into a non-empty folder that is not a checkpoint "
            f"(no config.json, no *.safetensors, no .git; holds "
            f"{', '.join(sorted(entries)[:3])}...); choose a new or empty folder"
        )


def _source_folder(model: Any) -> Path | None:
    """The local folder the model was loaded from, if it still exists."""
    config = getattr(model, "config", None)
    # transformers' name_or_path; diffusers' _name_or_path
    name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    if not name:
        return None
    path = Path(name).expanduser()
    return path if path.is_dir() else None


def _mapped_files(model: Any, folder: Path) -> list[str]:
    """Files directly in ``folder`` that ``model``'s CPU tensors are memory-mapped from
    (read from ``/proc/self/maps``; empty where there is none)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    prefix = os.path.realpath(folder) + os.sep
    ranges = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(prefix):
            name = fields[5][len(prefix) :]
            if os.sep not in name and not name.endswith(" (deleted)"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end, name))
    if not ranges or not hasattr(model, "parameters"):
        return []
    found = set()
    tensors = [*model.parameters(), *getattr(model, "buffers", list)()]
    for tensor in tensors:
        if tensor.device.type == "cpu":
            ptr = tensor.data_ptr()
            found.update(name for start, end, name in ranges if start <= ptr < end)
    return sorted(found)


def _bnb_layers(model: Any) -> tuple[int, int]:
    """Numbers of 4-bit and 8-bit weights in ``model``: bitsandbytes layers and
    leanstream's quantized experts (which hold bitsandbytes' layouts)."""
    import bitsandbytes as bnb

    four = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    eight = sum(isinstance(m, bnb.nn.Linear8bitLt) for m in model.modules())
    for param in _quantized_experts(model).values():
        four, eight = (four + 1, eight) if param.bits == 4 else (four, eight + 1)
    return four, eight


def _quantized_experts(model: Any) -> dict[str, Any]:
    """``{name: QuantizedExperts}`` of ``model``'s quantized 3-D experts weights."""
    from .experts import QuantizedExperts

    if not hasattr(model, "named_parameters"):
        return {}
    return {n: p for n, p in model.named_parameters() if isinstance(p, QuantizedExperts)}


def _config_to_save(model: Any) -> Any:
    """A copy of ``model.config`` as transformers would write it, checked against the layers."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ConfigError(
            "save() needs a transformers or diffusers model with a config, got "
            f"{type(model).__name__}"
        )
    quant = getattr(config, "quantization_config", None)
    _check_described(model, quant)
    config = copy.deepcopy(config)
    config.architectures = [type(model).__name__]
    extra = {
        **{key: [] for key in _EXTRA_FIELDS},
        **leanstream_extras(quant),
        # the experts weights the model holds quantized, whatever its config says
        _EXPERTS_FIELD: sorted(_quantized_experts(model)),
    }
    if any(extra.values()):
        # transformers cannot load bitsandbytes embeddings (nor a quantized lm_head), nor
        # 3-D experts weights held quantized: a quant_method of its own makes
        # from_pretrained refuse the folder by name
        fields = _quant_dict(quant)
        config.quantization_config = {
            **fields,
            **extra,
            "quant_method": LEANSTREAM_METHOD,
            # transformers still parses this as a BitsAndBytesConfig (load_in_4bit/8bit) and
            # fails on this field, naming it: "module 'torch' has no attribute '<REFUSAL>'"
            "bnb_4bit_compute_dtype": refusal(extra),
            "leanstream_compute_dtype": str(fields.get("bnb_4bit_compute_dtype")),
        }
    if getattr(config, "dtype", None) is None:
        config.dtype = getattr(model, "dtype", None)
    return config


def _check_described(model: Any, quant: Any) -> None:
    """The model's ``quantization_config`` must describe its bitsandbytes layers."""
    four, eight = _bnb_layers(model)
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


def _is_diffusers(model: Any) -> bool:
    import sys

    diffusers = sys.modules.get("diffusers")
    return diffusers is not None and isinstance(model, diffusers.ModelMixin)


def _module_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """bitsandbytes' serialization of a diffusers model, as its ``save_pretrained``
    writes it (the module's own ``state_dict``, no renaming)."""
    _fix_cpu_packed_absmax(model)
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    meta = [name for name, t in state.items() if t.is_meta]
    if meta:
        raise ConfigError(f"the model has tensors on 'meta' (not loaded): {', '.join(meta[:5])}")
    return state


#: ``quant_method`` of a folder whose embeddings, lm_head or mixture-of-experts weights
#: are quantized (leanstream format).
LEANSTREAM_METHOD = "leanstream"
#: What transformers' ``from_pretrained`` reports on a folder with quantized embeddings or
#: lm_head (as an AttributeError); see :func:`refusal`.
_REFUSAL_TAIL = "__transformers_cannot_load_it__use_leanstream_load"
REFUSAL = "saved_by_leanstream_with_quantized_embeddings_or_lm_head" + _REFUSAL_TAIL
_EXPERTS_FIELD = "leanstream_quantized_experts"
_EXTRA_FIELDS = ("leanstream_quantized_embeddings", "leanstream_quantized_lm_head", _EXPERTS_FIELD)


def leanstream_extras(quant: Any) -> dict[str, list[str]]:
    """The quantized embeddings, lm_head and experts weights recorded in a quantization
    config (all three keys; empty: none)."""
    extra = {name: list(_quant_field(quant, name) or []) for name in _EXTRA_FIELDS}
    return extra if any(extra.values()) else {}


def refusal(extra: dict[str, list[str]]) -> str:
    """The name transformers' ``from_pretrained`` reports on a folder in leanstream's
    format: :data:`REFUSAL`, or with quantized experts
    ``saved_by_leanstream_with_quantized_experts[_and_embeddings_or_lm_head]__...``."""
    if not extra.get(_EXPERTS_FIELD):
        return REFUSAL
    what = "experts"
    if extra.get(_EXTRA_FIELDS[0]) or extra.get(_EXTRA_FIELDS[1]):
        what += "_and_embeddings_or_lm_head"
    return f"saved_by_leanstream_with_quantized_{what}{_REFUSAL_TAIL}"


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
    # quantized experts weights keep the model's names (transformers' conversion would
    # split the packed bytes as if they were the merged weight); the others as usual
    experts = _experts_state(model)
    state = {k: v for k, v in state.items() if k not in experts}
    return {**revert_weight_conversion(model, state), **experts}


def _experts_state(model: Any) -> dict[str, torch.Tensor]:
    """The quantized experts weights in leanstream's format, for each ``<m>.<attr>``: the
    stored bytes under its name (4-bit: uint8 ``[E*R*C // 2, 1]``; 8-bit: int8
    ``[E, R, C]``) and its statistics under the suffixes bitsandbytes gives a 4-bit
    linear's weight (``<m>.<attr>.absmax``, ``.quant_map``, ``.nested_absmax``,
    ``.nested_quant_map``, ``.quant_state.bitsandbytes__nf4|fp4``: the JSON, with
    ``shape`` ``[E, R, C]`` and ``dtype``), or LLM.int8's row scales ``<m>.<attr>.SCB``
    (float32 ``[E*R]``; a module holds two such weights, so not ``<m>.SCB`` as for a
    linear)."""
    state: dict[str, torch.Tensor] = {}
    for name, param in _quantized_experts(model).items():
        state[name] = param
        if param.quant_state is not None:
            for key, value in param.quant_state.as_dict(packed=True).items():
                state[f"{name}.{key}"] = value
        else:
            state[f"{name}.SCB"] = param.SCB
    return state


def _is_bnb(model: Any, module_name: str) -> bool:
    import bitsandbytes as bnb

    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    return isinstance(module, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)


def _fix_cpu_packed_absmax(model: Any) -> None:
    """Work around a bitsandbytes (0.50) bug before calling ``state_dict()``, for 4-bit
    layers leanstream did not make (its own write the plain layout themselves:
    :mod:`leanstream.cpu_layout`).

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
            and not getattr(module, "_leanstream_cpu_layout", False)  # cpu_layout's hooks
            and state is not None
        ):
            cpu_layout.order_before_bitsandbytes_inverse(state)


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


class _Names:
    """The weight file names of a library's checkpoint folder."""

    def __init__(self, stem: str) -> None:
        self.pattern = stem + "{suffix}.safetensors"
        self.single = f"{stem}.safetensors"
        self.index = f"{stem}.safetensors.index.json"
        self.shard = re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}\.safetensors")


_TRANSFORMERS = _Names("model")
_DIFFUSERS = _Names("diffusion_pytorch_model")


def _split(state: dict[str, torch.Tensor], max_shard_size: int | str, names: _Names) -> Any:
    from huggingface_hub import split_torch_state_dict_into_shards

    return split_torch_state_dict_into_shards(
        state,
        filename_pattern=names.pattern,
        max_shard_size=parse_size(max_shard_size),
    )


def _write_shards(
    state: dict[str, torch.Tensor],
    split: Any,
    tmp: Path,
    model: Any,
    progress: bool,
    label: str,
    names: _Names,
) -> None:
    """Write each shard in turn; only one shard's CPU copies exist at a time."""
    with byte_progress(
        split.metadata["total_size"], f"leanstream save {label}", enabled=progress
    ) as bar:
        for filename, keys in split.filename_to_tensors.items():
            shard = {key: _to_cpu(state.pop(key)) for key in keys}
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
        (tmp / names.index).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


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


def _commit(tmp: Path, target: Path, shards: set[str], names: _Names = _TRANSFORMERS) -> None:
    """Rename the complete files of ``tmp`` into ``target`` and move its stale weight
    files aside into ``tmp`` (see :func:`save`, *Order*); undo every step on failure."""
    written = sorted(p.name for p in tmp.iterdir())
    for name in written:
        _fsync(tmp / name)
    stale = [
        name
        for name in sorted(p.name for p in target.iterdir())
        if name not in written
        and (name in (names.single, names.index) or names.shard.fullmatch(name))
        and not (target / name).is_dir()
    ]
    aside = tmp / ".previous"  # replaced and stale files, until the end (or an undo)
    aside.mkdir()
    weights = [n for n in written if n in shards] + [n for n in written if n == names.index]
    steps = [
        *((tmp / n, target / n) for n in weights),
        *((target / n, aside / n) for n in stale),
        *((tmp / n, target / n) for n in written if n not in weights),
    ]
    undo: list[tuple[Path, Path]] = []  # (move this, back to here)
    try:
        for source, dest in steps:
            if dest.parent != target:  # a stale file moved aside
                _rename(source, dest)
                undo.append((dest, source))
            elif dest.exists() or dest.is_symlink():  # replaced: keep the old one linked
                try:
                    os.link(dest, aside / dest.name, follow_symlinks=False)
                    undo.append((aside / dest.name, dest))
                except OSError:
                    pass  # no hard links on this file system: this replace cannot be undone
                _rename(source, dest)
            else:
                _rename(source, dest)
                undo.append((dest, source))
    except BaseException:
        for what, where in reversed(undo):
            with contextlib.suppress(OSError):
                _rename(what, where)
        raise
    with contextlib.suppress(OSError):  # some file systems cannot sync a folder
        _fsync(target)


def _rename(source: Path, dest: Path) -> None:
    os.replace(source, dest)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["TOKENIZER_PATTERNS", "parse_size", "save", "tokenizer_files"]
