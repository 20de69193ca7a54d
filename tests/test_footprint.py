"""Sizes as leanstream prints them: binary units, small ones readable (issue 15, item 6)."""

from __future__ import annotations

import pytest
import torch

import leanstream
from leanstream.progress import format_bytes

# the outcome depends on bitsandbytes' CPU 4-bit kernel (tests/cpu_kernel.py)
pytestmark = pytest.mark.cpu_kernel


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (64, "64 B"),
        (999, "999 B"),
        (1023, "0.999 KiB"),  # never four digits before the point
        (1023.6, "1.00 KiB"),  # a rate: rounds to 1024 B
        (1024, "1.00 KiB"),
        (12_800, "12.5 KiB"),
        ((1 << 20) - 1, "1.00 MiB"),  # not "1024.0 KiB"
        (188_643_328, "179.9 MiB"),
        (305 << 20, "305.0 MiB"),
        (1_072_798_105, "0.999 GiB"),  # not "1023.1 MiB"
        (1000 << 20, "0.977 GiB"),
        (5 << 30, "5.00 GiB"),
        (16 << 40, "16.0 TiB"),
    ],
)
def test_format_bytes(n: float, text: str) -> None:
    assert format_bytes(n) == text


def test_footprint_str_small_kinds() -> None:
    """Was "0.000 GB (float32 0.000 GB)" for anything under 500 kB."""
    linear = torch.nn.Linear(10, 10)  # 100 + 10 float32
    assert str(leanstream.footprint(linear)) == "440 B (float32 440 B)"
    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.LayerNorm(4))
    model[1].to(torch.bfloat16)
    assert str(leanstream.footprint(model)) == "3.82 MiB (bfloat16 16 B, float32 3.82 MiB)"


def test_footprint_repr_keeps_exact_bytes() -> None:
    fp = leanstream.footprint(torch.nn.Linear(10, 10))
    assert repr(fp) == "Footprint(total_bytes=440, by_kind={'float32': 440})"
