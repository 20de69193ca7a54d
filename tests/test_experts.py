"""QuantizedExperts (3-D expert weights held by bitsandbytes' 4-bit or LLM.int8 layout)
and the ``"leanstream"`` experts implementation.

Per expert, the 4-bit weight must equal bitsandbytes' quantization of that expert
alone (blocks never span two experts), and with double quantization the matching
slice of bitsandbytes' dequantization of the whole tensor. Where bitsandbytes has a
kernel for an expert's matmul (4 bits on an AVX512-BF16 CPU, LLM.int8 anywhere),
``linear`` must equal, bit for bit, bitsandbytes' own ``Linear4bit`` /
``Linear8bitLt`` holding that expert; in a model the logits are then the dequantized
reference's within that kernel's rounding. Elsewhere the implementation runs each
architecture's eager forward on the dequantized experts, so its outputs equal, bit
for bit, those of the same model holding the dequantized weights as plain parameters
with the eager implementation.
"""

from __future__ import annotations

import copy
import importlib
import pickle
from typing import Any

import bitsandbytes.functional as F
import pytest
import torch
import transformers
from cpu_kernel import needs_fused_kernel, packs
from torch import nn

from leanstream.experts import (
    IMPLEMENTATION,
    KERNEL_ROWS,
    QuantizedExperts,
    eager_forward,
    experts_forward,
    matmul_forward,
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
    kernel = uses_kernels(arch, mode)
    assert any(p.cpu_layout for p in model.parameters() if isinstance(p, QuantizedExperts)) == (
        kernel and mode != "int8"
    )
    if kernel:
        # bitsandbytes' kernels (bfloat16 scales and sums on the CPU, int8 activations):
        # the dequantized reference's logits within a few bf16 ulps
        torch.testing.assert_close(logits, exact, rtol=0, atol=0.03)
        assert not torch.equal(logits, exact)  # the kernels ran, not the dequantized copy
    else:
        # the same operations on the same values as the eager implementation: bit for bit
        assert torch.equal(logits, exact)
    # the default (grouped_mm) orders bf16 sums differently: a few bf16 ulps of the logits
    torch.testing.assert_close(logits, batched, rtol=0.03, atol=0.03)

    out = model.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    reference.set_experts_implementation("eager")
    assert out.shape == (2, IDS.shape[1] + 4)
    if not kernel:
        ref_out = reference.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(out, ref_out)
        return
    # decoding one token at a time through the kernels (their GEMV): each token generated
    # is a greedy choice of the reference, to within the same rounding
    with torch.no_grad():
        ref_logits = reference(out).logits[:, IDS.shape[1] - 1 : -1].float()
    chosen = ref_logits.gather(-1, out[:, IDS.shape[1] :, None]).squeeze(-1)
    assert bool((chosen >= ref_logits.max(-1).values - 0.03).all()), (chosen, ref_logits.max(-1))


def uses_kernels(arch: str, mode: str) -> bool:
    """Whether the tiny ``arch`` model's experts run through bitsandbytes' kernels on this
    CPU (as the session sees it): LLM.int8 anywhere, 4 bits where the fused AVX512-BF16
    kernel is; not GPT-OSS, whose experts are ``[E, in, out]`` (``x @ w``)."""
    return arch != "gpt_oss" and (mode == "int8" or packs())


# --- bitsandbytes' kernels, one expert at a time --------------------------------------


def bnb_layer(qe: QuantizedExperts, e: int) -> nn.Module:
    """bitsandbytes' own ``Linear4bit`` / ``Linear8bitLt`` holding expert ``e`` of ``qe``
    (its bytes and its plain statistics), in eval mode, as transformers builds one."""
    import bitsandbytes as bnb

    r, c = qe.expert_shape
    if qe.bits == 8:
        layer = bnb.nn.Linear8bitLt(c, r, bias=False, has_fp16_weights=False, threshold=6.0)
        cb, scb = qe.data[e].clone(), qe.SCB[e * r : (e + 1) * r].clone()
        layer.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False)
        layer.weight.CB, layer.weight.SCB = cb, scb
        return layer.eval()
    state = qe.quant_state
    size, blocks = r * c, r * c // state.blocksize
    expert_state = F.QuantState(
        absmax=qe._absmax(e * blocks, (e + 1) * blocks).clone(),
        shape=torch.Size((r, c)),
        code=state.code.clone(),
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.dtype,
    )
    layer = bnb.nn.Linear4bit(
        c, r, bias=False, compute_dtype=torch.bfloat16, quant_type=state.quant_type
    )
    layer.weight = bnb.nn.Params4bit(
        qe.data[e * size // 2 : (e + 1) * size // 2].clone(),
        requires_grad=False,
        quant_state=expert_state,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        bnb_quantized=True,
    )
    return layer.eval()


@pytest.mark.parametrize("rows", [1, 5, KERNEL_ROWS, KERNEL_ROWS + 1])
@pytest.mark.parametrize("mode", ["nf4", "fp4", "nf4-dq", "int8"])
def test_linear_is_bitsandbytes_own_layer(mode: str, rows: int) -> None:
    """One token (the GEMV of a decode step) or several: ``linear`` on an expert's share
    of the storage equals bitsandbytes' own layer holding that expert, bit for bit. At 4
    bits, more than ``KERNEL_ROWS`` rows multiply the dequantized expert instead (the
    fused CPU kernel decodes the weight once per row)."""
    if mode != "int8" and not packs():
        pytest.skip("4-bit kernels without dequantizing: bitsandbytes' AVX512-BF16 CPU kernel")
    torch.manual_seed(1)
    qe = quantized(torch.randn(E, 128, 192, dtype=torch.bfloat16), mode)
    x = torch.randn(rows, 192, dtype=torch.bfloat16) * 3  # some int8 outliers (> 6)
    layers = [bnb_layer(qe, e) for e in range(E)]  # from the plain layout
    with torch.no_grad():
        assert qe.fused(x)
        for e in range(E):
            want = layers[e](x)
            got = qe.linear(e, x)
            assert got.dtype == torch.bfloat16 and got.shape == (rows, 128)
            if mode != "int8" and rows > KERNEL_ROWS:
                # the expert dequantized (transposed, by the Rust core: bitsandbytes'
                # values bit for bit) and multiplied in bf16, other sums than F.linear's
                assert torch.equal(qe.transposed(e).T, qe[e])
                want = x @ qe.transposed(e)
            assert torch.equal(got, want), (e, (got - want).abs().max())
            # the dequantized expert's product, within the kernel's rounding
            exact = x.float() @ qe[e].float().T
            bound = (x.float().abs() @ qe[e].float().abs().T) * 2**-6 + 0.05
            if mode == "int8":  # activations quantized per row, to 1/127 of their max
                bound += (
                    x.float().abs().amax(-1, keepdim=True) / 127 * (qe[e].float().abs().sum(-1))
                )
            assert bool(((got.float() - exact).abs() <= bound).all())
    assert qe.cpu_layout == (mode != "int8")


@pytest.mark.parametrize("threshold", [0.0, 6.0, 2.0])
def test_int8_linear_is_bitsandbytes_own_layer_at_any_threshold(
    threshold: float, caplog: pytest.LogCaptureFixture
) -> None:
    """LLM.int8 with and without outlier columns held back: bitsandbytes' own
    ``Linear8bitLt`` (the same threshold) bit for bit, with no warning logged per call
    (bitsandbytes' matmul logs its float16 cast at every call)."""
    torch.manual_seed(3)
    qe = quantized(torch.randn(E, 96, 128, dtype=torch.bfloat16), "int8")
    qe.threshold = threshold
    x = torch.randn(7, 128, dtype=torch.bfloat16) * 3
    with torch.no_grad():
        for e in range(E):
            layer = bnb_layer(qe, e)
            layer.state.threshold = threshold
            want = layer(x)
            caplog.clear()
            got = qe.linear(e, x)
            assert not caplog.records
            assert torch.equal(got, want), (e, (got - want).abs().max())
        assert qe.linear(0, x[:0]).shape == (0, 96)


@needs_fused_kernel
@pytest.mark.parametrize("mode", ["nf4", "fp4-dq"])
def test_cpu_layout_round_trip(mode: str) -> None:
    """In the CPU kernel's layout, the stored form, each expert and the whole weight are
    what the plain layout gives, with the scales the kernel uses (bfloat16, as
    bitsandbytes' own conversion makes them); copies, pickles and saves are plain."""
    torch.manual_seed(2)
    qe = quantized(torch.randn(E, 64, 128, dtype=torch.bfloat16), mode)
    plain_bytes, plain_state = qe.data.clone(), copy.deepcopy(qe.quant_state)
    scales = qe._absmax(0, qe.quant_state.shape.numel() // BLOCKSIZE)
    rounded = scales.to(torch.bfloat16).float()
    qe.use_cpu_layout()
    assert qe.cpu_layout and qe.data.shape == plain_bytes.shape and qe.data.dtype == torch.uint8
    assert not torch.equal(qe.data, plain_bytes)  # rearranged, in place
    qe.use_cpu_layout()  # idempotent
    data, state = qe.plain()
    assert torch.equal(data, plain_bytes) and state.nested == plain_state.nested
    assert tuple(state.shape) == (E, 64, 128) and state.dtype == torch.bfloat16
    back = QuantizedExperts.four_bit(data, state)
    if state.nested:  # quantized again (8-bit, blocks of 256), as a saved weight is
        torch.testing.assert_close(back._absmax(0, scales.numel()), rounded, rtol=0.02, atol=0)
    else:
        assert torch.equal(back._absmax(0, scales.numel()), rounded)
    # the weight the kernel multiplies by: the plain bytes with the bfloat16 scales
    kernel_state = F.QuantState(
        absmax=rounded,
        shape=state.shape,
        code=state.code,
        blocksize=BLOCKSIZE,
        quant_type=state.quant_type,
        dtype=torch.bfloat16,
    )
    whole = QuantizedExperts.four_bit(data.clone(), kernel_state).dequantize()
    assert torch.equal(qe.dequantize(), whole)
    for e in range(E):
        assert torch.equal(qe[e], whole[e])
    twin = copy.deepcopy(qe)  # the same layout: computes the same
    assert twin.cpu_layout and twin.data_ptr() != qe.data_ptr()
    assert torch.equal(twin.data, qe.data) and torch.equal(twin.dequantize(), whole)
    again = pickle.loads(pickle.dumps(qe))  # the stored form, as saved
    assert isinstance(again, QuantizedExperts) and not again.cpu_layout
    assert torch.equal(again.data, plain_bytes)
    assert torch.equal(again.dequantize(), back.dequantize())
    module = nn.Module()
    module.w = qe
    saved = importlib.import_module("leanstream.save")._experts_state(module)
    assert torch.equal(saved["w"], plain_bytes)
    assert saved.keys() == {"w", *(f"w.{k}" for k in plain_state.as_dict(packed=True))}
    assert qe.cpu_layout  # saving did not change the model
    assert "cpu layout" in repr(qe)


def test_transposed_needs_a_bfloat16_weight_in_the_cpu_layout() -> None:
    qe = quantized(torch.randn(E, 64, 128, dtype=torch.bfloat16), "nf4")
    with pytest.raises(ValueError, match="CPU layout"):
        qe.transposed(0)  # plain layout
    half = quantized(torch.randn(E, 64, 128, dtype=torch.float16), "nf4")
    half.use_cpu_layout()
    with pytest.raises(ValueError, match="bfloat16"):
        half.transposed(0)


@needs_fused_kernel
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_transposed_is_bitsandbytes_dequantization(quant_type: str) -> None:
    """The Rust core's dequantization from the CPU layout: bitsandbytes' values."""
    torch.manual_seed(4)
    w = torch.randn(E, 96, 256, dtype=torch.bfloat16)
    w[0, 0, :64] = 0.0  # a zero block
    qe = quantized(w, quant_type)
    qe.use_cpu_layout()
    for e in range(E):
        got = qe.transposed(torch.tensor(e))
        assert got.shape == (256, 96) and got.dtype == torch.bfloat16 and got.is_contiguous()
        assert torch.equal(got.T, qe[e])


@needs_fused_kernel
def test_cpu_layout_made_once_under_threads() -> None:
    """Two threads running a fresh expert weight: one conversion, the same results."""
    import threading

    torch.manual_seed(3)
    qe = quantized(torch.randn(E, 64, 128, dtype=torch.bfloat16), "nf4")
    twin = copy.deepcopy(qe)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        want = [twin.linear(e, x) for e in range(E)]
    results: list[list[torch.Tensor]] = [[], []]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with torch.no_grad():
                results[i] = [qe.linear(e, x) for e in range(E)]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for got in results:
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert torch.equal(qe.data, twin.data)  # rearranged once, not twice


def test_no_expert_is_dequantized_where_a_kernel_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The point of the kernels: a forward never materializes an expert's weight."""
    modes = ["int8", "nf4-dq"] if packs() else ["int8"]
    for mode in modes:
        model, _ = quantize_experts(tiny("qwen3_moe"), mode)
        use_quantized_experts(model)

        def refuse(self: QuantizedExperts, index: Any) -> torch.Tensor:
            raise AssertionError("an expert was dequantized")

        with monkeypatch.context() as patch:
            patch.setattr(QuantizedExperts, "__getitem__", refuse)
            with torch.no_grad():
                model(IDS)
                model.generate(IDS, max_new_tokens=2, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_gradients_take_the_dequantized_experts(mode: str) -> None:
    """bitsandbytes' fused CPU kernel has no backward: in training, or for an input that
    wants a gradient, the eager forward runs on dequantized experts (bit for bit the
    reference's) and the input's gradient flows."""
    model, reference = quantize_experts(tiny("mixtral"), mode)
    use_quantized_experts(model)
    experts = model.model.layers[0].mlp.experts
    ref = reference.model.layers[0].mlp.experts
    hidden = torch.randn(6, 64, dtype=torch.bfloat16, requires_grad=True)
    index = torch.tensor([[0, 3], [1, 2], [3, 1], [2, 0], [1, 0], [0, 2]])
    weights = torch.rand(6, 2, dtype=torch.bfloat16)
    assert matmul_forward(experts, hidden, index, weights) is None
    got = experts_forward(experts, hidden, index, weights)
    want = eager_forward(type(ref))(ref, hidden, index, weights)
    assert torch.equal(got, want)
    got.float().sum().backward()
    assert hidden.grad is not None and bool(hidden.grad.abs().sum() > 0)
    experts.train()
    with torch.no_grad():
        assert matmul_forward(experts, hidden.detach(), index, weights) is None


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
    # GPT-OSS's experts are [E, in, out] (x @ w): no bitsandbytes kernel takes them
    assert matmul_forward(experts, hidden, index, weights) is None
