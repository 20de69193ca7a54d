"""The CPU kernel bitsandbytes runs 4-bit layers with, for tests whose outcome depends on it.

On a CPU with AVX512-BF16, bitsandbytes (0.50) converts a ``Linear4bit``'s weight to its
fused kernel's layout at the layer's first eval forward; leanstream makes that layout at
load (:mod:`leanstream.cpu_layout`). A reference model (transformers', diffusers' or
bitsandbytes' own quantization) that has not run a forward is still in the plain layout:
it is compared in the same state by converting it with bitsandbytes' own function, the one
its first forward runs (:func:`like_first_forward`).

``make test`` runs the suite as the CPU is, then, on an AVX512-BF16 CPU, the tests marked
``cpu_kernel`` again with bitsandbytes' detection forced off (``LEANSTREAM_TEST_CPU_KERNEL=
plain``, set up in ``conftest.py``): the plain kernel, as on a CPU without AVX512-BF16.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
from torch import nn

from leanstream import cpu_layout

#: bitsandbytes' detection forced off for the whole session (``conftest.py``)
FORCED_PLAIN = os.environ.get("LEANSTREAM_TEST_CPU_KERNEL") == "plain"


def packs() -> bool:
    """Whether a 4-bit load on this CPU (as the session sees it) makes the fused layout."""
    return cpu_layout.detected() and cpu_layout.agrees()


needs_fused_kernel = pytest.mark.skipif(
    not cpu_layout.detected(),
    reason="bitsandbytes' AVX512-BF16 CPU kernel: this CPU has no AVX512-BF16 "
    "(or LEANSTREAM_TEST_CPU_KERNEL=plain forces its detection off)",
)


def converts(module: nn.Module) -> bool:
    """Whether bitsandbytes' forward converts ``module``'s weight now (and can)."""
    if not isinstance(module, bnb.nn.Linear4bit):
        return False
    state = getattr(module.weight, "quant_state", None)
    return (
        state is not None
        and module.weight.device.type == "cpu"
        and bool(getattr(module, "support_avx512bf16_for_cpu", False))
        and not cpu_layout.is_packed(state)
        and cpu_layout.fits(module.out_features, module.in_features, state.blocksize)
    )


def convert(module: nn.Module) -> None:
    """What ``Linear4bit.forward`` does to a plain weight on an AVX512-BF16 CPU."""
    module.weight.data, module.weight.quant_state = F._convert_weight_packed_for_cpu(
        module.weight.data, module.weight.quant_state
    )


def like_first_forward(model: nn.Module) -> nn.Module:
    """``model`` with every 4-bit layer bitsandbytes' first eval forward on this CPU would
    convert converted, by that same function (in place; returned for chaining)."""
    if cpu_layout.detected():
        for module in model.modules():
            if converts(module):
                convert(module)
    return model


def same_layout(a: nn.Module, b: nn.Module) -> None:
    """Two twin 4-bit layers in the same layout: the plain one converted as its first
    forward would, when the other is in the fused layout."""
    sa = getattr(a.weight, "quant_state", None)
    sb = getattr(b.weight, "quant_state", None)
    if sa is None or sb is None:
        return
    if cpu_layout.is_packed(sb) and not cpu_layout.is_packed(sa) and converts(a):
        convert(a)
    elif cpu_layout.is_packed(sa) and not cpu_layout.is_packed(sb) and converts(b):
        convert(b)


def state2(state: Any) -> Any:
    """A ``QuantState``'s nested state (bitsandbytes deletes the attribute when it
    converts a weight to the fused layout)."""
    return getattr(state, "state2", None)


def plain_bytes(param: Any) -> Any:
    """A 4-bit weight's packed bytes in bitsandbytes' plain layout, by bitsandbytes' own
    inverse when it is in the fused layout (the weight is not changed)."""
    if not cpu_layout.is_packed(param.quant_state):
        return param.data
    data, _ = F._convert_weight_packed_for_cpu_inverse(
        param.data.clone(), copy.deepcopy(param.quant_state)
    )
    return data


def plain_kernel(model: nn.Module) -> nn.Module:
    """``model``'s 4-bit layers set to bitsandbytes' plain CPU kernel, as leanstream's
    ``cpu_kernel="plain"`` sets them (in place; returned for chaining)."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def exact_round_trip(setting: dict[str, Any]) -> str:
    """The ``cpu_kernel`` under which a save and reload of ``setting`` is bit for bit:
    ``"auto"``, except double quantization in the fused layout, whose bfloat16 scales are
    double-quantized again when saved (``tests/test_cpu_layout.py`` tests that case)."""
    return "plain" if setting.get("double_quant") and packs() else "auto"


def contiguous_inputs(model: nn.Module) -> nn.Module:
    """``model``'s 4-bit layers given contiguous inputs, as leanstream's layers make them:
    bitsandbytes' fused CPU kernel reads a strided input (``x.transpose(1, 2)``) wrong, so a
    reference that runs it on such inputs is wrong (in place; returned for chaining)."""

    def contiguous(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0].contiguous(), *args[1:])

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.register_forward_pre_hook(contiguous)
    return model
