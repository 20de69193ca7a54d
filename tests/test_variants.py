"""Weights variants (``fp16``, ...), diffusers' file names, and subfolders of a pipeline.

Folders are laid out as diffusers' ``save_pretrained(variant=...)`` writes them
(``_add_variant``), with huggingface_hub's own shard splitter for sharded ones.
"""

from __future__ import annotations

import json
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import load_file, save_file

from leanstream import _core
from leanstream.checkpoint import (
    HUB_PATTERNS,
    check_weights_format,
    read_config_dict,
    resolve,
    variants,
    weight_files,
)
from leanstream.errors import (
    AmbiguousCheckpointError,
    CheckpointError,
    ConfigError,
    FileNotFoundCheckpointError,
    UnsupportedCheckpointError,
)
from leanstream.reader import as_tensor

# the outcome depends on bitsandbytes' CPU 4-bit kernel (tests/cpu_kernel.py)
pytestmark = pytest.mark.cpu_kernel


DIFFUSERS = "diffusion_pytorch_model"
FLUX_CONFIG = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.30.0"}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def weights(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Four tensors of 64 bytes in float32, 32 in float16: 4 and 2 shards of at most 100 bytes."""
    return {f"blocks.{i}.weight": torch.randn(4, 4).to(dtype) for i in range(4)}


def write_single(folder: Path, variant: str | None = None, name: str = DIFFUSERS) -> Path:
    """``name.safetensors`` or ``name.<variant>.safetensors`` (float16 for a variant)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / (f"{name}.{variant}.safetensors" if variant else f"{name}.safetensors")
    save_file(weights(torch.float16 if variant else torch.float32), path)
    return path


def write_sharded(folder: Path, variant: str | None = None, name: str = DIFFUSERS) -> list[Path]:
    """Shards and index as diffusers writes them: ``name.<variant>-00001-of-0000N.safetensors``
    and ``name.safetensors.index.<variant>.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = weights(torch.float16 if variant else torch.float32)
    stem = f"{name}.{variant}" if variant else name
    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern=stem + "{suffix}.safetensors", max_shard_size=100
    )
    assert split.is_sharded
    for file, names in split.filename_to_tensors.items():
        save_file({n: tensors[n] for n in names}, folder / file)
    index = (
        f"{name}.safetensors.index.{variant}.json" if variant else f"{name}.safetensors.index.json"
    )
    (folder / index).write_text(
        json.dumps({"metadata": split.metadata, "weight_map": split.tensor_to_filename})
    )
    return sorted(folder / f for f in split.filename_to_tensors)


def opened(target: Path | list[Path]) -> list[str]:
    with _core.Checkpoint(target) as ckpt:
        return [Path(f).name for f in ckpt.files]


def test_single_file_beside_its_fp16_variant(tmp_path: Path) -> None:
    main = write_single(tmp_path)
    fp16 = write_single(tmp_path, "fp16")
    assert variants(tmp_path) == [None, "fp16"]
    with pytest.raises(ConfigError) as exc:
        weight_files(tmp_path)
    assert str(exc.value) == (
        f"{tmp_path}: holds several variants of the weights (no variant, 'fp16'); pass "
        "variant= to choose one (e.g. variant='fp16')"
    )
    assert weight_files(tmp_path, "fp16") == fp16
    main.unlink()
    assert weight_files(tmp_path) == fp16
    with _core.Checkpoint(weight_files(tmp_path, "fp16")) as ckpt:
        expected = load_file(fp16)
        assert sorted(ckpt.keys()) == sorted(expected)
        for name, tensor in expected.items():
            got = as_tensor(ckpt.view(name))
            assert got.dtype == torch.float16
            assert torch.equal(got, tensor)


def test_rust_refuses_variants_side_by_side(tmp_path: Path) -> None:
    """Both files hold the same names: opening the folder used to be a DuplicateTensorError."""
    write_single(tmp_path)
    write_single(tmp_path, "fp16")
    with pytest.raises(AmbiguousCheckpointError) as exc:
        _core.Checkpoint(tmp_path)
    message = str(exc.value)
    assert f"no variant: {DIFFUSERS}.safetensors" in message
    assert f"'fp16': {DIFFUSERS}.fp16.safetensors" in message
    assert "open one index, file or list of shards explicitly" in message
    assert exc.value.file == str(tmp_path)
    assert issubclass(AmbiguousCheckpointError, CheckpointError)
    assert AmbiguousCheckpointError.__module__ == "leanstream._core"


