"""leanstream.save: folders transformers loads, identical to its own save, written atomically."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from test_load import SETTINGS, assert_same_weights, logits, reference
from transformers import AutoModelForCausalLM

import leanstream

save_module = sys.modules["leanstream.save"]  # `leanstream.save` is the function


def _load(folder: Path, setting: str = "nf4", **kwargs: Any) -> Any:
    extra = {"compute_dtype": torch.bfloat16} if SETTINGS[setting]["bits"] == 4 else {}
    return leanstream.load(
        folder, device="cpu", progress=False, **SETTINGS[setting], **extra, **kwargs
    )


def _save(model: Any, folder: Path, **kwargs: Any) -> Path:
    return leanstream.save(model, folder, progress=False, **{"max_shard_size": "40KB", **kwargs})


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


CASES = [(s, "llama") for s in SETTINGS] + [("nf4", "llama-tied"), ("int8", "gpt2")]


@pytest.mark.parametrize(("setting", "arch"), CASES)
def test_transformers_loads_what_we_save(
    sources: dict[str, Path], tmp_path: Path, setting: str, arch: str
) -> None:
    ours = _load(sources[arch], setting)
    folder = _save(ours, tmp_path / "out")
    assert len(list(folder.glob("*.safetensors"))) > 1
    theirs = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    again = leanstream.load(folder, device="cpu", progress=False)  # pre-quantized, bits="auto"
    # weights first: a CPU forward may repack 4-bit weights in place (AVX512-BF16 kernel)
    assert assert_same_weights(ours, theirs) > 0
    assert assert_same_weights(ours, again) > 0
    expected = logits(ours)
    assert torch.equal(expected, logits(theirs))
    assert torch.equal(expected, logits(again))


@pytest.mark.parametrize("setting", ["nf4", "fp4", "int8"])
def test_save_after_cpu_forward_regression_bnb_absmax_layout(
    sources: dict[str, Path], tmp_path: Path, setting: str
) -> None:
    """bitsandbytes 0.50 on AVX512-BF16 CPUs: the first forward repacks 4-bit weights,
    and state_dict() then left absmax transposed, corrupting the saved checkpoint and
    the model itself (6% logits error on the tiny llama). save() puts it back first."""
    model = _load(sources["llama"], setting)
    expected = logits(model)
    folder = _save(model, tmp_path / "out")
    assert torch.equal(logits(model), expected)
    assert torch.equal(logits(leanstream.load(folder, device="cpu", progress=False)), expected)
    theirs = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    assert torch.equal(logits(theirs), expected)


@pytest.mark.parametrize(("setting", "arch"), CASES)
def test_same_bytes_as_transformers_save(
    sources: dict[str, Path], tmp_path: Path, setting: str, arch: str
) -> None:
    """Same tensors (names, dtypes, bytes) and the same quantization_config keys as
    transformers' save_pretrained of the model it quantizes itself."""
    ref = reference(sources[arch], SETTINGS[setting])
    ref.save_pretrained(tmp_path / "theirs", max_shard_size="40KB")
    _save(_load(sources[arch], setting), tmp_path / "ours")
    theirs, ours = _tensors(tmp_path / "theirs"), _tensors(tmp_path / "ours")
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    their_config = json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert config["quantization_config"].keys() == their_config["quantization_config"].keys()
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert config["architectures"] == their_config["architectures"]
    assert config["dtype"] == their_config["dtype"] == "bfloat16"
    ignored = {"quantization_config", "transformers_version"}
    assert {k: v for k, v in config.items() if k not in ignored} == {
        k: v for k, v in their_config.items() if k not in ignored
    }


