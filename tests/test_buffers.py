"""Buffers as transformers leaves them: ``from_pretrained`` builds the model with the
model's dtype as torch's default dtype, so a buffer computed in the default dtype
(XGLM's sinusoidal positions, OpenAI-GPT's causal mask, MusicGen's positions,
Falcon-H1's ``mup_vector``) has the model's dtype, and one computed explicitly in
float32 (rotary ``inv_freq``) stays float32. Always compared with transformers'
model loaded with the same dtype (issue 26, item 6)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import leanstream
from leanstream.meta import build_empty_model
from models import TINY, make_config, write_model

# the outcome of the 4-bit forwards depends on bitsandbytes' CPU kernel (tests/cpu_kernel.py)
pytestmark = pytest.mark.cpu_kernel

TINY.update(
    {
        "xglm": (
            "XGLMConfig",
            dict(
                d_model=64,
                ffn_dim=192,
                num_layers=2,
                attention_heads=4,
                vocab_size=320,
                max_position_embeddings=128,
            ),
        ),
        "openai-gpt": (
            "OpenAIGPTConfig",
            dict(n_embd=64, n_layer=2, n_head=4, vocab_size=320, n_positions=128),
        ),
        # the decoder alone: transformers' causal LM class for it is MusicgenForCausalLM
        # (AutoModelForCausalLM maps the composite MusicgenConfig, not this one)
        "musicgen": (
            "MusicgenDecoderConfig",
            dict(
                hidden_size=64,
                ffn_dim=192,
                num_hidden_layers=2,
                num_attention_heads=4,
                vocab_size=320,
                max_position_embeddings=128,
                num_codebooks=1,
                pad_token_id=0,
                bos_token_id=0,
            ),
        ),
        "falcon_h1": (
            "FalconH1Config",
            dict(
                hidden_size=64,
                intermediate_size=192,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                vocab_size=320,
                max_position_embeddings=128,
                mamba_d_ssm=128,
                mamba_n_heads=4,
                mamba_d_head=32,
                mamba_d_state=16,
                mamba_n_groups=1,
                mamba_chunk_size=16,
            ),
        ),
        # sinusoidal positions recomputed by _init_weights from a float32 inv_freq
        "gptj": (
            "GPTJConfig",
            dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=320, n_positions=128),
        ),
    }
)

ARCHS = ["llama", "xglm", "openai-gpt", "musicgen", "falcon_h1", "gptj"]
#: the class transformers loads each with (AutoModelForCausalLM unless named)
CLASSES = {"musicgen": "MusicgenForCausalLM"}


def model_class(arch: str) -> Any:
    return getattr(transformers, CLASSES[arch]) if arch in CLASSES else AutoModelForCausalLM


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("buffers")
    folders = {}
    for arch in ARCHS:
        if arch in CLASSES:
            torch.manual_seed(0)
            model = model_class(arch)(make_config(arch)).to(torch.bfloat16)
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(torch.randn_like(param) * 0.02)
            model.save_pretrained(root / arch, max_shard_size="40KB")
            folders[arch] = root / arch
        else:
            folders[arch] = write_model(root / arch, arch)
    return folders


def reference(folder: Path, arch: str, bits: int | None) -> Any:
    """transformers' model of ``folder`` in bfloat16 (with bitsandbytes at ``bits=4``)."""
    extra: dict[str, Any] = {}
    if bits == 4:
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16
        )
    return model_class(arch).from_pretrained(
        folder, dtype=torch.bfloat16, device_map="cpu", **extra
    )


def ours(folder: Path, bits: int | None) -> Any:
    extra = {"compute_dtype": torch.bfloat16} if bits == 4 else {}
    return leanstream.load(
        folder, bits=bits, dtype=torch.bfloat16, device="cpu", progress=False, **extra
    )


def logits(model: Any) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 42, 7, 300, 11, 2]])
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("arch", ARCHS)
def test_buffers_have_transformers_dtype_and_values(
    checkpoints: dict[str, Path], arch: str, bits: int | None
) -> None:
    """Regression (issue 26, item 6): XGLM's ``embed_positions.weights``, OpenAI-GPT's
    ``attn.bias`` and MusicGen's positions stayed float32 in a bfloat16 model (the
    first forward failed on mixed dtypes), Falcon-H1's ``mup_vector`` too (other
    logits); GPT-J's positions were computed under the bfloat16 switch, not recomputed
    by ``_init_weights`` in float32 as ``from_pretrained`` does (other logits)."""
    ref = reference(checkpoints[arch], arch, bits)
    got = ours(checkpoints[arch], bits)
    expected = dict(ref.named_buffers(remove_duplicate=False))
    buffers = dict(got.named_buffers(remove_duplicate=False))
    assert buffers.keys() == expected.keys()
    for name, buffer in expected.items():
        assert buffers[name].dtype == buffer.dtype, name
        assert torch.equal(buffers[name], buffer), name
    # a forward runs; without quantization it is transformers' to the bit
    out = logits(got)
    if bits is None:
        assert torch.equal(out, logits(ref))


def test_build_takes_the_configured_dtype_and_restores_the_default() -> None:
    """``build_empty_model`` builds with ``config.dtype`` as the default dtype (as
    ``from_config`` does), or with the dtype it is given, and leaves torch's default
    as it found it."""
    assert torch.get_default_dtype() == torch.float32
    config = make_config("openai-gpt", torch.bfloat16)
    assert build_empty_model(config).transformer.h[0].attn.bias.dtype == torch.bfloat16
    given = build_empty_model(config, dtype=torch.float16)
    assert given.transformer.h[0].attn.bias.dtype == torch.float16
    assert given.config.dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32


def test_builds_in_threads_keep_their_own_dtype() -> None:
    """The default dtype is process-wide: builds in two threads neither see each
    other's nor leave one behind."""
    dtypes = [torch.bfloat16, torch.float16] * 4
    seen: list[torch.dtype | None] = [None] * len(dtypes)

    def build(i: int) -> None:
        model = build_empty_model(make_config("xglm", dtypes[i]))
        seen[i] = model.model.embed_positions.weights.dtype

    threads = [threading.Thread(target=build, args=(i,)) for i in range(len(dtypes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == dtypes
    assert torch.get_default_dtype() == torch.float32
