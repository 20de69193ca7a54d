"""quantize_embeddings / quantize_lm_head: bitsandbytes embeddings and a quantized lm_head."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch
from cpu_kernel import packs
from torch import nn

import leanstream
from leanstream.cpu_layout import is_packed
from models import stored, write_model

# the outcome depends on bitsandbytes' CPU 4-bit kernel (tests/cpu_kernel.py)
pytestmark = pytest.mark.cpu_kernel


SETTINGS = {
    "nf4": dict(bits=4, quant_type="nf4"),
    "fp4": dict(bits=4, quant_type="fp4"),
    "nf4-dq": dict(bits=4, quant_type="nf4", double_quant=True),
    "int8": dict(bits=8),
}
FLAGS = {
    "embeddings": dict(quantize_embeddings=True),
    "lm_head": dict(quantize_lm_head=True),
    "both": dict(quantize_embeddings=True, quantize_lm_head=True),
}
IDS = torch.tensor([[1, 5, 9, 42, 7, 300, 11, 2]])


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("emb")
    return {a: write_model(root / a, a) for a in ("llama", "llama-tied", "opt", "gpt2")}


def load(folder: Path, **kwargs: Any) -> Any:
    return leanstream.load(folder, device="cpu", progress=False, **kwargs)


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def check_quantized(weight: Any, original: torch.Tensor, setting: dict[str, Any]) -> None:
    """``weight`` holds exactly what bitsandbytes' own quantizer makes of ``original``."""
    if setting["bits"] == 4:
        packed, state = F.quantize_4bit(
            original,
            blocksize=64,
            compress_statistics=setting.get("double_quant", False),
            quant_type=setting["quant_type"],
        )
        if is_packed(weight.quant_state):  # as bitsandbytes' first forward on this CPU leaves it
            packed, state = F._convert_weight_packed_for_cpu(packed, state)
        assert torch.equal(weight.data.view(torch.uint8), packed.view(torch.uint8))
        assert torch.equal(weight.quant_state.absmax, state.absmax)
        assert tuple(weight.quant_state.shape) == tuple(original.shape)
    else:
        param = bnb.nn.Int8Params(original.clone(), requires_grad=False, has_fp16_weights=False)
        ref = param._quantize("cpu")
        assert torch.equal(weight.data, ref.data)
        assert torch.equal(weight.SCB, ref.SCB)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_untied_llama(checkpoints: dict[str, Path], setting: str) -> None:
    folder = checkpoints["llama"]
    tensors = stored(folder)
    plain = load(folder, **SETTINGS[setting])
    # before any forward: bitsandbytes repacks 4-bit CPU weights in place at the first
    rest = {
        name: param.data.clone()
        for name, param in plain.named_parameters()
        if not name.startswith(("model.embed_tokens", "lm_head"))
    }
    reference = logits(plain)
    emb_cls = bnb.nn.Embedding4bit if SETTINGS[setting]["bits"] == 4 else bnb.nn.Embedding8bit
    lin_cls = bnb.nn.Linear4bit if SETTINGS[setting]["bits"] == 4 else bnb.nn.Linear8bitLt
    for flag, kwargs in FLAGS.items():
        model = load(folder, **SETTINGS[setting], **kwargs)
        embed, head = model.model.embed_tokens, model.lm_head
        assert isinstance(embed, emb_cls) == (flag != "lm_head"), flag
        assert (type(head) is lin_cls) == (flag != "embeddings"), flag
        if flag != "lm_head":
            check_quantized(embed.weight, tensors["model.embed_tokens.weight"], SETTINGS[setting])
            assert embed.weight.dtype != torch.bfloat16
        if flag != "embeddings":
            check_quantized(head.weight, tensors["lm_head.weight"], SETTINGS[setting])
        # the rest of the model is what the plain load makes of it
        for name, tensor in rest.items():
            assert torch.equal(tensor, model.get_parameter(name).data), name
        quant = model.config.quantization_config
        assert quant.leanstream_quantized_embeddings == (
            [] if flag == "lm_head" else ["model.embed_tokens"]
        )
        assert quant.leanstream_quantized_lm_head == ([] if flag == "embeddings" else ["lm_head"])
        rel = (logits(model) - reference).norm() / reference.norm()
        assert torch.isfinite(rel) and rel < 0.5, (flag, rel)
        assert leanstream.footprint(model).total_bytes < leanstream.footprint(plain).total_bytes


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("arch", ["llama-tied", "opt", "gpt2"])
def test_tied_pair_is_one_quantized_tensor(
    checkpoints: dict[str, Path], arch: str, setting: str
) -> None:
    """On a tied model either flag quantizes the one shared tensor, shared by both modules."""
    folder = checkpoints[arch]
    results = []
    for kwargs in FLAGS.values():
        model = load(folder, **SETTINGS[setting], **kwargs)
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        assert isinstance(embed, bnb.nn.Embedding4bit | bnb.nn.Embedding8bit)
        assert isinstance(head, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)
        assert embed.weight is head.weight
        out = logits(model)
        assert torch.isfinite(out).all()
        # the embedding still reads the shared weight right after lm_head's forward
        again = embed(IDS).float()
        if SETTINGS[setting]["bits"] == 4:
            full = F.dequantize_4bit(embed.weight.data, embed.weight.quant_state)
        else:
            full = embed.weight.data.float() * embed.weight.SCB[:, None] / 127
        assert torch.allclose(again, nn.functional.embedding(IDS, full).float(), atol=1e-2)
        results.append(out)
    assert torch.equal(results[0], results[2])
    if arch != "gpt2":  # GPT-2's wpe is a plain nn.Embedding too: only quantize_embeddings takes it
        assert torch.equal(results[0], results[1])


