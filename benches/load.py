"""Load-time and memory benchmark: leanstream vs transformers + bitsandbytes.

    python benches/load.py --shapes 1b --reps 3            # CPU, Llama-3.2-1B shapes
    python benches/load.py --shapes 8b --device cuda       # GPU, Llama-3.1-8B shapes
    python benches/load.py --shapes 8b --device cuda --cold --loaders "leanstream nf4"

Writes synthetic bf16 checkpoints with real architectures' shapes (cached under
``~/.cache/leanstream/bench``), then runs every loader in its **own fresh
process**. The child imports torch, transformers and bitsandbytes (and the
model's transformers modules, which transformers imports lazily) before the
clock starts, and times only the load call; the parent samples the child's
``/proc/<pid>/status`` (VmRSS, RssAnon, RssFile) every 5 ms. Each child also
writes the logits of a fixed prompt, compared with the transformers loader of
the same setting. With ``--cold`` the page cache is evicted before each run
(``posix_fadvise(DONTNEED)``, no root needed) and each round also times ``cat``
of the files, the floor for reading them. Prints a markdown table; ``--record`` appends it to
benches/RESULTS.md with date, machine, versions and command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1 << 20
GIB = 1 << 30

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


def write_checkpoint(folder: Path, shape: str, shard_bytes: int = 5 * GIB) -> Path:
    """Random bf16 weights, shard by shard, never the whole model in memory."""
    if (folder / "model.safetensors.index.json").exists():
        return folder
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from leanstream.meta import build_empty_model

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rope_theta=500000.0)
    config.dtype = torch.bfloat16
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    config.save_pretrained(tmp)
    model = build_empty_model(config)
    generator = torch.Generator().manual_seed(0)
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

    for name, param in model.named_parameters():
        tensor = torch.empty(param.shape, dtype=torch.bfloat16)
        tensor.normal_(0, 0.02, generator=generator)
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
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
    return folder


CHILD = r"""
import json, sys, time
args = json.loads(sys.argv[1])
import torch, transformers, bitsandbytes as bnb  # imported before the clock starts
import leanstream
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
# transformers imports its model registry and the model's modules lazily, at the first
# use (about 0.5 s): imports, not load time, for every loader alike
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(folder))]
print("ready", flush=True)
sys.stdin.readline()
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
start = time.perf_counter()
if kind == "leanstream":
    model = leanstream.load(folder, device=device, progress=False, compute_dtype=dtype, **s)
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
result = {"seconds": seconds}
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
print(json.dumps(result), flush=True)
"""


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


def time_cat(folder: Path) -> float:
    """Seconds ``cat`` takes to read the checkpoint's files from a cold page cache."""
    drop_page_cache(folder)
    files = sorted(str(p) for p in folder.glob("*.safetensors"))
    start = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    seconds = time.perf_counter() - start
    drop_page_cache(folder)
    return seconds


def run_one(kind: str, settings: dict, folder: Path, device: str, logits_path: Path) -> dict:
    args = dict(
        kind=kind, settings=settings, device=device, folder=str(folder), logits=str(logits_path)
    )
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

    def failed(what: str) -> RuntimeError:
        errors.seek(0)
        return RuntimeError(f"{kind} child {what}:\n{errors.read()[-4000:]}")

    if proc.stdout.readline().strip() != "ready":
        raise failed("failed to start")
    base = _status(proc.pid)
    peak = dict(base)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while True:
        now = _status(proc.pid)
        for key, value in now.items():
            peak[key] = max(peak.get(key, 0), value)
        if sel.select(timeout=0.005):
            line = proc.stdout.readline().strip()
            if line == "loaded":
                break
            if not line:
                raise failed("died")
    final = _status(proc.pid)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    result = json.loads(proc.stdout.readline())
    proc.wait(timeout=600)
    result.update(
        base_rss=base.get("VmRSS", 0),
        peak_rss=peak.get("VmRSS", 0),
        peak_anon=peak.get("RssAnon", 0),
        peak_file=peak.get("RssFile", 0),
        final_rss=final.get("VmRSS", 0),
    )
    return result


