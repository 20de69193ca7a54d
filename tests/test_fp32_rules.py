"""``_keep_in_fp32_modules(_strict)`` entries name modules and parameters alike
(Ernie4.5-MoE's ``"gate.weight"``, DeepSeek-V3's ``"e_score_correction_bias"``):
every tensor they match is float32, as transformers loads it (issue 26, item 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Ernie4_5_MoeConfig

import leanstream
from models import write_model

# the outcome depends on bitsandbytes' CPU 4-bit kernel (tests/cpu_kernel.py)
pytestmark = pytest.mark.cpu_kernel

# a tiny Ernie4.5-MoE: a dense first layer, then experts of 64x64 values
ERNIE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
    moe_intermediate_size=64,
    moe_num_experts=4,
    moe_k=2,
    moe_num_shared_experts=1,
    moe_layer_start_index=1,
    tie_word_embeddings=False,
)


def write_ernie(folder: Path) -> Path:
    torch.manual_seed(0)
    config = Ernie4_5_MoeConfig(**ERNIE)
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    model.save_pretrained(folder, max_shard_size="40KB")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fp32")
    return {
        "ernie4_5_moe": write_ernie(root / "ernie4_5_moe"),
        "deepseek_v3": write_model(root / "deepseek_v3", "deepseek_v3"),
    }


def bnb4() -> BitsAndBytesConfig:
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )


IDS = torch.tensor([[1, 5, 9, 42, 7, 100, 11, 2]])


def dtypes(model: Any) -> dict[str, torch.dtype]:
    """The dtype of every parameter and buffer but the 3-D experts (which leanstream
    quantizes and transformers' bitsandbytes leaves: tests/test_moe.py)."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {
        name: t.dtype
        for name, t in tensors.items()
        if not name.rpartition(".")[0].endswith(".experts")
    }


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.mark.parametrize("arch", ["ernie4_5_moe", "deepseek_v3"])
@pytest.mark.parametrize("bits", [None, 4])
def test_keep_in_fp32_parameter_patterns_are_transformers(
    folders: dict[str, Path], arch: str, bits: int | None
) -> None:
    folder = folders[arch]
    if bits is None:
        ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu")
        got = leanstream.load(folder, bits=None, dtype=torch.bfloat16, device="cpu", progress=False)
    else:
        ref = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.bfloat16, quantization_config=bnb4(), device_map="cpu"
        )
        got = leanstream.load(
            folder,
            bits=4,
            quant_type="nf4",
            double_quant=False,
            compute_dtype=torch.bfloat16,
            dtype=torch.bfloat16,
            device="cpu",
            progress=False,
        )
    expected = dtypes(ref)
    assert torch.float32 in expected.values()  # the rule is exercised
    assert dtypes(got) == expected
    if bits is None:
        assert torch.equal(logits(ref), logits(got))