def test_absent_variant_lists_the_present_ones(tmp_path: Path) -> None:
    write_single(tmp_path)
    write_single(tmp_path, "fp16")
    with pytest.raises(FileNotFoundCheckpointError) as exc:
        weight_files(tmp_path, "bf16")
    assert str(exc.value) == (
        f"{tmp_path}: no weights of the variant 'bf16'; it holds no variant, 'fp16'"
    )
    assert exc.value.file == str(tmp_path)


def test_variant_asked_of_a_folder_without_variants(tmp_path: Path) -> None:
    write_sharded(tmp_path)
    with pytest.raises(FileNotFoundCheckpointError, match=r"it holds no variant$"):
        weight_files(tmp_path, "fp16")


def test_sharded_variants_each_with_their_index(tmp_path: Path) -> None:
    main = write_sharded(tmp_path)
    fp16 = write_sharded(tmp_path, "fp16")
    assert [p.name for p in fp16] == [
        f"{DIFFUSERS}.fp16-00001-of-00002.safetensors",
        f"{DIFFUSERS}.fp16-00002-of-00002.safetensors",
    ]
    assert len(main) == 4
    assert variants(tmp_path) == [None, "fp16"]
    with pytest.raises(ConfigError, match=r"\(no variant, 'fp16'\); pass variant="):
        weight_files(tmp_path)
    assert weight_files(tmp_path, "fp16") == tmp_path / f"{DIFFUSERS}.safetensors.index.fp16.json"
    assert opened(weight_files(tmp_path, "fp16")) == [p.name for p in fp16]
    # The reader alone opens the diffusers index without a variant.
    assert opened(tmp_path) == [p.name for p in main]


def test_lone_diffusers_index(tmp_path: Path) -> None:
    shards = write_sharded(tmp_path)
    assert weight_files(tmp_path) == tmp_path / f"{DIFFUSERS}.safetensors.index.json"
    with _core.Checkpoint(tmp_path) as ckpt:
        assert [Path(f).name for f in ckpt.files] == [p.name for p in shards]
        expected = {n: t for p in shards for n, t in load_file(p).items()}
        assert sorted(ckpt.keys()) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.equal(as_tensor(ckpt.view(name)), tensor)


def test_sharded_variant_without_index(tmp_path: Path) -> None:
    shards = write_sharded(tmp_path, "fp16")
    (tmp_path / f"{DIFFUSERS}.safetensors.index.fp16.json").unlink()
    assert variants(tmp_path) == ["fp16"]
    assert weight_files(tmp_path, "fp16") == shards
    # The only weights there are: no need to name them.
    assert weight_files(tmp_path) == shards
    assert opened(tmp_path) == [p.name for p in shards]


def test_older_variant_shard_names(tmp_path: Path) -> None:
    """diffusers < 0.22 put the variant after the shard number."""
    main = write_single(tmp_path, name="model")
    old = tmp_path / "model-00001-of-00001.fp16.safetensors"
    save_file(weights(torch.float16), old)
    assert variants(tmp_path) == [None, "fp16"]
    assert weight_files(tmp_path, "fp16") == old
    old.unlink()
    assert weight_files(tmp_path) == main


def test_several_variants_all_named(tmp_path: Path) -> None:
    write_single(tmp_path, "fp16", name="model")
    bf16 = write_single(tmp_path, "bf16", name="model")
    with pytest.raises(ConfigError) as exc:
        weight_files(tmp_path)
    assert str(exc.value) == (
        f"{tmp_path}: holds several variants of the weights ('bf16', 'fp16'); pass variant= "
        "to choose one (e.g. variant='bf16')"
    )
    assert weight_files(tmp_path, "bf16") == bf16
    with pytest.raises(AmbiguousCheckpointError, match=r"'bf16': model\.bf16\.safetensors"):
        _core.Checkpoint(tmp_path)


