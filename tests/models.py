"""Tiny random transformers checkpoints for tests (no network: built from configs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# the decoder shape shared by the llama-like tiny models (dims bnb's CPU 4-bit matmul accepts)
_DECODER = dict(
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=128,
)

# name -> (config class name, kwargs); small but real architectures
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {**_DECODER, "tie_word_embeddings": False}),
    "llama-tied": ("LlamaConfig", {**_DECODER, "tie_word_embeddings": True}),
    "opt": (
        "OPTConfig",
        dict(
            hidden_size=64,
            ffn_dim=192,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=320,
            max_position_embeddings=128,
            word_embed_proj_dim=64,
        ),
    ),
    "gpt2": (
        "GPT2Config",
        dict(
            n_embd=64,
            n_layer=2,
            n_head=4,
            vocab_size=320,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    "qwen2": ("Qwen2Config", {**_DECODER, "tie_word_embeddings": False}),
}

# the mixture-of-experts layer shared by the tiny MoE models: experts of 64x64 / 128x64
# values (whole numbers of 64-value blocks), vocabulary 128
_MOE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
)
MOE_ARCHS = ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss"]
TINY.update(
    {
        "mixtral": (
            "MixtralConfig",
            {**_MOE, "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2},
        ),
        "qwen3_moe": (
            "Qwen3MoeConfig",
            dict(
                **_MOE,
                intermediate_size=128,
                moe_intermediate_size=64,
                num_experts=4,
                num_experts_per_tok=2,
                head_dim=16,
            ),
        ),
        "qwen2_moe": (
            "Qwen2MoeConfig",
            dict(
                **_MOE,
                intermediate_size=128,
                moe_intermediate_size=64,
                shared_expert_intermediate_size=64,
                num_experts=4,
                num_experts_per_tok=2,
            ),
        ),
        "olmoe": (
            "OlmoeConfig",
            dict(
                **_MOE, intermediate_size=64, num_experts=4, num_experts_per_tok=2, eos_token_id=1
            ),
        ),
        "deepseek_v3": (
            "DeepseekV3Config",
            dict(
                **{**_MOE, "num_key_value_heads": 4},  # its attention repeats no heads
                intermediate_size=128,
                moe_intermediate_size=64,
                n_routed_experts=4,
                num_experts_per_tok=2,
                n_shared_experts=1,
                n_group=1,
                topk_group=1,
                first_k_dense_replace=1,
                # 4-bit linears take a multiple of 64 inputs and make a multiple of 32
                # outputs, as in the real model (bitsandbytes' AVX512-BF16 CPU kernel needs
                # it): kv_a_proj_with_mqa makes kv_lora_rank + qk_rope_head_dim = 96
                q_lora_rank=64,
                kv_lora_rank=64,
                qk_nope_head_dim=16,
                qk_rope_head_dim=32,
                v_head_dim=16,
            ),
        ),
        "gpt_oss": (
            "GptOssConfig",
            dict(
                **_MOE,
                intermediate_size=64,
                num_local_experts=4,
                num_experts_per_tok=2,
                head_dim=16,
                sliding_window=32,
            ),
        ),
    }
)


def make_config(arch: str, dtype: torch.dtype = torch.bfloat16, **overrides: Any) -> Any:
    import transformers

    cls_name, kwargs = TINY[arch]
    config = getattr(transformers, cls_name)(**{**kwargs, **overrides})
    config.dtype = dtype
    return config


def write_model(
    folder: Path,
    arch: str,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str | int = "40KB",
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Write a random-weight checkpoint of ``arch`` in ``dtype``, in several shards."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = make_config(arch, dtype, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # random init of tiny models leaves some tensors (norms) constant: perturb all
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return folder


def stored(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read with safetensors."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def edit_tensor(folder: Path, name: str, value: torch.Tensor | None) -> None:
    """Replace (or with None, drop) tensor ``name`` in its shard of a sharded checkpoint
    folder, fixing the index."""
    import json

    from safetensors.torch import load_file, save_file

    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"][name]
    tensors = load_file(folder / shard)
    if value is None:
        del tensors[name], index["weight_map"][name]
    else:
        tensors[name] = value
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


def write_tokenizer(folder: Path) -> Path:
    """A tiny word-level tokenizer (ids 0..319, like the tiny models), built offline."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<s>", "</s>", "the", "meaning", "of", "life", "is"]
    words += [f"w{i}" for i in range(320 - len(words))]
    tokenizer = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(folder)
    return folder
