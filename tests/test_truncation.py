"""A shard truncated while it is being read gives ``TruncatedFileError``, never SIGBUS
and never a silently wrong model (``rust/fault.rs``).

Each scenario runs in a fresh process (a regression would kill it, not pytest), and
the process must never die of a signal (a negative return code)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from models import write_model


def run(script: str, *args: object, python_flags: tuple[str, ...] = ()) -> tuple[int, Any, str]:
    """Run ``script`` in a fresh interpreter: (return code, last stdout line as JSON, stderr)."""
    out = subprocess.run(
        [sys.executable, *python_flags, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1]) if out.returncode == 0 and lines else None
    return out.returncode, result, out.stderr


# Cut the file after the reader handed a view out (its fstat check passed), before
# torch reads the mapped bytes: exactly the window fstat cannot cover.
RAW = r"""
import faulthandler, json, os, sys
from leanstream import TruncatedFileError, _core
from leanstream.reader import as_tensor
import torch
from safetensors.torch import save_file

path, results = sys.argv[1], []
for late_faulthandler in (False, True):
    save_file({"a": torch.ones(256), "b": torch.full((1 << 20,), 2.0)}, path)
    ckpt = _core.Checkpoint(path)
    if late_faulthandler:
        faulthandler.enable()  # replaces our SIGBUS handler; handing a view out re-installs it
    view = ckpt.view("b")
    os.truncate(path, 4096)
    total = float(as_tensor(view).sum())  # SIGBUS without the handler; here: zeros
    result = {"sum": total, "expected": 2.0 * (1 << 20)}
    try:
        view.check()
    except TruncatedFileError as err:
        result.update(error=type(err).__name__, file=err.file, tensor=err.tensor, message=str(err))
    results.append(result)
    del view, ckpt
print(json.dumps(results))
"""


@pytest.mark.parametrize("flags", [(), ("-X", "faulthandler")], ids=["plain", "faulthandler"])
def test_view_read_after_truncation_is_reported(tmp_path: Path, flags: tuple[str, ...]) -> None:
    """Also when faulthandler was enabled before leanstream (pytest, ``-X faulthandler``)
    or after it."""
    path = tmp_path / "m.safetensors"
    code, results, err = run(RAW, path, python_flags=flags)
    assert code == 0, err
    for result in results:
        assert result["sum"] < result["expected"]  # zeros were read, and it is known:
        assert result["error"] == "TruncatedFileError"
        assert (result["file"], result["tensor"]) == (str(path), "b")
        assert "read as zeros" in result["message"]


FOREIGN = r"""
import mmap, os, sys
from leanstream import _core
import torch
from safetensors.torch import save_file

save_file({"a": torch.ones(4)}, sys.argv[1] + ".safetensors")
_core.Checkpoint(sys.argv[1] + ".safetensors")  # the handler is installed
with open(sys.argv[1], "wb") as f:
    f.write(b"x" * 65536)
with open(sys.argv[1], "rb") as f:
    mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
os.truncate(sys.argv[1], 10)
print(mapped[50000])  # not leanstream's mapping: must die of SIGBUS as without leanstream
"""


@pytest.mark.parametrize("flags", [(), ("-X", "faulthandler")], ids=["plain", "faulthandler"])
def test_a_sigbus_outside_leanstream_still_kills(tmp_path: Path, flags: tuple[str, ...]) -> None:
    code, _, err = run(FOREIGN, tmp_path / "other.bin", python_flags=flags)
    assert code == -signal.SIGBUS, err
    if flags:  # faulthandler (installed before leanstream's handler) still reports it
        assert err.count("Fatal Python error: Bus error") == 1, err


# Loads of copies of a folder, each run's `victim`-th tensor (or run of expert pieces) cut
# by the hook the script starts with; what each load raised, with what the hook saw last.
LOADS = r"""
results = []
for victim, options in json.loads(sys.argv[3]):
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(source, work)
    seen.clear()
    try:
        leanstream.load(work, device="cpu", progress=False, **options)
        results.append({"error": None})
    except leanstream.LeanstreamError as err:
        results.append({
            "error": type(err).__name__, "file": err.file, "tensor": err.tensor,
            "victim": [seen[-1].file, seen[-1].name], "seen": len(seen), "message": str(err),
        })
