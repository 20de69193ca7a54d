"""leanstream.save: folders transformers loads, identical to its own save, written atomically."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from cpu_kernel import exact_round_trip, plain_kernel
from safetensors import safe_open
from test_load import SETTINGS, assert_same_weights, logits, reference
from transformers import AutoModelForCausalLM

import leanstream

# the outcome depends on bitsandbytes' CPU 4-bit kernel (tests/cpu_kernel.py)
pytestmark = pytest.mark.cpu_kernel


save_module = importlib.import_module("leanstream.save")  # `leanstream.save` is the function


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
    kernel = exact_round_trip(SETTINGS[setting])
    ours = _load(sources[arch], setting, cpu_kernel=kernel)
    folder = _save(ours, tmp_path / "out")
    assert len(list(folder.glob("*.safetensors"))) > 1
    theirs = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    if kernel == "plain":
        plain_kernel(theirs)
    # pre-quantized, bits="auto"
    again = leanstream.load(folder, device="cpu", progress=False, cpu_kernel=kernel)
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
    kernel = exact_round_trip(SETTINGS[setting])
    _save(_load(sources[arch], setting, cpu_kernel=kernel), tmp_path / "ours")
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


# --- existing folders: only its own files, replaced atomically -----------------------


def _files(folder: Path) -> dict[str, bytes]:
    """Every file and folder under ``folder`` (hidden ones and .git included)."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(folder.rglob("*"))
    }


def _add_user_files(folder: Path) -> dict[str, bytes]:
    """What a cloned hub repo holds besides the checkpoint; returns them."""
    folder.mkdir(exist_ok=True)
    (folder / ".git" / "objects" / "ab").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / ".git" / "objects" / "ab" / "cdef").write_bytes(b"\x78\x01blob")
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# my model\n")
    (folder / "LICENSE").write_text("Apache License 2.0\n")
    from safetensors.torch import save_file

    save_file({"x": torch.ones(2)}, folder / "consolidated.safetensors")  # not our naming
    return {k: v for k, v in _files(folder).items() if k.split("/")[0] in _USER}


_USER = {".git", ".gitattributes", "README.md", "LICENSE", "consolidated.safetensors"}


def _weight_files(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("model*")}


def _expected_weight_files(folder: Path) -> set[str]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        return {*shards, index.name}
    return {"model.safetensors"}


@pytest.mark.parametrize("clone", ["of-another-checkpoint", "of-an-empty-repo"])
def test_keeps_every_file_it_does_not_write_regression_issue_15(
    sources: dict[str, Path], tmp_path: Path, clone: str
) -> None:
    """Saving into a cloned hub repo replaced the whole folder: .git, README.md, LICENSE,
    the tokenizer, all gone (or, without a config.json, the save was refused)."""
    import shutil

    folder = tmp_path / "repo"
    if clone == "of-another-checkpoint":
        shutil.copytree(sources["llama"], folder)  # bf16 llama, its tokenizer, 40KB shards
    kept = _add_user_files(folder)
    kept.update({p.name: p.read_bytes() for p in folder.glob("tokenizer*")})
    model = _load(sources["gpt2"], "int8")  # no tokenizer in its source: none written
    _save(model, folder, max_shard_size="100KB")
    after = _files(folder)
    assert {k: after.get(k) for k in kept} == kept
    assert _weight_files(folder) == _expected_weight_files(folder)  # no stale llama shard
    assert set(after) == {*kept, *_weight_files(folder), "config.json", "generation_config.json"}
    again = leanstream.load(folder, device="cpu", progress=False)
    theirs = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    assert assert_same_weights(model, again) > 0
    assert assert_same_weights(model, theirs) > 0


