"""Loading pre-quantized bitsandbytes checkpoints, against transformers' own save and load."""

from __future__ import annotations

import copy
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import pytest
import torch
from cpu_kernel import plain_bytes, plain_kernel, state2
from safetensors.torch import load_file
from test_load import SETTINGS, assert_same_weights, logits, reference
from transformers import AutoModelForCausalLM

import leanstream
from leanstream.cpu_layout import is_packed
from models import edit_tensor, make_config, stored, write_model

#: (setting, architecture) pairs saved by transformers: llama (plain), gpt2 (Conv1D), opt (tied)
# the outcome depends on bitsandbytes' CPU 4-bit kernel (tests/cpu_kernel.py)
pytestmark = pytest.mark.cpu_kernel


CASES = [(s, "llama") for s in SETTINGS] + [("nf4", "gpt2"), ("int8", "gpt2"), ("nf4-dq", "opt")]


@pytest.fixture(scope="session")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("src")
    return {arch: write_model(root / arch, arch) for arch in ("llama", "gpt2", "opt")}


@pytest.fixture(scope="session")
def saved(
    originals: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], Path]:
    """Folders written by transformers' ``save_pretrained`` of a bitsandbytes model."""
    root = tmp_path_factory.mktemp("tf-saved")
    folders = {}
    for setting, arch in CASES:
        model = reference(originals[arch], SETTINGS[setting])
        folder = root / f"{arch}-{setting}"
        model.save_pretrained(folder, max_shard_size="40KB")
        folders[setting, arch] = folder
    return folders


def _load(folder: Path, **kwargs: Any) -> Any:
    return leanstream.load(folder, device="cpu", progress=False, **kwargs)


@pytest.mark.parametrize(("setting", "arch"), CASES)
def test_transformers_saved_loads_identically(
    originals: dict[str, Path], saved: dict[tuple[str, str], Path], setting: str, arch: str
) -> None:
    folder = saved[setting, arch]
    assert len(list(folder.glob("*.safetensors"))) > 1, "the fixture must be sharded"
    ref = reference(originals[arch], SETTINGS[setting])  # quantized from full precision
    reloaded = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    got = _load(folder)  # bits="auto": what the checkpoint stores
    assert assert_same_weights(ref, got) > 0  # packed bytes, absmax, quant_map, SCB
    assert assert_same_weights(reloaded, got) > 0
    assert torch.equal(logits(reloaded), logits(got))
    assert getattr(got, "is_loaded_in_4bit", False) == (SETTINGS[setting]["bits"] == 4)
    assert getattr(got, "is_loaded_in_8bit", False) == (SETTINGS[setting]["bits"] == 8)
    qc = got.config.quantization_config
    assert qc.quant_method == "bitsandbytes"
    if SETTINGS[setting]["bits"] == 4:
        assert qc.bnb_4bit_quant_type == SETTINGS[setting]["quant_type"]
        assert qc.bnb_4bit_use_double_quant == SETTINGS[setting]["double_quant"]


def test_explicit_matching_options_are_accepted(saved: dict[tuple[str, str], Path]) -> None:
    folder = saved["nf4-dq", "llama"]
    got = _load(folder, bits=4, quant_type="nf4", double_quant=True, blocksize=64)
    assert isinstance(got.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    got = _load(saved["int8", "llama"], bits=8)
    assert isinstance(got.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)


def test_ready_model_owns_its_memory(saved: dict[tuple[str, str], Path]) -> None:
    """Nothing of the loaded model points into the (read-only) mapped shards."""
    for setting in ("nf4-dq", "int8"):
        model = _load(saved[setting, "llama"])
        assert not any(m.training for m in model.modules())
        tensors = [*model.parameters(), *model.buffers()]
        for param in model.parameters():
            state = getattr(param, "quant_state", None)
            if state is not None:
                tensors += [state.absmax, state.code]
                if state2(state) is not None:
                    tensors += [state.state2.absmax, state.state2.code]
            if getattr(param, "SCB", None) is not None:
                tensors.append(param.SCB)
        for tensor in tensors:
            assert tensor.untyped_storage().resizable(), "a view of the mapped file was kept"
        out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
        assert out.shape == (1, 7)


@pytest.mark.parametrize("pipeline", [False, True])
@pytest.mark.parametrize("setting", ["nf4-dq", "int8"])
def test_statistics_go_to_the_device_at_once(
    originals: dict[str, Path],
    saved: dict[tuple[str, str], Path],
    tmp_path: Path,
    setting: str,
    pipeline: bool,
) -> None:
    """A weight's statistics are parsed on the host and sent in one allocation and one
    copy (disjoint views of it), and the model still saves with transformers'
    ``save_pretrained`` and reloads bit for bit. In the plain layout: the fused CPU one
    makes new statistics (cpu_layout), and GPUs, where this matters, have none."""
    got = _load(saved[setting, "llama"], pipeline=pipeline, cpu_kernel="plain")
    for module in got.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            stats = [state.absmax, state.code, state.offset, state.state2.absmax]
            stats.append(state.state2.code)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            stats = [module.weight.SCB]
        else:
            continue
        storages = {t.untyped_storage().data_ptr() for t in stats}
        assert len(storages) == 1, "one allocation per weight"
        spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for t in stats)
        assert all(end <= start for (_, end), (start, _) in itertools.pairwise(spans))
    got.save_pretrained(tmp_path / "again", max_shard_size="40KB")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", device_map="cpu").eval()
    plain_kernel(again)  # as got: the same kernel
    ref = reference(originals["llama"], SETTINGS[setting])
    assert assert_same_weights(ref, again) > 0
    assert torch.equal(logits(got), logits(again))


