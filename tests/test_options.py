"""``load()``'s options against a ``quantization_config``: an option given explicitly
either agrees with the config (and the load is transformers' with that config) or is
a ConfigError naming both values, even when it is given as its own default."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
from test_load import assert_same_weights
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import leanstream
from models import write_model

# the outcome depends on bitsandbytes' CPU 4-bit kernel (tests/cpu_kernel.py)
pytestmark = pytest.mark.cpu_kernel


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("options") / "llama", "llama")


def ours(folder: Path, **kwargs: Any) -> Any:
    return leanstream.load(folder, device="cpu", progress=False, **kwargs)


@pytest.mark.parametrize(
    ("config", "kwargs", "match"),
    [
        # issue 26, item 4: load_in_4bit alone means fp4; nf4 was silently dropped
        (
            dict(load_in_4bit=True),
            dict(quant_type="nf4"),
            r"quant_type='nf4' contradicts quantization_config.bnb_4bit_quant_type \('fp4'\)",
        ),
        (
            dict(load_in_4bit=True, bnb_4bit_use_double_quant=True),
            dict(double_quant=False),
            r"double_quant=False contradicts "
            r"quantization_config.bnb_4bit_use_double_quant \(True\)",
        ),
        (
            dict(load_in_4bit=True, bnb_4bit_quant_storage=torch.bfloat16),
            dict(quant_storage=torch.uint8),
            r"quant_storage=torch.uint8 contradicts .*bnb_4bit_quant_storage \(torch.bfloat16\)",
        ),
        (
            dict(load_in_8bit=True, llm_int8_threshold=5.0),
            dict(threshold=6.0),
            r"threshold=6.0 contradicts quantization_config.llm_int8_threshold \(5.0\)",
        ),
    ],
)
def test_an_explicit_default_that_contradicts_the_config_is_refused(
    llama: Path, config: dict[str, Any], kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(leanstream.ConfigError, match=match):
        ours(llama, quantization_config=BitsAndBytesConfig(**config), **kwargs)
    with pytest.raises(leanstream.ConfigError, match=match):
        leanstream.load_into(
            lambda: torch.nn.Linear(4, 4),
            llama,
            progress=False,
            quantization_config=BitsAndBytesConfig(**config),
            **kwargs,
        )


@pytest.mark.parametrize(
    ("config", "kwargs"),
    [
        (dict(load_in_4bit=True), dict(quant_type="fp4", double_quant=False)),
        (dict(load_in_4bit=True), {}),  # left out: the config's (fp4)
        (
            dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
            dict(quant_type="nf4", double_quant=True, bits=4),
        ),
    ],
)
def test_options_that_agree_with_the_config_load_as_transformers(
    llama: Path, config: dict[str, Any], kwargs: dict[str, Any]
) -> None:
    bnb_config = BitsAndBytesConfig(bnb_4bit_compute_dtype=torch.bfloat16, **config)
    ref = AutoModelForCausalLM.from_pretrained(
        llama, quantization_config=bnb_config, device_map="cpu"
    ).eval()
    got = ours(llama, quantization_config=bnb_config, **kwargs)
    assert assert_same_weights(ref, got) > 0
    assert got.config.quantization_config.bnb_4bit_quant_type == bnb_config.bnb_4bit_quant_type


def test_the_signatures_still_read_their_defaults() -> None:
    for function in (leanstream.load, leanstream.load_into):
        parameters = inspect.signature(function).parameters
        shown = {k: repr(parameters[k].default) for k in ("quant_type", "double_quant")}
        assert shown == {"quant_type": "'nf4'", "double_quant": "False"}
        assert repr(parameters["quant_storage"].default) == "torch.uint8"