def test_two_indexes_of_the_same_variant(tmp_path: Path) -> None:
    write_sharded(tmp_path, name="model")
    write_sharded(tmp_path, name="other")
    with pytest.raises(ConfigError) as exc:
        weight_files(tmp_path)
    assert "model.safetensors.index.json, other.safetensors.index.json" in str(exc.value)
    write_sharded(tmp_path, "fp16", name="a")
    write_sharded(tmp_path, "fp16", name="b")
    with pytest.raises(ConfigError, match=r"a\.safetensors\.index\.fp16\.json, b\.safe"):
        weight_files(tmp_path, "fp16")


def test_rust_refuses_several_indexes(tmp_path: Path) -> None:
    write_sharded(tmp_path, name="one")
    write_sharded(tmp_path, name="two")
    with pytest.raises(AmbiguousCheckpointError) as exc:
        _core.Checkpoint(tmp_path)
    assert "several indexes (one.safetensors.index.json, two.safetensors.index.json)" in str(
        exc.value
    )


def test_index_and_main_file_come_before_other_files(tmp_path: Path) -> None:
    write_single(tmp_path, name="adapter_model")
    main = write_single(tmp_path, name="model")
    assert weight_files(tmp_path) == main
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"x": "model.safetensors"}}))
    assert weight_files(tmp_path) == index


def test_files_without_a_main_one_are_all_opened(tmp_path: Path) -> None:
    second = write_single(tmp_path, name="b")
    first = write_single(tmp_path, name="a")
    assert weight_files(tmp_path) == [first, second]


def test_no_safetensors_left_to_the_reader(tmp_path: Path) -> None:
    assert variants(tmp_path) == []
    assert weight_files(tmp_path) == tmp_path
    assert weight_files(tmp_path, "fp16") == tmp_path
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    (tmp_path / "notes.json").write_text("{}")
    assert variants(tmp_path) == []
    with pytest.raises(UnsupportedCheckpointError, match="only pickle weights"):
        check_weights_format(tmp_path)


@pytest.mark.parametrize(
    "config",
    [
        FLUX_CONFIG,
        {**FLUX_CONFIG, "in_channels": 64, "num_layers": 19},
        {"model_type": "llama"},
        {"model_type": "llama", "_class_name": "LlamaModel"},
    ],
)
def test_config_of_transformers_or_diffusers(tmp_path: Path, config: dict[str, Any]) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_config_dict(tmp_path) == config


@pytest.mark.parametrize(
    "config",
    [
        {"_class_name": 3},
        {"_class_name": "FluxTransformer2DModel", "model_type": None},
        {"_diffusers_version": "0.30.0"},
        ["FluxTransformer2DModel"],
        {},
    ],
)
def test_config_that_is_neither(tmp_path: Path, config: object) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as exc:
        read_config_dict(tmp_path)
    assert str(exc.value) == (
        f"{tmp_path / 'config.json'}: not a transformers or diffusers config "
        '(no "model_type" or "_class_name" string)'
    )


