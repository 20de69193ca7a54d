"""A model whose ``get_input_embeddings`` raises (CLIPModel: two towers, no one input
embedding) loads and is inspected like any other (issue 26, item 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_cli import run
from test_load import assert_same_weights
from transformers import BitsAndBytesConfig, CLIPConfig, CLIPModel

import leanstream
from leanstream.errors import ConfigError
from leanstream.quantize import QuantSpec, extra_modules

# the outcome depends on bitsandbytes' CPU 4-bit kernel (tests/cpu_kernel.py)
pytestmark = pytest.mark.cpu_kernel

TOWER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            **TOWER,
            vocab_size=128,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),
        vision_config=dict(**TOWER, image_size=32, patch_size=16),
        projection_dim=64,
    )
    config.dtype = torch.bfloat16
    model = CLIPModel(config).to(torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder, max_shard_size="40KB")
    return folder


def outputs(model: Any) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 42, 7, 100, 11, 2], [3, 4, 5, 6, 7, 8, 9, 10]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(input_ids=ids, pixel_values=pixels.to(torch.bfloat16)).logits_per_image


def test_clip_loads_as_transformers(clip: Path) -> None:
    ref = CLIPModel.from_pretrained(
        clip,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16
        ),
        device_map="cpu",
    )
    got = leanstream.load(
        clip,
        bits=4,
        quant_type="fp4",
        double_quant=False,
        compute_dtype=torch.bfloat16,
        device="cpu",
        model_class=CLIPModel,
        progress=False,
    )
    assert assert_same_weights(ref, got) > 0
    assert torch.equal(outputs(ref), outputs(got))


def test_clip_inspects(clip: Path) -> None:
    result = run("inspect", str(clip), "--model-class", "CLIPModel")
    assert result.returncode == 0, result.stderr


def test_quantize_embeddings_without_input_embeddings(clip: Path) -> None:
    """Nothing to tie them to (no output embeddings): every ``nn.Embedding`` is quantized,
    but the position embeddings, whose weight the embeddings' forwards read directly
    (``self.position_embedding.weight.shape[0]``: a packed weight's is wrong)."""
    got = leanstream.load(
        clip,
        bits=4,
        device="cpu",
        model_class=CLIPModel,
        quantize_embeddings=True,
        compute_dtype=torch.bfloat16,
        progress=False,
    )
    kinds = {n: type(m).__name__ for n, m in got.named_modules() if n.endswith("_embedding")}
    assert kinds == {
        "text_model.embeddings.token_embedding": "Embedding4bit",
        "text_model.embeddings.position_embedding": "Embedding",
        "vision_model.embeddings.position_embedding": "Embedding",
        "vision_model.embeddings.patch_embedding": "Conv2d",
    }
    assert torch.isfinite(outputs(got)).all()


class Towers(torch.nn.Module):
    """A model that cannot name its input embeddings (as CLIPModel), ``head`` its
    output embeddings or, ``head=None``, none it can name either."""

    def __init__(self, head: bool) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(8, 64)
        self.head = torch.nn.Linear(64, 8) if head else None

    def get_input_embeddings(self) -> torch.nn.Module:
        raise NotImplementedError("not auto-handled")

    def get_output_embeddings(self) -> torch.nn.Module:
        if self.head is None:
            raise AttributeError("no head")
        return self.head


@pytest.mark.parametrize("flag", ["embeddings", "lm_head"])
@pytest.mark.parametrize(
    ("head", "method"), [(True, "get_input_embeddings"), (False, "get_output_embeddings")]
)
def test_extra_modules_refuses_what_the_model_cannot_name(
    flag: str, head: bool, method: str
) -> None:
    with pytest.raises(ConfigError, match=f"quantize_{flag}=True: Towers.{method}"):
        extra_modules(Towers(head), QuantSpec(bits=4, **{flag: True}), [])


@pytest.mark.parametrize("head", [True, False])
def test_extra_modules_of_a_model_that_cannot_name_them(head: bool) -> None:
    assert extra_modules(Towers(head), QuantSpec(bits=4), []) == (set(), set())
