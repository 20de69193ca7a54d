"""torch answering as on a machine with one CUDA device, on a machine without one.

``LEANSTREAM_TEST_GPU_MACHINE=1`` (``make test-gpu-machine``, set up in ``conftest.py``)
runs the tests not marked ``gpu`` as a full ``pytest`` on a GPU machine runs them:
``torch.cuda.is_available()`` says True and ``device_count()`` 1, in the test process and,
through this ``sitecustomize`` (this folder is put first on ``PYTHONPATH``), in every Python
process a test starts, unless ``CUDA_VISIBLE_DEVICES`` is empty, as the CUDA driver hides
its devices then. Nothing else of CUDA is faked: a test that reaches for the device anyway
fails ("Found no NVIDIA driver"), as it would have touched the GPU there.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType
from typing import Any


def answer_as_a_gpu_machine(cuda: ModuleType) -> None:
    """Make ``torch.cuda``'s availability answers those of a one-device machine."""

    def visible() -> bool:
        return os.environ.get("CUDA_VISIBLE_DEVICES") != ""

    cuda.is_available = visible
    cuda.device_count = lambda: int(visible())


class _AfterTorchCuda(importlib.abc.MetaPathFinder):
    """Patches ``torch.cuda`` right after it is first imported (no import of torch here:
    most child processes of the suite never use it)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "torch.cuda":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            answer_as_a_gpu_machine(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if "torch.cuda" in sys.modules:
    answer_as_a_gpu_machine(sys.modules["torch.cuda"])
else:
    sys.meta_path.insert(0, _AfterTorchCuda())
