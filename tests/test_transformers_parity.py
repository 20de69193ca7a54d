"""The loaded model as transformers' own bitsandbytes model, as a user observes it:
quantization markers and the guards that read them (``Trainer``, ``.half()``,
``.to(dtype)``), ``requires_grad``, dtypes and compute dtypes parameter by parameter,
train-mode logits after peft's QLoRA preparation, and the ``from_pretrained``
keywords ``load()`` accepts. Always compared with transformers doing the same."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import pytest
import torch
from test_load import SETTINGS, assert_same_weights, logits, reference
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import leanstream
from models import write_model

# the outcome depends on bitsandbytes' CPU 4-bit kernel (tests/cpu_kernel.py)
pytestmark = pytest.mark.cpu_kernel


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("parity") / "llama", "llama")


def ours(folder: Path, **kwargs: Any) -> Any:
    return leanstream.load(folder, device="cpu", progress=False, **kwargs)


def settings_of(setting: str) -> dict[str, Any]:
    extra = {"compute_dtype": torch.bfloat16} if SETTINGS[setting]["bits"] == 4 else {}
    return {**SETTINGS[setting], **extra}


def outcome(action: Callable[[], Any]) -> tuple[str, str]:
    """What a user sees: the exception's type and first line, or "ok"."""
    try:
        action()
    except Exception as err:
        return type(err).__name__, str(err).splitlines()[0] if str(err) else ""
    return "ok", ""


# --- markers and guards -----------------------------------------------------------------


@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_quantization_markers_are_transformers(llama: Path, setting: str) -> None:
    ref = reference(llama, SETTINGS[setting])
    got = ours(llama, **settings_of(setting))
    assert got.is_quantized is True and ref.is_quantized is True
    assert got.quantization_method == ref.quantization_method
    assert type(got.hf_quantizer) is type(ref.hf_quantizer)
    assert got.hf_quantizer.quantization_config is got.config.quantization_config
    assert got.hf_quantizer.pre_quantized == ref.hf_quantizer.pre_quantized
    assert got.config._is_quantized and ref.config._is_quantized
    for marker in ("is_loaded_in_4bit", "is_loaded_in_8bit"):  # only the true one is set
        assert hasattr(got, marker) == hasattr(ref, marker), marker
        assert getattr(got, marker, None) == getattr(ref, marker, None), marker


def test_prequantized_markers_are_transformers(llama: Path, tmp_path: Path) -> None:
    reference(llama, SETTINGS["nf4-dq"]).save_pretrained(tmp_path / "saved")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", device_map="cpu")
    got = ours(tmp_path / "saved")
    assert type(got.hf_quantizer) is type(ref.hf_quantizer)
    assert got.hf_quantizer.pre_quantized and ref.hf_quantizer.pre_quantized
    assert got.quantization_method == ref.quantization_method


GUARDS: dict[str, Callable[[Any], Any]] = {
    "half": lambda m: m.half(),
    "float": lambda m: m.float(),
    "bfloat16": lambda m: m.bfloat16(),
    "to(float16)": lambda m: m.to(torch.float16),
    "to(cpu, float16)": lambda m: m.to("cpu", torch.float16),
    "to(cpu)": lambda m: m.to("cpu"),
}


@pytest.mark.parametrize("guard", list(GUARDS))
@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_casting_guards_behave_as_transformers(llama: Path, setting: str, guard: str) -> None:
    ref = reference(llama, SETTINGS[setting])
    got = ours(llama, **settings_of(setting))
    theirs = outcome(lambda: GUARDS[guard](ref))
    assert outcome(lambda: GUARDS[guard](got)) == theirs
    if setting == "nf4" and guard == "half":
        assert theirs[0] != "ok"  # the guard exists: the test compares refusals


