"""Streaming a checkpoint much larger than the read-ahead window keeps resident
memory near the window, proven in a fresh process from /proc/self/status.

Memory pressure only ever lowers resident memory, so the upper bounds hold on any
machine. The lower bound (the read-ahead faulted the window in) holds only for pages
the kernel may not reclaim: the child locks the start of the mapping on fault
(``mlock2(MLOCK_ONFAULT)``: nothing is read by that) until it has looked."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

MiB = 1 << 20
TENSOR_BYTES = 8 * MiB
N_TENSORS = 75  # ~600 MiB
WINDOW = 32 * MiB

# Runs in a fresh interpreter: prints one JSON line of measurements.
CHILD = textwrap.dedent(
    """
    import ctypes, errno, json, os, re, sys, time

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

    def mapping(path):
        # (start, end) of the mapping of `path`
        with open("/proc/self/maps") as f:
            for line in f:
                if line.rstrip("\\n").endswith(" " + path):
                    start, end = line.split()[0].split("-")
                    return int(start, 16), int(end, 16)
        raise KeyError(path)

    def resident(path):
        # bytes of `path` resident in this process (its mappings' Rss in smaps)
        total, ours = 0, False
        with open("/proc/self/smaps") as f:
            for line in f:
                if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
                    ours = line.rstrip("\\n").endswith(" " + path)
                elif ours and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
        return total

    def lock_on_fault(start, length):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mlock2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        if libc.mlock2(start, length, 1) == 0:  # MLOCK_ONFAULT
            return None
        return errno.errorcode.get(ctypes.get_errno(), "?")

    def unlock(start, length):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        assert libc.munlock(start, length) == 0

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
    start, end = mapping(path)
    locked = (start, min(end - start, 2 * window))
    lock_error = lock_on_fault(*locked)
    base_threads = threads()
    base = status("VmRSS")
    base_mapped = resident(path)
    peak_reset = reset_peak()

    stream = ckpt.stream(names, window=window)
    # Before anything is consumed, the read-ahead thread faults the window in (and no
    # further). Waiting for locked pages to become resident; a minute is a hang.
    deadline = time.monotonic() + 60
    while resident(path) - base_mapped < window and time.monotonic() < deadline:
        time.sleep(0.005)
    prefetched = resident(path) - base_mapped
    stream_threads = threads()
    if lock_error is None:
        unlock(*locked)  # before anything is released: MADV_DONTNEED refuses locked pages

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
        "lock_error": lock_error,
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


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("memory") / "big.safetensors"
    write_checkpoint(path)
    assert path.stat().st_size > 15 * WINDOW
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(WINDOW)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_read_ahead_faults_the_window_in_before_the_first_item(measured: dict[str, Any]) -> None:
    if measured["lock_error"] is not None:
        pytest.skip(f"mlock2 refused ({measured['lock_error']}): residency is not certain")
    assert measured["prefetched"] >= WINDOW, measured


@pytest.mark.slow
def test_resident_memory_stays_within_twice_the_window(measured: dict[str, Any]) -> None:
    m = measured
    # Every byte was read, in order, and correct.
    assert m["names"] == [f"t{i:03d}" for i in range(N_TENSORS)]
    assert m["sums"] == [float((i + 1) * (TENSOR_BYTES // 4)) for i in range(N_TENSORS)]
    # Resident memory stayed near the window although ~600 MiB went through.
    assert m["peak"] - m["base"] < 2 * WINDOW, m
    if m["hwm"] is not None:
        assert m["hwm"] - m["base"] < 2 * WINDOW, m
    # One background thread while streaming, gone after close().
    assert m["stream_threads"] == m["base_threads"] + 1, m
    assert m["closed_threads"] == m["base_threads"], m
