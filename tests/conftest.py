"""Shared fixtures: seeded RNGs and tiny transformers checkpoints written on the fly.

``LEANSTREAM_TEST_CPU_KERNEL=plain`` forces bitsandbytes' AVX512-BF16 detection off for
the session: the suite then runs as on a CPU without it (``tests/cpu_kernel.py``).
``LEANSTREAM_TEST_GPU_MACHINE=1`` makes torch answer as on a machine with one CUDA device,
here and in the processes tests start (``tests/gpu_machine/sitecustomize.py``): ``pytest -m
"not gpu"`` then runs as the CPU tests of a full ``pytest`` on a GPU machine run.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from models import write_model, write_tokenizer

GPU_MACHINE = Path(__file__).resolve().parent / "gpu_machine"


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def pytest_configure(config: pytest.Config) -> None:
    kernel = os.environ.get("LEANSTREAM_TEST_CPU_KERNEL", "")
    if kernel not in ("", "plain"):
        raise pytest.UsageError(f"LEANSTREAM_TEST_CPU_KERNEL={kernel!r}: '' or 'plain'")
    if kernel == "plain":
        import bitsandbytes.functional
        import bitsandbytes.nn.modules

        # what a CPU without AVX512-BF16 answers: layers keep the plain kernel
        bitsandbytes.functional.has_avx512bf16 = lambda: False
        bitsandbytes.nn.modules.has_avx512bf16 = lambda: False
    machine = os.environ.get("LEANSTREAM_TEST_GPU_MACHINE", "")
    if machine not in ("", "1"):
        raise pytest.UsageError(f"LEANSTREAM_TEST_GPU_MACHINE={machine!r}: '' or '1'")
    if machine == "1":
        sys.path.insert(0, str(GPU_MACHINE))
        # its import makes torch.cuda (imported above) answer as on a one-GPU machine
        import sitecustomize  # type: ignore[import-not-found]  # noqa: F401

        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(GPU_MACHINE), os.environ.get("PYTHONPATH")])
        )


def pytest_report_header(config: pytest.Config) -> str:
    from leanstream import cpu_layout

    forced = os.environ.get("LEANSTREAM_TEST_CPU_KERNEL") == "plain"
    kernel = "fused (AVX512-BF16)" if cpu_layout.detected() else "plain"
    machine = os.environ.get("LEANSTREAM_TEST_GPU_MACHINE") == "1"
    return (
        f"bitsandbytes CPU 4-bit kernel: {kernel}"
        + (" (detection forced off)" if forced else "")
        + ("; torch answers as on a one-GPU machine" if machine else "")
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


#: transformers' answers about CUDA, cached for the process at their first call
_CACHED_CUDA_ANSWERS = ("is_torch_cuda_available", "is_torch_bf16_gpu_available")


def _forget_cached_cuda_answers() -> None:
    from transformers.utils import import_utils

    for name in _CACHED_CUDA_ANSWERS:
        getattr(import_utils, name).cache_clear()


@pytest.fixture(autouse=True)
def _no_cuda_unless_gpu(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """On a machine with CUDA, a test not marked ``gpu`` runs as on the CPU machines it was
    written for: ``torch.cuda.is_available()`` says False and ``device_count()`` 0 for it,
    transformers' cached answers are asked again, and the processes it starts see no device
    (``CUDA_VISIBLE_DEVICES`` empty), so that the defaults (``load``'s device,
    ``device_map="auto"``/``"balanced"``/``"sequential"``, transformers' references) plan
    the CPU, as its CPU references and its checks of where tensors are expect. The ``gpu``
    tests see the GPU; a full ``pytest`` on a GPU machine is both."""
    if request.node.get_closest_marker("gpu") is not None or not torch.cuda.is_available():
        yield
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    _forget_cached_cuda_answers()
    yield
    monkeypatch.undo()
    _forget_cached_cuda_answers()


@pytest.fixture(scope="session")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny llama, tied llama and gpt2 checkpoints (the llama one with a tokenizer)."""
    root = tmp_path_factory.mktemp("src")
    folders = {arch: write_model(root / arch, arch) for arch in ("llama", "llama-tied", "gpt2")}
    write_tokenizer(folders["llama"])
    return folders
