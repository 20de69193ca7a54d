"""The progress bar of ``load`` and ``save``: bytes, binary units, with rate."""

from __future__ import annotations

from typing import Any


def byte_progress(total: int, desc: str, *, enabled: bool) -> Any:
    """A tqdm bar over ``total`` bytes that disappears when closed (a context manager)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        disable=not enabled,
        leave=False,
    )


__all__ = ["byte_progress"]
