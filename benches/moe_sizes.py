"""Memory of real mixture-of-experts models: bf16, transformers + bitsandbytes, leanstream.

    python benches/moe_sizes.py

Builds each model on ``meta`` from its published hyperparameters and predicts its
memory with the code behind ``leanstream inspect`` (``leanstream.cli._predict``, which
equals ``leanstream.footprint`` after ``load``). No download: the configs below are
transcribed by hand from each model's ``config.json`` on the Hugging Face hub (only
the fields that set a parameter's shape matter here).

Columns:

- bf16: every parameter and buffer in bfloat16.
- transformers "4-bit": what ``from_pretrained(..., BitsAndBytesConfig(load_in_4bit=True))``
  holds: its ``nn.Linear`` layers in 4 bits, the 3-D experts (transformers 5's
  ``experts.gate_up_proj`` / ``down_proj``, not linears) left in bf16. Predicted by
  the same code with every experts module in ``skip_modules``.
- leanstream 4-bit / 8-bit: ``leanstream.load(..., bits=4|8)``, experts quantized too
  (4-bit: NF4, blocksize 64, no double quantization, as ``BitsAndBytesConfig`` defaults;
  double quantization saves a further ~3 % and is its own column).

gpt-oss-20b is published with its experts in MXFP4 (about 13 GB of files); it is counted
here in bf16, what transformers dequantizes those experts to without MXFP4 kernels.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

GIB = 1 << 30

# Transcribed from each model's config.json (hub, main branch); not downloaded.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "Mixtral-8x7B": (  # mistralai/Mixtral-8x7B-v0.1
        "mixtral",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=32768,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
    ),
    "Qwen3-30B-A3B": (  # Qwen/Qwen3-30B-A3B
        "qwen3_moe",
        dict(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
        ),
    ),
    "gpt-oss-20b": (  # openai/gpt-oss-20b (experts MXFP4 on disk; counted as bf16)
        "gpt_oss",
        dict(
            vocab_size=201088,
            hidden_size=2880,
            intermediate_size=2880,
            num_hidden_layers=24,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=64,
            num_local_experts=32,
            num_experts_per_tok=4,
            sliding_window=128,
            layer_types=["sliding_attention", "full_attention"] * 12,
            max_position_embeddings=131072,
            attention_bias=True,
            tie_word_embeddings=False,
        ),
    ),
    "OLMoE-1B-7B": (  # allenai/OLMoE-1B-7B-0924
        "olmoe",
        dict(
            vocab_size=50304,
            hidden_size=2048,
            intermediate_size=1024,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=16,
            num_experts=64,
            num_experts_per_tok=8,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
    ),
}

COLUMNS = [
    "bf16 GiB",
    'transformers "4-bit" GiB',
    "leanstream 4-bit GiB",
    "4-bit + double quant GiB",
    "leanstream 8-bit GiB",
    "experts share of bf16",
]


def build(model_type: str, fields: dict[str, Any]) -> Any:
    import torch
    from transformers import AutoConfig

    from leanstream.meta import build_empty_model

    config = AutoConfig.for_model(model_type, **fields)
    config.dtype = torch.bfloat16
    return build_empty_model(config)


def predict(model_type: str, fields: dict[str, Any]) -> dict[str, int]:
    """Predicted bytes after loading, by setting (``leanstream <bits>``, ``transformers
    <bits>``, ``bf16``), and ``experts bf16``: the bytes of the 3-D experts in bf16."""
    import torch

    from leanstream.cli import _predict
    from leanstream.quantize import QuantSpec, default_skip_modules, expert_params

    dtype = torch.bfloat16
    settings = {
        "bf16": QuantSpec(bits=16),
        "leanstream 4-bit": QuantSpec(bits=4),
        "leanstream 4-bit dq": QuantSpec(bits=4, double_quant=True),
        "leanstream 8-bit": QuantSpec(bits=8),
    }
    model = build(model_type, fields)
    experts = expert_params(model, ())
    skip = default_skip_modules(model)
    out = {
        p.setting: p.total_bytes for p in _predict(model, dtype, settings, layers(model, skip))[0]
    }
    out["experts bf16"] = sum(e * r * c * dtype.itemsize for e, r, c in experts.values())
    # transformers + bitsandbytes: the same, with every experts module kept as it is
    model = build(model_type, fields)
    keep = default_skip_modules(model) | {name.rpartition(".")[0] for name in experts}
    settings = {"transformers 4-bit": QuantSpec(bits=4), "transformers 8-bit": QuantSpec(bits=8)}
    out.update(
        (p.setting, p.total_bytes) for p in _predict(model, dtype, settings, layers(model, keep))[0]
    )
    return out


def layers(model: Any, skip: set[str]) -> Any:
    """What a load of the transformers meta ``model`` does to its tensors when ``skip``
    stays in full precision (``leanstream.cli``'s ``_Layers``, for ``_predict``); its
    linears are replaced on meta."""
    import torch

    from leanstream.cli import _Layers
    from leanstream.families import fp32_rule, quantized_experts
    from leanstream.matching import expected_shapes
    from leanstream.quantize import QuantSpec, replace_linears

    expected = expected_shapes(model)
    replaced = replace_linears(model, QuantSpec(bits=4), skip)
    experts = quantized_experts(model, "transformers", skip, None, expected)
    keep_fp32 = fp32_rule(model, "transformers", torch.bfloat16)
    return _Layers(replaced, set(), set(), experts, set(expected), keep_fp32)


def row(name: str, model_type: str, fields: dict[str, Any]) -> str:
    """The table's row for one model."""
    p = predict(model_type, fields)
    keys = ["bf16", "transformers 4-bit", "leanstream 4-bit", "leanstream 4-bit dq"]
    gib = [p[k] / GIB for k in [*keys, "leanstream 8-bit"]]
    share = p["experts bf16"] / p["bf16"]
    return f"| {name} | " + " | ".join(f"{g:.1f}" for g in gib) + f" | {share:.1%} |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CONFIGS), help="comma-separated names")
    args = parser.parse_args(argv)
    lines = ["| model | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name in args.models.split(","):
        lines.append(row(name.strip(), *CONFIGS[name.strip()]))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
