"""``load(model_class=...)``: encoders, seq2seq and image-text-to-text models, and
multimodal checkpoints loaded as text-only (``ignore_unexpected``), against
transformers + bitsandbytes loading the same folder with the same class."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_load import SETTINGS, assert_same_weights, bnb_config

import leanstream
from leanstream import ConfigError, MismatchError

# the outcome depends on bitsandbytes' CPU 4-bit kernel (tests/cpu_kernel.py)
pytestmark = pytest.mark.cpu_kernel


def ours(folder: Path, setting: str, **kwargs: Any) -> Any:
    settings = SETTINGS[setting]
    extra = {"compute_dtype": torch.bfloat16} if settings["bits"] == 4 else {}
    return leanstream.load(folder, device="cpu", progress=False, **settings, **extra, **kwargs)


def theirs(cls: Any, folder: Path, setting: str) -> Any:
    return cls.from_pretrained(
        folder, quantization_config=bnb_config(SETTINGS[setting]), device_map="cpu"
    ).eval()


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model.to(torch.bfloat16)


def write_tiny(folder: Path, cls: Any, config: Any, max_shard_size: str = "60KB") -> Path:
    """A randomized ``cls(config)`` saved in bf16 shards, as the hub holds it."""
    torch.manual_seed(0)
    randomized(cls(config)).save_pretrained(folder, max_shard_size=max_shard_size)
    return folder


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertModel

    return write_tiny(tmp_path_factory.mktemp("bert"), BertModel, bert_config())


def bert_config() -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=320,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )


@pytest.fixture(scope="module")
def bert_classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertForSequenceClassification

    # 32 labels: bitsandbytes' AVX512-BF16 CPU kernel, which transformers' model takes
    # at its first forward, asserts a 4-bit layer's out_features % 32 == 0
    config = bert_config()
    config.num_labels = 32
    folder = tmp_path_factory.mktemp("bert-classifier")
    return write_tiny(folder, BertForSequenceClassification, config)


@pytest.fixture(scope="module")
def whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=320,
        num_mel_bins=16,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=16,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    folder = tmp_path_factory.mktemp("whisper")
    return write_tiny(folder, WhisperForConditionalGeneration, config)


@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=320,
        d_model=64,
        d_kv=32,
        d_ff=128,
        num_layers=2,
        num_heads=2,
        decoder_start_token_id=0,
    )
    return write_tiny(tmp_path_factory.mktemp("t5"), T5ForConditionalGeneration, config)


@pytest.fixture(scope="module")
def mllama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama-3.2-Vision-like checkpoint: text model, vision tower, projector."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    config = MllamaConfig(
        text_config=dict(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            cross_attention_layers=[1],
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_global_layers=1,
            attention_heads=2,
            image_size=28,
            patch_size=14,
            vision_output_dim=64,
            max_num_tiles=1,
            supported_aspect_ratios=[[1, 1]],
            intermediate_layers_indices=[0],
        ),
    )
    folder = tmp_path_factory.mktemp("mllama")
    return write_tiny(folder, MllamaForConditionalGeneration, config, max_shard_size="100KB")


IDS = torch.tensor([[1, 5, 9, 42, 7, 300, 11, 2]])


@pytest.mark.parametrize("setting", ["nf4", "int8"])
@pytest.mark.parametrize("model_class", ["AutoModel", "BertModel"])
def test_an_encoder_with_model_class(bert: Path, model_class: str, setting: str) -> None:
    import transformers

    cls = getattr(transformers, model_class)
    got = ours(bert, setting, model_class=cls)
    ref = theirs(transformers.AutoModel, bert, setting)
    assert type(got) is type(ref) is transformers.BertModel
    assert assert_same_weights(ref, got) > 0
    with torch.no_grad():
        a = ref(input_ids=IDS).last_hidden_state.float()
        b = got(input_ids=IDS).last_hidden_state.float()
    assert torch.isfinite(b).all()
    assert (a - b).norm() / a.norm() < 1e-2


def test_an_encoder_is_not_a_causal_lm(bert: Path) -> None:
    """bert's causal LM class (BertLMHeadModel) has a head this checkpoint lacks: the
    error names the class built and what to pass."""
    from transformers import AutoModelForCausalLM

    with pytest.raises(MismatchError) as err:
        ours(bert, "nf4", model_class=AutoModelForCausalLM)
    assert any(name.startswith("cls.predictions") for name in err.value.missing)
    assert "the model built is a BertLMHeadModel" in str(err.value)
    assert "model_class=" in str(err.value)


def test_a_missing_head_names_the_class_built(bert: Path) -> None:
    """Regression (issue 26): with tensors missing (none extra) the error did not say
    which class was built, nor that model_class= chooses another."""
    from transformers import BertForSequenceClassification

    with pytest.raises(MismatchError) as err:
        ours(bert, "nf4", model_class=BertForSequenceClassification)
    assert err.value.missing == ["classifier.bias", "classifier.weight"]
    assert not err.value.unexpected
    assert "the model built is a BertForSequenceClassification" in str(err.value)
    assert "model_class=" in str(err.value)


@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_the_default_class_is_the_one_architectures_names(
    bert_classifier: Path, bert: Path, setting: str
) -> None:
    """Regression (issue 26): a BertForSequenceClassification checkpoint built
    BertLMHeadModel (the causal LM class of its config) and failed with a
    MismatchError; as transformers' pipelines, the class the checkpoint was saved from
    is built."""
    from transformers import (
        AutoModelForSequenceClassification,
        BertForSequenceClassification,
        BertModel,
    )

    got = ours(bert_classifier, setting)
    ref = theirs(AutoModelForSequenceClassification, bert_classifier, setting)
    assert type(got) is type(ref) is BertForSequenceClassification
    assert assert_same_weights(ref, got) > 0
    with torch.no_grad():
        a, b = ref(input_ids=IDS).logits.float(), got(input_ids=IDS).logits.float()
    assert torch.isfinite(b).all()
    assert torch.equal(a, b)
    assert type(ours(bert, setting)) is BertModel  # saved from BertModel


def test_a_whisper_checkpoint_builds_its_own_class(whisper: Path) -> None:
    """Regression (issue 26): Whisper built WhisperForCausalLM (a decoder only)."""
    from transformers import AutoModelForSpeechSeq2Seq, WhisperForConditionalGeneration

    got = ours(whisper, "nf4")
    ref = theirs(AutoModelForSpeechSeq2Seq, whisper, "nf4")
    assert type(got) is type(ref) is WhisperForConditionalGeneration
    assert assert_same_weights(ref, got) > 0


@pytest.mark.parametrize("architectures", [None, ["NotATransformersClass"]])
def test_without_a_known_architectures_class_the_causal_lm_is_built(
    sources: dict[str, Path], tmp_path: Path, architectures: Any
) -> None:
    import json
    import shutil

    from transformers import LlamaForCausalLM

    folder = Path(shutil.copytree(sources["llama"], tmp_path / "llama"))
    config = json.loads((folder / "config.json").read_text())
    config.pop("architectures")
    if architectures is not None:
        config["architectures"] = architectures
    (folder / "config.json").write_text(json.dumps(config))
    assert type(ours(folder, "nf4")) is LlamaForCausalLM


def test_without_a_causal_lm_class_the_architectures_class_is_built(t5: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM, T5ForConditionalGeneration

    got = ours(t5, "nf4")  # T5 has no causal LM class: config.architectures names one
    ref = theirs(AutoModelForSeq2SeqLM, t5, "nf4")
    assert type(got) is type(ref) is T5ForConditionalGeneration
    assert assert_same_weights(ref, got) > 0
    out = got.generate(input_ids=IDS, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref.generate(input_ids=IDS, max_new_tokens=4, do_sample=False))


def test_seq2seq_with_an_auto_class(t5: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM

    got = ours(t5, "int8", model_class=AutoModelForSeq2SeqLM)
    assert assert_same_weights(theirs(AutoModelForSeq2SeqLM, t5, "int8"), got) > 0


def test_a_multimodal_checkpoint_as_text_only_is_an_explicit_choice(mllama: Path) -> None:
    from transformers import AutoModelForCausalLM, MllamaForCausalLM

    with pytest.raises(MismatchError) as err:
        ours(mllama, "nf4", model_class=AutoModelForCausalLM)
    assert any("vision_model" in name for name in err.value.unexpected)
    assert "multi_modal_projector.weight" in err.value.unexpected
    assert "ignore_unexpected" in str(err.value) and "model_class" in str(err.value)
    got = ours(
        mllama,
        "nf4",
        model_class=AutoModelForCausalLM,
        ignore_unexpected=["vision_model", "multi_modal_projector"],
    )
    ref = theirs(AutoModelForCausalLM, mllama, "nf4")  # transformers drops them, warning
    assert type(got) is type(ref) is MllamaForCausalLM
    assert assert_same_weights(ref, got) > 0
    with torch.no_grad():
        a, b = ref(input_ids=IDS).logits.float(), got(input_ids=IDS).logits.float()
    assert (a - b).norm() / a.norm() < 1e-2


def test_a_multimodal_checkpoint_with_its_own_class(mllama: Path) -> None:
    from transformers import AutoModelForImageTextToText, MllamaForConditionalGeneration

    got = ours(mllama, "nf4", model_class=AutoModelForImageTextToText)
    ref = theirs(AutoModelForImageTextToText, mllama, "nf4")
    assert type(got) is type(ref) is MllamaForConditionalGeneration
    assert assert_same_weights(ref, got) > 0
    # the class its architectures names, by default
    assert assert_same_weights(ref, ours(mllama, "nf4")) > 0


def test_a_model_class_that_is_not_one(bert: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM

    with pytest.raises(ConfigError, match="model_class"):
        ours(bert, "nf4", model_class=dict)
    with pytest.raises(ConfigError, match="cannot be built"):
        ours(bert, "nf4", model_class=AutoModelForSeq2SeqLM)  # bert has no seq2seq class
