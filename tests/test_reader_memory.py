"""Streaming a checkpoint much larger than the read-ahead window keeps resident
memory near the window, proven in a fresh process from /proc/self/status."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

MiB = 1 << 20
TENSOR_BYTES = 8 * MiB
N_TENSORS = 75  # ~600 MiB
WINDOW = 32 * MiB

# Runs in a fresh interpreter: prints one JSON line of measurements.
CHILD = textwrap.dedent(
    """
    import json, os, sys, time

    import torch

    from leanstream import _core
    from leanstream.reader import as_tensor

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    def threads():
        return len(os.listdir("/proc/self/task"))

    def reset_peak():
        # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0).
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    path, window = sys.argv[1], int(sys.argv[2])
    # Warm up torch (thread pool, allocator) outside the measurement.
    torch.ones(1 << 20).sum()
    ckpt = _core.Checkpoint(path)
    names = ckpt.keys()
    base_threads = threads()
    base = status("VmRSS")
    peak_reset = reset_peak()

    stream = ckpt.stream(names, window=window)
    # Before anything is consumed, the read-ahead thread faults the window in.
    deadline = time.monotonic() + 20
    while status("VmRSS") - base < window // 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    prefetched = status("VmRSS") - base
    stream_threads = threads()

    sums, peak = [], 0
    for name, view in stream:
        sums.append(as_tensor(view).sum().item())
        peak = max(peak, status("VmRSS"))
    stream.close()
    print(json.dumps({
        "base": base,
        "peak": peak,
        "hwm": status("VmHWM") if peak_reset else None,
        "prefetched": prefetched,
        "sums": sums,
        "names": names,
        "base_threads": base_threads,
        "stream_threads": stream_threads,
        "closed_threads": threads(),
    }))
    """
)


def write_checkpoint(path: Path) -> None:
    """F32 tensors t000..t074 of 8 MiB, tensor i filled with i + 1: plain writes."""
    n = TENSOR_BYTES // 4
    header = {
        f"t{i:03d}": {
            "dtype": "F32",
            "shape": [n // 1024, 1024],
            "data_offsets": [i * TENSOR_BYTES, (i + 1) * TENSOR_BYTES],
        }
        for i in range(N_TENSORS)
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for i in range(N_TENSORS):
            f.write(np.full(n, i + 1, dtype=np.float32).tobytes())


@pytest.mark.slow
def test_resident_memory_stays_within_twice_the_window(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    write_checkpoint(path)
    assert path.stat().st_size > 15 * WINDOW
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(WINDOW)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    m = json.loads(out.stdout.strip().splitlines()[-1])

    # Every byte was read, in order, and correct.
    assert m["names"] == [f"t{i:03d}" for i in range(N_TENSORS)]
    assert m["sums"] == [float((i + 1) * (TENSOR_BYTES // 4)) for i in range(N_TENSORS)]
    # The read-ahead thread pre-faulted about a window before the first item.
    assert m["prefetched"] >= WINDOW // 2, m
    # Resident memory stayed near the window although ~600 MiB went through.
    assert m["peak"] - m["base"] < 2 * WINDOW, m
    if m["hwm"] is not None:
        assert m["hwm"] - m["base"] < 2 * WINDOW, m
    # One background thread while streaming, gone after close().
    assert m["stream_threads"] == m["base_threads"] + 1, m
    assert m["closed_threads"] == m["base_threads"], m
