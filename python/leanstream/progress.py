"""Sizes in binary units (KiB, MiB, GiB), and the progress bar of ``load`` and ``save``.

Every size leanstream prints goes through :func:`format_bytes`: the bar, the command line's
summaries and tables, and ``str(footprint(model))``, so that one model is "279.2 KiB"
wherever it appears.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")

#: the bar as tqdm's default, with sizes and rate from :func:`format_bytes`
_BAR_FORMAT = "{l_bar}{bar}| {n_size}/{total_size} [{elapsed}<{remaining}, {rate_size}]"


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units, with at least three significant digits and never
    more than three digits before the point: from 1000 of a unit on, the next unit
    ("0.977 GiB", not "1000.0 MiB").

    >>> format_bytes(64), format_bytes(12_800), format_bytes(188_643_328), format_bytes(5 << 30)
    ('64 B', '12.5 KiB', '179.9 MiB', '5.00 GiB')
    >>> format_bytes(1_072_798_105), format_bytes(1000 << 10)
    ('0.999 GiB', '0.977 MiB')
    """
    if abs(round(n)) < 1000:
        return f"{n:.0f} B"
    value = float(n)
    for unit in _UNITS:
        value /= 1024
        text = f"{value:.3f}"
        if abs(float(text)) >= 1:  # 0.9996 is 1.00
            text = _digits(value)
        if abs(float(text)) < 1000 or unit == _UNITS[-1]:
            return f"{text} {unit}"
    raise AssertionError("unreachable")


def _digits(value: float) -> str:
    text = f"{value:.2f}"
    return text if abs(float(text)) < 10 else f"{value:.1f}"


@contextlib.contextmanager
def byte_progress(total: int, desc: str, *, enabled: bool) -> Iterator[Any]:
    """A tqdm bar over ``total`` bytes (a context manager). It stays, at 100 %, once the
    work is done (a log keeps the last state, not the first); an error clears it, so
    that the error's message is the last line."""
    bar = _byte_bar()(
        total=total,
        unit="B",
        bar_format=_BAR_FORMAT,
        desc=desc,
        disable=not enabled,
        leave=False,
    )
    try:
        yield bar
    except BaseException:
        bar.close()
        raise
    bar.leave = True
    bar.close()


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
