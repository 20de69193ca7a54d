"""Hub-download benchmark: loading a repo while it downloads, against the loopback hub.

    python benches/download.py                        # 0.6 GB bf16 Llama, 150 MB/s, 3 rounds
    python benches/download.py --size-gb 0.05 --rounds 1 --bandwidth 50e6   # a smoke test
    python benches/download.py --record               # append the tables to benches/RESULTS.md

Writes (once, reused from ``--work``) a random-weight bf16 Llama checkpoint of about
``--size-gb`` GB with transformers' ``save_pretrained(max_shard_size=...)`` in about
``--shards`` shards (whole tensors: 5 for the default), real-model dimensions (hidden 1024,
128-wide heads: :func:`llama_shape`), and
serves it with ``tests/hubserver.py``'s ``HubServer(bandwidth=--bandwidth)`` from this
process. Every measurement runs in a fresh child (this script with ``--child``) with
``HF_ENDPOINT`` the server, ``HF_HUB_CACHE`` a fresh empty folder and telemetry off; the
child imports torch, transformers, bitsandbytes, huggingface_hub and leanstream (and the
model's transformers modules) before the clock starts, times only the call, and prints its
results as JSON, with its CPU seconds. Each round runs, in this order:

1. ``snapshot_download(repo)`` alone, cold cache;
2. a local load of the checkpoint folder (page cache warm), ``leanstream.load(folder,
   bits=4, device="cpu", progress=False)``: seconds, peak RSS (the child's ``VmHWM``: its
   ``ru_maxrss`` keeps the RSS of the parent it was forked from; the imports' alone are
   printed), and the logits of a short forward, the reference of the others;
3. the hub load, cold cache: seconds, seconds from the last byte's arrival
   (``HubDownload.last_byte_at``, the instance caught by wrapping its ``__init__``) to the
   return of ``load``, peak RSS, logits equal to the local load's;
4. the same with ``keep_download=False``: the download's own ``peak_on_disk`` and the disk
   use sampled every 5 ms by a thread of the child (``st_blocks * 512`` of the files under
   ``<cache>/models--*/.leanstream-*``), against ``WINDOW_BYTES`` (``--window``);
5. the hub load with one byte in the middle of the last shard corrupted by the server:
   the exception, seconds until it was raised, and whether anything of that shard is
   marked complete in the cache (a blob named by its sha256, a snapshot link).

The server's bytes sent are counted per run (a re-download shows as more than the
checkpoint). The targets of issue 28 are printed with PASS/MISS: (a) after the last byte,
load returns within max(0.1 s, 0.5 x the local load); (b) the cold hub load takes <= 1.15 x
``snapshot_download`` alone; (c) corrupted bytes end in a named error found while streaming,
with nothing marked complete; (d) with keep_download=False the peak disk use is <= the window
+ a few chunks and < the checkpoint; (e) the hub load's peak RSS <= the local load's + 10 %.
Medians over ``--rounds`` (min in the next column); the host is shared, so timings drift.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load as load_bench  # benches/load.py: machine(), record()

HERE = Path(__file__).resolve().parent

MB = 1_000_000
MIB = 1 << 20
REPO = "bench/llama-download"
FEW_CHUNKS = 4  # target (d): how many chunks past the window still count as "a few"
ERROR_LINES = 12  # of a failed child's stderr, shown with its row

#: Llama shapes (128-wide heads; hidden and intermediate multiples of 64): the larger one
#: when the size allows two layers of it, else the smaller
SHAPES = (
    dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=32000,
    ),
    dict(
        hidden_size=512,
        intermediate_size=1408,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=8192,
    ),
)


def llama_shape(size: float) -> tuple[dict[str, Any], int]:
    """Llama config fields with about ``size`` bytes of bf16 weights, and those bytes."""
    for shape in SHAPES:
        h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
        kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
        layer = 2 * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h)
        fixed = 2 * (2 * v * h + h)  # embeddings, lm_head (untied), final norm
        layers = round((size - fixed) / layer)
        if layers >= 2 or shape is SHAPES[-1]:
            layers = max(1, layers)
            fields = dict(
                shape,
                num_hidden_layers=layers,
                max_position_embeddings=4096,
                tie_word_embeddings=False,
            )
            return fields, fixed + layers * layer
    raise AssertionError


def write_checkpoint(work: Path, size_gb: float, shards: int) -> Path:
    """The checkpoint folder (written once: reused when complete)."""
    fields, total = llama_shape(size_gb * 1e9)
    folder = work / f"llama-{size_gb:g}gb-{shards}shards"
    if (folder / "model.safetensors.index.json").exists() or (
        folder / "model.safetensors"
    ).exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    start = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=work))
    try:
        torch.manual_seed(0)
        config = LlamaConfig(**fields)
        config.dtype = torch.bfloat16
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        with torch.no_grad():  # Llama's norms start at 1: make every tensor random
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.add_(torch.randn_like(param) * 0.02)
        model.save_pretrained(tmp, max_shard_size=math.ceil(total / shards) + MIB)
        del model
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(
        f"wrote {folder}: {total / 1e9:.2f} GB in "
        f"{len(list(folder.glob('*.safetensors')))} shards, {time.monotonic() - start:.1f} s",
        flush=True,
    )
    return folder


# -- the child ------------------------------------------------------------------------


def child(spec: dict[str, Any]) -> None:
    """One measurement (``spec["mode"]``), in a fresh process; prints ``result <json>``."""
    import resource
    import threading

    import bitsandbytes  # noqa: F401  (imported before the clock starts)
    import httpx2  # noqa: F401  (leanstream's download imports it at the first request)
    import torch
    import transformers  # noqa: F401
    from huggingface_hub import HfApi, snapshot_download  # noqa: F401
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import leanstream
    import leanstream.download as ls_download
    import leanstream.loader  # its modules are imported lazily, at the first load

    mode, folder, repo = spec["mode"], spec["folder"], spec["repo"]
    # transformers imports the model's modules lazily, at the first use: imports, not load
    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(folder))]
    if spec.get("window"):
        ls_download.WINDOW_BYTES = spec["window"]
    caught: list[Any] = []
    init = ls_download.HubDownload.__init__

    def catch(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        caught.append(self)

    ls_download.HubDownload.__init__ = catch  # type: ignore[method-assign]

    def maxrss() -> int:
        """The peak RSS of this process: VmHWM. (``ru_maxrss`` keeps, across the exec that
        started this child, the RSS of the parent it was forked from: not ours.)"""
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    cache = Path(os.environ["HF_HUB_CACHE"])
    sampled = [0]
    stop = threading.Event()

    def sample_disk() -> None:
        while not stop.wait(0.005):
            used = 0
            for staging in cache.glob("models--*/.leanstream-*"):
                for root, _dirs, files in os.walk(staging):
                    for name in files:
                        try:
                            used += os.lstat(os.path.join(root, name)).st_blocks * 512
                        except FileNotFoundError:
                            pass
            sampled[0] = max(sampled[0], used)

    result: dict[str, Any] = {
        "imports_rss": maxrss(),
        "ru_maxrss_at_start": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    sampler = threading.Thread(target=sample_disk, daemon=True)
    if mode == "hub_nokeep":
        sampler.start()
    kwargs = dict(bits=4, device="cpu", progress=False)
    model = None
    start_mono = time.monotonic()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    try:
        if mode == "snapshot":
            snapshot_download(repo)
        elif mode == "local":
            model = leanstream.load(folder, **kwargs)
        elif mode == "hub_nokeep":
            model = leanstream.load(repo, keep_download=False, **kwargs)
        else:  # hub, corrupt
            model = leanstream.load(repo, **kwargs)
    except Exception as err:
        if mode != "corrupt":
            raise
        result["error"] = f"{type(err).__module__}.{type(err).__name__}"
        result["message"] = str(err)
    returned = time.monotonic()
    result["seconds"] = time.perf_counter() - start
    used = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = used.ru_utime - cpu.ru_utime + used.ru_stime - cpu.ru_stime
    result["peak_rss"] = maxrss()
    stop.set()
    if mode == "hub_nokeep":
        sampler.join()
        result["sampled_disk"] = sampled[0]
    if caught:
        download = caught[-1]
        result.update(
            total=download.total,
            window=download.window,
            peak_on_disk=download.peak_on_disk,
            downloaded=download.downloaded,
            chunk=ls_download.CHUNK_BYTES,
        )
        if download.last_byte_at is not None:
            result["after_last_byte"] = returned - download.last_byte_at
            result["download_s"] = download.last_byte_at - start_mono
    if model is not None:
        vocab = model.config.vocab_size
        ids = torch.tensor([[t % vocab for t in (128000, 791, 7438, 315, 2324, 374, 264, 1296)]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        if mode == "local":
            torch.save(logits, spec["logits"])
        elif Path(spec["logits"]).exists():
            reference = torch.load(spec["logits"])
            result["logits_equal"] = bool(torch.equal(logits, reference))
            result["logits_max_diff"] = (logits - reference).abs().max().item()
    print("result " + json.dumps(result), flush=True)


# -- the parent -----------------------------------------------------------------------


class RunFailed(Exception):
    def __init__(self, what: str, tail: list[str]) -> None:
        super().__init__(what)
        self.tail = tail


def run_child(spec: dict[str, Any], env: dict[str, str], timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryFile("w+") as errors:
        try:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(spec)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            errors.seek(0)
            raise RunFailed(
                f"timed out after {timeout:.0f} s", errors.read().splitlines()[-ERROR_LINES:]
            ) from None
        errors.seek(0)
        tail = errors.read().splitlines()[-ERROR_LINES:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("result ")]
    if proc.returncode != 0 or not lines:
        raise RunFailed(f"exit status {proc.returncode}", tail)
    return json.loads(lines[-1][len("result ") :])


def marked_complete(cache: Path, shard: str, sha256: str) -> tuple[list[str], list[str]]:
    """What of ``shard`` the cache holds: (marked complete: the blob named by its sha256,
    snapshot links; other files of it left behind)."""
    complete: list[str] = []
    left: list[str] = []
    for storage in cache.glob("models--*"):
        blob = storage / "blobs" / sha256
        if blob.exists():
            complete.append(str(blob.relative_to(cache)))
        for link in storage.glob(f"snapshots/*/{shard}"):
            complete.append(str(link.relative_to(cache)))
        for path in storage.glob(f"blobs/{sha256}?*"):
            left.append(str(path.relative_to(cache)))
    return complete, left


def fmt_gb(n: float) -> str:
    return f"{n / 1e9:.3f} GB"


def stats(values: list[float], fmt: str = "{:.2f}") -> tuple[str, str]:
    if not values:
        return "n/a", "n/a"
    return fmt.format(statistics.median(values)), fmt.format(min(values))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=0.6, help="checkpoint size (1e9 bytes)")
    parser.add_argument("--shards", type=int, default=4, help="about how many shards")
    parser.add_argument(
        "--bandwidth", type=float, default=150e6, help="the server's bytes/s (default 150e6)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median, min)")
    parser.add_argument(
        "--window",
        type=lambda text: int(float(text)),
        help="bytes: set leanstream.download.WINDOW_BYTES in the children (e.g. 64e6)",
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "leanstream-bench-download",
        help="where the checkpoint is written (reused) and the children's caches go",
    )
    parser.add_argument("--run-timeout", type=float, default=300.0, help="seconds per child")
    parser.add_argument("--record", action="store_true", help="append the tables to RESULTS.md")
    if argv is None and sys.argv[1:2] == ["--child"]:
        child(json.loads(sys.argv[2]))
        return 0
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    given = argv if argv is not None else sys.argv[1:]
    command = shlex.join(["python", "benches/download.py", *given])
    machine = load_bench.machine("huggingface_hub", "transformers", "bitsandbytes")
    print(f"command: {command}\nmachine: {machine}", flush=True)

    sys.path.insert(0, str(HERE.parent / "tests"))
    from hubserver import HubServer

    folder = write_checkpoint(args.work, args.size_gb, args.shards)
    shard_files = sorted(folder.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shard_files)
    for path in shard_files:  # the local load reads from a warm page cache
        with open(path, "rb") as f:
            while f.read(16 * MIB):
                pass
    config = json.loads((folder / "config.json").read_text())
    runs_dir = Path(tempfile.mkdtemp(prefix="runs-", dir=args.work))
    logits = runs_dir / "local-logits.pt"
    modes = ("snapshot", "local", "hub", "hub_nokeep", "corrupt")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    failures: list[str] = []
    interrupted = False
    load_start = os.getloadavg()[0]
    hub = HubServer(bandwidth=args.bandwidth, idle_timeout=None)
    with hub:
        hub.add_repo(REPO, folder)
        served = hub.files(REPO)
        last = shard_files[-1].name
        corrupt_at = served[last].size // 2
        base_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))
        }
        try:
            for rnd in range(args.rounds):
                for mode in modes:  # interleaved, so drift hits every measurement alike
                    cache = runs_dir / f"cache-{rnd}-{mode}"
                    cache.mkdir()
                    env = dict(
                        base_env,
                        HF_ENDPOINT=hub.url,
                        HF_HUB_CACHE=str(cache),
                        HF_HUB_DISABLE_TELEMETRY="1",
                        HF_HUB_DISABLE_PROGRESS_BARS="1",
                        PYTHONDONTWRITEBYTECODE="1",
                    )
                    spec = dict(
                        mode=mode,
                        folder=str(folder),
                        repo=REPO,
                        logits=str(logits),
                        window=args.window,
                    )
                    if mode == "corrupt":
                        hub.corrupt(last, corrupt_at)
                    hub.reset_stats()
                    try:
                        result = run_child(spec, env, args.run_timeout)
                    except RunFailed as e:
                        tail = "".join(f"\n    {line}" for line in e.tail)
                        failures.append(
                            f"- round {rnd} {mode}: {e}: `{e.tail[-1] if e.tail else ''}`"
                        )
                        print(f"round {rnd} {mode}: FAILED, {e}{tail}", flush=True)
                        continue
                    finally:
                        hub.clear_faults()
                        sent = hub.bytes_sent
                    result["sent"] = sent
                    if mode == "corrupt":
                        complete, left = marked_complete(cache, last, served[last].sha256 or "")
                        result["complete"], result["left"] = complete, left
                    shutil.rmtree(cache, ignore_errors=True)
                    runs[mode].append(result)
                    print(f"round {rnd} {mode}: {summary(mode, result)}", flush=True)
        except KeyboardInterrupt:
            interrupted = True
            print("interrupted: the tables have the runs measured so far", flush=True)

    lines = report(
        args, runs, size, len(shard_files), config, last, corrupt_at, load_start, interrupted
    )
    if failures:
        lines += ["", "Failed:", *failures]
    table = "\n".join(lines)
    print(table, flush=True)
    shutil.rmtree(runs_dir, ignore_errors=True)
    if args.record:
        load_bench.record(command, machine, table)
    ok = all(runs[m] for m in modes)
    return 1 if failures or interrupted or not ok else 0


def summary(mode: str, r: dict[str, Any]) -> str:
    out = f"{r['seconds']:.2f} s, sent {fmt_gb(r['sent'])}"
    if mode != "snapshot":
        out += f", peak RSS {r['peak_rss'] / MIB:.0f} MiB (imports {r['imports_rss'] / MIB:.0f})"
    if "after_last_byte" in r:
        out += f", last byte -> return {r['after_last_byte']:.3f} s"
    if "logits_equal" in r:
        out += f", logits equal: {r['logits_equal']}"
    if "sampled_disk" in r:
        out += f", peak on disk {fmt_gb(r['peak_on_disk'])} (sampled {fmt_gb(r['sampled_disk'])})"
    if mode == "corrupt":
        out += f", {r.get('error', 'NO ERROR')}, complete: {r['complete'] or 'nothing'}"
    return out


def report(
    args: argparse.Namespace,
    runs: dict[str, list[dict[str, Any]]],
    size: int,
    shards: int,
    config: dict[str, Any],
    last: str,
    corrupt_at: int,
    load_start: float,
    interrupted: bool,
) -> list[str]:
    def col(mode: str, key: str, scale: float = 1.0, fmt: str = "{:.2f}") -> tuple[str, str]:
        return stats([r[key] / scale for r in runs[mode] if key in r], fmt)

    def med(mode: str, key: str) -> float | None:
        values = [r[key] for r in runs[mode] if key in r]
        return statistics.median(values) if values else None

    shape = ", ".join(
        f"{k}={config[k]}"
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
        )
    )
    lines = [
        f"checkpoint: Llama ({shape}), random bf16, {fmt_gb(size)} in {shards} shards "
        f"(save_pretrained); loopback hub at {args.bandwidth / MB:.0f} MB/s; leanstream.load("
        f"bits=4, device='cpu'); {args.rounds} round(s) of fresh processes (median, min); "
        f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
        + ("; INTERRUPTED" if interrupted else ""),
        "",
        "| run | seconds | min | CPU s | last byte at s | after last byte s | peak RSS MiB "
        "| min | imports RSS MiB | server sent | logits equal local |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "snapshot": "snapshot_download, cold cache",
        "local": "local load (warm page cache)",
        "hub": "hub load, cold cache",
        "hub_nokeep": "hub load, keep_download=False",
        "corrupt": "hub load, corrupted byte (until raised)",
    }
    for mode, label in names.items():
        rs = runs[mode]
        if not rs:
            lines.append(f"| {label} | failed |" + " |" * 9)
            continue
        secs = col(mode, "seconds")
        after = col(mode, "after_last_byte", fmt="{:.3f}")[0] if mode.startswith("hub") else ""
        got = col(mode, "download_s")[0] if mode.startswith("hub") else ""
        rss = col(mode, "peak_rss", MIB, "{:.0f}") if mode != "snapshot" else ("", "")
        imports = col(mode, "imports_rss", MIB, "{:.0f}")[0] if mode != "snapshot" else ""
        sent = fmt_gb(statistics.median(r["sent"] for r in rs))
        equal = ""
        if any("logits_equal" in r for r in rs):
            equal = "yes" if all(r.get("logits_equal") for r in rs) else "**NO**"
            diffs = [r["logits_max_diff"] for r in rs if "logits_max_diff" in r]
            if equal != "yes":
                equal += f" (max diff {max(diffs):.3g})"
        lines.append(
            f"| {label} | {secs[0]} | {secs[1]} | {col(mode, 'cpu_s')[0]} | {got} | {after} "
            f"| {rss[0]} | {rss[1]} | {imports} | {sent} | {equal} |"
        )

    nokeep = runs["hub_nokeep"]
    window = chunk = None
    if nokeep:
        window, chunk = nokeep[-1]["window"], nokeep[-1]["chunk"]
        lines += [
            "",
            f"keep_download=False: window (WINDOW_BYTES) {fmt_gb(window)}, chunk "
            f"{chunk / MIB:.0f} MiB, checkpoint {fmt_gb(size)}; peak on disk as the download "
            f"counts it: {' / '.join(fmt_gb(r['peak_on_disk']) for r in nokeep)}; sampled "
            "(st_blocks of the staging files, every 5 ms): "
            + " / ".join(fmt_gb(r["sampled_disk"]) for r in nokeep),
        ]
    corrupt = runs["corrupt"]
    if corrupt:
        r = corrupt[-1]
        lines += [
            "",
            f"corrupted byte at offset {corrupt_at} of {last} ({fmt_gb(r['total'] / shards)} "
            f"per shard): `{r.get('error', 'no error raised')}`: "
            + (r.get("message", "")[:400] or "the load succeeded")
            + f"; left in the cache of that shard: {', '.join(r['left']) or 'nothing'}",
        ]

    targets = []
    local_s, snap_s = med("local", "seconds"), med("snapshot", "seconds")
    hub_after, hub_s = med("hub", "after_last_byte"), med("hub", "seconds")
    if local_s is not None and hub_after is not None:
        bound = max(0.1, 0.5 * local_s)
        targets.append(
            f"| (a) after the last byte, load returns within max(0.1 s, 0.5 x local load "
            f"{local_s:.2f} s) = {bound:.2f} s | {hub_after:.3f} s | {mark(hub_after <= bound)} |"
        )
    if snap_s is not None and hub_s is not None:
        ratio = hub_s / snap_s
        nk = med("hub_nokeep", "seconds")
        extra = f"; keep_download=False {nk / snap_s:.2f}x" if nk is not None else ""
        targets.append(
            f"| (b) cold hub load <= 1.15 x snapshot_download alone ({snap_s:.2f} s) | "
            f"{hub_s:.2f} s = {ratio:.2f}x{extra} | {mark(ratio <= 1.15)} |"
        )
    if corrupt:
        named = all(r.get("error", "").endswith("CorruptDownloadError") for r in corrupt)
        secs = statistics.median(r["seconds"] for r in corrupt)
        streaming = snap_s is not None and secs <= 1.15 * snap_s
        nothing = not any(r["complete"] for r in corrupt)
        vs = f" = {secs / snap_s:.2f}x snapshot_download" if snap_s else ""
        names_seen = sorted({r.get("error", "none").rsplit(".", 1)[-1] for r in corrupt})
        targets.append(
            "| (c) corrupted bytes: a named error (CorruptDownloadError), raised while "
            "streaming (<= 1.15 x snapshot_download), nothing marked complete | "
            f"{', '.join(names_seen)} after {secs:.2f} s{vs}; marked complete: "
            f"{'nothing' if nothing else 'SOMETHING'} | {mark(named and streaming and nothing)} |"
        )
    if nokeep and window is not None and chunk is not None:
        peak = max(max(r["sampled_disk"], r["peak_on_disk"]) for r in nokeep)
        bound = window + FEW_CHUNKS * chunk
        targets.append(
            f"| (d) keep_download=False: peak disk <= window + {FEW_CHUNKS} chunks "
            f"({fmt_gb(bound)}) and < checkpoint ({fmt_gb(size)}) | {fmt_gb(peak)} (the "
            f"larger of sampled and counted, worst run) | {mark(peak <= bound and peak < size)} |"
        )
    local_rss, hub_rss = med("local", "peak_rss"), med("hub", "peak_rss")
    if local_rss is not None and hub_rss is not None:
        nk_rss = med("hub_nokeep", "peak_rss")
        extra = f"; keep_download=False {nk_rss / local_rss:.2f}x" if nk_rss else ""
        base = med("local", "imports_rss") or 0
        growth = (
            f" (growth over the imports' {base / MIB:.0f} MiB: hub "
            f"{(hub_rss - base) / MIB:.0f} MiB, local {(local_rss - base) / MIB:.0f} MiB)"
        )
        targets.append(
            f"| (e) hub load peak RSS <= local load's ({local_rss / MIB:.0f} MiB) + 10 % | "
            f"{hub_rss / MIB:.0f} MiB = {hub_rss / local_rss:.2f}x{extra}{growth} "
            f"| {mark(hub_rss <= 1.1 * local_rss)} |"
        )
    if targets:
        lines += ["", "| target (issue 28) | measured (medians) | |", "|---|---|---|", *targets]
    return lines


def mark(ok: bool) -> str:
    return "PASS" if ok else "**MISS**"


if __name__ == "__main__":
    sys.exit(main())
