"""Sources: local folders and Hugging Face hub repo ids served from a local cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import leanstream
from leanstream.checkpoint import resolve
from models import write_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder laid out exactly as huggingface_hub writes it."""
    cache = tmp_path_factory.mktemp("hf-cache")
    repo = cache / "models--tiny-org--tiny-llama"
    write_model(repo / "snapshots" / COMMIT, "llama")
    write_model(repo / "snapshots" / OTHER, "llama-tied")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "tied").write_text(OTHER)
    return cache


def test_local_folder_is_used_as_is(tmp_path: Path) -> None:
    folder = write_model(tmp_path / "m", "llama")
    assert resolve(folder) == folder.resolve()
    assert resolve(str(folder)) == folder.resolve()


def test_repo_id_from_cache_with_local_files_only(hub_cache: Path) -> None:
    folder = resolve("tiny-org/tiny-llama", cache_dir=hub_cache, local_files_only=True)
    assert folder == hub_cache / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    model = leanstream.load(
        "tiny-org/tiny-llama",
        cache_dir=hub_cache,
        local_files_only=True,
        device="cpu",
        progress=False,
    )
    assert model.config.tie_word_embeddings is False


def test_revision_is_honoured(hub_cache: Path) -> None:
    folder = resolve(
        "tiny-org/tiny-llama", revision="tied", cache_dir=hub_cache, local_files_only=True
    )
    assert folder.name == OTHER
    model = leanstream.load(
        "tiny-org/tiny-llama",
        revision="tied",
        cache_dir=hub_cache,
        local_files_only=True,
        device="cpu",
        progress=False,
    )
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_hf_hub_offline_environment(hub_cache: Path, tmp_path: Path) -> None:
    """HF_HUB_OFFLINE=1 (read by huggingface_hub at import) serves from the cache."""
    code = (
        "import leanstream, sys\n"
        "m = leanstream.load('tiny-org/tiny-llama', cache_dir=sys.argv[1], device='cpu',\n"
        "                    progress=False)\n"
        "print(type(m).__name__)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(hub_cache)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("LlamaForCausalLM")
    code_missing = (
        "import leanstream, sys\n"
        "try:\n"
        "    leanstream.load('tiny-org/absent', cache_dir=sys.argv[1], device='cpu',\n"
        "                    progress=False)\n"
        "except leanstream.FileNotFoundCheckpointError as e:\n"
        "    print('refused:', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code_missing, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "refused: tiny-org/absent" in out.stdout


def test_repo_not_in_cache_offline(tmp_path: Path) -> None:
    with pytest.raises(leanstream.FileNotFoundCheckpointError, match="tiny-org/absent"):
        resolve("tiny-org/absent", cache_dir=tmp_path, local_files_only=True)


def test_a_file_is_not_a_folder(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(leanstream.FileNotFoundCheckpointError, match="got a file"):
        resolve(path)


def test_relative_path_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(leanstream.FileNotFoundCheckpointError, match="no such folder"):
        resolve("./definitely/not/here")


def test_hub_patterns_never_fetch_pickles() -> None:
    from fnmatch import fnmatch

    from leanstream.checkpoint import HUB_PATTERNS

    for name in ["pytorch_model.bin", "model.pt", "flax_model.msgpack", "tf_model.h5"]:
        assert not any(fnmatch(name, p) for p in HUB_PATTERNS), name
    for name in ["model-00001-of-00002.safetensors", "config.json", "tokenizer.json"]:
        assert any(fnmatch(name, p) for p in HUB_PATTERNS), name


def test_index_naming_shards_with_dot_slash_loads(tmp_path: Path) -> None:
    """Regression (issue 24): an index whose weight_map writes
    ``./model-00001-of-00002.safetensors`` (transformers loads it: it joins the name to
    the folder as written) was refused with IndexMismatchError. It loads the same model
    as the plain index, even with one shard spelled both ways."""
    plain = write_model(tmp_path / "plain", "llama")
    dotted = tmp_path / "dotted"
    shutil.copytree(plain, dotted)
    index_path = dotted / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
    assert len(set(weight_map.values())) > 1, "the fixture must be sharded"
    spellings = ["./{}", "{}", "././{}", ".//{}"]
    index["weight_map"] = {
        name: spellings[i % len(spellings)].format(file)
        for i, (name, file) in enumerate(weight_map.items())
    }
    assert any(f.startswith("./") for f in index["weight_map"].values())
    index_path.write_text(json.dumps(index))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(dotted)  # the reference takes it

    want = leanstream.load(plain, device="cpu", progress=False).state_dict()
    got = leanstream.load(dotted, device="cpu", progress=False).state_dict()
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
