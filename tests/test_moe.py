"""Mixture-of-experts checkpoints: experts merged by transformers' conversion rules
(one tensor per expert on disk) or stored fused (gpt-oss), streamed piece by piece
into place; quantized (4 and 8 bits) without the merged full-precision tensor ever
existing, bit-identical to bitsandbytes quantizing transformers' merged tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch
from safetensors.torch import load_file
from test_load import SETTINGS, reference
from transformers import AutoModelForCausalLM

import leanstream
import leanstream.matching
from leanstream.experts import QuantizedExperts
from leanstream.quantize import accept_any_rank
from models import MOE_ARCHS, edit_tensor, make_config

# the outcome depends on bitsandbytes' CPU 4-bit kernel (tests/cpu_kernel.py)
pytestmark = pytest.mark.cpu_kernel


IDS = torch.tensor([[1, 5, 9, 42, 7, 100, 11, 2]])


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each architecture written by transformers' ``save_pretrained`` (which splits the
    merged experts back into one tensor per expert, except gpt-oss's fused ones)."""
    root = tmp_path_factory.mktemp("moe")
    out = {}
    for arch in MOE_ARCHS:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(make_config(arch), dtype=torch.bfloat16)
        out[arch] = root / arch
        model.save_pretrained(out[arch], max_shard_size="60KB")
    return out


def load(folder: Path, **kwargs: Any) -> Any:
    return leanstream.load(folder, device="cpu", progress=False, **kwargs)


