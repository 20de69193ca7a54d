"""The architecture sweep (issue 26): every model type of a few transformers registries,
built tiny and random, saved, loaded by leanstream at nf4 and int8 and compared with
transformers + bitsandbytes loading the same folder.

A case is ``(registry, model_type)``. :func:`tiny_config` shrinks transformers' default
config for the type generically (attribute names, recursing into sub-configs);
:func:`write_case` builds the registry's class from it in bfloat16 and saves it;
:func:`classify` loads it both ways and names the :class:`Outcome`:

- ``equal``: leanstream's logits are transformers' + bitsandbytes' exactly (MoE experts
  that leanstream quantizes are compared with transformers' model whose experts are
  quantized and dequantized per expert, ``tests/test_moe.py::dequantized_reference``,
  running both on the dequantized experts; run through bitsandbytes' kernels, the
  experts must also give the reference's logits within :data:`KERNELS_TOLERANCE`;
  transformers is given the ``llm_int8_skip_modules`` leanstream recorded, so the layers
  leanstream keeps for a weight read directly are kept there too, and its layers make
  leanstream's two documented kernel choices: int8 inputs of any rank, the plain 4-bit
  kernel where bitsandbytes' AVX512-BF16 repacking cannot take the shape);
- ``beyond``: transformers' quantized model fails, leanstream's runs and is close to the
  bf16 model (:data:`BEYOND`);
- ``refused``: leanstream raises a :class:`leanstream.LeanstreamError` at load;
- ``crash``: leanstream's load raises something else, its forward raises, or the case
  killed or hung the worker;
- ``differ``: both run and differ, or transformers fails and ours is far from bf16;
- ``inspect-mismatch``: ``leanstream inspect`` predicted other layers or bytes than
  load made;
- ``unbuildable``: transformers itself cannot build the tiny model or run a bf16
  forward on it (excluded from the sweep's denominator).

Cases run in a worker subprocess (:class:`Worker`), restarted after a crash, with a
timeout per case: one bad type cannot end the sweep. ``tests/test_sweep.py`` runs a
fast subset (or everything, ``LEANSTREAM_SWEEP=all``); ``benches/sweep.py`` prints the
table.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: registry name -> (transformers' mapping of model type to class name, its Auto class)
REGISTRIES: dict[str, tuple[str, str]] = {
    "causal-lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    "seq2seq": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    "masked-lm": ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
    "vision": (
        "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
        "AutoModelForImageClassification",
    ),
    "image-text": ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "AutoModelForImageTextToText"),
}
SETTINGS = ("nf4", "int8")
#: ``footprint``'s row of ``leanstream inspect`` for each setting
MEMORY_ROW = {"nf4": "4-bit nf4", "int8": "8-bit (LLM.int8)"}
#: largest relative error ``norm(ours - bf16) / norm(bf16)`` that counts as ``beyond``
#: (the 257 nf4 / 289 int8 equal cases of the first full sweep, 2026-12-06: nf4 median
#: 0.13, 95th percentile 0.34; int8 median 0.014, 95th percentile 0.052)
BEYOND = {"nf4": 0.5, "int8": 0.05}
#: statuses a case may end with in the test
ACCEPTED = ("equal", "beyond", "refused")
#: largest difference, relative to the largest reference logit, between the logits of a
#: model whose quantized experts run through bitsandbytes' kernels and the reference on
#: the dequantized experts (bfloat16 scales and sums of the fused 4-bit kernel, int8
#: activations of LLM.int8: about 1 % in tests/test_experts.py)
KERNELS_TOLERANCE = 0.05
CASE_TIMEOUT = 120.0  # seconds per (case, setting), imports included
SEQ = 8  # tokens of the input
TOKEN_HIGH = 200  # input ids are in [3, TOKEN_HIGH): below remapped special tokens

# --- generic shrinking -------------------------------------------------------------------

_HIDDEN = (
    "hidden_size",
    "d_model",
    "n_embd",
    "embed_dim",
    "word_embed_proj_dim",
    "d_embed",
    "embedding_size",
    "projection_dim",
    "vision_embed_dim",
    "text_embed_dim",
)
_INTERMEDIATE = (
    "intermediate_size",
    "ffn_dim",
    "d_ff",
    "n_inner",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "ffn_hidden_size",
    "dense_intermediate_size",
    "mlp_dim",
    "decoder_intermediate_size",
)
_EXPERT_INTERMEDIATE = (
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "expert_intermediate_size",
    "expert_ffn_hidden_size",
)
_LAYERS = (
    "num_hidden_layers",
    "n_layer",
    "n_layers",
    "num_layers",
    "encoder_layers",
    "decoder_layers",
    "num_decoder_layers",
    "num_encoder_layers",
)
_HEADS = (
    "num_attention_heads",
    "n_head",
    "n_heads",
    "num_heads",
    "encoder_attention_heads",
    "decoder_attention_heads",
)
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num")
_HEAD_DIM = ("head_dim", "kv_channels")
_POSITIONS = (
    "max_position_embeddings",
    "n_positions",
    "n_ctx",
    "max_source_positions",
    "max_target_positions",
    "seq_length",
)
_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOP_K = ("num_experts_per_tok", "moe_topk", "moe_k", "top_k")
# DeepSeek-like multi-head latent attention, as tests/models.py shrinks it: 4-bit
# linears take multiples of 64 inputs and make multiples of 32 outputs
_FIXED = {
    "n_group": 1,
    "topk_group": 1,
    "q_lora_rank": 64,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 32,
    "v_head_dim": 16,
    "first_k_dense_replace": 1,
    "state_size": 16,
    "ssm_state_size": 16,
    "d_state": 16,
    "mamba_d_state": 16,
    "mamba_dt_rank": 64,
}
_IMAGE = 32
_PATCH = 16
VOCAB = 256

#: an :data:`OVERRIDES` value that removes the key (a value the config derives itself)
DROP = object()
#: per-type overrides where the generic shrinking cannot work (applied last; a dict
#: value is merged into the sub-config dict it names)
OVERRIDES: dict[str, dict[str, Any]] = {
    "mamba2": {"num_heads": 8, "head_dim": 16, "n_groups": 1},
    # rope_theta and clip_qkv are read from attn_config, which does not save them
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}},
    # no attention layer by default: the second one attends
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "attention"]},
    # the layer types default to None; the first layer is dense by default (both, at 2)
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    # widths derived in __post_init__, saved, then set back over the new ones by from_dict
    "zamba2": dict.fromkeys(
        (
            "attention_head_dim",
            "attention_hidden_size",
            "mamba_headdim",
            "kv_channels",
            "num_query_groups",
            "hybrid_layer_ids",
        ),
        DROP,
    ),
}


def _small(value: Any, new: int) -> Any:
    """``value`` (an int, or a per-layer list of ints) at most ``new``."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return min(value, new) if value > 0 else value
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [min(v, new) for v in value]
    return value


