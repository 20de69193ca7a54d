"""An interrupted load (an exception or Ctrl-C in the middle) leaves nothing behind:
no read-ahead thread, no mapped shard, no partly built model in memory. Measured
from /proc in a fresh process, while the caller still holds the exception (as
``pytest.raises`` or a notebook's ``sys.last_traceback`` would)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from models import write_model

MIB = 1 << 20

CHILD = r"""
import ctypes, gc, json, os, random, signal, sys, threading, time, traceback
import tqdm.auto
import leanstream
from leanstream import loader

folder = sys.argv[1]
# Python's own Ctrl-C handler, also where this process was started with SIGINT ignored
# (a background job of a non-interactive shell, as some CI runners start tests)
signal.signal(signal.SIGINT, signal.default_int_handler)
trim = ctypes.CDLL("libc.so.6").malloc_trim

def anonymous():
    # resident or swapped out: memory pressure moves anonymous pages between the two,
    # and drops file-backed ones (the libraries' code) that a later load faults in again
    with open("/proc/self/status") as f:
        status = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if "kB" in line}
    return status["RssAnon"] + status.get("VmSwap", 0)

def snapshot(collect=True):
    if collect:
        gc.collect()
        trim(0)
    with open("/proc/self/maps") as f:
        maps = sum(folder in line for line in f)
    return {
        "anon": anonymous(),
        "tasks": len(os.listdir("/proc/self/task")),
        "threads": len(threading.enumerate()),
        "maps": maps,
    }

def load(bits):
    # a small read-ahead window: the read-ahead thread is still waiting when interrupted
    return leanstream.load(folder, device="cpu", progress=False, bits=bits, window=8 << 20)

for bits in (4, 16):  # warm up: imports, torch's thread pool, allocator arenas
    load(bits)
real_materialize, materialized = loader.materialize, [0]

def counting(*args, **kwargs):
    materialized[0] += 1
    return real_materialize(*args, **kwargs)

loader.materialize = counting
started = time.perf_counter()
model = load(16)
duration = time.perf_counter() - started
loader.materialize = real_materialize
size = sum(t.nbytes for t in model.state_dict().values())
del model
base = snapshot()
results = {"base": base, "model": size, "duration": duration, "runs": {}}

def after_half(patch_target, attr, error):
    real = getattr(patch_target, attr)
    calls = [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 12:
            during.update(snapshot(collect=False))
            raise error
        return real(*args, **kwargs)

    return real, patched

during = {}

def interrupted(name, bits, setup=None, teardown=None):
    during.clear()
    if setup:
        setup()
    try:
        load(bits)
    except (KeyboardInterrupt, RuntimeError) as err:
        kept = err  # hold the exception and its traceback, like pytest.raises
        frames = [f.filename for f in traceback.extract_tb(kept.__traceback__)]
        inside = any("leanstream" in f for f in frames)
        if teardown:
            teardown()
        results["runs"][name] = {
            "caught": type(kept).__name__, "inside": inside, "during": dict(during), **snapshot()
        }
        return inside
    if teardown:
        teardown()
    results["runs"][name] = {"caught": None}
    return False

for bits in (16, 4):
    real, patched = after_half(loader, "materialize", RuntimeError("boom"))
    interrupted(
        f"exception from materialize, bits={bits}", bits,
        lambda: setattr(loader, "materialize", patched),
        lambda: setattr(loader, "materialize", real),
    )
real, patched = after_half(tqdm.auto.tqdm, "update", KeyboardInterrupt())
interrupted(
    "KeyboardInterrupt from the progress bar", 16,
    lambda: setattr(tqdm.auto.tqdm, "update", patched),
    lambda: setattr(tqdm.auto.tqdm, "update", real),
)
# A real SIGINT, raised by another thread while the main thread waits inside the load
# (at a materialize call picked at random: the stream, the read-ahead thread and the
# model are then at a random point). Not at a random *time*: a signal that lands while
# the main thread runs a finalizer (a __del__, a weakref callback during garbage
# collection) becomes "Exception ignored in ..." and the load finishes normally, and a
# loaded machine moves where a timed signal lands.
at = random.Random(0).randrange(2, materialized[0])
ready, raised = threading.Event(), threading.Event()

def gated(*args, **kwargs):
    calls[0] += 1
    if calls[0] == at:
        ready.set()
        raised.wait()  # the KeyboardInterrupt is raised in here, in this thread
    return real_materialize(*args, **kwargs)

def sigint():
    ready.wait()
    # to the main thread itself: its blocked wait is interrupted and runs the handler
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
    raised.set()

calls = [0]
thread = threading.Thread(target=sigint)
interrupted(
    "SIGINT from another thread", 16,
    lambda: (setattr(loader, "materialize", gated), thread.start()),
    lambda: (thread.join(), setattr(loader, "materialize", real_materialize)),
)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~120 MB bf16 Llama in 16 MB shards: big enough to see a leaked half-model."""
    return write_model(
        tmp_path_factory.mktemp("interrupt") / "mid",
        "llama",
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=8192,
        max_shard_size="16MB",
    )


def test_interrupted_loads_leave_nothing_behind(mid_model: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(mid_model)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    base, runs = result["base"], result["runs"]
    assert result["model"] > 100 * MIB
    assert len(runs) == 4, runs
    for name, run in runs.items():
        assert run["caught"] is not None and run["inside"], (name, run)
        if run["during"]:  # what the checks below must see gone was there
            assert run["during"]["maps"] > 0, (name, run)
            assert run["during"]["tasks"] > base["tasks"], (name, run)
        assert run["maps"] == 0, (name, run)  # no shard mapped any more
        assert run["tasks"] == base["tasks"], (name, run, base)  # no read-ahead thread
        assert run["threads"] == base["threads"], (name, run, base)
        # the partly built model is gone (a leak would be ~half of the model)
        assert run["anon"] - base["anon"] < 16 * MIB, (name, (run["anon"] - base["anon"]) / MIB)
