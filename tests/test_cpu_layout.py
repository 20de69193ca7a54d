"""bitsandbytes' AVX512-BF16 CPU layout made at load (leanstream.cpu_layout), and the
bitsandbytes CPU-kernel traps leanstream's layers avoid.

The conversions are compared with bitsandbytes' own (``_convert_weight_packed_for_cpu``
and its inverse are plain torch code: they run on any CPU); what needs the fused kernel
itself is skipped on a CPU without AVX512-BF16 (``needs_fused_kernel``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch
from cpu_kernel import needs_fused_kernel, packs, plain_kernel
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

import leanstream
from leanstream import cpu_layout
from leanstream.cpu_layout import is_packed

pytestmark = pytest.mark.cpu_kernel

IDS = torch.tensor([[1, 5, 9, 42, 7, 300, 11, 2]])


def _layer(out_features: int, in_features: int, *, blocksize: int, **kwargs: Any) -> Any:
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, device="meta", **kwargs)
    layer.weight.blocksize = blocksize
    return layer


def _bnb_4bit(weight: torch.Tensor, layer: Any) -> Any:
    """bitsandbytes' own quantization of ``weight`` for ``layer`` (Params4bit.to)."""
    return bnb.nn.Params4bit(
        weight.clone(),
        requires_grad=False,
        blocksize=layer.weight.blocksize,
        compress_statistics=layer.weight.compress_statistics,
        quant_type=layer.weight.quant_type,
        quant_storage=layer.weight.quant_storage,
    ).to("cpu")