def test_only_exact_embeddings_are_replaced(checkpoints: dict[str, Path]) -> None:
    opt = load(checkpoints["opt"], bits=4, quantize_embeddings=True)
    positions = opt.model.decoder.embed_positions
    assert type(positions).__name__ == "OPTLearnedPositionalEmbedding"
    assert positions.weight.dtype == torch.bfloat16
    gpt2 = load(checkpoints["gpt2"], bits=4, quantize_embeddings=True)
    assert isinstance(gpt2.transformer.wpe, bnb.nn.Embedding4bit)  # a plain nn.Embedding
    gpt2 = load(checkpoints["gpt2"], bits=4, quantize_lm_head=True)
    assert type(gpt2.transformer.wpe) is nn.Embedding  # lm_head's flag: only the tied pair


def test_skip_modules_win(checkpoints: dict[str, Path]) -> None:
    model = load(
        checkpoints["llama"],
        bits=4,
        quantize_embeddings=True,
        quantize_lm_head=True,
        skip_modules=["lm_head"],
    )
    assert type(model.lm_head) is nn.Linear
    assert isinstance(model.model.embed_tokens, bnb.nn.Embedding4bit)


@pytest.mark.parametrize("flag", ["quantize_embeddings", "quantize_lm_head"])
@pytest.mark.parametrize("bits", [16, None])
def test_flags_need_quantization(checkpoints: dict[str, Path], flag: str, bits: Any) -> None:
    with pytest.raises(leanstream.ConfigError, match="bits=4 or bits=8"):
        load(checkpoints["llama"], bits=bits, **{flag: True})


# --- save and the pre-quantized round trip ------------------------------------------


def state(model: Any) -> dict[str, torch.Tensor]:
    from leanstream.save import _state_dict

    return {k: v.detach().clone() for k, v in _state_dict(model).items()}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("arch", ["llama", "llama-tied"])
def test_save_load_round_trip(
    checkpoints: dict[str, Path], tmp_path: Path, arch: str, setting: str
) -> None:
    model = load(checkpoints[arch], **SETTINGS[setting], **FLAGS["both"])
    before = state(model)
    folder = leanstream.save(model, tmp_path / "out", progress=False)
    saved = stored(folder)
    assert set(saved) == set(before)
    prefix = "model.embed_tokens."
    if SETTINGS[setting]["bits"] == 4:
        kind = SETTINGS[setting]["quant_type"]
        assert f"{prefix}weight.quant_state.bitsandbytes__{kind}" in saved
        assert (f"{prefix}weight.nested_absmax" in saved) == (setting == "nf4-dq")
    else:
        assert saved[f"{prefix}weight"].dtype == torch.int8 and f"{prefix}SCB" in saved
    if arch == "llama-tied":  # one tensor, stored once
        assert not [k for k in saved if k.startswith("lm_head.")]
    # a double-quantized lm_head in bitsandbytes' fused CPU layout holds plain bfloat16
    # scales, double-quantized again when saved: read back, it is the saved model, in the
    # plain layout exactly (cpu_layout.unpacked)
    exact = not (packs() and setting == "nf4-dq")
    again = load(folder, cpu_kernel="auto" if exact else "plain")
    assert type(again.model.embed_tokens) is type(model.model.embed_tokens)
    assert type(again.lm_head) is type(model.lm_head)
    if arch == "llama-tied":
        assert again.model.embed_tokens.weight is again.lm_head.weight
    after = state(again)
    assert set(after) == set(before)
    for key, tensor in before.items():
        assert torch.equal(after[key], tensor), key
    if exact:
        assert torch.equal(logits(again), logits(model))
        assert leanstream.footprint(again) == leanstream.footprint(model)
    else:
        a, b = logits(again), logits(model)
        assert (a - b).norm() / b.norm() < 1e-2
    quant = again.config.quantization_config
    assert quant.leanstream_quantized_embeddings == ["model.embed_tokens"]
    assert quant.leanstream_quantized_lm_head == ["lm_head"]