@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_trainer_refuses_a_purely_quantized_model(
    llama: Path, tmp_path: Path, setting: str
) -> None:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    theirs = outcome(lambda: Trainer(model=reference(llama, SETTINGS[setting]), args=args))
    got = outcome(lambda: Trainer(model=ours(llama, **settings_of(setting)), args=args))
    assert theirs[0] == "ValueError" and "purely quantized" in theirs[1]
    assert got == theirs


# --- parameters: requires_grad, dtypes, compute dtypes ------------------------------------


def parameters(model: Any) -> dict[str, tuple[str, bool, torch.dtype]]:
    return {
        name: (type(p).__name__, p.requires_grad, p.dtype)
        for name, p in model.named_parameters(remove_duplicate=False)
    }


def compute_dtypes(model: Any) -> dict[str, tuple[torch.dtype, bool]]:
    return {
        name: (m.compute_dtype, m.compute_type_is_set)
        for name, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }


@pytest.mark.parametrize("setting", ["nf4", "nf4-dq", "int8"])
def test_parameters_match_transformers(llama: Path, setting: str) -> None:
    ref = reference(llama, SETTINGS[setting])  # compute dtype bf16: the model's dtype
    got = ours(llama, **SETTINGS[setting])  # compute dtype left to its default
    assert parameters(got) == parameters(ref)
    assert compute_dtypes(got) == compute_dtypes(ref)
    assert got.training == ref.training


def test_unquantized_parameters_are_trainable(llama: Path) -> None:
    """bits=None: a full fine-tune works, as with ``from_pretrained``."""
    ref = AutoModelForCausalLM.from_pretrained(llama, device_map="cpu")
    got = ours(llama, bits=None)
    assert parameters(got) == parameters(ref)
    got.train()
    ids = torch.tensor([[1, 5, 9, 42]])
    got(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in got.parameters())


def test_compute_dtype_from_a_bitsandbytes_config_is_transformers(llama: Path) -> None:
    """A BitsAndBytesConfig without a compute dtype means float32 in transformers."""
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    ref = AutoModelForCausalLM.from_pretrained(llama, quantization_config=config, device_map="cpu")
    got = ours(llama, quantization_config=config)
    assert compute_dtypes(got) == compute_dtypes(ref)
    assert {dtype for dtype, _ in compute_dtypes(got).values()} == {torch.float32}
    assert_same_weights(ref, got)


@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_train_mode_after_qlora_preparation_equals_transformers(llama: Path, setting: str) -> None:
    """peft's prepare_model_for_kbit_training casts what is not quantized to float32;
    the 4-bit layers must still compute in their configured dtype, as transformers'."""
    from peft import prepare_model_for_kbit_training

    ref = prepare_model_for_kbit_training(
        reference(llama, SETTINGS[setting]), use_gradient_checkpointing=False
    )
    # the compute dtype left to its default (the model's: bf16, the reference's)
    got = prepare_model_for_kbit_training(
        ours(llama, **SETTINGS[setting]), use_gradient_checkpointing=False
    )
    assert parameters(got) == parameters(ref)
    assert compute_dtypes(got) == compute_dtypes(ref)
    ref.train()
    got.train()
    ids = torch.tensor([[1, 5, 9, 42, 7, 300, 11, 2]])
    assert torch.equal(got(input_ids=ids).logits, ref(input_ids=ids).logits)


# --- transformers' keywords ---------------------------------------------------------------


def test_quantization_config_is_the_source_of_the_options(llama: Path) -> None:
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    ref = AutoModelForCausalLM.from_pretrained(llama, quantization_config=config, device_map="cpu")
    got = ours(llama, quantization_config=config)
    assert assert_same_weights(ref, got) > 0
    assert torch.equal(logits(ref), logits(got))
    as_dict = ours(llama, quantization_config=config.to_dict())
    assert assert_same_weights(got, as_dict) > 0
    eight = ours(llama, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    assert isinstance(eight.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(quant_type="fp4"), r"quant_type='fp4' contradicts quantization_config"),
        (dict(bits=8), r"bits=8 contradicts quantization_config"),
        (dict(compute_dtype=torch.float16), r"compute_dtype=.* contradicts"),
    ],
)
def test_options_that_contradict_the_quantization_config(
    llama: Path, kwargs: dict[str, Any], match: str
) -> None:
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    with pytest.raises(leanstream.ConfigError, match=match):
        ours(llama, quantization_config=config, **kwargs)
    # agreeing explicit options are fine
    ours(llama, quantization_config=config, quant_type="nf4", bits=4)


