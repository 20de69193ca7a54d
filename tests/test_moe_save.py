"""Saving and reloading quantized mixture-of-experts weights in leanstream's format:
bit for bit, refused by name by transformers, counted by inspect, and every damaged
statistics tensor named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from cpu_kernel import exact_round_trip
from test_load import SETTINGS
from test_moe import IDS, expert_weights, load
from transformers import AutoModelForCausalLM

import leanstream
from leanstream.experts import IMPLEMENTATION, QuantizedExperts
from models import edit_tensor, make_config, stored

# the outcome depends on bitsandbytes' CPU 4-bit kernel (tests/cpu_kernel.py)
pytestmark = pytest.mark.cpu_kernel


ARCHS = ["mixtral", "qwen3_moe", "gpt_oss"]
EXPERTS = "model.layers.0.mlp.experts.gate_up_proj"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each architecture as transformers' ``save_pretrained`` writes it (bf16)."""
    root = tmp_path_factory.mktemp("moe-src")
    out = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(make_config(arch), dtype=torch.bfloat16)
        out[arch] = root / arch
        model.save_pretrained(out[arch], max_shard_size="60KB")
    return out


@pytest.fixture(scope="module")
def saved(
    sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str], Path]:
    """``leanstream.save`` of each architecture loaded with each setting (sharded)."""
    root = tmp_path_factory.mktemp("moe-saved")
    return {
        (arch, setting): leanstream.save(
            load(
                sources[arch], **SETTINGS[setting], cpu_kernel=exact_round_trip(SETTINGS[setting])
            ),
            root / f"{arch}-{setting}",
            max_shard_size="60KB",
            progress=False,
        )
        for arch in ARCHS
        for setting in ("nf4", "nf4-dq", "int8")
    }


def experts_state(model: Any) -> dict[str, Any]:
    """Everything a model's quantized experts hold: stored bytes, every statistics
    tensor and the QuantState's other fields."""
    out: dict[str, Any] = {}
    for name, param in model.named_parameters():
        if not isinstance(param, QuantizedExperts):
            continue
        out[name] = param.data
        if param.bits == 8:
            out[f"{name}.SCB"] = param.SCB
            out[f"{name}.dtype"] = param.dequant_dtype
            continue
        for key, value in param.quant_state.as_dict().items():
            out[f"{name}.{key}"] = value
        if param.quant_state.nested:
            out[f"{name}.offset"] = param.quant_state.offset
    return out


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