@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_transformers_refuses_the_folder(
    checkpoints: dict[str, Path], tmp_path: Path, setting: str
) -> None:
    from transformers import AutoModelForCausalLM

    model = load(checkpoints["llama"], **SETTINGS[setting], quantize_embeddings=True)
    folder = leanstream.save(model, tmp_path / "out", progress=False)
    with pytest.raises(AttributeError, match=r"saved_by_leanstream.*use_leanstream_load"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_plain_save_stays_loadable_by_transformers(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    import json

    folder = leanstream.save(load(checkpoints["llama"], bits=4), tmp_path / "out", progress=False)
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "bitsandbytes"
    assert "leanstream_quantized_embeddings" not in quant


def test_flags_on_a_prequantized_folder(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    plain = leanstream.save(load(checkpoints["llama"], bits=4), tmp_path / "a", progress=False)
    with pytest.raises(leanstream.ConfigError, match="quantize_embeddings=True was asked"):
        load(plain, quantize_embeddings=True)
    model = load(checkpoints["llama"], bits=4, quantize_lm_head=True)
    head = leanstream.save(model, tmp_path / "b", progress=False)
    assert isinstance(load(head, quantize_lm_head=True).lm_head, bnb.nn.Linear4bit)
    with pytest.raises(leanstream.ConfigError, match="quantize_embeddings=True was asked"):
        load(head, quantize_embeddings=True)


# --- inspect --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "llama-tied"])
def test_inspect_a_prequantized_folder_with_the_flags(
    checkpoints: dict[str, Path], tmp_path: Path, arch: str
) -> None:
    from leanstream.cli import inspect_checkpoint

    model = load(checkpoints[arch], bits=4, double_quant=True, **FLAGS["both"])
    folder = leanstream.save(model, tmp_path / "out", progress=False)
    report = inspect_checkpoint(folder)
    assert "also model.embed_tokens, lm_head" in report["quantization"]
    (row,) = report["memory"]
    assert row["total_bytes"] < leanstream.footprint(load(checkpoints[arch], bits=4)).total_bytes
    actual = leanstream.footprint(load(folder))
    assert row["setting"] == "4-bit nf4 + double + emb/head"
    assert (row["total_bytes"], row["by_kind"]) == (actual.total_bytes, actual.by_kind)


# --- quality and the two CPU quantizers -------------------------------------------------


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_native_and_bitsandbytes_quantizers_agree(
    checkpoints: dict[str, Path], setting: str
) -> None:
    native = state(load(checkpoints["llama-tied"], **SETTINGS[setting], **FLAGS["both"]))
    kernels = load(
        checkpoints["llama-tied"], **SETTINGS[setting], **FLAGS["both"], native_quantizer=False
    )
    other = state(kernels)
    assert set(native) == set(other)
    for key, tensor in native.items():
        assert torch.equal(tensor, other[key]), key


def test_quality_cost_against_bf16(checkpoints: dict[str, Path]) -> None:
    """What benches/quality.py measures, bounded: the flags add error, not garbage."""
    folder = checkpoints["llama"]
    reference = logits(load(folder, bits=16))

    def error(**kwargs: Any) -> float:
        return float((logits(load(folder, **kwargs)) - reference).norm() / reference.norm())

    for setting in ("nf4", "int8"):
        base = error(**SETTINGS[setting])
        more = error(**SETTINGS[setting], **FLAGS["both"])
        assert base < (0.5 if setting == "nf4" else 0.05)
        assert more < base * 1.5 + 0.01, (setting, base, more)