def _peer(name: str) -> str | None:
    """The transformers loader with the same settings as ``name``."""
    settings = {k: v for k, v in LOADERS[name][1].items() if k != "pipeline"}
    return next((n for n, (k, s) in LOADERS.items() if k == "transformers" and s == settings), None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=list(SHAPES), default="1b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--loaders", default=",".join(LOADERS), help="comma-separated names")
    parser.add_argument("--cold", action="store_true", help="evict the page cache before each run")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/leanstream/bench")
    parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    args = parser.parse_args(argv)

    args.cache.mkdir(parents=True, exist_ok=True)
    folder = write_checkpoint(args.cache / f"llama-{args.shapes}-bf16", args.shapes)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    names = [n.strip() for n in args.loaders.split(",")]
    results: dict[str, list[dict]] = {n: [] for n in names}
    logits: dict[str, Path] = {}
    work = Path(tempfile.mkdtemp(prefix="leanstream-bench-"))
    cat: list[float] = []  # cold: seconds `cat` takes to read the same files
    for rep in range(args.reps):
        if args.cold:
            cat.append(time_cat(folder))
            print(f"rep {rep} cat: {cat[-1]:.2f} s", file=sys.stderr)
        for name in names:  # interleaved, so drift hits every loader alike
            kind, settings = LOADERS[name]
            if args.cold:
                drop_page_cache(folder)
            logits[name] = work / f"{name.replace(' ', '_')}.pt"
            result = run_one(kind, settings, folder, args.device, logits[name])
            results[name].append(result)
            print(f"rep {rep} {name}: {result['seconds']:.2f} s", file=sys.stderr)

    import torch

    def agreement(name: str) -> str:
        peer = _peer(name)
        if peer is None or peer not in logits or name == peer:
            return "ref"
        a, b = torch.load(logits[peer]), torch.load(logits[name])
        return f"{((a - b).norm() / a.norm()).item():.1e}"

    lines = [
        f"checkpoint: Llama {args.shapes} shapes, bf16, {size / GIB:.2f} GiB; "
        f"device {args.device}; "
        f"{'cold' if args.cold else 'warm'} page cache; {args.reps} runs each (median, min-max)"
        + (f"; `cat` of the files, cold: {statistics.median(cat):.2f} s" if cat else ""),
        "",
        "| loader | load s | min-max | vs transformers | "
        + ("vs cat | " if cat else "")
        + "peak RSS growth | peak RssFile | "
        + ("GPU peak | GPU final | " if args.device == "cuda" else "")
        + "logits rel. err |",
        "|---|---|---|---|---|---|"
        + ("---|" if cat else "")
        + ("---|---|" if args.device == "cuda" else "")
        + "---|",
    ]
    medians = {n: statistics.median(r["seconds"] for r in results[n]) for n in names}
    for name in names:
        runs = results[name]
        peer = _peer(name)
        ratio = (
            f"{medians[peer] / medians[name]:.1f}x faster"
            if peer in medians and peer != name
            else ""
        )
        grow = max(r["peak_rss"] - r["base_rss"] for r in runs)
        file_peak = max(r["peak_file"] for r in runs)
        row = (
            f"| {name} | {medians[name]:.2f} | {min(r['seconds'] for r in runs):.2f}-"
            f"{max(r['seconds'] for r in runs):.2f} | {ratio} | "
            + (f"{medians[name] / statistics.median(cat):.2f}x | " if cat else "")
            + f"{grow / GIB:.2f} GiB | {file_peak / GIB:.2f} GiB | "
        )
        if args.device == "cuda":
            row += (
                f"{max(r['gpu_peak'] for r in runs) / GIB:.2f} GiB | "
                f"{max(r['gpu_final'] for r in runs) / GIB:.2f} GiB | "
            )
        row += f"{agreement(name)} |"
        lines.append(row)
    table = "\n".join(lines)
    print(table)
    if args.record:
        import bitsandbytes
        import transformers

        header = (
            f"\n## {time.strftime('%Y-%m-%d')} — `python benches/load.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / GIB:.0f} GiB RAM"
            + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ", no GPU")
            + f"; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"bitsandbytes {bitsandbytes.__version__}, Python {platform.python_version()}\n\n"
        )
        with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
            f.write(header + table + "\n")


if __name__ == "__main__":
    main()