def merged_reference(folder: Path) -> Any:
    """transformers' own bf16 model of the folder (the experts merged by transformers)."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()


def expert_weights(model: Any) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.dim() == 3}


def bnb_quantized(weight: torch.Tensor, setting: dict[str, Any]) -> dict[str, torch.Tensor]:
    """bitsandbytes quantizing the merged ``[E, R, C]`` tensor as rows of ``[E * R, C]``
    (each expert matrix quantized as bitsandbytes quantizes a linear's weight)."""
    experts, rows, cols = weight.shape
    flat = weight.reshape(experts * rows, cols)
    if setting["bits"] == 8:
        cb, scb, _ = F.int8_vectorwise_quant(flat.half())
        return {"CB": cb.reshape(weight.shape), "SCB": scb}
    packed, state = F.quantize_4bit(
        flat,
        blocksize=64,
        compress_statistics=setting["double_quant"],
        quant_type=setting["quant_type"],
    )
    out = {"packed": packed, "absmax": state.absmax}
    if state.nested:
        out.update(offset=state.offset, absmax2=state.state2.absmax)
    return out


def ours_as_dict(param: QuantizedExperts) -> dict[str, torch.Tensor]:
    if param.bits == 8:
        return {"CB": param.data, "SCB": param.SCB}
    state = param.quant_state
    out = {"packed": param.data, "absmax": state.absmax}
    if state.nested:
        out.update(offset=state.offset, absmax2=state.state2.absmax)
    return out


@pytest.mark.parametrize("setting", ["nf4", "nf4-dq", "fp4", "int8"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_experts_are_quantized_bit_identically(
    folders: dict[str, Path], arch: str, setting: str
) -> None:
    ref = merged_reference(folders[arch])
    got = load(folders[arch], **SETTINGS[setting])
    want = expert_weights(ref)
    assert want, "the tiny model has experts"
    params = dict(got.named_parameters())
    for name, weight in want.items():
        param = params[name]
        assert isinstance(param, QuantizedExperts), name
        assert tuple(param.shape3) == tuple(weight.shape)
        expected = bnb_quantized(weight, SETTINGS[setting])
        actual = ours_as_dict(param)
        assert actual.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(actual[key].reshape(value.shape), value), (name, key)
    qc = got.config.quantization_config
    assert sorted(qc.leanstream_quantized_experts) == sorted(want)


def test_expert_pieces_are_quantized_in_runs(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the CPU, pieces stored in the model's dtype go to the Rust core many at a
    call (:meth:`ExpertsQuantizer.add_streamed`), none through Python one by one; pieces
    that must be converted first (here to float16) go one by one, and give what
    bitsandbytes gives for the converted merged tensor."""
    from leanstream.quantize import ExpertsQuantizer

    runs: list[int] = []
    streamed, add = ExpertsQuantizer.add_streamed, ExpertsQuantizer.add

    def counted(self: Any, stream: Any, pieces: Any, threads: int) -> bool:
        runs.append(len(pieces))
        return streamed(self, stream, pieces, threads)

    def refused(*args: Any, **kwargs: Any) -> bool:
        raise AssertionError("a piece went through add()")

    monkeypatch.setattr(ExpertsQuantizer, "add_streamed", counted)
    monkeypatch.setattr(ExpertsQuantizer, "add", refused)
    load(folders["mixtral"], **SETTINGS["nf4"])
    assert runs and max(runs) > 1, runs

    monkeypatch.setattr(ExpertsQuantizer, "add", add)
    runs.clear()
    got = load(folders["mixtral"], **SETTINGS["int8"], dtype=torch.float16)
    assert not runs
    ref = AutoModelForCausalLM.from_pretrained(folders["mixtral"], dtype=torch.float16)
    for name, weight in expert_weights(ref).items():
        expected = bnb_quantized(weight, SETTINGS["int8"])
        actual = ours_as_dict(got.get_parameter(name))
        for key, value in expected.items():
            assert torch.equal(actual[key].reshape(value.shape), value), (name, key)


def test_two_moe_loads_in_two_threads(folders: dict[str, Path]) -> None:
    """Each load's runs of expert pieces (Rust worker threads, the stream's read-ahead)
    are its own: two loads at once, of two architectures and of one, give the experts one
    load alone gives."""
    import threading

    jobs = [("mixtral", "nf4"), ("qwen3_moe", "int8"), ("mixtral", "nf4")]
    results: dict[int, Any] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        try:
            start.wait(30)
            arch, setting = jobs[i]
            results[i] = load(folders[arch], **SETTINGS[setting])
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, (arch, setting) in enumerate(jobs):
        alone = dict(load(folders[arch], **SETTINGS[setting]).named_parameters())
        experts = {
            n: p for n, p in results[i].named_parameters() if isinstance(p, QuantizedExperts)
        }
        assert experts, arch
        for name, param in experts.items():
            want = ours_as_dict(alone[name])
            for key, value in ours_as_dict(param).items():
                assert torch.equal(value, want[key]), (arch, name, key)


def dequantized_reference(folder: Path, setting: dict[str, Any]) -> Any:
    """transformers' bf16 model whose experts are what bitsandbytes' quantization of them
    dequantizes to, and whose other linears are bitsandbytes layers as transformers
    quantizes them: the model ours must compute."""
    ref = reference(folder, setting)
    for name, weight in expert_weights(ref).items():
        experts, rows, cols = weight.shape
        flat = weight.data.reshape(experts * rows, cols)
        if setting["bits"] == 8:
            cb, scb, _ = F.int8_vectorwise_quant(flat.half())
            value = F.int8_vectorwise_dequant(cb, scb)
        else:
            packed, state = F.quantize_4bit(
                flat,
                blocksize=64,
                compress_statistics=setting["double_quant"],
                quant_type=setting["quant_type"],
            )
            value = F.dequantize_4bit(packed, state)
        module_name, _, attr = name.rpartition(".")
        module = ref.get_submodule(module_name)
        module._parameters[attr] = torch.nn.Parameter(
            value.to(torch.bfloat16).reshape(weight.shape), requires_grad=False
        )
    ref.config._experts_implementation = "eager"
    for module in ref.modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            # DeepSeek's kv_b_proj gets a 4-D input, which transformers' LLM.int8 layer
            # cannot take (test_int8_layers_take_inputs_of_any_rank): leanstream's fix
            accept_any_rank(module)
        if isinstance(module, bnb.nn.Linear4bit) and module.out_features % 32:
            # Qwen2-MoE's shared-expert gate, Linear(H, 1): on an AVX512-BF16 CPU
            # bitsandbytes repacks it at the first forward and asserts "N must be divisible
            # by block_n" (test_layers_bitsandbytes_cannot_repack_keep_the_plain_cpu_kernel);
            # leanstream's layer keeps the plain CPU kernel (README, "Deliberately
            # different"): so does the reference. The same weights either way; a no-op on
            # other CPUs.
            module.support_avx512bf16_for_cpu = False
    return ref


@pytest.mark.parametrize("setting", ["nf4", "nf4-dq", "int8"])
@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_logits_are_those_of_the_quantized_experts(
    folders: dict[str, Path], arch: str, setting: str
) -> None:
    extra = {"compute_dtype": torch.bfloat16} if SETTINGS[setting]["bits"] == 4 else {}
    got = load(folders[arch], **SETTINGS[setting], **extra)
    ref = dequantized_reference(folders[arch], SETTINGS[setting])
    with torch.no_grad():
        a, b = ref(input_ids=IDS).logits.float(), got(input_ids=IDS).logits.float()
    assert torch.isfinite(b).all()
    assert torch.allclose(a, b, rtol=0, atol=1e-2 * a.abs().max().item()), (a - b).abs().max()
    out = got.generate(IDS, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, IDS.shape[1] + 4)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_pipelined_equals_mapped(folders: dict[str, Path], arch: str) -> None:
    for setting in ("nf4-dq", "int8"):
        mapped = load(folders[arch], **SETTINGS[setting])
        piped = load(folders[arch], **SETTINGS[setting], pipeline=True, ring_bytes=16 * 1000)
        for name in expert_weights(merged_reference(folders[arch])):
            a, b = ours_as_dict(mapped.get_parameter(name)), ours_as_dict(piped.get_parameter(name))
            assert all(torch.equal(a[k], b[k]) for k in a), name
        assert torch.equal(mapped(input_ids=IDS).logits, piped(input_ids=IDS).logits)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_unquantized_moe_equals_transformers(folders: dict[str, Path], arch: str) -> None:
    ref = merged_reference(folders[arch])
    for pipeline in (False, True):
        got = load(folders[arch], bits=None, pipeline=pipeline)
        a, b = ref.state_dict(), got.state_dict()
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert torch.equal(b[key], value), key
        assert torch.equal(ref(input_ids=IDS).logits, got(input_ids=IDS).logits)


def test_skip_modules_keeps_experts_in_full_precision(folders: dict[str, Path]) -> None:
    got = load(folders["mixtral"], bits=4, skip_modules=["model.layers.0.mlp.experts"])
    assert not isinstance(got.model.layers[0].mlp.experts.gate_up_proj, QuantizedExperts)
    assert got.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert isinstance(got.model.layers[1].mlp.experts.gate_up_proj, QuantizedExperts)


def test_a_missing_expert_is_named(folders: dict[str, Path], tmp_path: Path) -> None:
    """transformers 5 loads such a checkpoint with random weights for the expert."""
    folder = Path(shutil.copytree(folders["mixtral"], tmp_path / "m"))
    edit_tensor(folder, "model.layers.1.block_sparse_moe.experts.2.w3.weight", None)
    with pytest.raises(leanstream.MismatchError) as err:
        load(folder, bits=4)
    assert err.value.missing == ["model.layers.1.mlp.experts.gate_up_proj (expert 2, part 2 of 2)"]


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_inspect_predicts_the_loaded_size(folders: dict[str, Path], arch: str) -> None:
    from leanstream.cli import inspect_checkpoint

    report = inspect_checkpoint(folders[arch])
    memory = {row["setting"]: row["total_bytes"] for row in report["memory"]}
    for label, kwargs in (
        ("16-bit", dict(bits=None)),
        ("8-bit (LLM.int8)", dict(bits=8)),
        ("4-bit nf4", dict(bits=4)),
        ("4-bit nf4 + double", dict(bits=4, double_quant=True)),
    ):
        got = leanstream.footprint(load(folders[arch], **kwargs)).total_bytes
        assert memory[label] == got, (label, memory[label], got)


def test_inspect_refuses_what_load_refuses(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conversion that cannot be streamed (here: every merge, as if unsupported)."""
    import leanstream.loader
    from leanstream.cli import inspect_checkpoint

    monkeypatch.setattr(leanstream.matching, "_merge_piece", lambda *args: None)
    with pytest.raises(leanstream.UnsupportedCheckpointError, match=r"w1\.weight"):
        load(folders["mixtral"], bits=4)
    with pytest.raises(leanstream.UnsupportedCheckpointError, match=r"w1\.weight"):
        inspect_checkpoint(folders["mixtral"])


def test_experts_kept_in_full_precision_save_as_transformers_does(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    """Quantized experts are saved in leanstream's format (test_moe_save.py); experts kept
    in bf16 are saved as transformers saves them, one tensor per expert."""
    kept = load(folders["mixtral"], bits=4, skip_modules=["experts"])
    folder = leanstream.save(kept, tmp_path / "kept", progress=False)
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "bitsandbytes"
    assert "leanstream_quantized_experts" not in quant
    keys = {k for path in folder.glob("*.safetensors") for k in load_file(path)}
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in keys
    again = load(folder)
    assert torch.equal(kept(input_ids=IDS).logits, again(input_ids=IDS).logits)


@pytest.mark.parametrize("setting", ["nf4-dq", "fp4", "int8"])
@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_experts_quantized_with_bitsandbytes_ops(
    folders: dict[str, Path], arch: str, setting: str
) -> None:
    """The GPU's path on the CPU: bitsandbytes' ops per piece (owned pieces cast in place
    for LLM.int8), bit-identical to bitsandbytes quantizing the merged tensor."""
    got = load(
        folders[arch], **SETTINGS[setting], native_quantizer=False, pipeline=True, ring_bytes=16000
    )
    for name, weight in expert_weights(merged_reference(folders[arch])).items():
        expected = bnb_quantized(weight, SETTINGS[setting])
        actual = ours_as_dict(got.get_parameter(name))
        for key, value in expected.items():
            assert torch.equal(actual[key].reshape(value.shape), value), (name, key)


def test_layers_bitsandbytes_cannot_repack_keep_the_plain_cpu_kernel(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an AVX512-BF16 CPU bitsandbytes repacks 4-bit weights at the first forward and
    asserts for a layer whose out_features is not a multiple of 32 (Qwen2-MoE's
    shared-expert gate, Linear(H, 1)): transformers' model fails, ours runs."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    setting = SETTINGS["nf4"]
    ref = reference(folders["qwen2_moe"], setting)
    with pytest.raises(AssertionError, match="block_n"), torch.no_grad():
        ref(input_ids=IDS)
    got = load(folders["qwen2_moe"], **setting, compute_dtype=torch.bfloat16)
    gate = got.model.layers[0].mlp.shared_expert_gate
    assert gate.out_features == 1 and not gate.support_avx512bf16_for_cpu
    assert got.model.layers[0].self_attn.q_proj.support_avx512bf16_for_cpu
    with torch.no_grad():
        assert torch.isfinite(got(input_ids=IDS).logits).all()


def test_int8_layers_take_inputs_of_any_rank(folders: dict[str, Path]) -> None:
    """DeepSeek's MLA feeds kv_b_proj a 4-D input: bitsandbytes' LLM.int8 layer fails on it
    (in transformers' model), leanstream's runs it as nn.Linear would."""
    ref = reference(folders["deepseek_v3"], SETTINGS["int8"])
    with pytest.raises(RuntimeError), torch.no_grad():
        ref(input_ids=IDS)
    layer = bnb.nn.Linear8bitLt(64, 32, bias=True, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(
        torch.randn(32, 64).half(), requires_grad=False, has_fp16_weights=False
    )._quantize("cpu")
    layer.bias = torch.nn.Parameter(torch.randn(32).half(), requires_grad=False)
    accept_any_rank(layer)
    x = torch.randn(2, 3, 5, 64).half()
    with torch.no_grad():
        four = layer(x)
        two = layer(x.reshape(-1, 64))
        three = layer(x.reshape(6, 5, 64))
    assert four.shape == (2, 3, 5, 32)
    assert torch.equal(four.reshape(-1, 32), two) and torch.equal(three.reshape(-1, 32), two)
    with pytest.raises(RuntimeError):
        layer(torch.randn(2, 3, 5, 63).half())
    with torch.no_grad():
        assert torch.equal(layer(x), four)  # the failed call left nothing behind
