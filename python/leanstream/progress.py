"""Sizes in binary units (KiB, MiB, GiB), and the progress bar of ``load`` and ``save``.

Every size leanstream prints goes through :func:`format_bytes`: the bar, the command line's
summaries and tables, and ``str(footprint(model))``, so that one model is "279.2 KiB"
wherever it appears.
"""

from __future__ import annotations

import functools
from typing import Any

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")

#: the bar as tqdm's default, with sizes and rate from :func:`format_bytes`
_BAR_FORMAT = "{l_bar}{bar}| {n_size}/{total_size} [{elapsed}<{remaining}, {rate_size}]"


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units, with at least three significant digits.

    >>> format_bytes(64), format_bytes(12_800), format_bytes(188_643_328), format_bytes(5 << 30)
    ('64 B', '12.5 KiB', '179.9 MiB', '5.00 GiB')
    """
    if abs(round(n)) < 1024:
        return f"{n:.0f} B"
    value = float(n)
    for unit in _UNITS:
        value /= 1024
        text = f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
        if abs(float(text)) < 1024 or unit == _UNITS[-1]:  # 1023.96 KiB is 1.00 MiB
            return f"{text} {unit}"
    raise AssertionError("unreachable")


def byte_progress(total: int, desc: str, *, enabled: bool) -> Any:
    """A tqdm bar over ``total`` bytes that disappears when closed (a context manager)."""
    return _byte_bar()(
        total=total,
        unit="B",
        bar_format=_BAR_FORMAT,
        desc=desc,
        disable=not enabled,
        leave=False,
    )


@functools.cache
def _byte_bar() -> type:
    """tqdm (or its notebook widget) with sizes in :func:`format_bytes`' units: tqdm's own
    ``unit_scale`` writes "305M" for MiB and scales the rate by 1000."""
    from tqdm.auto import tqdm

    class ByteBar(tqdm):  # type: ignore[misc, valid-type]
        @property
        def format_dict(self) -> dict[str, Any]:
            values = super().format_dict
            total, rate = values.get("total"), values.get("rate")
            values.update(
                n_size=format_bytes(values.get("n") or 0),
                total_size=format_bytes(total) if total is not None else "?",
                rate_size=f"{format_bytes(rate)}/s" if rate else "? B/s",
            )
            return values

    return ByteBar


__all__ = ["byte_progress", "format_bytes"]