def write_pipeline(root: Path) -> Path:
    """A diffusers pipeline folder: model_index.json, a transformer and a vae."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    for component in ("transformer", "vae"):
        write_sharded(root / component)
        (root / component / "config.json").write_text(json.dumps(FLUX_CONFIG))
    return root


def test_subfolder_of_a_local_pipeline(tmp_path: Path) -> None:
    root = write_pipeline(tmp_path / "pipe")
    expected = root.resolve() / "transformer"
    for sub in ("transformer", "transformer/", "./transformer"):
        assert resolve(root, subfolder=sub) == expected, sub
    assert resolve(root, subfolder=None) == root.resolve()
    folder = resolve(root, subfolder="transformer")
    assert weight_files(folder) == expected / f"{DIFFUSERS}.safetensors.index.json"
    assert read_config_dict(folder)["_class_name"] == "FluxTransformer2DModel"


def test_missing_local_subfolder(tmp_path: Path) -> None:
    root = write_pipeline(tmp_path / "pipe")
    with pytest.raises(FileNotFoundCheckpointError) as exc:
        resolve(root, subfolder="unet")
    assert str(exc.value) == f"{root.resolve() / 'unet'}: no subfolder 'unet' in {root}"
    assert exc.value.file == str(root.resolve() / "unet")
    (root / "model_index.json").rename(root / "unet")  # a file, not a folder
    with pytest.raises(FileNotFoundCheckpointError, match="no subfolder 'unet'"):
        resolve(root, subfolder="unet")


@pytest.mark.parametrize("sub", ["../outside", "transformer/../../outside", "/etc", "/"])
def test_subfolder_cannot_leave_the_checkpoint(tmp_path: Path, sub: str) -> None:
    root = write_pipeline(tmp_path / "pipe")
    write_sharded(tmp_path / "outside")  # exists: refused for its path, not its absence
    with pytest.raises(FileNotFoundCheckpointError) as exc:
        resolve(root, subfolder=sub)
    assert str(exc.value) == (
        f"{root}: subfolder {sub!r} must be a relative path inside the checkpoint "
        "(no '..', not absolute)"
    )
    assert exc.value.file == str(root)


@pytest.fixture
def hub_cache(tmp_path: Path) -> Path:
    """A cache folder laid out as huggingface_hub writes it, holding a pipeline."""
    cache = tmp_path / "hf-cache"
    repo = cache / "models--tiny-org--tiny-flux"
    write_pipeline(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


def test_subfolder_from_the_cache_with_local_files_only(hub_cache: Path) -> None:
    folder = resolve(
        "tiny-org/tiny-flux", subfolder="transformer", cache_dir=hub_cache, local_files_only=True
    )
    snapshot = hub_cache / "models--tiny-org--tiny-flux" / "snapshots" / COMMIT
    assert folder == snapshot / "transformer"
    assert opened(weight_files(folder)) == [
        f"{DIFFUSERS}-0000{i}-of-00004.safetensors" for i in (1, 2, 3, 4)
    ]
    with pytest.raises(FileNotFoundCheckpointError) as exc:
        resolve("tiny-org/tiny-flux", subfolder="unet", cache_dir=hub_cache, local_files_only=True)
    assert str(exc.value) == f"{snapshot / 'unet'}: no subfolder 'unet' in tiny-org/tiny-flux"


def test_subfolder_from_the_cache_with_hf_hub_offline(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # huggingface_hub reads HF_HUB_OFFLINE at import: set the constant it was read into too
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    folder = resolve("tiny-org/tiny-flux", subfolder="vae", cache_dir=hub_cache)
    assert folder == hub_cache / "models--tiny-org--tiny-flux" / "snapshots" / COMMIT / "vae"
    # offline, not a connection error: huggingface_hub says which switch to turn
    with pytest.raises(FileNotFoundCheckpointError, match="HF_HUB_OFFLINE=0"):
        resolve("tiny-org/absent", subfolder="vae", cache_dir=hub_cache)


def test_hub_subfolder_fetches_only_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []

    def snapshot_download(repo_id: str, **kwargs: Any) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        (tmp_path / "transformer").mkdir(exist_ok=True)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert resolve("org/pipe", subfolder="transformer", revision="v1") == tmp_path / "transformer"
    patterns = calls[0]["allow_patterns"]
    assert patterns == [f"transformer/{p}" for p in HUB_PATTERNS]
    assert calls[0]["revision"] == "v1"
    wanted = ["transformer/config.json", f"transformer/{DIFFUSERS}.fp16-00001-of-00002.safetensors"]
    unwanted = [
        "model_index.json",
        f"vae/{DIFFUSERS}.safetensors",
        "transformer/diffusion_pytorch_model.bin",
        f"{DIFFUSERS}.safetensors",
    ]
    for name in wanted:
        assert any(fnmatch(name, p) for p in patterns), name
    for name in unwanted:
        assert not any(fnmatch(name, p) for p in patterns), name
    resolve("org/pipe")
    assert calls[1]["allow_patterns"] == HUB_PATTERNS
    # refused before the hub is asked
    with pytest.raises(FileNotFoundCheckpointError, match="must be a relative path"):
        resolve("org/pipe", subfolder="../other")
    assert len(calls) == 2
