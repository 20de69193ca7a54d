"""Shared fixtures: seeded RNGs and tiny transformers checkpoints written on the fly."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from models import write_model, write_tokenizer


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny llama, tied llama and gpt2 checkpoints (the llama one with a tokenizer)."""
    root = tmp_path_factory.mktemp("src")
    folders = {arch: write_model(root / arch, arch) for arch in ("llama", "llama-tied", "gpt2")}
    write_tokenizer(folders["llama"])
    return folders