def test_tied_weights_are_saved_once(sources: dict[str, Path], tmp_path: Path) -> None:
    folder = _save(_load(sources["llama-tied"]), tmp_path / "out")
    keys = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    model = leanstream.load(folder, device="cpu", progress=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_folder_contents(sources: dict[str, Path], tmp_path: Path) -> None:
    model = _load(sources["llama"])
    folder = _save(model, tmp_path / "out")
    names = sorted(p.name for p in folder.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    others = ["config.json", "generation_config.json", "model.safetensors.index.json"]
    assert names == sorted([*shards, *others, "tokenizer.json", "tokenizer_config.json"])
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in _tensors(folder).values()
    )
    with safe_open(folder / shards[0], "pt") as f:
        assert f.metadata() == {"format": "pt"}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("the meaning of life")["input_ids"] == [3, 4, 5, 6]
    # one shard: no index
    single = _save(model, tmp_path / "single", max_shard_size="4GB")
    assert sorted(p.name for p in single.glob("*.safetensors")) == ["model.safetensors"]
    assert not (single / "model.safetensors.index.json").exists()


def test_unquantized_model(sources: dict[str, Path], tmp_path: Path) -> None:
    model = leanstream.load(sources["gpt2"], bits=16, device="cpu", progress=False)
    folder = _save(model, tmp_path / "out")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    theirs = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    assert torch.equal(logits(model), logits(theirs))


def test_a_transformers_bnb_model_saves_too(sources: dict[str, Path], tmp_path: Path) -> None:
    ref = reference(sources["llama"], SETTINGS["nf4-dq"])
    folder = _save(ref, tmp_path / "out")
    assert (folder / "tokenizer.json").exists()  # from config.name_or_path
    got = leanstream.load(folder, device="cpu", progress=False)
    assert assert_same_weights(ref, got) > 0


def test_tokenizer_from(sources: dict[str, Path], tmp_path: Path) -> None:
    model = _load(sources["gpt2"])  # gpt2's source folder has no tokenizer
    assert not (_save(model, tmp_path / "a") / "tokenizer.json").exists()
    folder = _save(model, tmp_path / "b", tokenizer_from=sources["llama"])
    assert (folder / "tokenizer.json").exists() and (folder / "tokenizer_config.json").exists()
    with pytest.raises(leanstream.ConfigError, match="tokenizer_from"):
        _save(model, tmp_path / "c", tokenizer_from=tmp_path / "nope")


def test_shards_are_written_one_at_a_time(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each write gets at most one shard's tensors, plain CPU tensors."""
    written: list[int] = []
    real = save_module._write_shard

    def spy(tensors: dict[str, torch.Tensor], path: Path) -> None:
        for tensor in tensors.values():
            assert type(tensor) is torch.Tensor and tensor.device.type == "cpu"
        sizes = [t.numel() * t.element_size() for t in tensors.values()]
        assert sum(sizes) <= 40_000 or len(sizes) == 1
        written.append(sum(sizes))
        real(tensors, path)

    monkeypatch.setattr(save_module, "_write_shard", spy)
    _save(_load(sources["llama"], "int8"), tmp_path / "out")
    assert len(written) == len(list((tmp_path / "out").glob("*.safetensors"))) > 2


# --- atomic replacement ------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_failure_mid_save_leaves_the_previous_folder_intact(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    if not exchange:
        monkeypatch.setattr(save_module, "_exchange", lambda a, b: False)
    model = _load(sources["llama"])
    folder = _save(model, tmp_path / "out")
    before = _snapshot(folder)
    calls = []
    real = save_module._write_shard

    def fail_on_second(tensors: dict[str, torch.Tensor], path: Path) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device (simulated)")
        real(tensors, path)

    monkeypatch.setattr(save_module, "_write_shard", fail_on_second)
    with pytest.raises(OSError, match="simulated"):
        _save(_load(sources["llama"], "int8"), folder)
    assert calls[0].parent != folder  # shards went to a temporary folder
    assert _snapshot(folder) == before
    assert _leftovers(tmp_path) == []
    # a new target: nothing at all is left behind
    with pytest.raises(OSError, match="simulated"):
        calls.clear()
        _save(model, tmp_path / "new")
    assert not (tmp_path / "new").exists() and _leftovers(tmp_path) == []
    # and a successful save replaces the whole folder: no stale shard of the old one
    monkeypatch.setattr(save_module, "_write_shard", real)
    _save(model, folder, max_shard_size="4GB")
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    assert not (folder / "model.safetensors.index.json").exists()
    assert _leftovers(tmp_path) == []
    assert oct(folder.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_interrupt_during_save_cleans_up(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(tensors: dict[str, torch.Tensor], path: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(save_module, "_write_shard", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _save(_load(sources["llama"]), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_save_into_the_folder_it_was_loaded_from(sources: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(sources["llama"], folder)
    model = _load(folder)
    _save(model, folder)
    assert (folder / "tokenizer.json").exists()
    got = leanstream.load(folder, device="cpu", progress=False)
    assert assert_same_weights(model, got) > 0


# --- errors ---------------------------------------------------------------------


def test_refuses_to_replace_what_is_not_a_checkpoint(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    model = _load(sources["llama"])
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(leanstream.ConfigError, match="not a checkpoint"):
        _save(model, precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(leanstream.ConfigError, match="not a folder"):
        _save(model, tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (_save(model, empty) / "config.json").exists()


def test_parse_size() -> None:
    parse = save_module.parse_size
    assert parse("4GB") == 4_000_000_000 and parse("40KB") == parse("40kb") == 40_000
    assert parse("1.5GB") == 1_500_000_000 and parse("2GiB") == 2 << 30
    assert parse(" 500 MB ") == 500_000_000 and parse("123") == parse(123) == 123


@pytest.mark.parametrize("size", ["lots", "4XB", "", -1, 0, "0KB", 1.5, True])
def test_bad_max_shard_size(sources: dict[str, Path], tmp_path: Path, size: Any) -> None:
    model = _load(sources["llama"])
    with pytest.raises(leanstream.ConfigError, match="max_shard_size"):
        _save(model, tmp_path / "out", max_shard_size=size)
    assert list(tmp_path.iterdir()) == []


def test_model_whose_config_does_not_describe_its_layers(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    model = _load(sources["llama"])
    quantization_config = model.config.quantization_config
    model.config.quantization_config = None
    with pytest.raises(leanstream.ConfigError, match="4-bit layers"):
        _save(model, tmp_path / "out")
    model.config.quantization_config = _load(sources["llama"], "int8").config.quantization_config
    with pytest.raises(leanstream.ConfigError, match="4-bit layers"):
        _save(model, tmp_path / "out")
    plain = leanstream.load(sources["llama"], bits=16, device="cpu", progress=False)
    plain.config.quantization_config = quantization_config
    with pytest.raises(leanstream.ConfigError, match="no bitsandbytes layers"):
        _save(plain, tmp_path / "out")
    with pytest.raises(leanstream.ConfigError, match="transformers model"):
        _save(torch.nn.Linear(2, 2), tmp_path / "out")


def test_model_with_meta_tensors(tmp_path: Path) -> None:
    from leanstream.meta import build_empty_model
    from models import make_config

    empty = build_empty_model(make_config("llama"))
    with pytest.raises(leanstream.ConfigError, match="meta"):
        _save(empty, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_progress_bar(
    sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    leanstream.save(_load(sources["llama"]), tmp_path / "out", max_shard_size="40KB")
    assert "leanstream save out" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("setting", ["nf4-dq", "int8"])
def test_gpu_model_round_trip(sources: dict[str, Path], tmp_path: Path, setting: str) -> None:
    """A CUDA model is copied to the CPU shard by shard; the folder loads back onto CUDA."""
    model = leanstream.load(
        sources["llama"], device="cuda", progress=False, compute_dtype=torch.bfloat16,
        **SETTINGS[setting],
    )  # fmt: skip
    folder = _save(model, tmp_path / "out")
    got = leanstream.load(folder, device="cuda", progress=False)
    assert got.model.layers[0].mlp.up_proj.weight.device.type == "cuda"
    assert assert_same_weights(model, got) > 0
    theirs = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda:0")
    assert assert_same_weights(model, theirs) > 0
