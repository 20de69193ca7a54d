"""Load-time and memory benchmark: leanstream vs transformers + bitsandbytes.

    python benches/load.py --shapes 1b --reps 3            # CPU, Llama-3.2-1B shapes
    python benches/load.py --shapes 8b --device cuda       # GPU, Llama-3.1-8B shapes
    python benches/load.py --shapes 8b --device cuda --cold --loaders "leanstream nf4"
    python benches/load.py --shapes 8b --device cuda --deadline 300   # stop starting runs in time

Writes synthetic bf16 checkpoints with real architectures' shapes (cached under
``~/.cache/leanstream/bench``; the values are slices of one seeded pool of normal
values, norms 1.0), then runs every loader in its **own fresh process**. The child
imports torch, transformers and bitsandbytes (and the model's transformers modules,
which transformers imports lazily) before the clock starts, and times only the load
call; the parent samples the child's ``/proc/<pid>/status`` (VmRSS, RssAnon, RssFile)
every 5 ms. Each child also writes the logits of a fixed prompt, compared with the
transformers loader of the same setting. With ``--cold`` the page cache is evicted
before each run (``posix_fadvise(DONTNEED)``, no root needed) and each round also
times ``cat`` of the files, the floor for reading them.

Each run prints one line as soon as it is measured. A run that fails (the child
dies, raises, or outlives ``--run-timeout``) is reported with the last lines of its
stderr and the others go on; with ``--deadline`` no run starts that would not
plausibly end in time (estimated from the loader's earlier runs), and a run still
going at the deadline is killed. The markdown table is always printed, with the
failed and skipped runs marked; the exit status is 1 if a run failed (or none
succeeded). ``--record`` appends the table to benches/RESULTS.md with date,
machine, versions and command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import queue
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MIB = 1 << 20
GIB = 1 << 30
POOL_VALUES = 64 * MIB  # bf16 values the checkpoints are cut from: 128 MiB, made once
ERROR_LINES = 12  # of a failed child's stderr, shown with its row
START = time.monotonic()  # --deadline counts from here

SHAPES = {
    "tiny": dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8192,
        tie_word_embeddings=False,
    ),
    "1b": dict(  # meta-llama/Llama-3.2-1B
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "8b": dict(  # meta-llama/Llama-3.1-8B
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}

LOADERS = {
    "leanstream nf4": ("leanstream", dict(bits=4, quant_type="nf4")),
    "leanstream nf4+dq": ("leanstream", dict(bits=4, quant_type="nf4", double_quant=True)),
    "leanstream int8": ("leanstream", dict(bits=8)),
    # the default is pipelined on CUDA and mapped on the CPU: both, explicitly
    "leanstream nf4 mapped": ("leanstream", dict(bits=4, quant_type="nf4", pipeline=False)),
    "leanstream nf4 pipelined": ("leanstream", dict(bits=4, quant_type="nf4", pipeline=True)),
    "leanstream int8 pipelined": ("leanstream", dict(bits=8, pipeline=True)),
    "transformers nf4": ("transformers", dict(bits=4, quant_type="nf4")),
    "transformers nf4+dq": ("transformers", dict(bits=4, quant_type="nf4", double_quant=True)),
    "transformers int8": ("transformers", dict(bits=8)),
    "naive bf16->nf4": ("naive", dict(bits=4, quant_type="nf4")),
}


def _fill(flat, pool, offset: int) -> None:
    """Copy ``pool`` into ``flat`` from ``offset`` on, wrapping, shifted at each wrap."""
    pos = 0
    while pos < flat.numel():
        take = min(flat.numel() - pos, pool.numel() - offset)
        flat[pos : pos + take].copy_(pool[offset : offset + take])
        pos += take
        offset = (offset + take + 1_000_003) % pool.numel()


def write_checkpoint(folder: Path, shape: str, shard_bytes: int = 5 * GIB) -> Path:
    """A Llama checkpoint of ``SHAPES[shape]`` with random bf16 weights
    (:func:`write_random_checkpoint`)."""
    if (folder / "model.safetensors.index.json").exists():
        return folder
    import torch
    from transformers import LlamaConfig

    from leanstream.meta import build_empty_model

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0)
    config.dtype = torch.bfloat16
    shapes = {name: tuple(p.shape) for name, p in build_empty_model(config).named_parameters()}
    return write_random_checkpoint(folder, config, shapes, shard_bytes)


def write_random_checkpoint(
    folder: Path, config: Any, shapes: dict[str, tuple[int, ...]], shard_bytes: int
) -> Path:
    """``config`` and random bf16 tensors of ``shapes`` (in that order), shard by shard,
    never the whole model in memory.

    Drawing 8e9 normal values one by one takes minutes: every tensor is instead cut
    from one seeded pool of ``POOL_VALUES`` normal values (std 0.02), at an offset of
    its own, so tensors differ and each 4-bit block still sees normal statistics; norms
    are 1. Written into a temporary folder, renamed into place when complete.
    """
    import torch
    from safetensors.torch import save_file

    start = time.monotonic()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        config.save_pretrained(tmp)
        generator = torch.Generator().manual_seed(0)
        pool = torch.randn(POOL_VALUES, generator=generator).mul_(0.02).to(torch.bfloat16)
        weight_map: dict[str, str] = {}
        shard: dict[str, torch.Tensor] = {}
        size = total = 0
        count = 0

        def flush() -> None:
            nonlocal count
            count += 1
            name = f"model-{count:05d}.safetensors"
            save_file(shard, tmp / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard.clear()

        for i, (name, dims) in enumerate(shapes.items()):
            tensor = torch.empty(dims, dtype=torch.bfloat16)
            if name.endswith("norm.weight"):
                tensor.fill_(1.0)
            else:
                _fill(tensor.view(-1), pool, (i * 7_919_993) % POOL_VALUES)
            shard[name] = tensor
            size += tensor.nbytes
            total += tensor.nbytes
            if size >= shard_bytes:
                flush()
                size = 0
        if shard:
            flush()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index))
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(
        f"wrote {folder}: {total / GIB:.2f} GiB in {count} shards, "
        f"{time.monotonic() - start:.1f} s",
        flush=True,
    )
    return folder


#: What a child runs before the clock, for every loader alike (``folder``: the checkpoint):
#: transformers imports its model registry and the model's modules lazily, at the first
#: use (about 0.5 s), and builds its checkpoint conversion tables (every architecture's
#: renaming regexes) at the first load of the process that asks for them, from_pretrained's
#: and leanstream's alike: imports and tables, not load time; the tables timed apart
#: (``tables``, reported as such).
WARM_TRANSFORMERS = r"""
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(folder))]
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
tables = time.perf_counter()
get_checkpoint_conversion_mapping("llama")
tables = time.perf_counter() - tables
"""

CHILD = (
    r"""
