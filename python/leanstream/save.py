"""``save()``: write a (quantized) model as a checkpoint folder that transformers loads.

The folder is what ``PreTrainedModel.save_pretrained`` writes for a bitsandbytes
model: safetensors shards whose keys are bitsandbytes' own serialization
(``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4|fp4``;
LLM.int8: ``weight``, ``SCB``, ``weight_format``), tied weights stored once,
``model.safetensors.index.json`` when there are several shards, ``config.json``
with a ``quantization_config``, ``generation_config.json``, and the tokenizer
files of the folder the model was loaded from: by name (:data:`TOKENIZER_PATTERNS`),
regular files inside that folder only (a hub snapshot's links into its repo's
``blobs/`` included), never what a link points to elsewhere (:func:`_tokenizer_candidates`).

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
leaves the previous content whole (:func:`_commit`: undone by renames, with or
without hard links). Streamed: tensors are copied to the CPU one
shard at a time.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import os
import re
import shutil
import stat
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch

from . import cpu_layout
from .errors import CheckpointError, ConfigError, checkpoint_error
from .progress import byte_progress

#: The tokenizer (and chat template) files copied from the source folder along with the
#: weights, by name (``fnmatch``, case-sensitive): those transformers' tokenizers read and
#: write (``PreTrainedTokenizerBase.from_pretrained``/``save_pretrained``: ``tokenizer.json``,
#: ``tokenizer_config.json``, ``special_tokens_map.json``, ``added_tokens.json``,
#: ``chat_template.jinja``/``.json``; the tokenizer classes' ``VOCAB_FILES_NAMES``, all of
#: them as of transformers 5), mistral-common's (``tekken.json``, ``tokenizer.model.v3``)
#: and tiktoken vocabularies. A file named otherwise is never copied.
TOKENIZER_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    # VOCAB_FILES_NAMES
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "sentencepiece.model",
    "spm.model",
    "spm_char.model",
    "source.spm",
    "target.spm",
    "bpe.codes",
    "dict.txt",
    "entity_vocab.json",
    "vocab-src.json",
    "vocab-tgt.json",
    "target_vocab.json",
    "emoji.json",
    "normalizer.json",
    "byte_maps.json",
    "word_shape.json",
    "word_pronunciation.json",
    "prophetnet.tokenizer",
    # mistral-common, tiktoken
    "tekken.json",
    "tokenizer.model.v*",
    "tiktoken.model",
    "*.tiktoken",
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
            the model was loaded from (the one :func:`leanstream.load` read, else
            ``model.config.name_or_path``), when it exists. Copied: the files named as
            transformers' tokenizers name theirs (:data:`TOKENIZER_PATTERNS`:
            ``tokenizer.json``, ``tokenizer_config.json``, ``tokenizer.model``,
            ``vocab.json``, ``merges.txt``, ``chat_template.jinja`` ...), each a regular
            file inside that folder, or a link to one (in a hub cache snapshot: to its
            repo's ``blobs/``); a tokenizer-named link to a file outside the folder
            (``tokenizer.model -> /proc/self/environ``), a FIFO or a folder is not copied,
            and a ``UserWarning`` names it and says why.
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
      name, shards first, then the index, then stale weights are moved out, then
      ``config.json``, ``generation_config.json`` and the tokenizer files. A replaced
      file is kept in the hidden folder until the end: as a hard link where the file
      system has them (the replace is then one atomic rename: readers see the old file
      or the new one), else moved there by a rename just before the new file's (for
      that moment the name is missing). A failure or Ctrl-C at any point, renames
      included, puts the previous files back, on every file system (each step is a
      rename, undone by a rename); a killed process may leave the hidden folder,
      holding the new files and, during the renames, the previous ones in
      ``.previous/`` (recoverable).
    * Errors: a folder that cannot be created (under a file, no permission) raises
      :class:`ConfigError`; a write that fails (a full disk, an I/O error) a
      :class:`CheckpointError` naming the file (``.file``) and the cause (the
      ``OSError`` or safetensors' error as its ``__cause__``), the folder as it was.
    * Refused (:class:`ConfigError`), the folder untouched: the folder the model was
      loaded from (the one :func:`leanstream.load` read, and ``model.config.name_or_path``,
      compared with ``os.path.samefile``),
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
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(
            f"{target}: cannot create this folder ({err.strerror or err}); "
            "choose a folder to save into"
        ) from err
    tmp = target / f".leanstream-tmp-{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir()
        _write_shards(state, split, tmp, model, progress, target, names)
        write_config(tmp)
        if getattr(model, "generation_config", None) is not None and _can_generate(model):
            model.generation_config.save_pretrained(tmp)
        if tokenizer_source is not None:
            _copy_tokenizer(tokenizer_source, tmp)
        _commit(tmp, target, set(split.filename_to_tensors), names)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # only this save's files (and undone backups)
        if created:
            with contextlib.suppress(OSError):
                target.rmdir()  # only if empty
        if isinstance(err, OSError):  # a full disk, an I/O error, a read-only folder
            raise _write_error(target, err) from err
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # the replaced and stale files moved aside
    return target


def _write_error(target: Path, err: BaseException, file: Path | None = None) -> CheckpointError:
    """A :class:`CheckpointError` for a write that failed (``.file``: the file written,
    else ``target``); the save has put the folder back as it was."""
    if file is None and isinstance(err, OSError) and err.filename:
        file = Path(os.fsdecode(err.filename))
    cause = (err.strerror if isinstance(err, OSError) else None) or str(err) or type(err).__name__
    where = f" writing {file.name}" if file is not None else ""
    return checkpoint_error(
        CheckpointError,
        f"{target}: the save failed{where}: {cause}; the folder was left as it was before the save",
        file=str(file if file is not None else target),
    )


def _check_target(target: Path, model: Any) -> None:
    if not target.exists():
        # the first part of the path that exists must be a folder to create it in
        existing = target.parent
        while not os.path.lexists(existing) and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(
                f"{target}: cannot create this folder: {existing} is not a folder; "
                "choose a folder to save into"
            )
        return
    if not target.is_dir():
        raise ConfigError(f"{target}: exists and is not a folder; choose a folder to save into")
    for source in _source_folders(model):
        if os.path.samefile(source, target):
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


def _source_folders(model: Any) -> list[Path]:
    """The local folders the model was loaded from that still exist: the one the loader
    read (``model._leanstream_source``, recorded by :func:`leanstream.load` and
    ``load_into``), then the one its config names (``name_or_path``, which anyone can
    change, and which is all a transformers model has)."""
    config = getattr(model, "config", None)
    # transformers' name_or_path; diffusers' _name_or_path
    name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    found = []
    for where in (getattr(model, "_leanstream_source", None), name):
        if where:
            path = Path(where).expanduser()
            if path.is_dir():
                found.append(path)
    return found


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
        if param.quant_state is not None:
            # the stored form (a weight in the CPU kernel's layout is put back in order)
            data, quant_state = param.plain()
            state[name] = data if param.cpu_layout else param
            for key, value in quant_state.as_dict(packed=True).items():
                state[f"{name}.{key}"] = value
        else:
            state[name] = param
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
    target: Path,
    names: _Names,
) -> None:
    """Write each shard in turn; only one shard's CPU copies exist at a time."""
    from safetensors import SafetensorError

    with byte_progress(
        split.metadata["total_size"], f"leanstream save {target.name}", enabled=progress
    ) as bar:
        for filename, keys in split.filename_to_tensors.items():
            shard = {key: _to_cpu(state.pop(key)) for key in keys}
            nbytes = sum(t.numel() * t.element_size() for t in shard.values())
            try:
                _write_shard(shard, tmp / filename)
            except (OSError, SafetensorError) as err:  # safetensors': "I/O error: No space ..."
                raise _write_error(target, err, target / filename) from err
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
    sources = _source_folders(model)
    return sources[0] if sources else None


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer (and chat template) files of ``folder``, as :func:`save` copies them:
    named as in :data:`TOKENIZER_PATTERNS`, regular files, in ``folder`` (see
    :func:`_tokenizer_candidates`)."""
    return [path for path, _ in _tokenizer_candidates(folder)[0]]


def _tokenizer_candidates(folder: Path) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """``([(file, what to read)], [(file, why not)])`` for the tokenizer-named entries of
    ``folder``.

    A file is read where it resolves (``os.path.realpath``): only a regular file inside
    ``folder`` (a symlink to another of its files is the folder's own content, read by
    transformers too) or, for a hub snapshot (``.../models--org--name/snapshots/<rev>/``),
    in that repo's ``blobs/``, where the hub cache keeps every file. Never one outside
    (``tokenizer.model -> /proc/self/environ``, ``-> ~/.ssh/id_rsa``): a downloaded folder
    must not make the save copy the user's files into a checkpoint that may be uploaded.
    Not a FIFO, device or folder either (reading a FIFO would block the save).
    """
    home = os.path.realpath(folder)
    roots = [home]
    parts = Path(home).parts
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--"):
            roots.append(os.path.join(*parts[:i], "blobs"))
            break
    take: list[tuple[Path, str]] = []
    skip: list[tuple[Path, str]] = []
    for name in sorted(os.listdir(folder)):
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in TOKENIZER_PATTERNS):
            continue
        path = folder / name
        real = os.path.realpath(path)
        if not any(os.path.commonpath([real, root]) == root != real for root in roots):
            skip.append((path, f"it links to {real}, outside the folder"))
            continue
        try:
            regular = stat.S_ISREG(os.stat(real).st_mode)
        except OSError:
            regular = False
        if regular:
            take.append((path, real))
        else:
            skip.append((path, "not a regular file"))
    return take, skip


def _copy_tokenizer(source: Path, tmp: Path) -> None:
    """Copy :func:`tokenizer_files` of ``source`` into ``tmp``, and warn, naming each,
    about the tokenizer-named files that are not copied (see
    :func:`_tokenizer_candidates`)."""
    take, skip = _tokenizer_candidates(source)
    for path, real in take:
        if (tmp / path.name).exists():
            continue
        # the resolved path, opened without following a link, checked again once open:
        # what was checked is what is read
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(real, flags)
        except OSError as err:
            skip.append((path, f"cannot be read ({err.strerror or err})"))
            continue
        with os.fdopen(fd, "rb") as reader:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                skip.append((path, "not a regular file"))
                continue
            with open(tmp / path.name, "xb") as writer:
                shutil.copyfileobj(reader, writer)
    for path, why in skip:
        warnings.warn(
            f"{path}: not copied with the tokenizer files: {why}", UserWarning, stacklevel=3
        )


def _commit(tmp: Path, target: Path, shards: set[str], names: _Names = _TRANSFORMERS) -> None:
    """Move the complete files of ``tmp`` into ``target`` and its stale weight files aside
    into ``tmp/.previous`` (see :func:`save`, *Order*); undo every step on failure.

    A file replaced is kept in ``.previous`` (same file system) until the end: as a hard
    link where the file system has them, so that the new file replaces it in one rename
    (readers see the old file or the new one); elsewhere it is moved there by a rename
    first (then, until the next rename, the name is missing). Either way every step is a
    rename that a rename undoes, and each undo is recorded before its step: an interrupt
    right after a step cannot leave it done but unrecorded (undoing a step not taken fails,
    harmlessly: its file is not there).
    """
    written = sorted(p.name for p in tmp.iterdir())
    in_the_way = [n for n in written if (target / n).is_dir() and not (target / n).is_symlink()]
    if in_the_way:
        raise ConfigError(
            f"{target / in_the_way[0]}: a folder has the name of a file the save writes; "
            "move it, or save to another folder"
        )
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
    undo: list[tuple[Path, Path]] = []  # (move this, back to here), recorded first
    name = ""
    try:
        for name in weights:
            _move_in(tmp / name, target / name, aside / name, undo)
        for name in stale:
            undo.append((aside / name, target / name))
            _rename(target / name, aside / name)
        for name in written:
            if name not in weights:
                _move_in(tmp / name, target / name, aside / name, undo)
    except BaseException as err:
        for what, where in reversed(undo):
            with contextlib.suppress(OSError):
                _rename(what, where)
        if isinstance(err, OSError):
            raise _write_error(target, err, target / name) from err
        raise
    with contextlib.suppress(OSError):  # some file systems cannot sync a folder
        _fsync(target)


def _move_in(new: Path, dest: Path, keep: Path, undo: list[tuple[Path, Path]]) -> None:
    """Rename ``new`` to ``dest``, keeping a previous ``dest`` as ``keep`` (see
    :func:`_commit`)."""
    if os.path.lexists(dest):
        undo.append((keep, dest))
        try:
            os.link(dest, keep, follow_symlinks=False)
        except OSError:  # no hard links on this file system: moved aside instead
            _rename(dest, keep)
    else:
        undo.append((dest, new))
    _rename(new, dest)


def _rename(source: Path, dest: Path) -> None:
    os.replace(source, dest)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["TOKENIZER_PATTERNS", "parse_size", "save", "tokenizer_files"]