def _shrink(d: dict[str, Any], hidden: int) -> dict[str, Any]:
    """A config dict (``to_dict()``) shrunk, its sub-config dicts too."""
    out = dict(d)
    layers = next((d[k] for k in _LAYERS if isinstance(d.get(k), int)), None)
    for key, value in d.items():
        if isinstance(value, dict):
            out[key] = _shrink(value, hidden)
        elif key in _HIDDEN:
            out[key] = _small(value, hidden) if not isinstance(value, int) else hidden
        elif key in _INTERMEDIATE:
            out[key] = _small(value, 2 * hidden) if value is not None else None
            if isinstance(value, int):
                out[key] = 2 * hidden
        elif key in _EXPERT_INTERMEDIATE:
            out[key] = _small(value, 64)
        elif key in _LAYERS:
            out[key] = _small(value, 2)
        elif key in _HEADS:  # per stage in hierarchical vision models
            out[key] = [4] * len(value) if isinstance(value, list) else 4
        elif key in ("out_features", "out_indices"):  # backbones: derived from the stages
            out[key] = None
        elif key in _KV_HEADS:  # multi-head attention stays so (DeepSeek's MLA needs it)
            heads = next((d[k] for k in _HEADS if k in d), None)
            if value is None and isinstance(heads, int):  # None: as many as the heads
                value = heads
            out[key] = 4 if isinstance(value, int) and value == heads else _small(value, 2)
        elif key in _HEAD_DIM and isinstance(value, int):
            out[key] = hidden // 4
        elif key == "head_dim" and value is None and any(k in d for k in _HEADS):
            out[key] = hidden // 4  # what hidden / heads gives, for the models that read it
        elif key in _POSITIONS:
            out[key] = _small(value, 64)
        elif key in _EXPERTS:
            out[key] = _small(value, 4)
        elif key in _TOP_K:
            experts = any(isinstance(d.get(k), int) and d[k] > 1 for k in _EXPERTS)
            out[key] = 2 if value is None and experts else _small(value, 2)
        elif str(key).endswith("_layer_period") and isinstance(value, int):
            out[key] = min(value, 2)  # Jamba: attention / experts every other layer
        elif key == "rotary_dim" and isinstance(value, int):  # a part of the head
            out[key] = hidden // 8
        elif key in _FIXED and isinstance(value, int):
            out[key] = _FIXED[key]
        elif key == "vocab_size":
            out[key] = _small(value, VOCAB)
        elif key == "image_size":
            out[key] = [_IMAGE, _IMAGE] if isinstance(value, list | tuple) else _IMAGE
        elif key == "window_size" and isinstance(value, int) and "patch_size" in d:
            out[key] = 2  # Swin-like: windows within the small image's patch grid
        elif key == "patch_size" and isinstance(value, int):
            out[key] = min(value, _PATCH)
        elif key == "mrope_section" and isinstance(value, list):
            out[key] = _scaled(value, hidden // 8)
    for key, value in d.items():  # ... at the offset in that period
        period = out.get(str(key).replace("_layer_offset", "_layer_period"))
        if str(key).endswith("_layer_offset") and isinstance(value, int) and period:
            out[key] = value % period
    heads, width = out.get("mamba_n_heads"), out.get("mamba_d_head")
    expanded = int(out.get("mamba_expand", 2) * out.get("hidden_size", hidden))
    if isinstance(heads, int) and isinstance(width, int) and "mamba_d_ssm" not in out:
        if heads * width != expanded:  # Bamba: heads of 16 filling the expanded width
            out["mamba_d_head"], out["mamba_n_heads"] = 16, expanded // 16
    if isinstance(out.get("qk_rope_head_dim"), int):  # MLA: rotary part and query width
        if "head_dim" in out:
            out["head_dim"] = out["qk_rope_head_dim"]
        if "qk_head_dim" in out:
            out["qk_head_dim"] = out["qk_rope_head_dim"] + out.get("qk_nope_head_dim", 0)
    # per-layer lists and patterns follow the new number of layers
    if isinstance(layers, int) and layers > 2:
        for key, value in out.items():
            per_layer = isinstance(value, list) or (isinstance(value, str) and "pattern" in key)
            if per_layer and len(value) == layers and key not in _HIDDEN:
                # two layers of two kinds where there are several (hybrid attention)
                other = next((v for v in value if v != value[0]), value[1])
                out[key] = value[:1] + (other if isinstance(value, str) else [other])
            elif isinstance(value, dict) and value and all(_index(k) is not None for k in value):
                out[key] = {k: v for k, v in value.items() if (_index(k) or 0) < 2}
            elif str(key).endswith("_layers") and isinstance(value, list):
                if all(isinstance(v, int) for v in value):
                    out[key] = [v for v in value if v < 2]
            elif str(key).endswith("types") and isinstance(value, list) and len(value) > 2:
                # a cycle of layer kinds (RecurrentGemma's block types): one of each two
                other = next((v for v in value if v != value[0]), None)
                if other is not None:
                    out[key] = [value[0], other]
    # special token ids beyond the new vocabulary: remapped to its top
    top = [VOCAB - 1]
    for key, value in list(out.items()):
        if str(key).endswith(("_token_id", "_token_index", "_token_ids")):
            out[key] = _remap(value, top)
    return out


def _index(key: Any) -> int | None:
    """``key`` as a layer index (an int, or an int written as a string), else None."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    return int(key) if isinstance(key, str) and key.isdigit() else None


def _remap(value: Any, top: list[int]) -> Any:
    if isinstance(value, list):
        return [_remap(v, top) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and value >= VOCAB:
        top[0] -= 1
        return top[0] + 1
    return value


def _scaled(section: list[int], total: int) -> list[int]:
    """``section`` (parts of a rotary dimension) scaled to add up to ``total``."""
    whole = sum(section) or 1
    parts = [max(1, v * total // whole) for v in section]
    parts[-1] += total - sum(parts)
    return parts


def tiny_config(model_type: str, hidden: int = 64) -> Any:
    """transformers' default config of ``model_type`` shrunk (``hidden`` wide, 2
    layers, 4 heads, vocabulary :data:`VOCAB`, 4 experts with top-2...), bfloat16."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    shrunk = _merge(_shrink(default.to_dict(), hidden), OVERRIDES.get(model_type, {}))
    config = type(default).from_dict(shrunk)
    config.dtype = "bfloat16"
    _mrope(config)
    return config