import json, sys, time
args = json.loads(sys.argv[1])
import torch, transformers, bitsandbytes as bnb  # imported before the clock starts
import leanstream, leanstream.loader  # its modules are imported lazily, at the first load
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
kind, s, device, folder = args["kind"], args["settings"], args["device"], args["folder"]
dtype = torch.bfloat16

def bnb_config():
    if s["bits"] == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=s["quant_type"],
                              bnb_4bit_use_double_quant=s.get("double_quant", False),
                              bnb_4bit_compute_dtype=dtype)

if device == "cuda":
    torch.empty(1, device=device)  # the CUDA context belongs to the base, not to the load
"""
    + WARM_TRANSFORMERS
    + r"""
print("ready", flush=True)
sys.stdin.readline()
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
start = time.perf_counter()
if kind == "leanstream":
    # compute_dtype is a 4-bit option: load() refuses it with bits=8
    extra = {"compute_dtype": dtype} if s["bits"] == 4 else {}
    model = leanstream.load(folder, device=device, progress=False, **extra, **s)
elif kind == "transformers":
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config(),
                                                 device_map=device)
else:  # naive: the whole bf16 model first, then quantize it
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device)
    for name, module in list(model.named_modules()):
        if type(module) is torch.nn.Linear and not name.endswith("lm_head"):
            q = bnb.nn.Linear4bit(module.in_features, module.out_features, module.bias is not None,
                                  dtype, quant_type=s["quant_type"], device="meta")
            q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False,
                                         quant_type=s["quant_type"], module=q).to(device)
            model.set_submodule(name, q)
if device == "cuda":
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
result = {"seconds": seconds, "tables": tables}
if device == "cuda":
    result["gpu_peak"] = torch.cuda.max_memory_allocated()
    result["gpu_final"] = torch.cuda.memory_allocated()
print("loaded", flush=True)
sys.stdin.readline()
vocab = model.config.vocab_size
ids = torch.tensor([[t % vocab for t in (128000, 791, 7438, 315, 2324, 374)]], device=device)
with torch.no_grad():
    logits = model(input_ids=ids).logits.float().cpu()