def test_save_again_removes_only_stale_weight_files(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    """Shards of a previous save that the new one does not write are removed (as
    save_pretrained removes them), and so are the single file or index of the other
    layout (which transformers, or leanstream, would otherwise load); nothing else."""
    folder = tmp_path / "out"
    kept = _add_user_files(folder)
    nf4, int8 = _load(sources["llama"]), _load(sources["llama"], "int8")
    counts = []
    for model, size in [(nf4, "40KB"), (int8, "100KB"), (nf4, "4GB"), (int8, "40KB")]:
        _save(model, folder, max_shard_size=size)
        names = _weight_files(folder)
        assert names == _expected_weight_files(folder)
        counts.append(len(names))
        after = _files(folder)
        assert {k: after.get(k) for k in kept} == kept
        assert not [k for k in after if k.startswith(".leanstream")]
        assert assert_same_weights(model, leanstream.load(folder, device="cpu", progress=False))
        theirs = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
        assert assert_same_weights(model, theirs) > 0
    assert counts[0] > counts[1] > counts[2] == 1 and counts[3] > 2


def _checkpoint_copy(sources: dict[str, Path], tmp_path: Path) -> Path:
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(sources["llama"], folder)
    _add_user_files(folder)
    return folder


def test_refuses_the_folder_the_model_was_loaded_from_regression_issue_15(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    """Saving onto the source silently replaced its bf16 weights (and everything else)."""
    folder = _checkpoint_copy(sources, tmp_path)
    before = _files(folder)
    model = _load(folder)
    link = tmp_path / "link"
    link.symlink_to(folder)
    for target in (folder, link, folder / ".." / "m"):
        with pytest.raises(leanstream.ConfigError, match="loaded from this folder") as info:
            _save(model, target)
        assert str(folder) in str(info.value) and "another folder" in str(info.value)
        assert _files(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "m"]
    # another folder is fine, the source's tokenizer comes along
    other = _save(model, tmp_path / "other")
    assert (other / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert _files(folder) == before


def test_refuses_a_folder_the_model_still_maps(sources: dict[str, Path], tmp_path: Path) -> None:
    """A transformers model loaded on the CPU reads its tensors from the mapped shards,
    whatever its name_or_path says."""
    folder = _checkpoint_copy(sources, tmp_path)
    before = _files(folder)
    theirs = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    expected = logits(theirs)
    for name in (str(folder), "someone/else"):
        theirs.config.name_or_path = name
        with pytest.raises(leanstream.ConfigError, match="another folder"):
            _save(theirs, folder)
        assert _files(folder) == before
    with pytest.raises(leanstream.ConfigError, match="memory-mapped from model-0000"):
        _save(theirs, folder)
    copy = _save(theirs, tmp_path / "copy")  # reads through the mapping
    again = AutoModelForCausalLM.from_pretrained(copy, device_map="cpu").eval()
    assert torch.equal(logits(again), expected)


def test_failure_mid_save_leaves_the_previous_folder_intact(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "out"
    _add_user_files(folder)
    model = _load(sources["llama"])
    _save(model, folder)
    before = _files(folder)
    calls = []
    real = save_module._write_shard

    def fail_on_second(tensors: dict[str, torch.Tensor], path: Path) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device (simulated)")
        real(tensors, path)

    monkeypatch.setattr(save_module, "_write_shard", fail_on_second)
    with pytest.raises(leanstream.CheckpointError, match="simulated") as info:
        _save(_load(sources["llama"], "int8"), folder, max_shard_size="100KB")
    assert isinstance(info.value.__cause__, OSError)  # the operating system's, as the cause
    # shards went to a hidden folder inside the target, named like no weight file
    assert calls[0].parent.parent == folder and calls[0].parent.name.startswith(".leanstream-")
    assert _files(folder) == before
    assert assert_same_weights(model, leanstream.load(folder, device="cpu", progress=False))
    # a new target: nothing at all is left behind
    with pytest.raises(leanstream.CheckpointError, match="simulated"):
        calls.clear()
        _save(model, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.setattr(save_module, "_write_shard", real)
    new = _save(model, tmp_path / "new")
    assert oct(new.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def test_failure_while_renaming_undoes_the_renames_done(
    sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new files go in by renames (new shards, replaced ones, the index, stale
    shards moved out, config, tokenizer): a failure after any of them undoes them all."""
    folder = tmp_path / "out"
    _add_user_files(folder)
    model = _load(sources["llama"])
    _save(model, folder)  # 40KB shards
    before = _files(folder)
    int8 = _load(sources["llama"], "int8")
    real = save_module._rename
    failed_at = 0
    while True:
        failed_at += 1
        renames: list[Path] = []

        def fail_at(
            source: Path, dest: Path, at: int = failed_at, done: list[Path] = renames
        ) -> None:
            done.append(dest)
            if len(done) == at:
                raise KeyboardInterrupt if at % 2 else OSError(5, "I/O error (simulated)")
            real(source, dest)

        monkeypatch.setattr(save_module, "_rename", fail_at)
        try:
            _save(int8, folder, max_shard_size="100KB")
        except (KeyboardInterrupt, leanstream.CheckpointError):
            assert _files(folder) == before, f"failed at rename {failed_at}: {renames}"
            continue
        break
    renamed = {p.name for p in renames}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= renamed
    assert failed_at > 10  # shards, stale shards, config, generation config, tokenizer
    assert assert_same_weights(int8, leanstream.load(folder, device="cpu", progress=False))
    after = _files(folder)
    assert {k: after[k] for k in before if k.split("/")[0] in _USER} == {
        k: v for k, v in before.items() if k.split("/")[0] in _USER
    }


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


# --- errors ---------------------------------------------------------------------


def test_refuses_to_save_into_what_is_not_a_checkpoint(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    model = _load(sources["llama"])
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(leanstream.ConfigError, match="not a checkpoint"):
        _save(model, precious)
    assert _files(precious) == {"notes.txt": b"keep me"}
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
    with pytest.raises(leanstream.ConfigError, match="transformers or diffusers model"):
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
    # compute_dtype is a 4-bit option: load() refuses it with bits=8
    extra = {"compute_dtype": torch.bfloat16} if SETTINGS[setting]["bits"] == 4 else {}
    model = leanstream.load(
        sources["llama"], device="cuda", progress=False, **extra, **SETTINGS[setting]
    )
    folder = _save(model, tmp_path / "out")
    got = leanstream.load(folder, device="cuda", progress=False)
    assert got.model.layers[0].mlp.up_proj.weight.device.type == "cuda"
    assert assert_same_weights(model, got) > 0
    theirs = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda:0")
    assert assert_same_weights(model, theirs) > 0