def test_other_quantization_configs_are_refused(llama: Path) -> None:
    from transformers import GPTQConfig

    with pytest.raises(leanstream.ConfigError, match="BitsAndBytesConfig"):
        ours(llama, quantization_config=GPTQConfig(bits=4))
    with pytest.raises(leanstream.ConfigError, match="fp32_cpu_offload"):
        ours(
            llama,
            quantization_config=BitsAndBytesConfig(
                load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True
            ),
        )


def test_load_in_4bit_and_8bit(llama: Path) -> None:
    assert ours(llama, load_in_8bit=True).is_loaded_in_8bit
    four = ours(llama, load_in_4bit=True)
    assert four.is_loaded_in_4bit
    assert assert_same_weights(ours(llama, bits=4), four) > 0
    with pytest.raises(leanstream.ConfigError, match="pick one"):
        ours(llama, load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(leanstream.ConfigError, match="contradicts load_in_8bit"):
        ours(llama, bits=4, load_in_8bit=True)


def test_torch_dtype_is_dtype(llama: Path) -> None:
    got = ours(llama, bits=4, torch_dtype=torch.float16)
    assert got.model.norm.weight.dtype == torch.float16
    assert ours(llama, bits=4, torch_dtype="float16", dtype=torch.float16)
    with pytest.raises(leanstream.ConfigError, match="contradicts torch_dtype"):
        ours(llama, torch_dtype=torch.float16, dtype=torch.float32)


def test_attn_implementation_reaches_the_model(llama: Path) -> None:
    ref = AutoModelForCausalLM.from_pretrained(llama, attn_implementation="eager")
    got = ours(llama, bits=4, attn_implementation="eager")
    assert got.config._attn_implementation == ref.config._attn_implementation == "eager"
    with pytest.raises(leanstream.ConfigError, match="attn_implementation"):
        ours(llama, attn_implementation="no-such-attention")


def test_device_map_of_one_device_and_low_cpu_mem_usage(llama: Path) -> None:
    for device_map in ("cpu", {"": "cpu"}, torch.device("cpu")):
        model = leanstream.load(
            llama, progress=False, device_map=device_map, low_cpu_mem_usage=True
        )
        assert {p.device for p in model.parameters()} == {torch.device("cpu")}
        assert not hasattr(model, "hf_device_map")  # transformers sets it across devices only
    with pytest.raises(leanstream.ConfigError, match="disk"):
        leanstream.load(llama, progress=False, device_map={"model": "cpu", "lm_head": "disk"})
    with pytest.raises(leanstream.ConfigError, match="contradicts device_map"):
        leanstream.load(llama, progress=False, device="cpu", device_map="cuda:0")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(bits=8, quant_type="fp4"), r"quant_type='fp4': 4-bit option"),
        (dict(bits=None, double_quant=True), r"double_quant=True: 4-bit option"),
        (dict(bits=8, blocksize=128), r"blocksize=128: 4-bit option"),
        (dict(bits=4, threshold=4.0), r"threshold=4.0: LLM.int8 option"),
        (dict(threshold=4.0), r"threshold=4.0: LLM.int8 option"),
        (dict(bits=None, skip_modules=["lm_head"]), r"nothing is quantized"),
        (dict(bits=4, skip_modules=["model.layers.0", "no_such_module"]), r"no_such_module"),
    ],
)
def test_options_that_would_do_nothing_are_refused(
    llama: Path, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(leanstream.ConfigError, match=match):
        ours(llama, **kwargs)