def test_compute_dtype_comes_from_the_checkpoint_unless_given(
    saved: dict[tuple[str, str], Path],
) -> None:
    folder = saved["nf4", "llama"]
    assert _load(folder).model.layers[0].mlp.up_proj.compute_dtype == torch.bfloat16
    got = _load(folder, compute_dtype=torch.float32)
    assert got.model.layers[0].mlp.up_proj.compute_dtype == torch.float32
    assert got.config.quantization_config.bnb_4bit_compute_dtype == torch.float32


@pytest.mark.parametrize(
    ("setting", "kwargs", "match"),
    [
        ("int8", dict(bits=4), r"bits=4 was asked"),
        ("nf4", dict(bits=8), r"bits=8 was asked"),
        ("nf4", dict(bits=16), r"does not dequantize"),
        ("nf4", dict(bits=None), r"bits=None was asked"),
        ("nf4", dict(quant_type="fp4"), r"quant_type='fp4' was asked.*stores quant_type='nf4'"),
        ("nf4", dict(double_quant=True), r"double_quant"),
        ("nf4", dict(quant_storage=torch.bfloat16), r"quant_storage"),
        ("nf4", dict(blocksize=128), r"blocksize 64 but blocksize=128"),
        ("nf4", dict(skip_modules=["lm_head"]), r"skip_modules"),
    ],
)
def test_options_that_disagree_with_the_checkpoint_are_refused(
    saved: dict[tuple[str, str], Path], setting: str, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(leanstream.ConfigError, match=match):
        _load(saved[setting, "llama"], **kwargs)


# --- damaged checkpoints ----------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_statistics_are_named(saved: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    folder = _copy(saved["nf4-dq", "llama"], tmp_path / "m")
    edit_tensor(folder, "model.layers.1.mlp.up_proj.weight.nested_absmax", None)
    with pytest.raises(leanstream.MismatchError) as err:
        _load(folder)
    assert err.value.missing == ["model.layers.1.mlp.up_proj.weight.nested_absmax"]


def test_int8_without_scb_is_refused(saved: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    folder = _copy(saved["int8", "llama"], tmp_path / "m")
    edit_tensor(folder, "model.layers.0.self_attn.q_proj.SCB", None)
    with pytest.raises(leanstream.MismatchError, match=r"q_proj\.SCB"):
        _load(folder)


def test_config_claiming_quantization_of_full_precision_weights(
    originals: dict[str, Path], tmp_path: Path
) -> None:
    folder = _copy(originals["llama"], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(leanstream.MismatchError, match=r"up_proj\.weight\.absmax") as err:
        _load(folder)
    assert ("model.layers.0.mlp.up_proj.weight", (192, 64), (6144, 1)) in err.value.mismatched


def test_statistics_of_an_unquantized_layer_are_unexpected(
    saved: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    folder = _copy(saved["nf4", "llama"], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["llm_int8_skip_modules"] = ["lm_head", "mlp.up_proj"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(leanstream.MismatchError, match=r"up_proj\.weight\.absmax") as err:
        _load(folder)
    assert "model.layers.0.mlp.up_proj.weight.quant_map" in err.value.unexpected


def test_int8_weight_of_wrong_dtype(saved: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    folder = _copy(saved["int8", "llama"], tmp_path / "m")
    edit_tensor(
        folder, "model.layers.0.mlp.up_proj.weight", torch.zeros(192, 64, dtype=torch.bfloat16)
    )
    with pytest.raises(leanstream.UnsupportedCheckpointError, match=r"is BF16; an LLM\.int8") as e:
        _load(folder)
    assert e.value.tensor == "model.layers.0.mlp.up_proj.weight"


def test_int8_column_major_format_is_refused(
    saved: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    folder = _copy(saved["int8", "llama"], tmp_path / "m")
    edit_tensor(
        folder, "model.layers.0.mlp.up_proj.weight_format", torch.tensor(1, dtype=torch.uint8)
    )
    with pytest.raises(leanstream.UnsupportedCheckpointError, match="weight_format 1"):
        _load(folder)


def _quant_state(folder: Path, name: str) -> dict[str, Any]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    packed = load_file(folder / index["weight_map"][name])[name]
    return json.loads(bytes(packed.tolist()))


def _put_quant_state(folder: Path, name: str, state: dict[str, Any]) -> None:
    edit_tensor(folder, name, torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8))


def test_quant_state_of_the_wrong_shape(saved: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    folder = _copy(saved["nf4", "llama"], tmp_path / "m")
    name = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    state = _quant_state(folder, name)
    assert state["shape"] == [192, 64]
    _put_quant_state(folder, name, {**state, "shape": [64, 192]})
    with pytest.raises(leanstream.MismatchError, match=r"up_proj\.weight \(checkpoint \[64, 192\]"):
        _load(folder)


def test_invalid_quant_state(saved: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    folder = _copy(saved["nf4", "llama"], tmp_path / "m")
    name = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    state = _quant_state(folder, name)
    del state["blocksize"]
    _put_quant_state(folder, name, state)
    with pytest.raises(leanstream.UnsupportedCheckpointError, match="statistics of") as err:
        _load(folder)
    assert err.value.tensor == "model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize(
    ("arch", "setting", "stat"), [("mixtral", "nf4", "absmax"), ("gpt_oss", "int8", "SCB")]
)
def test_non_finite_experts_statistics_are_refused(
    tmp_path: Path, arch: str, setting: str, stat: str
) -> None:
    """Regression: a NaN among a quantized experts weight's statistics loaded (NaN
    outputs). The linears' are in the hostile corpus (tests/hostile.py)."""
    source = tmp_path / "src"
    model = AutoModelForCausalLM.from_config(make_config(arch), dtype=torch.bfloat16)
    model.save_pretrained(source)
    quantized = _load(source, **SETTINGS[setting])
    folder = leanstream.save(quantized, tmp_path / "q", max_shard_size="60KB", progress=False)
    name = f"model.layers.0.mlp.experts.gate_up_proj.{stat}"
    values = stored(folder)[name].clone()
    values[0] = float("nan")
    edit_tensor(folder, name, values)
    with pytest.raises(leanstream.UnsupportedCheckpointError, match="NaN") as err:
        _load(folder)
    assert err.value.tensor == name and err.value.file.endswith("config.json")


def test_neither_4bit_nor_8bit_is_refused(
    saved: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    folder = _copy(saved["nf4", "llama"], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(load_in_4bit=False, _load_in_4bit=False)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(leanstream.UnsupportedCheckpointError, match="4-bit or 8-bit only"):
        _load(folder)


def test_packed_weight_of_another_storage_dtype(
    saved: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    folder = _copy(saved["nf4", "llama"], tmp_path / "m")
    edit_tensor(folder, "model.layers.0.mlp.up_proj.weight", torch.zeros(6144, 1, dtype=torch.int8))
    with pytest.raises(leanstream.UnsupportedCheckpointError, match=r"stored as torch\.int8"):
        _load(folder)


# --- saved after a forward on the CPU (issue 15) -------------------------------------

#: 4-bit settings of models that ran a forward on the CPU before ``save_pretrained``
CPU_CASES = [("nf4", "llama"), ("nf4-dq", "llama"), ("fp4", "llama"), ("nf4", "gpt2")]


def _forward_on_cpu(model: Any) -> None:
    """What a user's forward does to the 4-bit layers on an AVX512-BF16 CPU: repack
    them for the CPU kernel. On a CPU without it (the forward leaves them as they are)
    the layers get the same call ``Linear4bit.forward`` makes."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    logits(model)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            if not getattr(state, "packing_format_for_cpu", False):
                module.weight.data, state = _convert_weight_packed_for_cpu(
                    module.weight.data, state
                )
            assert state.packing_format_for_cpu and module.weight.quant_state is state


@pytest.fixture(scope="session")
def cpu_saved(
    originals: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], Path]:
    """Folders of transformers' ``save_pretrained`` after a forward on the CPU."""
    root = tmp_path_factory.mktemp("tf-cpu-saved")
    folders = {}
    for setting, arch in CPU_CASES:
        model = reference(originals[arch], SETTINGS[setting])
        _forward_on_cpu(model)
        folder = root / f"{arch}-{setting}"
        model.save_pretrained(folder, max_shard_size="40KB")
        folders[setting, arch] = folder
    return folders


def _absmax_layouts(model: Any) -> set[tuple[int, ...]]:
    return {
        tuple(m.weight.quant_state.absmax.shape)
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }


def _in_order(model: Any) -> Any:
    """A transformers reload of such a folder with each transposed absmax read back in
    bitsandbytes' order (``absmax.T.reshape(-1)``, as bitsandbytes' inverse does)."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.weight.quant_state.absmax.dim() == 2:
            state = module.weight.quant_state
            state.absmax = state.absmax.T.reshape(-1).float()
    return model


def _absmax_in_bfloat16(model: Any) -> Any:
    """The original quantization with absmax rounded as the CPU layout stores it."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            state.absmax = state.absmax.to(torch.bfloat16).float()
    return model


@pytest.mark.parametrize(("setting", "arch"), CPU_CASES)
def test_saved_after_a_cpu_forward(
    originals: dict[str, Path], cpu_saved: dict[tuple[str, str], Path], setting: str, arch: str
) -> None:
    """Regression (issue 15): a model that ran a forward on an AVX512-BF16 CPU saves a
    plain absmax transposed, bfloat16 ``[in // 64, out]`` (double-quantized statistics
    are re-quantized in the usual layout). It loads in bitsandbytes' layout: what
    transformers reloads, in order, and the original quantization with its absmax in
    bfloat16; the packed weights are the original's."""
    folder = cpu_saved[setting, arch]
    reloaded = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    original = reference(originals[arch], SETTINGS[setting])
    got = _load(folder)
    for name, module in original.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            packed = got.get_submodule(name).weight
            assert torch.equal(module.weight.data, plain_bytes(packed)), name
            if not is_packed(packed.quant_state):  # else bfloat16 [in // 64, out], in order
                assert packed.quant_state.absmax.dim() == 1, name
    layouts = _absmax_layouts(reloaded)
    if SETTINGS[setting]["double_quant"]:
        assert all(len(shape) == 1 for shape in layouts)
        assert assert_same_weights(reloaded, got) > 0
        assert torch.equal(logits(reloaded), logits(got))
    else:
        assert all(len(shape) == 2 for shape in layouts)
        assert any(shape[0] > 1 for shape in layouts), "no layer where the order matters"
        # transformers keeps the tensor as stored: bitsandbytes misreads its order (a copy
        # runs the forward: on an AVX512-BF16 CPU it converts the layers it runs)
        assert not torch.equal(logits(copy.deepcopy(reloaded)), logits(got))
        assert assert_same_weights(_in_order(reloaded), got) > 0
        assert torch.equal(logits(reloaded), logits(got))
        assert assert_same_weights(_absmax_in_bfloat16(original), got) > 0
        assert torch.equal(logits(original), logits(got))
    a, b = logits(reference(originals[arch], SETTINGS[setting])), logits(got)
    assert (a - b).norm() / a.norm() < 1e-2


def test_transposed_absmax_of_the_wrong_shape(
    cpu_saved: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    folder = _copy(cpu_saved["nf4", "llama"], tmp_path / "m")
    name = "model.layers.0.mlp.down_proj.weight.absmax"
    edit_tensor(folder, name, torch.ones(64, 3, dtype=torch.bfloat16))
    with pytest.raises(leanstream.MismatchError) as err:
        _load(folder)
    assert err.value.mismatched == [(name, (64, 3), (3, 64))]
    edit_tensor(folder, name, torch.ones(3, 64, dtype=torch.float32))
    with pytest.raises(
        leanstream.UnsupportedCheckpointError, match=r"float32, not torch\.bfloat16"
    ) as e:
        _load(folder)
    assert e.value.tensor == "model.layers.0.mlp.down_proj.weight"


@pytest.mark.gpu
@pytest.mark.parametrize("setting", ["nf4-dq", "int8"])
def test_onto_gpu(saved: dict[tuple[str, str], Path], setting: str) -> None:
    folder = saved[setting, "llama"]
    reloaded = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda:0")
    got = leanstream.load(folder, device="cuda", progress=False)
    assert got.model.layers[0].mlp.up_proj.weight.device.type == "cuda"
    assert assert_same_weights(reloaded, got) > 0
