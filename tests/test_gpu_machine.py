"""What a test sees of CUDA: the tests not marked ``gpu`` run on a GPU machine as on the CPU
machines they were written for (``conftest.py``), and ``make test-gpu-machine`` checks that
on a machine without one (``tests/gpu_machine/sitecustomize.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.utils import import_utils

GPU_MACHINE = Path(__file__).resolve().parent / "gpu_machine"
ASK = "import torch; print(torch.cuda.is_available(), torch.cuda.device_count())"


def ask(env: dict[str, str]) -> str:
    """What torch answers in a fresh Python process with this environment."""
    out = subprocess.run(
        [sys.executable, "-c", ASK], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_test_not_marked_gpu_sees_no_cuda() -> None:
    """Here, in transformers' cached answer and in the processes it starts: a CPU test that
    planned the GPU on a GPU machine would compare a GPU model with its CPU reference."""
    assert not torch.cuda.is_available() and torch.cuda.device_count() == 0
    assert not import_utils.is_torch_cuda_available()
    assert ask(dict(os.environ)) == "False 0"


def test_the_stand_in_answers_as_a_one_gpu_machine() -> None:
    """``tests/gpu_machine``'s ``sitecustomize`` says one device unless
    ``CUDA_VISIBLE_DEVICES`` is empty, as the CUDA driver does (else the run of the suite
    with it would check nothing)."""
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PYTHONPATH"] = str(GPU_MACHINE)
    assert ask(env) == "True 1"
    assert ask({**env, "CUDA_VISIBLE_DEVICES": ""}) == "False 0"
    assert ask({**env, "CUDA_VISIBLE_DEVICES": "0"}) == "True 1"


@pytest.mark.gpu
def test_a_gpu_test_sees_the_gpu() -> None:
    """After CPU tests asked transformers (its answer is cached for the process)."""
    assert torch.cuda.is_available() and torch.cuda.device_count() >= 1
    assert import_utils.is_torch_cuda_available()
    assert os.environ.get("CUDA_VISIBLE_DEVICES") != ""
