"""QuantizedExperts (3-D expert weights held by bitsandbytes' 4-bit or LLM.int8 layout,
dequantized one expert at a time) and the ``"leanstream"`` experts implementation.

Per expert, the 4-bit weight must equal bitsandbytes' quantization of that expert
alone (blocks never span two experts), and with double quantization the matching
slice of bitsandbytes' dequantization of the whole tensor. In a model, the
implementation runs each architecture's eager forward on the dequantized experts,
so its outputs equal, bit for bit, those of the same model holding the
dequantized weights as plain parameters with the eager implementation.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

import bitsandbytes.functional as F
import pytest
import torch
import transformers
from torch import nn

from leanstream.experts import (
    IMPLEMENTATION,
    QuantizedExperts,
    eager_forward,
    experts_forward,
    use_quantized_experts,
)
from models import MOE_ARCHS, make_config

E, BLOCKSIZE = 4, 64
# the outcome depends on bitsandbytes' CPU 4-bit kernel (tests/cpu_kernel.py)
pytestmark = pytest.mark.cpu_kernel


# (64, 32): rows of half a block; blocks run across rows (JetMoE's attention experts)
SHAPES = [(64, 64), (128, 64), (64, 256), (128, 192), (64, 32)]
MODES = ["nf4", "fp4", "nf4-dq", "fp4-dq", "int8"]


def quantized(w: torch.Tensor, mode: str) -> QuantizedExperts:
    """``w`` ``[E, R, C]`` quantized as bitsandbytes quantizes the flattened ``[E*R, C]``."""
    e, r, c = w.shape
    if mode == "int8":
        cb, scb, _ = F.int8_vectorwise_quant(w.reshape(e * r, c).half())
        return QuantizedExperts.eight_bit(cb.reshape(e, r, c), scb, w.dtype)
    quant_type, _, dq = mode.partition("-")
    packed, state = F.quantize_4bit(
        w.reshape(e * r, c),
        blocksize=BLOCKSIZE,
        compress_statistics=bool(dq),
        quant_type=quant_type,
    )
    state.shape = torch.Size([e, r, c])
    return QuantizedExperts.four_bit(packed, state)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_expert_equals_bitsandbytes(shape: tuple[int, int], mode: str) -> None:
    r, c = shape
    w = torch.randn(E, r, c, dtype=torch.bfloat16)
    qe = quantized(w, mode)
    assert qe.shape3 == (E, r, c) and qe.num_experts == E and qe.expert_shape == (r, c)
    assert qe.bits == (8 if mode == "int8" else 4)
    assert qe.dequant_dtype == torch.bfloat16
    whole = qe.dequantize()
    assert whole.shape == (E, r, c) and whole.dtype == torch.bfloat16
    for e in range(E):
        got = qe[e]
        assert got.shape == (r, c) and got.dtype == torch.bfloat16
        assert torch.equal(got, whole[e])
        assert torch.equal(qe[torch.tensor(e)], got)  # as the eager forwards index
        assert torch.equal(qe[e - E], got)
        if mode == "int8":
            cb, scb, _ = F.int8_vectorwise_quant(w.reshape(E * r, c).half())
            rows = slice(e * r, (e + 1) * r)
            ref = F.int8_vectorwise_dequant(cb[rows], scb[rows]).to(torch.bfloat16)
            assert torch.equal(got, ref)
            continue
        quant_type, _, dq = mode.partition("-")
        # the dequantized values are the weight's, give or take 4-bit rounding (a 2-D
        # dequantize_4bit on the CPU reads rows of half a block wrongly: not this)
        assert float((got.float() - w[e].float()).norm() / w[e].float().norm()) < 0.2
        if dq:
            ref = F.dequantize_4bit(
                *F.quantize_4bit(
                    w.reshape(-1),
                    blocksize=BLOCKSIZE,
                    compress_statistics=True,
                    quant_type=quant_type,
                )
            )
            assert torch.equal(got, ref.reshape(E, r, c)[e])
            continue
        # no double quantization: the expert's own quantization, byte for byte
        packed, state = F.quantize_4bit(
            w[e].reshape(-1), blocksize=BLOCKSIZE, quant_type=quant_type
        )
        size = r * c
        assert torch.equal(qe.data[e * size // 2 : (e + 1) * size // 2], packed)
        blocks = size // BLOCKSIZE
        assert torch.equal(qe.quant_state.absmax[e * blocks : (e + 1) * blocks], state.absmax)
        assert torch.equal(got, F.dequantize_4bit(packed, state).reshape(r, c))


@pytest.mark.parametrize("index", [slice(0, 2), [0, 1], (0, 1), 1.0, True, None, ...])
def test_bad_index_is_a_type_error(index: Any) -> None:
    qe = quantized(torch.randn(E, 64, 64, dtype=torch.bfloat16), "nf4")
    with pytest.raises(TypeError, match="one expert"):
        qe[index]


@pytest.mark.parametrize(
    "index", [torch.tensor([0, 1]), torch.tensor([1]), torch.tensor(1.0), torch.tensor(True)]
)
def test_bad_tensor_index_is_a_type_error(index: torch.Tensor) -> None:
    qe = quantized(torch.randn(E, 64, 64, dtype=torch.bfloat16), "int8")
    with pytest.raises(TypeError, match="one expert"):
        qe[index]


def test_out_of_range_expert() -> None:
    qe = quantized(torch.randn(E, 64, 64, dtype=torch.bfloat16), "nf4")
    with pytest.raises(IndexError, match="expert 4 is out of range"):
        qe[E]
    with pytest.raises(IndexError):
        qe[torch.tensor(-E - 1)]


def test_blocks_must_not_span_experts() -> None:
    w = torch.randn(E * 8, 24, dtype=torch.bfloat16)  # 8*24 = 192 values per expert
    packed, state = F.quantize_4bit(w, blocksize=128)
    state.shape = torch.Size([E, 8, 24])
    with pytest.raises(ValueError, match="whole number of 128-value blocks"):
        QuantizedExperts.four_bit(packed, state)


def test_mismatched_statistics_are_refused() -> None:
    w = torch.randn(E * 64, 64, dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(w, blocksize=BLOCKSIZE)
    state.shape = torch.Size([E, 64, 64])
    with pytest.raises(ValueError, match="packed must be uint8"):
        QuantizedExperts.four_bit(packed[1:], state)
    state.shape = torch.Size([E * 64, 64])
    with pytest.raises(ValueError, match=r"\[E, R, C\]"):
        QuantizedExperts.four_bit(packed, state)
    cb, scb, _ = F.int8_vectorwise_quant(w.half())
    with pytest.raises(ValueError, match="row scales"):
        QuantizedExperts.eight_bit(cb.reshape(E, 64, 64), scb[1:], torch.bfloat16)
    with pytest.raises(ValueError, match="int8"):
        QuantizedExperts.eight_bit(cb, scb, torch.bfloat16)


@pytest.mark.parametrize("mode", ["nf4-dq", "int8"])
def test_parameter_machinery(mode: str) -> None:
    qe = quantized(torch.randn(E, 64, 128, dtype=torch.bfloat16), mode)
    whole = qe.dequantize()
    module = nn.Module()
    module.w = qe
    assert module.w is qe and dict(module.named_parameters()) == {"w": qe}
    assert not qe.requires_grad
    module.eval().requires_grad_(False)
    module.to("cpu")
    module.cpu()
    assert module.w is qe and torch.equal(module.w.dequantize(), whole)
    moved = qe.to("cpu")
    assert moved is qe
    with pytest.raises(TypeError, match="cannot be cast"):
        qe.to(torch.float16)
    module.half()  # integer storage: untouched, still dequantizes to bfloat16
    assert module.w.dequant_dtype == torch.bfloat16
    twin = copy.deepcopy(module)
    assert isinstance(twin.w, QuantizedExperts) and twin.w is not qe
    assert twin.w.data_ptr() != qe.data_ptr()
    assert torch.equal(twin.w.dequantize(), whole)
    again = pickle.loads(pickle.dumps(qe))
    assert isinstance(again, QuantizedExperts) and torch.equal(again.dequantize(), whole)
    assert "QuantizedExperts(" in repr(qe) and "experts=4" in repr(qe)
    assert f"{E * 64 * 128}" not in repr(qe)  # no byte dump
    # data set to another QuantizedExperts (what nn.Module._apply does) brings its statistics
    other = quantized(torch.randn(E, 64, 128, dtype=torch.bfloat16), mode)
    module.w.data = other
    assert torch.equal(module.w.dequantize(), other.dequantize())


def test_eager_forward_is_the_wrapped_original() -> None:
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    for cls in (MixtralExperts, GptOssExperts):
        assert cls.forward.__wrapped__ is eager_forward(cls)
        assert eager_forward(cls) is not cls.forward
        assert "_experts_implementation" not in eager_forward(cls).__code__.co_names

    class Sub(MixtralExperts):  # inherits the dispatching forward
        pass

    assert eager_forward(Sub) is MixtralExperts.forward.__wrapped__
    assert eager_forward(nn.Linear) is nn.Linear.forward


# --- in a model ------------------------------------------------------------------------

IDS = torch.tensor([[1, 5, 9, 42, 7, 100, 11, 2], [3, 3, 17, 64, 90, 8, 120, 4]])


def tiny(arch: str) -> Any:
    torch.manual_seed(0)
    config = make_config(arch)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)  # larger than the default init: routing and logits differ
    return model.eval()


def experts_params(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [
        (module, name)
        for module in model.modules()
        for name, p in module.named_parameters(recurse=False)
        if p.dim() == 3
    ]


def quantize_experts(model: nn.Module, mode: str) -> tuple[Any, Any]:
    """``(quantized, reference)``: ``model`` with every 3-D parameter a QuantizedExperts,
    and a copy holding their ``dequantize()`` as plain bf16 parameters."""
    reference = copy.deepcopy(model)
    pairs = zip(experts_params(model), experts_params(reference), strict=True)
    for (module, name), (ref, ref_name) in pairs:
        qe = quantized(getattr(module, name).data, mode)
        setattr(module, name, qe)
        setattr(ref, ref_name, nn.Parameter(qe.dequantize(), requires_grad=False))
    return model, reference


@pytest.mark.parametrize("mode", ["nf4", "fp4-dq", "int8"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_model_equals_dequantized_model(arch: str, mode: str) -> None:
    model, reference = quantize_experts(tiny(arch), mode)
    default = reference.config._experts_implementation
    names = use_quantized_experts(model)
    assert names and all(name.endswith(".experts") for name in names)
    assert names == use_quantized_experts(model)  # idempotent
    assert model.config._experts_implementation == IMPLEMENTATION
    assert model.get_experts_implementation()[""] == IMPLEMENTATION
    assert all(
        model.get_submodule(n).config._experts_implementation == IMPLEMENTATION for n in names
    )
    assert reference.config._experts_implementation == default  # a copy: unaffected
    assert model.dtype == torch.bfloat16

    with torch.no_grad():
        logits = model(IDS).logits
        reference.set_experts_implementation("eager")
        exact = reference(IDS).logits
        reference.set_experts_implementation(default)
        batched = reference(IDS).logits
    # the same operations on the same values as the eager implementation: bit for bit
    assert torch.equal(logits, exact)
    # the default (grouped_mm) orders bf16 sums differently: a few bf16 ulps of the logits
    torch.testing.assert_close(logits, batched, rtol=0.03, atol=0.03)

    out = model.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    reference.set_experts_implementation("eager")
    ref_out = reference.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, IDS.shape[1] + 4)
    assert torch.equal(out, ref_out)


def test_dispatch_goes_through_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    model, _ = quantize_experts(tiny("qwen3_moe"), "nf4")
    use_quantized_experts(model)
    assert ALL_EXPERTS_FUNCTIONS[IMPLEMENTATION] is experts_forward
    calls: list[str] = []

    def spy(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        calls.append(type(module).__name__)
        return experts_forward(module, *args, **kwargs)

    monkeypatch.setitem(ExpertsInterface._global_mapping, IMPLEMENTATION, spy)
    with torch.no_grad():
        model(IDS)
    assert calls == ["Qwen3MoeExperts"] * model.config.num_hidden_layers


def test_deepcopied_model_still_quantized() -> None:
    model, _ = quantize_experts(tiny("mixtral"), "nf4-dq")
    use_quantized_experts(model)
    twin = copy.deepcopy(model)
    assert isinstance(twin.model.layers[0].mlp.experts.gate_up_proj, QuantizedExperts)
    assert twin.config._experts_implementation == IMPLEMENTATION
    with torch.no_grad():
        assert torch.equal(twin(IDS).logits, model(IDS).logits)


def test_model_without_quantized_experts_is_unaffected() -> None:
    model = tiny("qwen3_moe")
    before = model.get_experts_implementation()
    assert use_quantized_experts(model) == []
    assert model.get_experts_implementation() == before
    assert before[""] != IMPLEMENTATION


def test_experts_forward_on_a_module() -> None:
    """The implementation on its own: the module's eager forward, whatever the config says."""
    model, reference = quantize_experts(tiny("gpt_oss"), "nf4")
    experts = model.model.layers[0].mlp.experts
    ref = reference.model.layers[0].mlp.experts
    hidden = torch.randn(6, 64, dtype=torch.bfloat16)
    index = torch.tensor([[0, 3], [1, 2], [3, 3], [2, 0], [1, 1], [0, 2]])
    weights = torch.rand(6, 2, dtype=torch.bfloat16)
    with torch.no_grad():
        got = experts_forward(experts, hidden, index, weights)
        want = eager_forward(type(ref))(ref, hidden, index, weights)
    assert torch.equal(got, want)