@pytest.mark.parametrize("setting", ["nf4", "nf4-dq", "int8"])
@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_is_bit_identical(
    sources: dict[str, Path], saved: dict[tuple[str, str], Path], arch: str, setting: str
) -> None:
    kernel = exact_round_trip(SETTINGS[setting])
    model = load(sources[arch], **SETTINGS[setting], cpu_kernel=kernel)
    folder = saved[arch, setting]
    names = sorted(expert_weights(AutoModelForCausalLM.from_config(make_config(arch))))
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "leanstream"
    assert quant["leanstream_quantized_experts"] == names
    files = stored(folder)
    e, r, c = model.get_parameter(EXPERTS).shape3
    if SETTINGS[setting]["bits"] == 4:
        kind = SETTINGS[setting]["quant_type"]
        assert files[EXPERTS].dtype == torch.uint8
        assert files[EXPERTS].shape == (e * r * c // 2, 1)
        state = json.loads(bytes(files[f"{EXPERTS}.quant_state.bitsandbytes__{kind}"].tolist()))
        assert state["shape"] == [e, r, c] and state["dtype"] == "bfloat16"
        assert (f"{EXPERTS}.nested_absmax" in files) == (setting == "nf4-dq")
    else:
        assert files[EXPERTS].dtype == torch.int8 and files[EXPERTS].shape == (e, r, c)
        assert files[f"{EXPERTS}.SCB"].shape == (e * r,)

    again = load(folder, cpu_kernel=kernel)  # bits="auto": what the folder stores
    assert_same(experts_state(model), experts_state(again))
    assert len(experts_state(again)) > len(names)
    assert sorted(again.config.quantization_config.leanstream_quantized_experts) == names
    assert again.get_parameter(EXPERTS).dequant_dtype == torch.bfloat16
    assert again.model.layers[0].mlp.experts.config._experts_implementation == IMPLEMENTATION
    before, after = model.state_dict(), again.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert leanstream.footprint(again) == leanstream.footprint(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, again(input_ids=IDS).logits)
    out = again.generate(IDS, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, model.generate(IDS, max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("setting", ["nf4-dq", "int8"])
@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_pipelined_reload(saved: dict[tuple[str, str], Path], arch: str, setting: str) -> None:
    folder = saved[arch, setting]
    mapped = load(folder)
    piped = load(folder, pipeline=True, ring_bytes=16 * 1000)
    assert_same(experts_state(mapped), experts_state(piped))
    with torch.no_grad():
        assert torch.equal(mapped(input_ids=IDS).logits, piped(input_ids=IDS).logits)


def test_saving_a_reloaded_model_again(saved: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    """A reloaded model's statistics share one allocation (to_device_at_once); saved again,
    into a new folder and over it, they are what they were."""
    first = load(saved["qwen3_moe", "nf4-dq"])
    for _ in range(2):
        folder = leanstream.save(first, tmp_path / "again", progress=False)
        assert stored(folder).keys() == stored(saved["qwen3_moe", "nf4-dq"]).keys()
        assert_same(experts_state(first), experts_state(load(folder)))


@pytest.mark.parametrize("setting", ["nf4", "int8"])
def test_transformers_refuses_the_folder_by_name(
    saved: dict[tuple[str, str], Path], setting: str
) -> None:
    with pytest.raises(
        AttributeError, match=r"saved_by_leanstream_with_quantized_experts_.*use_leanstream_load"
    ):
        AutoModelForCausalLM.from_pretrained(saved["mixtral", setting])


def test_experts_and_embeddings_are_refused_together(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    model = load(sources["mixtral"], bits=4, quantize_embeddings=True)
    folder = leanstream.save(model, tmp_path / "out", progress=False)
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quant["leanstream_quantized_embeddings"] == ["model.embed_tokens"]
    with pytest.raises(AttributeError, match=r"quantized_experts_and_embeddings_or_lm_head"):
        AutoModelForCausalLM.from_pretrained(folder)
    again = load(folder)
    assert_same(experts_state(model), experts_state(again))
    assert torch.equal(model(input_ids=IDS).logits, again(input_ids=IDS).logits)


@pytest.mark.parametrize("setting", ["nf4", "nf4-dq", "int8"])
@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_inspect_predicts_the_reloaded_size(
    saved: dict[tuple[str, str], Path], arch: str, setting: str
) -> None:
    from leanstream.cli import inspect_checkpoint

    report = inspect_checkpoint(saved[arch, setting])
    assert "4 mixture-of-experts weights (leanstream format)" in report["quantization"]
    (row,) = report["memory"]
    actual = leanstream.footprint(load(saved[arch, setting]))
    assert (row["total_bytes"], row["by_kind"]) == (actual.total_bytes, actual.by_kind)


# --- damaged folders --------------------------------------------------------------------


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "m"))


def _edit_quant_state(folder: Path, change: Any) -> None:
    name = f"{EXPERTS}.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(stored(folder)[name].tolist()))
    change(state)
    edit_tensor(folder, name, torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8))


@pytest.mark.parametrize(
    ("setting", "stat"),
    [("nf4", "absmax"), ("nf4-dq", "nested_absmax"), ("nf4", "quant_state.bitsandbytes__nf4")],
)
def test_missing_statistics_are_named(
    saved: dict[tuple[str, str], Path], tmp_path: Path, setting: str, stat: str
) -> None:
    folder = _copy(saved["mixtral", setting], tmp_path)
    edit_tensor(folder, f"{EXPERTS}.{stat}", None)
    with pytest.raises(leanstream.MismatchError) as err:
        load(folder)
    assert err.value.missing == [f"{EXPERTS}.{stat}"]


def test_missing_scb_is_named(saved: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    folder = _copy(saved["gpt_oss", "int8"], tmp_path)
    edit_tensor(folder, f"{EXPERTS}.SCB", None)
    with pytest.raises(leanstream.MismatchError) as err:
        load(folder)
    assert err.value.missing == [f"{EXPERTS}.SCB"]


def test_invalid_quant_state_is_named(saved: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    folder = _copy(saved["mixtral", "nf4"], tmp_path)
    _edit_quant_state(folder, lambda state: state.pop("blocksize"))
    with pytest.raises(leanstream.UnsupportedCheckpointError, match="statistics of") as err:
        load(folder)
    assert err.value.tensor == EXPERTS
    assert err.value.file.endswith("config.json")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s.update(shape=[4, 64, 128]), r"gate_up_proj \(checkpoint \[4, 64, 128\]"),
        (lambda s: s.update(shape=[4, 8192]), r"shape \[4, 8192\] is not 3 positive sizes"),
        (lambda s: s.update(blocksize=48), r"blocksize 48 is not a positive power of two"),
        (lambda s: s.update(blocksize=32768), r"gate_up_proj\.absmax \(checkpoint \[512\]"),
        (lambda s: s.update(dtype="int8"), r"dtype torch\.int8 is not a floating-point"),
        (lambda s: s.update(quant_type="int4"), r"quant_type 'int4'"),
    ],
)
def test_malformed_quant_state_is_refused(
    saved: dict[tuple[str, str], Path], tmp_path: Path, change: Any, match: str
) -> None:
    folder = _copy(saved["mixtral", "nf4"], tmp_path)
    _edit_quant_state(folder, change)
    with pytest.raises(leanstream.CheckpointError, match=match) as err:
        load(folder)
    assert err.value.tensor.startswith(EXPERTS)


def test_absmax_of_the_wrong_length(saved: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    folder = _copy(saved["mixtral", "nf4-dq"], tmp_path)
    edit_tensor(folder, f"{EXPERTS}.absmax", torch.zeros(7, dtype=torch.uint8))
    with pytest.raises(leanstream.MismatchError) as err:
        load(folder)
    assert err.value.mismatched == [(f"{EXPERTS}.absmax", (7,), (512,))]


def test_stored_bytes_of_the_wrong_size_or_dtype(
    saved: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    folder = _copy(saved["mixtral", "nf4"], tmp_path)
    edit_tensor(folder, EXPERTS, torch.zeros(100, 1, dtype=torch.uint8))
    with pytest.raises(leanstream.MismatchError) as err:
        load(folder)
    assert err.value.mismatched == [(EXPERTS, (100, 1), (16384, 1))]
    edit_tensor(folder, EXPERTS, torch.zeros(16384, 1, dtype=torch.int8))
    with pytest.raises(leanstream.UnsupportedCheckpointError, match="is I8; a 4-bit") as e:
        load(folder)
    assert e.value.tensor == EXPERTS


def test_int8_scales_of_the_wrong_shape_or_dtype(
    saved: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    folder = _copy(saved["gpt_oss", "int8"], tmp_path)
    scb = stored(folder)[f"{EXPERTS}.SCB"]
    edit_tensor(folder, f"{EXPERTS}.SCB", scb[:-1].clone())
    with pytest.raises(leanstream.MismatchError) as err:
        load(folder)
    assert err.value.mismatched == [(f"{EXPERTS}.SCB", (255,), (256,))]
    edit_tensor(folder, f"{EXPERTS}.SCB", scb.half())
    with pytest.raises(leanstream.UnsupportedCheckpointError, match="float32") as e:
        load(folder)
    assert e.value.tensor == f"{EXPERTS}.SCB"


def test_unquantized_experts_listed_as_quantized(sources: dict[str, Path], tmp_path: Path) -> None:
    """A folder whose config lists experts it stores in bf16 (one tensor per expert, or
    fused): refused, naming them; a name that is no experts weight is refused by load
    and inspect alike."""
    from leanstream.cli import inspect_checkpoint

    for arch in ("mixtral", "gpt_oss"):
        model = load(sources[arch], bits=4, skip_modules=["model.layers.0.mlp.experts"])
        folder = leanstream.save(model, tmp_path / arch, progress=False)
        path = folder / "config.json"
        config = json.loads(path.read_text())
        config["quantization_config"]["leanstream_quantized_experts"].append(EXPERTS)
        path.write_text(json.dumps(config))
        if arch == "mixtral":
            with pytest.raises(leanstream.MismatchError) as err:
                load(folder)
            assert err.value.missing == [
                EXPERTS,
                *(
                    f"{EXPERTS}.{s}"
                    for s in ("absmax", "quant_map", "quant_state.bitsandbytes__nf4")
                ),
            ]
            assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in err.value.unexpected
        else:
            with pytest.raises(leanstream.UnsupportedCheckpointError, match="is BF16; a 4-bit"):
                load(folder)
        config["quantization_config"]["leanstream_quantized_experts"].append("lm_head.weight")
        path.write_text(json.dumps(config))
        for call in (load, inspect_checkpoint):
            with pytest.raises(leanstream.ConfigError, match=r"names lm_head\.weight, not a 3-D"):
                call(folder)


def test_quantize_says_the_folder_is_for_leanstream(
    sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 27, item 4: what the command says of the folder is what transformers does
    with it."""
    from leanstream.cli import main

    out = tmp_path / "moe"
    assert main(["quantize", str(sources["mixtral"]), str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "leanstream format (MoE experts quantized): leanstream.load reads it" in printed
    with pytest.raises(AttributeError, match=r"use_leanstream_load"):
        AutoModelForCausalLM.from_pretrained(out)
    # a dense model's folder is bitsandbytes' own: nothing said, transformers loads it
    assert main(["quantize", str(sources["mixtral"]), str(tmp_path / "dense"), "--no-progress",
                 "--skip-modules", "experts"]) == 0  # fmt: skip
    assert "leanstream format" not in capsys.readouterr().out
    AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert main(["quantize", "--help"]) == 0
    assert "only leanstream loads" in " ".join(capsys.readouterr().out.split())