print(json.dumps(results))
"""

# leanstream.load: the view of the n-th tensor is handed out, then its shard is cut
# to nothing before the quantizer (or the copy) reads it.
LOAD_CUT = (
    r"""
import json, os, shutil, sys
import leanstream
from leanstream import loader

source, work = sys.argv[1], sys.argv[2]
real, seen, victim = loader.as_tensor, [], 0

def cut(view):
    seen.append(view)
    if len(seen) == victim:
        os.truncate(view.file, 0)
    return real(view)

loader.as_tensor = cut
"""
    + LOADS
)

#: (n-th tensor streamed, load options): the embedding (copied), linears (quantized)
RUNS = [
    (victim, options)
    for victim in (1, 7)
    for options in ({"bits": 4}, {"bits": 4, "native_quantizer": False}, {"bits": 8}, {"bits": 16})
]


def test_load_of_a_shard_cut_under_the_reader(tmp_path: Path) -> None:
    llama = write_model(tmp_path / "llama", "llama")
    code, results, err = run(LOAD_CUT, llama, tmp_path / "work", json.dumps(RUNS))
    assert code == 0, err
    assert len(results) == len(RUNS)
    for run_, result in zip(RUNS, results, strict=True):
        assert result["error"] == "TruncatedFileError", (run_, result)
        assert [result["file"], result["tensor"]] == result["victim"], (run_, result)
        assert "read as zeros" in result["message"], (run_, result)


# While the raw reader streams a file and torch sums every tensor, a thread truncates
# the file inside tensor `at`, at a random moment after it was handed out: either
# TruncatedFileError, or every sum is right. In the "gated" rounds the sum of `at`
# stops at the cut until the thread has cut (it still races with the reads below the
# cut): its bytes past the cut are certainly read after it, as zeros, which only the
# SIGBUS handler reports. How fast either thread runs changes nothing else.
RACE = r"""
import json, os, random, sys, threading, time
import torch
from safetensors.torch import save_file
from leanstream import TruncatedFileError, _core
from leanstream.reader import as_tensor

path, rounds = sys.argv[1], int(sys.argv[2])
n, size = 8, 4 << 20  # 8 tensors of 16 MiB
page = os.sysconf("SC_PAGE_SIZE")
tensors = {f"t{i:02d}": torch.full((size,), float(i + 1)) for i in range(n)}
names = sorted(tensors)
rng = random.Random(0)
outcomes = []
for r in range(rounds):
    gated = r % 2 == 0
    save_file(tensors, path)
    at = rng.randrange(n)
    with _core.Checkpoint(path) as ckpt:
        info = ckpt[names[at]]
    # a page past the cut lies inside the tensor: reading it is a fault, not a short page
    cut = rng.randrange(info.start, info.end - page)
    reached, done = threading.Event(), threading.Event()

    def truncate():
        reached.wait()
        time.sleep(rng.random() * 0.002)
        os.truncate(path, cut)
        done.set()

    thread = threading.Thread(target=truncate)
    thread.start()
    sums = {}
    try:
        with _core.Checkpoint(path) as ckpt, ckpt.stream(names, window=8 << 20) as stream:
            for i, (name, view) in enumerate(stream):
                values = as_tensor(view)
                if i != at:
                    sums[name] = float(values.double().sum())
                    continue
                reached.set()
                if not gated:
                    sums[name] = float(values.double().sum())
                    continue
                below = (cut - info.start) // 4  # elements wholly below the cut
                total = float(values[:below].double().sum())
                if not done.wait(60):
                    raise TimeoutError("the truncating thread hangs")
                sums[name] = total + float(values[below:].double().sum())
        right = all(sums[k] == (int(k[1:]) + 1) * size for k in names)
        outcomes.append("complete" if right else "WRONG")
    except TruncatedFileError as err:
        outcomes.append("zeros" if "read as zeros" in str(err) else "fstat")
    finally:
        reached.set()
        thread.join()