torch.save(logits, args["logits"])
print("result", json.dumps(result), flush=True)
"""
)


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def drop_page_cache(folder: Path) -> None:
    """Evict the checkpoint's pages from the page cache (no root needed)."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def time_cat(folder: Path, timeout: float) -> float:
    """Seconds ``cat`` takes to read the checkpoint's files from a cold page cache."""
    drop_page_cache(folder)
    files = sorted(str(p) for p in folder.glob("*.safetensors"))
    start = time.perf_counter()
    try:
        subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True, timeout=timeout)
    finally:
        drop_page_cache(folder)
    return time.perf_counter() - start


class RunFailed(Exception):
    """A child that died, raised, or ran out of time; ``tail``: its stderr's last lines."""

    def __init__(self, what: str, tail: list[str], *, timed_out: bool = False) -> None:
        super().__init__(what)
        self.tail = tail
        self.timed_out = timed_out


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line.strip())
    lines.put(None)  # end of file: the child is gone


def run_one(
    kind: str, settings: dict, folder: Path, device: str, logits_path: Path, timeout: float
) -> dict:
    """Load once in a fresh child; killed after ``timeout`` seconds (RunFailed)."""
    args = dict(
        kind=kind, settings=settings, device=device, folder=str(folder), logits=str(logits_path)
    )
    start = time.monotonic()
    # the child's warnings (one per int8 matmul) go to a file, shown if it fails
    errors = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
    )
    assert proc.stdin and proc.stdout
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()

    def failed(what: str, timed_out: bool = False) -> RunFailed:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        errors.seek(0)
        return RunFailed(what, errors.read().splitlines()[-ERROR_LINES:], timed_out=timed_out)

    def expect(prefix: str, sample=None) -> str:
        """The child's next line that starts with ``prefix`` (others are skipped)."""
        while True:
            left = start + timeout - time.monotonic()
            if left <= 0:
                raise failed(f"timed out after {timeout:.0f} s", timed_out=True)
            if sample is not None:
                sample()
            try:
                line = lines.get(timeout=min(0.005 if sample else 0.5, left))
            except queue.Empty:
                continue
            if line is None:
                raise failed(f"died (exit status {proc.wait()})")
            if line.startswith(prefix):
                return line[len(prefix) :]

    def go() -> None:
        try:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        except BrokenPipeError:
            raise failed(f"died (exit status {proc.wait()})") from None

    try:
        expect("ready")
        base = _status(proc.pid)
        peak = dict(base)

        def sample() -> None:
            for key, value in _status(proc.pid).items():
                peak[key] = max(peak.get(key, 0), value)

        go()
        expect("loaded", sample)
        final = _status(proc.pid)
        go()
        result = json.loads(expect("result "))
        proc.wait(timeout=max(start + timeout - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        raise failed(f"timed out after {timeout:.0f} s", timed_out=True) from None
    finally:
        if proc.poll() is None:  # also on Ctrl-C
            proc.kill()
            proc.wait()
        errors.close()
    result.update(
        wall=time.monotonic() - start,
        base_rss=base.get("VmRSS", 0),
        peak_rss=peak.get("VmRSS", 0),
        peak_anon=peak.get("RssAnon", 0),
        peak_file=peak.get("RssFile", 0),
        final_rss=final.get("VmRSS", 0),
    )
    return result


def machine(*packages: str) -> str:
    """The machine a record was measured on: architecture, cores, RAM, GPU, and the
    versions of torch, ``packages`` and Python."""
    import importlib

    import torch

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    versions = "".join(f", {p} {importlib.import_module(p).__version__}" for p in packages)
    cpu = ""
    with contextlib.suppress(OSError):
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = f" {names[0]}" if names else ""
    return (
        f"{platform.machine()}{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, {gpu}; torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads){versions}, "
        f"Python {platform.python_version()}"
    )


def try_run(
    rep: int, name: str, failures: list[str], *args: Any, **kwargs: Any
) -> dict[str, Any] | None:
    """:func:`run_one` (``args``, ``kwargs``) for rep ``rep`` of loader ``name``; a failed run
    is printed with its stderr's tail, added to ``failures`` and gives None."""
    try:
        return run_one(*args, **kwargs)
    except RunFailed as e:
        tail = "".join(f"\n    {line}" for line in e.tail)
        failures.append(f"- rep {rep} {name}: {e}: `{e.tail[-1] if e.tail else ''}`")
        print(f"rep {rep} {name}: FAILED, {e}{tail}", flush=True)
        return None


def publish(
    lines: list[str],
    failures: list[str],
    work: Path,
    record: bool,
    script: str,
    argv: list[str] | None,
    *packages: str,
) -> None:
    """Print the table ``lines`` (and the failures), remove the children's ``work``
    folder, and when ``record`` append the table to RESULTS.md (:func:`record_run`)."""
    if failures:
        lines = [*lines, "", "Failed:", *failures]
    table = "\n".join(lines)
    print(table, flush=True)
    shutil.rmtree(work, ignore_errors=True)
    if record:
        record_run(script, argv, table, *packages)


def record_run(script: str, argv: list[str] | None, table: str, *packages: str) -> None:
    """:func:`record` ``table`` under the command line of ``benches/<script>`` as run."""
    args = shlex.join(argv if argv is not None else sys.argv[1:])
    record(f"python benches/{script} {args}", machine(*packages), table)


def record(command: str, machine: str, table: str) -> None:
    """Append ``table`` to benches/RESULTS.md under a dated heading with the command and
    the machine it was measured with."""
    title = f"\n## {time.strftime('%Y-%m-%d')} — `{command}`\n\nMachine: {machine}\n\n"
    with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
        f.write(title + table + "\n")


def _peer(name: str) -> str | None:
    """The transformers loader with the same settings as ``name``."""
    settings = {k: v for k, v in LOADERS[name][1].items() if k != "pipeline"}
    return next((n for n, (k, s) in LOADERS.items() if k == "transformers" and s == settings), None)


MARKS = {"failed": "failed", "cut": "cut at the deadline", "skipped": "skipped for time"}


def _summary(result: dict, cuda: bool) -> str:
    grow = result["peak_rss"] - result["base_rss"]
    return (
        f"{result['seconds']:.2f} s, peak RSS +{grow / GIB:.2f} GiB"
        + (f", GPU peak {result['gpu_peak'] / GIB:.2f} GiB" if cuda else "")
        + f" ({result['wall']:.0f} s with the child's start)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=list(SHAPES), default="1b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--loaders", default=",".join(LOADERS), help="comma-separated names")
    parser.add_argument("--cold", action="store_true", help="evict the page cache before each run")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/leanstream/bench")
    parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    parser.add_argument(
        "--deadline",
        type=float,
        help="seconds from the start (checkpoint writing included) by which every run has ended: "
        "a run that would not plausibly end by then is skipped, one still going is killed",
    )
    parser.add_argument(
        "--run-timeout",
        type=float,
        default=120.0,
        help="kill a run (child start to exit) after this many seconds; also the most a "
        "loader's first run is expected to take (default 120)",
    )
    args = parser.parse_args(argv)
    # Ctrl-C (or `timeout -s INT`) prints the table so far, even in a background job, where
    # SIGINT starts ignored and Python would install no handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    names = [n.strip() for n in args.loaders.split(",")]
    if unknown := [n for n in names if n not in LOADERS]:
        parser.error(f"unknown loaders {unknown}; known: {', '.join(LOADERS)}")
    deadline = START + args.deadline if args.deadline is not None else math.inf
    cuda = args.device == "cuda"

    args.cache.mkdir(parents=True, exist_ok=True)
    folder = write_checkpoint(args.cache / f"llama-{args.shapes}-bf16", args.shapes)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    runs: dict[str, list[dict]] = {n: [] for n in names}  # results, or failed/cut/skipped
    logits: dict[str, Path] = {}  # each loader's last successful run
    work = Path(tempfile.mkdtemp(prefix="leanstream-bench-"))
    cat: list[float] = []  # cold: seconds `cat` takes to read the same files
    problems: list[str] = []  # failures outside the loaders' rows
    interrupted = False

    def left() -> float:
        return deadline - time.monotonic()

    def estimate(name: str) -> float:
        """Seconds a run of ``name`` may take: its slowest so far; before its first, twice the
        slowest run of any loader, at most --run-timeout; nothing before the very first run
        (nothing else could use the time: tried, and killed at the deadline if need be)."""
        own = [r["wall"] for r in runs[name] if "wall" in r]
        if own:
            return max(own)
        every = [r["wall"] for rs in runs.values() for r in rs if "wall" in r]
        return min(args.run_timeout, 2 * max(every)) if every else 0.0

    if deadline < math.inf:
        print(f"deadline: {left():.0f} s left after the checkpoint", flush=True)
    try:
        for rep in range(args.reps):
            if args.cold and any(left() >= max(cat, default=0) + estimate(n) for n in names):
                try:
                    cat.append(time_cat(folder, min(args.run_timeout, left())))
                    print(f"rep {rep} cat: {cat[-1]:.2f} s", flush=True)
                except (subprocess.SubprocessError, OSError) as e:
                    if not (isinstance(e, subprocess.TimeoutExpired) and left() <= 0):
                        problems.append(f"rep {rep} cat: {e}")
                    print(f"rep {rep} cat: {e}", flush=True)
            for name in names:  # interleaved, so drift hits every loader alike
                kind, settings = LOADERS[name]
                need = estimate(name)
                if left() < need:
                    why = f"{left():.0f} s left, needs ~{need:.0f}" if left() > 0 else "too late"
                    runs[name].append(dict(rep=rep, skipped=why))
                    print(f"rep {rep} {name}: skipped, {why}", flush=True)
                    continue
                if args.cold:
                    drop_page_cache(folder)
                path = work / f"{name.replace(' ', '_')}-{rep}.pt"
                timeout = min(args.run_timeout, left())
                try:
                    result = run_one(kind, settings, folder, args.device, path, timeout)
                except RunFailed as e:
                    mark = "cut" if e.timed_out and timeout < args.run_timeout else "failed"
                    runs[name].append({"rep": rep, mark: str(e), "tail": e.tail})
                    tail = "".join(f"\n    {line}" for line in e.tail)
                    print(f"rep {rep} {name}: {mark.upper()}, {e}{tail}", flush=True)
                    continue
                runs[name].append(result)
                logits[name] = path
                print(f"rep {rep} {name}: {_summary(result, cuda)}", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: the table has the runs measured so far", flush=True)

    def agreement(name: str) -> str:
        peer = _peer(name)
        if name == peer:
            return "ref"
        if peer not in logits or name not in logits:
            return "n/a"
        import torch

        try:
            a, b = torch.load(logits[peer]), torch.load(logits[name])
            return f"{((a - b).norm() / a.norm()).item():.1e}"
        except Exception as e:  # a table with a hole beats no table
            return f"error: {type(e).__name__}"

    header = (
        "| loader | load s | min-max | vs transformers | "
        + ("vs cat | " if cat else "")
        + "peak RSS growth | peak RssFile | "
        + ("GPU peak | GPU final | " if cuda else "")
        + "logits rel. err |"
    )
    columns = header.count("|") - 1
    lines = [
        f"checkpoint: Llama {args.shapes} shapes, bf16, {size / GIB:.2f} GiB; "
        f"device {args.device}; "
        f"{'cold' if args.cold else 'warm'} page cache; {args.reps} runs each (median, min-max)"
        + (f"; `cat` of the files, cold: {statistics.median(cat):.2f} s" if cat else "")
        + (f"; deadline {args.deadline:.0f} s" if args.deadline is not None else "")
        + ("; INTERRUPTED" if interrupted else ""),
        "",
        header,
        "|" + "---|" * columns,
    ]
    ok = {n: [r for r in runs[n] if "seconds" in r] for n in names}
    medians = {n: statistics.median(r["seconds"] for r in ok[n]) for n in names if ok[n]}
    for name in names:
        marks = [
            f"{sum(key in r for r in runs[name])} {word}"
            for key, word in MARKS.items()
            if any(key in r for r in runs[name])
        ]
        label = name + (f" ({', '.join(marks)})" if marks else "")
        good = ok[name]
        if not good:
            status = next((w for k, w in MARKS.items() if any(k in r for r in runs[name])), "")
            lines.append(f"| {label} | {status or 'not run'} |" + " |" * (columns - 2))
            continue
        peer = _peer(name)
        ratio = (
            f"{medians[peer] / medians[name]:.1f}x faster"
            if peer in medians and peer != name
            else ""
        )
        grow = max(r["peak_rss"] - r["base_rss"] for r in good)
        file_peak = max(r["peak_file"] for r in good)
        row = (
            f"| {label} | {medians[name]:.2f} | {min(r['seconds'] for r in good):.2f}-"
            f"{max(r['seconds'] for r in good):.2f} | {ratio} | "
            + (f"{medians[name] / statistics.median(cat):.2f}x | " if cat else "")
            + f"{grow / GIB:.2f} GiB | {file_peak / GIB:.2f} GiB | "
        )
        if cuda:
            row += (
                f"{max(r['gpu_peak'] for r in good) / GIB:.2f} GiB | "
                f"{max(r['gpu_final'] for r in good) / GIB:.2f} GiB | "
            )
        row += f"{agreement(name)} |"
        lines.append(row)
    failures = [
        f"- rep {r['rep']} {name}: {r['failed']}" + (f": `{r['tail'][-1]}`" if r["tail"] else "")
        for name in names
        for r in runs[name]
        if "failed" in r
    ] + [f"- {p}" for p in problems]
    publish(lines, failures, work, args.record, "load.py", argv, "transformers", "bitsandbytes")
    return 1 if failures or interrupted or not medians else 0


if __name__ == "__main__":
    sys.exit(main())