def _merge(d: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``d`` with ``override``'s values, merged into sub-config dicts, :data:`DROP` removed."""
    out = dict(d)
    for key, value in override.items():
        if value is DROP:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


#: types whose model code reads ``mrope_section`` though their config does not list it
_MROPE_UNLISTED = frozenset({"paddleocr_vl"})


def _mrope(config: Any) -> None:
    """Multimodal rotary sections that add up to the tiny rotary half width, where the
    text config takes an ``mrope_section`` that its default leaves to the model code
    (Qwen2-VL's [16, 24, 24], GLM-4V's [8, 12, 12]: for 128 wide heads)."""
    try:
        text = config.get_text_config()
    except ValueError:  # MusicGen: several text configs, none with multimodal rotary
        return
    listed = "mrope_section" in getattr(text, "ignore_keys_at_rope_validation", ())
    # PaddleOCR-VL's config does not say so, but its model code reads one
    if not listed and getattr(config, "model_type", None) not in _MROPE_UNLISTED:
        return
    for name in ("rope_parameters", "rope_scaling"):
        rope = getattr(text, name, None)
        if not isinstance(rope, dict):
            continue
        heads = getattr(text, "num_attention_heads", 1) or 1
        head = getattr(text, "head_dim", None) or text.hidden_size // heads
        partial = rope.get("partial_rotary_factor", getattr(text, "partial_rotary_factor", 1))
        half = int(head * (partial or 1)) // 2
        if half >= 3 and sum(rope.get("mrope_section") or ()) != half:
            rope["mrope_section"] = _scaled(rope.get("mrope_section") or [2, 3, 3], half)


# --- cases -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One swept class: a registry of :data:`REGISTRIES` and a model type in it."""

    registry: str
    model_type: str

    @property
    def id(self) -> str:
        return f"{self.registry}/{self.model_type}"


def cases(registries: list[str] | None = None, types: list[str] | None = None) -> list[Case]:
    """Every case of ``registries`` (default all), only ``types`` if given."""
    from transformers.models.auto import modeling_auto

    out = []
    for registry in registries or list(REGISTRIES):
        names = getattr(modeling_auto, REGISTRIES[registry][0])
        out += [Case(registry, t) for t in names if types is None or t in types]
    return out


def model_class(case: Case) -> Any:
    """The class the registry maps ``case.model_type`` to."""
    import transformers
    from transformers.models.auto import modeling_auto

    name = getattr(modeling_auto, REGISTRIES[case.registry][0])[case.model_type]
    if isinstance(name, list | tuple):
        name = name[0]
    return getattr(transformers, name)


def sharded(case: Case) -> bool:
    """Whether ``case`` is saved in several shards (half of the types, fixed)."""
    return zlib.crc32(case.model_type.encode()) % 2 == 0


def build(case: Case, config: Any) -> Any:
    """The registry's class from ``config``, seeded, bf16, every tensor perturbed (the
    init of tiny models leaves norms constant), in eval mode."""
    import torch

    cls = model_class(case)
    if not isinstance(config, cls.config_class):  # MusicGen's decoder: its sub-config
        subs = [getattr(config, name, None) for name in getattr(config, "sub_configs", {})]
        config = next((c for c in subs if isinstance(c, cls.config_class)), config)
        config.dtype = "bfloat16"
    torch.manual_seed(0)
    model = cls._from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.add_(torch.randn_like(param) * 0.02)
    return model.eval()


def inputs(case: Case, model: Any) -> dict[str, Any]:
    """The forward's inputs, chosen from ``model.main_input_name``: random token ids
    (image-text models: text only), pixel values or audio features; fixed seed."""
    import torch

    gen = torch.Generator().manual_seed(0)
    config = model.config
    name = getattr(model, "main_input_name", "input_ids")
    if case.registry == "image-text" or name not in ("pixel_values", "input_features"):
        name = "input_values" if name == "input_values" else "input_ids"
    if name == "input_ids":
        text = config.get_text_config()
        vocab = int(getattr(text, "vocab_size", VOCAB) or VOCAB)
        rows = int(getattr(text, "num_codebooks", 1) or 1)  # MusicGen: one row per codebook
        ids = torch.randint(3, min(vocab, TOKEN_HIGH), (rows, SEQ), generator=gen)
        out = {"input_ids": ids}
        if case.registry == "image-text":
            out["attention_mask"] = torch.ones_like(ids)
        if case.registry == "seq2seq":
            out["decoder_input_ids"] = ids.clone()
        return out
    if name == "pixel_values":
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", _IMAGE)
        h, w = size if isinstance(size, list | tuple) else (size, size)
        channels = int(getattr(vision, "num_channels", 3) or 3)
        shape = (1, channels, int(h), int(w))
        return {"pixel_values": torch.randn(shape, generator=gen).to(torch.bfloat16)}
    if name == "input_features":
        bins = int(getattr(config, "num_mel_bins", 0) or getattr(config, "feature_size", 80))
        frames = 2 * int(getattr(config, "max_source_positions", 32) or 32)
        feats = torch.randn((1, bins, frames), generator=gen).to(torch.bfloat16)
        out = {"input_features": feats}
        if case.registry == "seq2seq":
            out["decoder_input_ids"] = torch.randint(3, TOKEN_HIGH, (1, SEQ), generator=gen)
        return out
    return {"input_values": torch.randn((1, 1024), generator=gen).to(torch.bfloat16)}


def output(model: Any, args: dict[str, Any]) -> Any:
    """``model``'s ``.logits`` (or first float tensor of its output) on ``args``, float32."""
    import torch

    with torch.no_grad():
        result = model(**args)
    tensor = getattr(result, "logits", None)
    if tensor is None:
        values = result.to_tuple() if hasattr(result, "to_tuple") else result
        tensor = next(v for v in values if torch.is_tensor(v) and v.is_floating_point())
    return tensor.float()


def write_case(case: Case, folder: Path) -> tuple[Any, Any]:
    """Build ``case`` from :func:`tiny_config` (64 wide, else 128 wide) under a fixed seed
    in bf16, check that its bf16 forward runs, save it to ``folder`` (safetensors, in
    small shards for :func:`sharded` cases). Returns (bf16 logits, inputs); raises when
    transformers cannot (the case is unbuildable)."""
    error: Exception | None = None
    for hidden in (64, 128):
        try:
            model = build(case, tiny_config(case.model_type, hidden))
            args = inputs(case, model)
            logits = output(model, args)
        except Exception as err:  # transformers itself cannot: try wider, then give up
            error = error or err
            continue
        model.save_pretrained(folder, max_shard_size="100KB" if sharded(case) else "5GB")
        return logits, args
    assert error is not None
    raise error


# --- one case, one setting ---------------------------------------------------------------


@dataclass
class Outcome:
    """What happened to one case at one setting."""

    status: str
    detail: str = ""
    #: norm(ours - bf16) / norm(bf16), and the same for transformers' quantized model
    rel: float | None = None
    ref_rel: float | None = None
    #: max |ours - transformers'| when both ran
    max_abs: float | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def bnb_config(setting: str, skip: list[str] | None = None) -> Any:
    """transformers' config for ``setting``; ``skip``: its ``llm_int8_skip_modules``."""
    import torch
    from transformers import BitsAndBytesConfig

    if setting == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def ours(folder: Path, cls: Any, setting: str) -> Any:
    """leanstream's load of ``folder`` at ``setting``."""
    import torch

    import leanstream

    kwargs: dict[str, Any] = (
        dict(bits=4, quant_type="nf4", double_quant=False, compute_dtype=torch.bfloat16)
        if setting == "nf4"
        else dict(bits=8)
    )
    return leanstream.load(folder, device="cpu", progress=False, model_class=cls, **kwargs)


def quantized_experts(model: Any) -> list[str]:
    """The 3-D expert parameters leanstream quantized in ``model``."""
    for holder in (model.config, getattr(model.config, "quantization_config", None)):
        names = getattr(holder, "leanstream_quantized_experts", None)
        if names:
            return list(names)
    return []


def eager_experts(model: Any) -> None:
    """Run ``model``'s experts modules with transformers' eager forward (its configs and
    its text config): one dequantized expert at a time."""
    for config in (model.config, model.config.get_text_config()):
        config._experts_implementation = "eager"


def reference(
    folder: Path, cls: Any, setting: str, experts: list[str], skip: list[str] | None = None
) -> Any:
    """transformers + bitsandbytes' model of ``folder``; with ``experts``, those 3-D
    parameters quantized and dequantized per expert (``tests/test_moe.py``'s
    ``dequantized_reference``, for any architecture); with ``skip``, keeping those
    modules in full precision (``llm_int8_skip_modules``: the list leanstream recorded,
    which adds to transformers' own the layers whose weight a forward reads directly)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch

    from leanstream import cpu_layout
    from leanstream.quantize import accept_any_rank

    ref = cls.from_pretrained(
        folder,
        quantization_config=bnb_config(setting, skip),
        device_map="cpu",
        dtype=torch.bfloat16,
    ).eval()
    for name in experts:
        weight = ref.get_parameter(name)
        flat = weight.data.reshape(-1, weight.shape[-1])
        if setting == "int8":
            cb, scb, _ = F.int8_vectorwise_quant(flat.half())
            value = F.int8_vectorwise_dequant(cb, scb)
        else:
            # flat: bitsandbytes' CPU kernel dequantizes a 2-D shape whose rows are not
            # whole blocks wrongly (leanstream.quantize.partial_blocks)
            packed, state = F.quantize_4bit(
                flat.reshape(-1), blocksize=64, compress_statistics=False, quant_type="nf4"
            )
            value = F.dequantize_4bit(packed, state)
        module_name, _, attr = name.rpartition(".")
        module = ref.get_submodule(module_name)
        module._parameters[attr] = torch.nn.Parameter(
            value.to(torch.bfloat16).reshape(weight.shape), requires_grad=False
        )
    if experts:
        eager_experts(ref)
    # leanstream's documented kernel choices (README, "CPUs with AVX512-BF16"), made on
    # transformers' model too: LLM.int8 layers take inputs of any rank; 4-bit layers
    # whose shape bitsandbytes' AVX512-BF16 repacking cannot take ("N must be divisible
    # by block_n", "shape '[512, 0]' is invalid") run its plain kernel; a strided input
    # (SegFormer's, Swin's transposes) is made contiguous, where the fused kernel reads
    # it as contiguous and computes wrong values
    for module in ref.modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            accept_any_rank(module)
        if isinstance(module, bnb.nn.Linear4bit):
            module.register_forward_pre_hook(_contiguous_input)
            if not cpu_layout.fits(
                module.out_features, module.in_features, module.weight.blocksize
            ):
                module.support_avx512bf16_for_cpu = False
    return ref


#: cases where transformers' quantized model computes wrong values and leanstream's does
#: not (checked by hand; a case here that differs counts as ``beyond``, with the reason)
TRANSFORMERS_WRONG: dict[tuple[str, str], str] = {
    ("vision", "swinv2"): (
        "transformers' model casts Swin-v2's relative coordinates to the dtype of its first "
        "continuous-position-bias layer's weight, int8/uint8 once quantized (-1.05 becomes "
        "-1); leanstream computes them before the layers are replaced"
    ),
}


def _contiguous_input(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0] if args else None
    if x is not None and x.dim() > 1 and x.stride(-1) != 1:
        return (x.contiguous(), *args[1:])
    return None


def inspect_mismatch(folder: Path, cls: Any, setting: str, model: Any) -> str:
    """Where ``leanstream inspect`` did not predict what load made of ``model`` (its
    quantized layers, the linears kept in full precision, footprint()); "" if nowhere."""
    import bitsandbytes as bnb
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    import leanstream
    from leanstream.cli import inspect_checkpoint
    from leanstream.experts import QuantizedExperts

    try:
        report = inspect_checkpoint(folder, model_class=cls)
    except Exception as err:
        return f"inspect raised {_line(err)}"
    quant = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    layers = [n for n, m in model.named_modules() if isinstance(m, quant)]
    layers += [n for n, p in model.named_parameters() if isinstance(p, QuantizedExperts)]
    kept = sorted(
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear | Conv1D) and not isinstance(m, quant)
    )
    problems = []
    if report["quantizable_layers"] != len(layers):
        problems.append(f"quantizable_layers {report['quantizable_layers']} != {len(layers)}")
    if sorted(report["kept_in_full_precision"]) != kept:
        want = set(report["kept_in_full_precision"])
        problems.append(f"kept: predicted-only {sorted(want - set(kept))[:3]}")
        problems[-1] += f" loaded-only {sorted(set(kept) - want)[:3]}"
    row = {r["setting"]: r for r in report["memory"]}.get(MEMORY_ROW[setting])
    actual = leanstream.footprint(model)
    if row is None:
        problems.append(f"no memory row {MEMORY_ROW[setting]!r}")
    elif (row["total_bytes"], row["by_kind"]) != (actual.total_bytes, actual.by_kind):
        problems.append(f"memory {row['by_kind']} != footprint {actual.by_kind}")
    return "; ".join(problems)


def notes_of(folder: Path, cls: Any) -> dict[str, str]:
    """``leanstream inspect``'s notes: the layers leanstream's rules beyond transformers'
    decided."""
    from leanstream.cli import inspect_checkpoint

    try:
        return dict(inspect_checkpoint(folder, model_class=cls)["notes"])
    except Exception:
        return {}  # inspect_mismatch reports it


def _rel(a: Any, b: Any) -> float:
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def classify(case: Case, setting: str, folder: Path, bf16: Any, args: dict[str, Any]) -> Outcome:
    """The :class:`Outcome` of ``case`` at ``setting`` (``folder`` written by
    :func:`write_case`, ``bf16`` its bf16 logits on ``args``)."""
    import torch

    import leanstream

    cls = model_class(case)
    try:
        got = ours(folder, cls, setting)
    except leanstream.LeanstreamError as err:
        return Outcome("refused", _line(err))
    except Exception as err:
        return Outcome("crash", f"load: {_line(err)}")
    mismatch = inspect_mismatch(folder, cls, setting, got)  # before a forward repacks
    experts = quantized_experts(got)
    # transformers keeps what leanstream kept: the layers leanstream keeps beyond
    # transformers' rules (a weight read directly) are compared as kept
    recorded = got.config.quantization_config.llm_int8_skip_modules
    skip = list(recorded) if recorded is not None else None
    beyond = {n: why for n, why in notes_of(folder, cls).items() if " reads self." in why}
    try:
        mine = output(got, args)
        kernels = None
        if experts:
            # the experts ran through bitsandbytes' kernels (leanstream.experts); compared
            # exactly, the same model on the dequantized experts (the eager forward), as
            # the reference computes, and the kernels' output within their rounding
            kernels = mine
            eager_experts(got)
            mine = output(got, args)
    except Exception as err:
        crash = Outcome("crash", f"forward: {_line(err)}", extra={"inspect": mismatch})
        try:  # whether transformers' quantized model runs where ours does not
            output(reference(folder, cls, setting, experts, skip), args)
            crash.detail += " (transformers' runs)"
        except Exception as theirs:
            crash.detail += f" (transformers' fails too: {_line(theirs)[:120]})"
        return crash
    del got
    rel = _rel(bf16, mine) if mine.shape == bf16.shape else float("inf")
    outcome = Outcome("differ", rel=rel)
    if not torch.isfinite(mine).all():
        outcome.detail = "ours: non-finite logits"
    else:
        try:
            theirs = output(reference(folder, cls, setting, experts, skip), args)
        except Exception as err:
            theirs = None
            why = _line(err)
        if theirs is None:
            ok = rel <= BEYOND[setting]
            outcome.status = "beyond" if ok else "differ"
            outcome.detail = f"transformers: {why}; ours vs bf16 rel {rel:.3g}"
        else:
            outcome.ref_rel = _rel(bf16, theirs)
            if theirs.shape != mine.shape:
                outcome.detail = f"shapes {tuple(mine.shape)} vs {tuple(theirs.shape)}"
            else:
                outcome.max_abs = float((theirs - mine).abs().max())
                scale = float(theirs.abs().max())
                if kernels is not None:
                    outcome.extra["kernels_max_abs"] = float((theirs - kernels).abs().max())
                if kernels is not None and not (
                    outcome.extra["kernels_max_abs"] <= KERNELS_TOLERANCE * scale
                ):
                    outcome.detail = (
                        f"the experts' kernels: max abs diff {outcome.extra['kernels_max_abs']:.3g}"
                        f" (|ref| max {scale:.3g})"
                    )
                elif torch.equal(theirs, mine):
                    outcome.status = "equal"
                elif (case.registry, case.model_type) in TRANSFORMERS_WRONG:
                    outcome.status = "beyond"
                    outcome.detail = TRANSFORMERS_WRONG[case.registry, case.model_type]
                else:
                    outcome.detail = (
                        f"max abs diff {outcome.max_abs:.3g} (|ref| max "
                        f"{float(theirs.abs().max()):.3g}); rel vs bf16 ours {rel:.3g} "
                        f"transformers {outcome.ref_rel:.3g}"
                    )
        if experts:
            outcome.extra["experts"] = len(experts)
        if beyond:
            outcome.extra["kept_beyond_transformers"] = len(beyond)
    if mismatch:
        if outcome.status in ACCEPTED:
            outcome.status, outcome.detail = "inspect-mismatch", mismatch
        else:
            outcome.extra["inspect"] = mismatch
    return outcome


# --- the worker --------------------------------------------------------------------------

_LAST: dict[str, Any] = {}  # the worker's last written case: {"case", "result" | "error"}


def run_case(case: Case, setting: str, root: Path) -> Outcome:
    """:func:`classify` ``case`` at ``setting``, writing it under ``root`` first (once per
    case in a row); an unbuildable case is that outcome."""
    start = time.monotonic()
    if _LAST.get("case") != case:
        _LAST.clear()
        _LAST["case"] = case
        folder = root / case.registry / case.model_type
        try:
            _LAST["result"] = (folder, *write_case(case, folder))
        except Exception as err:
            _LAST["error"] = _line(err)
    if "error" in _LAST:
        outcome = Outcome("unbuildable", _LAST["error"])
    else:
        folder, logits, args = _LAST["result"]
        outcome = classify(case, setting, folder, logits, args)
    outcome.seconds = round(time.monotonic() - start, 2)
    return outcome


def serve() -> None:
    """The worker's loop: one JSON request a line on stdin ({"registry", "model_type",
    "setting", "root"}), one :class:`Outcome` a line on the original stdout (the
    libraries' prints go to stderr)."""
    import warnings

    import torch

    if os.environ.get("LEANSTREAM_TEST_CPU_KERNEL") == "plain":  # as conftest.py does
        import bitsandbytes.functional
        import bitsandbytes.nn.modules

        bitsandbytes.functional.has_avx512bf16 = lambda: False
        bitsandbytes.nn.modules.has_avx512bf16 = lambda: False
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    warnings.simplefilter("ignore")
    torch.set_num_threads(int(os.environ.get("LEANSTREAM_SWEEP_THREADS", "1")))
    for line in sys.stdin:
        req = json.loads(line)
        case = Case(req["registry"], req["model_type"])
        try:
            outcome = run_case(case, req["setting"], Path(req["root"]))
        except Exception as err:  # the sweep's own machinery: reported, not fatal
            outcome = Outcome("crash", f"sweep: {_line(err)}")
        proto.write(json.dumps(asdict(outcome)) + "\n")


def _close_pipes(proc: subprocess.Popen[str]) -> None:
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            try:
                pipe.close()
            except OSError:  # a dead worker's stdin: nothing left to flush to
                pass


class Worker:
    """A :func:`serve` subprocess, (re)started on demand; one request at a time, each
    with a timeout. A worker that dies or hangs is a ``crash`` of that case."""

    def __init__(self, root: Path, timeout: float = CASE_TIMEOUT) -> None:
        self.root = Path(root)
        self.timeout = timeout
        self.proc: subprocess.Popen[str] | None = None
        self.log = self.root / "worker.log"

    def _start(self) -> subprocess.Popen[str]:
        here = Path(__file__).resolve().parent
        env = dict(os.environ)
        paths = [str(here.parent / "python"), str(here), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        self.root.mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as log:
            return subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--serve"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
            )

    def run(self, case: Case, setting: str) -> Outcome:
        """The outcome of ``case`` at ``setting`` in the worker."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        proc = self.proc
        assert proc.stdin is not None and proc.stdout is not None
        req = {**asdict(case), "setting": setting, "root": str(self.root)}
        start = time.monotonic()
        try:
            proc.stdin.write(json.dumps(req) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            ready = sel.select(self.timeout)
        line = proc.stdout.readline() if ready else ""
        if line:
            return Outcome(**json.loads(line))
        seconds = round(time.monotonic() - start, 2)
        if not ready:
            self.close()
            return Outcome("crash", f"timeout after {self.timeout:.0f} s", seconds=seconds)
        code = proc.wait()
        self.proc = None
        _close_pipes(proc)
        why = f"signal {signal.Signals(-code).name}" if code < 0 else f"worker exit {code}"
        tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        return Outcome("crash", f"{why}: {tail[0][:200]}", seconds=seconds)

    def close(self) -> None:
        """End the worker (killed if it does not exit at once)."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        try:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=5)
        except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
            proc.kill()
            proc.wait()
        _close_pipes(proc)

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    serve()