print(json.dumps(outcomes))
"""


def test_streaming_while_another_thread_truncates(tmp_path: Path) -> None:
    code, outcomes, err = run(RACE, tmp_path / "race.safetensors", 8)
    assert code == 0, err
    assert "WRONG" not in outcomes, outcomes
    assert set(outcomes) <= {"complete", "zeros", "fstat"}, outcomes
    # the gated rounds hit the window that only the SIGBUS handler covers
    assert outcomes[::2] == ["zeros"] * 4, outcomes


# leanstream.load while a thread truncates one shard at a random moment of the
# streaming: TruncatedFileError, never a model that differs from one loaded from an
# intact copy. The cut comes after the first tensor was handed out (the clock starts
# there), and the victim's last tensor waits for it: the load cannot finish first,
# however fast or slow either thread runs, so every round must end in the error.
LOAD_RACE = r"""
import json, os, random, shutil, sys, threading, time
import torch
import leanstream
from leanstream import loader

source, work, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
real, files, gate = loader.as_tensor, [], [None]
streaming, cut_done = threading.Event(), threading.Event()

def watched(view):
    files.append(os.path.basename(view.file))
    streaming.set()
    if len(files) == gate[0] and not cut_done.wait(60):
        raise TimeoutError("the truncating thread hangs")
    return real(view)

loader.as_tensor = watched
reference = leanstream.load(source, device="cpu", progress=False).state_dict()
order = list(files)
started = time.perf_counter()
leanstream.load(source, device="cpu", progress=False)
duration = time.perf_counter() - started
rng = random.Random(0)
outcomes = []
for _ in range(rounds):
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(source, work)
    name = rng.choice(sorted(set(order)))
    victim = os.path.join(work, name)
    gate[0] = max(i for i, f in enumerate(order) if f == name) + 1  # its last tensor
    cut = rng.randrange(os.path.getsize(victim) // 2)
    delay = rng.uniform(0, 0.6) * duration
    files.clear()
    streaming.clear()
    cut_done.clear()

    def truncate():
        streaming.wait()
        time.sleep(delay)
        os.truncate(victim, cut)
        cut_done.set()

    thread = threading.Thread(target=truncate)
    thread.start()
    try:
        got = leanstream.load(work, device="cpu", progress=False).state_dict()
        same = got.keys() == reference.keys() and all(
            torch.equal(got[k], v) for k, v in reference.items()
        )
        outcomes.append("complete" if same else "WRONG")
    except leanstream.TruncatedFileError:
        outcomes.append("truncated")
    finally:
        streaming.set()
        thread.join()
print(json.dumps({"outcomes": outcomes, "duration": duration}))
"""


def test_load_while_another_thread_truncates_a_shard(tmp_path: Path) -> None:
    source = write_model(
        tmp_path / "mid",
        "llama",
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=4096,
        max_shard_size="8MB",
    )
    code, result, err = run(LOAD_RACE, source, tmp_path / "work", 5)
    assert code == 0, err
    assert result["outcomes"] == ["truncated"] * 5, result


# The same for a mixture of experts' pieces, which the Rust core takes from the stream
# many at a call (ExpertsQuantizer.add_streamed): the file of the n-th run's first piece
# cut just before the run is taken.
LOAD_CUT_EXPERTS = (
    r"""
import json, os, shutil, sys
import leanstream
from leanstream.quantize import ExpertsQuantizer

source, work = sys.argv[1], sys.argv[2]
real, seen, victim = ExpertsQuantizer.add_streamed, [], 0

def cut(self, stream, pieces, threads):
    seen.append(pieces[0][0])
    if len(seen) == victim:
        os.truncate(pieces[0][0].file, 0)
    return real(self, stream, pieces, threads)

ExpertsQuantizer.add_streamed = cut
"""
    + LOADS
)


def test_load_of_experts_cut_under_the_reader(tmp_path: Path) -> None:
    mixtral = write_model(tmp_path / "mixtral", "mixtral")
    runs = [(2, {"bits": 4}), (2, {"bits": 8})]
    code, results, err = run(LOAD_CUT_EXPERTS, mixtral, tmp_path / "work", json.dumps(runs))
    assert code == 0, err
    for run_, result in zip(runs, results, strict=True):
        assert result["error"] == "TruncatedFileError", (run_, result)
        assert result["seen"] == 2, (run_, result)
        assert [result["file"], result["tensor"]] == result["victim"], (run_, result)