def _assert_same_param(ours: Any, ref: Any) -> None:
    assert ours.data.dtype == ref.data.dtype and ours.data.shape == ref.data.shape
    assert torch.equal(ours.data, ref.data)
    for attr in ("blocksize", "compress_statistics", "quant_type", "quant_storage"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    assert cpu_layout._same_state(ours.quant_state, ref.quant_state)


CASES = [
    # (out, in, dtype, quant_type, double_quant, quant_storage, blocksize)
    (64, 128, torch.bfloat16, "nf4", False, torch.uint8, 64),
    (96, 256, torch.bfloat16, "fp4", False, torch.uint8, 64),
    (64, 128, torch.bfloat16, "nf4", True, torch.uint8, 64),
    (32, 512, torch.float16, "nf4", True, torch.uint8, 128),
    (128, 64, torch.float32, "fp4", True, torch.uint8, 32),
    (64, 256, torch.bfloat16, "nf4", False, torch.bfloat16, 64),
    (64, 256, torch.bfloat16, "nf4", True, torch.float32, 256),
    (64, 128, torch.float16, "fp4", False, torch.uint8, 32),
    (32, 256, torch.float32, "nf4", False, torch.uint8, 128),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}-{c[3]}-{c[4]}")
def test_quantized_into_the_layout_is_bitsandbytes_conversion(case: tuple[Any, ...]) -> None:
    """Straight into the layout (the Rust core, then the statistics) = bitsandbytes'
    quantization followed by the conversion its first forward runs: every byte of the
    weight and every attribute of the QuantState; the pre-quantized path too."""
    out_f, in_f, dtype, qt, dq, storage, bs = case
    layer = _layer(
        out_f, in_f, quant_type=qt, compress_statistics=dq, quant_storage=storage, blocksize=bs
    )
    weight = (torch.randn(out_f, in_f) * torch.rand(out_f, 1) * 3).to(dtype)
    ref = _bnb_4bit(weight, layer)
    plain = copy.deepcopy(ref)
    ref.data, ref.quant_state = F._convert_weight_packed_for_cpu(ref.data, ref.quant_state)
    _assert_same_param(cpu_layout.quantize(layer, weight), ref)
    # a pre-quantized weight: converted from its stored bytes
    _assert_same_param(cpu_layout.from_plain(layer, plain.data, plain.quant_state), ref)
    # and back: the bytes bitsandbytes' inverse gives, the scales in order (float32)
    data, state = cpu_layout.unpacked(ref, double_quant=dq)
    inverse, _ = F._convert_weight_packed_for_cpu_inverse(
        ref.data.clone(), copy.deepcopy(ref.quant_state)
    )
    assert data.dtype == storage == inverse.dtype and data.shape == plain.data.shape
    assert torch.equal(data.view(torch.uint8), inverse.view(torch.uint8))  # bytes: NaNs
    assert torch.equal(data.view(torch.uint8), plain.data.view(torch.uint8))
    absmax = ref.quant_state.absmax.T.reshape(-1).float()  # the bf16 scales, in order
    if dq:
        offset = absmax.mean()
        codes, state2 = F.quantize_blockwise(absmax - offset, blocksize=256)
        assert torch.equal(state.absmax, codes) and torch.equal(state.offset, offset)
        assert torch.equal(state.state2.absmax, state2.absmax)
    else:
        assert state.absmax.dtype == torch.float32 and torch.equal(state.absmax, absmax)
    assert state.dtype == dtype and not is_packed(state)


def test_the_torch_inverse_is_the_rust_one() -> None:
    """The inverse a weight moved off the CPU gets (torch, any device) = the Rust one."""
    packed = torch.randint(0, 256, (96, 80), dtype=torch.uint8)
    rust = cpu_layout._plain_bytes(packed, 96, 160)
    assert torch.equal(cpu_layout._plain_bytes_torch(packed, 96, 160), rust)
    inverse, _ = F._convert_weight_packed_for_cpu_inverse(packed.clone(), _fake_state(96, 160))
    assert torch.equal(rust.reshape(-1), inverse.reshape(-1))


def _fake_state(rows: int, cols: int) -> Any:
    state = F.QuantState(
        absmax=torch.ones(cols // 64, rows, dtype=torch.bfloat16),
        shape=torch.Size((rows, cols)),
        blocksize=64,
        quant_type="nf4",
        dtype=torch.bfloat16,
    )
    state.packing_format_for_cpu = True
    state.original_qshape = torch.Size((rows * cols // 2, 1))
    state.original_nested = False
    state.original_dtype = torch.bfloat16
    return state


@pytest.mark.parametrize("shape", [(32, 3), (31, 64), (512, 16), (64, 96)])
def test_shapes_without_the_layout(shape: tuple[int, int]) -> None:
    """bitsandbytes' conversion asserts or crashes on these: they keep the plain kernel."""
    out_f, in_f = shape
    assert not cpu_layout.fits(out_f, in_f, 64)
    assert cpu_layout.fits(32, 128, 64) and cpu_layout.fits(64, 64, 32)


@pytest.fixture(scope="module")
def llama(sources: dict[str, Path]) -> Path:
    return sources["llama"]


def _load(folder: Path, **kwargs: Any) -> Any:
    return leanstream.load(folder, device="cpu", progress=False, **kwargs)


def _logits(model: Any, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, **kwargs).logits.float()


def _linears(model: Any) -> list[Any]:
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


@needs_fused_kernel
@pytest.mark.parametrize("double_quant", [False, True])
def test_the_first_forward_finds_the_layout_made(llama: Path, double_quant: bool) -> None:
    """The load leaves every 4-bit linear in the fused layout: bitsandbytes' first forward
    has nothing left to convert (the weights are the same tensors afterwards), and gives
    the logits of transformers' model after its own first forward."""
    model = _load(llama, double_quant=double_quant)
    layers = _linears(model)
    assert layers and all(is_packed(m.weight.quant_state) for m in layers)
    before = [(m.weight.data_ptr(), m.weight.quant_state.absmax.data_ptr()) for m in layers]
    got = _logits(model)
    assert before == [(m.weight.data_ptr(), m.weight.quant_state.absmax.data_ptr()) for m in layers]
    ref = AutoModelForCausalLM.from_pretrained(
        llama,
        device_map="cpu",
        quantization_config=transformers_config(double_quant),
    ).eval()
    assert torch.equal(_logits(ref), got)  # its first forward converts, as bitsandbytes does
    assert all(is_packed(m.weight.quant_state) for m in _linears(ref))


def transformers_config(double_quant: bool) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def test_plain_kernel_opt_out(llama: Path) -> None:
    """``cpu_kernel="plain"``: the plain layout, kept through forwards (bitsandbytes does
    not convert), the plain kernel's logits: those of transformers' model set to it."""
    model = _load(llama, cpu_kernel="plain")
    assert not any(is_packed(m.weight.quant_state) for m in _linears(model))
    got = _logits(model)
    assert not any(is_packed(m.weight.quant_state) for m in _linears(model))
    assert not any(m.support_avx512bf16_for_cpu for m in _linears(model))
    ref = plain_kernel(
        AutoModelForCausalLM.from_pretrained(
            llama, device_map="cpu", quantization_config=transformers_config(False)
        ).eval()
    )
    assert torch.equal(_logits(ref), got)
    with pytest.raises(leanstream.ConfigError, match="cpu_kernel"):
        _load(llama, cpu_kernel="fast")


def test_another_bitsandbytes_conversion_is_left_to_bitsandbytes(
    llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the installed bitsandbytes converts differently (here: a stand-in that
    reverses the bytes), the load keeps the plain layout and leaves the conversion to
    bitsandbytes' forward, as without leanstream."""

    def other(qweight: torch.Tensor, state: Any, block_n: int = 32) -> Any:
        data, state = real(qweight, state, block_n)
        return data.flip(-1).contiguous(), state

    real = F._convert_weight_packed_for_cpu
    monkeypatch.setattr(F, "_convert_weight_packed_for_cpu", other)
    cpu_layout.agrees.cache_clear()
    try:
        assert not cpu_layout.agrees()
        model = _load(llama)
        assert not any(is_packed(m.weight.quant_state) for m in _linears(model))
    finally:
        monkeypatch.undo()
        cpu_layout.agrees.cache_clear()
    assert cpu_layout.agrees()


@needs_fused_kernel
@pytest.mark.parametrize("double_quant", [False, True])
def test_training_gets_gradients_and_eval_gets_the_layout_back(
    llama: Path, double_quant: bool
) -> None:
    """Regression: bitsandbytes' fused kernel has no backward; after one eval forward a
    4-bit layer's input gradient is silently lost in training. leanstream's layers go
    back to the plain layout for training (gradients as with the plain kernel, bit for
    bit: the same scales) and to the fused one, unchanged, for the next eval forward."""
    model = _load(llama, double_quant=double_quant)
    plain = _load(llama, double_quant=double_quant, cpu_kernel="plain")
    # the fused layout's scales are bfloat16: give the plain model the same
    for a, b in zip(_linears(plain), _linears(model), strict=True):
        data, state = cpu_layout.unpacked(b.weight, double_quant=False)
        a.weight = leanstream.quantize.params_4bit(a, data, state)
    first = _logits(model)
    grads = []
    for m in (model, plain):
        m.train()
        embeds = m.model.embed_tokens(IDS).detach().requires_grad_(True)
        m(inputs_embeds=embeds).logits.float().sum().backward()
        grads.append(embeds.grad)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert torch.equal(grads[0], grads[1])
    model.eval()
    assert torch.equal(_logits(model), first)
    assert all(is_packed(m.weight.quant_state) for m in _linears(model))


@needs_fused_kernel
def test_bitsandbytes_loses_the_input_gradient_after_an_eval_forward() -> None:
    """The bitsandbytes behaviour the test above guards against (if this starts failing,
    bitsandbytes fixed it)."""
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(
        torch.randn(64, 128, dtype=torch.bfloat16), requires_grad=False, module=layer
    )
    layer = layer.to("cpu").eval()
    layer(torch.randn(2, 128, dtype=torch.bfloat16))
    layer.train()
    x = torch.randn(2, 128, dtype=torch.bfloat16, requires_grad=True)
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        layer(x).float().sum().backward()
    assert x.grad is None


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_writes_the_plain_layout_and_keeps_the_model(
    llama: Path, tmp_path: Path, double_quant: bool
) -> None:
    """``state_dict()`` (save, save_pretrained) writes bitsandbytes' plain format (what
    transformers reads back, to the same logits) and leaves the layers as they were."""
    model = _load(llama, double_quant=double_quant)
    expected = _logits(model)
    kept = [(m.weight, m.weight.quant_state) for m in _linears(model)]
    state = model.state_dict()
    assert all(state[k].dim() == 1 for k in state if k.endswith(".absmax"))
    assert [(m.weight, m.weight.quant_state) for m in _linears(model)] == kept
    folder = leanstream.save(model, tmp_path / "out", progress=False)
    theirs = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    assert torch.equal(_logits(model), expected)
    if not double_quant:  # bfloat16 scales are exact in float32
        assert torch.equal(_logits(theirs), expected)
        again = _load(folder)
        assert torch.equal(_logits(again), expected)
    else:  # double-quantized again from them: close
        assert (_logits(theirs) - expected).norm() / expected.norm() < 1e-2
    model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # transformers' own save
    assert [(m.weight, m.weight.quant_state) for m in _linears(model)] == kept
    assert torch.equal(_logits(model), expected)


def test_bitsandbytes_own_inverse_is_repaired(llama: Path) -> None:
    """``Params4bit.cuda()`` undoes the layout with bitsandbytes' inverse, which leaves a
    plain absmax transposed in bfloat16 (its scales then apply to the wrong blocks): the
    layer's next forward puts it in order (here on the CPU, the same inverse applied)."""
    model = _load(llama, cpu_kernel="plain")
    expected = _logits(model)
    for m in _linears(model):
        weight = m.weight
        weight.data, state = F._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
        weight.data, weight.quant_state = F._convert_weight_packed_for_cpu_inverse(
            weight.data, state
        )
        m.quant_state = weight.quant_state
    wide = [m for m in _linears(model) if m.weight.quant_state.absmax.shape[0] > 1]
    assert wide and all(m.weight.quant_state.absmax.dim() == 2 for m in wide)
    assert torch.equal(_logits(model), expected)
    assert all(m.weight.quant_state.absmax.dim() == 1 for m in _linears(model))


def test_a_strided_input_gives_the_contiguous_result(llama: Path) -> None:
    """Regression: the fused kernel reads an input whose last dimension is strided
    (``x.transpose(1, 2)``, as diffusers' attention blocks pass) as if it were contiguous
    (relative error 1.3 on bitsandbytes' own layer): leanstream's layers make it so."""
    model = _load(llama)
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(1, layer.in_features, 5, dtype=torch.bfloat16).transpose(1, 2)
    assert x.stride(-1) != 1
    with torch.no_grad():
        assert torch.equal(layer(x), layer(x.contiguous()))


class _Narrow(nn.Module):
    """A layer whose input is narrower than one block (Jamba's ``dt_proj``, dt_rank 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.dt_proj = nn.Linear(16, 512)
        self.out = nn.Linear(512, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.dt_proj(x))


def test_an_input_narrower_than_a_block_runs(tmp_path: Path) -> None:
    """Regression: bitsandbytes' conversion crashes on ``Linear(16, 512)`` (``shape
    '[512, 0]' is invalid``) at its first forward: such a layer keeps the plain kernel,
    and gives what bitsandbytes' plain kernel gives."""
    torch.manual_seed(1)
    source = _Narrow().to(torch.bfloat16)
    save_file(source.state_dict(), tmp_path / "narrow.safetensors")
    model = leanstream.load_into(_Narrow, tmp_path / "narrow.safetensors", bits=4, device="cpu")
    assert not model.dt_proj.support_avx512bf16_for_cpu
    assert model.out.support_avx512bf16_for_cpu == cpu_layout.detected()
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        got = model(x)
    ref = bnb.nn.Linear4bit(
        16, 512, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=False
    )
    ref.weight = bnb.nn.Params4bit(
        source.dt_proj.weight.data.clone(),
        requires_grad=False,
        quant_type="nf4",
        compress_statistics=False,
        module=ref,
    )
    ref.bias = nn.Parameter(source.dt_proj.bias.data.clone(), requires_grad=False)
    ref = plain_kernel(ref.to("cpu").eval())
    with torch.no_grad():
        assert torch.equal(model.dt_proj(x), ref(x))
    assert torch.isfinite(got).all()


def test_int8_footprint_keeps_the_row_scales_after_a_forward(llama: Path) -> None:
    """Regression: bitsandbytes moves an LLM.int8 weight's SCB into the layer's state at
    the first forward; footprint still counts them."""
    model = _load(llama, bits=8)
    before = leanstream.footprint(model)
    _logits(model)
    assert leanstream.footprint(model) == before


@pytest.mark.parametrize("double_quant", [False, True])
def test_footprint_and_inspect_tell_the_layout(llama: Path, double_quant: bool) -> None:
    """What ``footprint`` reports is what the weights hold, in either layout, and
    ``inspect`` predicts it for this CPU (bfloat16 absmax; double quantization undone)."""
    from leanstream.cli import inspect_checkpoint

    model = _load(llama, double_quant=double_quant)
    plain = _load(llama, double_quant=double_quant, cpu_kernel="plain")
    got, expected = leanstream.footprint(model), leanstream.footprint(plain)
    stats = [m.weight.quant_state for m in _linears(model)]
    blocks = sum(m.weight.numel() * 2 // 64 for m in _linears(model))
    if packs():
        assert all(s.absmax.dtype == torch.bfloat16 for s in stats)
        if double_quant:  # uint8 codes and the nested state, for bfloat16 scales
            plain_stats = sum(
                s.absmax.numel() + s.state2.absmax.nbytes + s.state2.code.nbytes
                for s in (m.weight.quant_state for m in _linears(plain))
            )
        else:  # float32 scales
            plain_stats = blocks * 4
        difference = blocks * 2 - plain_stats
        assert got.by_kind["quant_state"] - expected.by_kind["quant_state"] == difference
    else:
        assert got == expected
    report = inspect_checkpoint(llama)
    assert report["cpu_layout"] == packs()
    label = "4-bit nf4 + double" if double_quant else "4-bit nf4"
    (row,) = [r for r in report["memory"] if r["setting"] == label]
    assert row["total_bytes"] == got.total_bytes
    plain_report = inspect_checkpoint(llama, cpu_kernel="plain")
    (row,) = [r for r in plain_report["memory"] if r["setting"] == label]
    assert row["total_bytes"] == expected.total_bytes


def test_another_bitsandbytes_conversion_still_saves_in_order(
    llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the conversion is left to bitsandbytes (its layout not leanstream's), a model
    that ran a forward still saves its absmax in bitsandbytes' order: transformers reads
    back the same logits."""
    monkeypatch.setattr(cpu_layout, "agrees", lambda: False)
    model = _load(llama)
    expected = _logits(model)  # bitsandbytes converts here, on an AVX512-BF16 CPU
    folder = leanstream.save(model, tmp_path / "out", progress=False)
    assert torch.equal(_logits(model), expected)
    theirs = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    assert torch.equal(_logits(theirs), expected)
