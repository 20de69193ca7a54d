"""device_map benchmark: leanstream's quantized CPU part vs transformers' CPU offload.

    python benches/offload.py --reps 3                # Llama-3.2-1B shapes; CPU, and GPU if any
    python benches/offload.py --shapes tiny --reps 1  # a smoke test
    python benches/offload.py --reps 3 --record       # append the tables to benches/RESULTS.md

With ``device_map``, leanstream keeps the modules it places on the CPU quantized
(bitsandbytes 4-bit / int8 layers that run on the CPU). transformers + bitsandbytes
refuses a ``device_map`` with ``"cpu"`` entries beside others unless
``BitsAndBytesConfig(llm_int8_enable_fp32_cpu_offload=True)``, and then leaves every
module that a dict maps to ``"cpu"`` unquantized. Each child reports what it actually got
(layer classes and weight dtypes), so the tables say what transformers did rather than
what it is said to do.

**CPU scenario** (always): the dict a user writes for a GPU/CPU split of the model's
modules (``model.embed_tokens``, ``model.rotary_emb``, the first half of the decoder layers
and, when tied to the embeddings, ``lm_head`` for the GPU; the second half of the layers,
``model.norm`` and an untied ``lm_head`` for the CPU: the "CPU part"), every entry
``"cpu"``, as on a machine without a GPU. Loaders: leanstream nf4 / int8 with that dict;
transformers nf4 / int8 with that dict and the offload flag (which then keeps *every*
entry unquantized, all of them being ``"cpu"``); and, the closest a CPU can come to
transformers' real split, transformers nf4 / int8 with the same dict, no flag (an
all-``"cpu"`` dict needs none) and ``llm_int8_skip_modules`` = the CPU part plus
``lm_head``: the first half quantized, the CPU part left as the flag leaves it.

**GPU scenario** (only when ``torch.cuda.is_available()``): ``device_map="auto"`` with
``max_memory={0: <embeddings + the largest layer + about half the decoder layers at the
loader's bits>, "cpu": ...}``, so that about half the layers go to the CPU; leanstream and
transformers (offload flag on) at nf4 and int8, and each library's one-GPU load at the
same bits as the reference for the logits. transformers plans with its own size
estimates, so the two plans need not split at the same layer: the table says how many
decoder layers each put on the CPU.

The checkpoint is ``benches/load.py``'s (same shapes, seeded pool, same cache folder, so
an existing one is reused). Each load runs in its own fresh process through
``benches/load.py``'s ``run_one`` (imports before the clock, only the load call timed,
``/proc/<pid>/status`` sampled every 5 ms for the peak RSS). After the load, untimed, the
child measures ``leanstream.footprint`` of the model and of its CPU part (plus, for
modules accelerate offloaded, the CPU tensors its hooks hold), counts the quantized
linear layers, computes the logits of a fixed 6-token prompt, and reports its own RSS
growth once that forward has touched every weight: a tensor that is a view of the mapped
checkpoint (transformers keeps unquantized bf16 weights so) costs no RSS until it is read,
so the peak during the load alone would hide it.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load as load_bench  # benches/load.py: shapes, checkpoint, child runner, record

GIB, MIB = load_bench.GIB, load_bench.MIB

NF4 = dict(bits=4, quant_type="nf4")
INT8 = dict(bits=8)
CPU_LOADERS = {
    "leanstream nf4": ("leanstream", NF4),
    "leanstream int8": ("leanstream", INT8),
    "transformers nf4 (+fp32 cpu offload)": ("transformers", dict(NF4, offload=True)),
    "transformers int8 (+fp32 cpu offload)": ("transformers", dict(INT8, offload=True)),
    "transformers nf4 (CPU part skipped)": ("transformers", dict(NF4, skip=True)),
    "transformers int8 (CPU part skipped)": ("transformers", dict(INT8, skip=True)),
}
GPU_LOADERS = {
    "leanstream nf4 auto": ("leanstream", dict(NF4, split=True)),
    "leanstream int8 auto": ("leanstream", dict(INT8, split=True)),
    "transformers nf4 auto (+fp32 cpu offload)": (
        "transformers",
        dict(NF4, split=True, offload=True),
    ),
    "transformers int8 auto (+fp32 cpu offload)": (
        "transformers",
        dict(INT8, split=True, offload=True),
    ),
    "leanstream nf4 1 GPU": ("leanstream", dict(NF4, split=False)),
    "leanstream int8 1 GPU": ("leanstream", dict(INT8, split=False)),
    "transformers nf4 1 GPU": ("transformers", dict(NF4, split=False)),
    "transformers int8 1 GPU": ("transformers", dict(INT8, split=False)),
}

CHILD = r"""
import collections, json, sys, time
args = json.loads(sys.argv[1])
import torch, transformers, accelerate, bitsandbytes as bnb  # imported before the clock starts
import leanstream
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
kind, s, device, folder = args["kind"], args["settings"], args["device"], args["folder"]
dtype = torch.bfloat16
place = dict(s["place"])  # device / device_map / max_memory, as the loader takes them
if place.get("max_memory"):  # JSON made the CUDA index a string
    place["max_memory"] = {int(k) if k.isdigit() else k: v for k, v in place["max_memory"].items()}

def bnb_config():
    extra = dict(llm_int8_enable_fp32_cpu_offload=s.get("offload", False))
    if s.get("skip_modules"):
        extra["llm_int8_skip_modules"] = s["skip_modules"]
    if s["bits"] == 8:
        return BitsAndBytesConfig(load_in_8bit=True, **extra)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=s["quant_type"],
                              bnb_4bit_compute_dtype=dtype, **extra)

if device == "cuda":
    torch.empty(1, device=device)  # the CUDA context belongs to the base, not to the load
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(folder))]  # lazy imports

def rss():
    with open("/proc/self/status") as f:
        pairs = (line.split(":", 1) for line in f)
        return {k: int(v.split()[0]) * 1024 for k, v in pairs if k in ("VmRSS", "RssAnon")}

before = rss()
print("ready", flush=True)
sys.stdin.readline()
if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
start = time.perf_counter()
if kind == "leanstream":
    opts = dict(bits=s["bits"])
    if s["bits"] == 4:
        opts.update(quant_type=s["quant_type"], compute_dtype=dtype)
    model = leanstream.load(folder, progress=False, **opts, **place)
else:
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb_config(), **place)
if device == "cuda":
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
result = {"seconds": seconds}
if device == "cuda":
    result["gpu_peak"] = torch.cuda.max_memory_allocated()
    result["gpu_final"] = torch.cuda.memory_allocated()
print("loaded", flush=True)
sys.stdin.readline()

def offloaded(model):
    # CPU tensors held by accelerate's hooks for modules it offloaded (their parameters
    # are on meta: footprint does not see them), once each
    seen, total = set(), 0
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            data = getattr(h, "weights_map", None)
            while hasattr(data, "dataset"):
                data = data.dataset
            tensors = getattr(data, "state_dict", data)  # dispatch_model's loader, or a dict
            for t in (tensors.values() if isinstance(tensors, dict) else ()):
                if t.device.type == "cpu" and t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total

def linear_kind(m):
    if isinstance(m, bnb.nn.Linear4bit):
        return "Linear4bit " + str(m.weight.quant_type)
    if isinstance(m, bnb.nn.Linear8bitLt):
        return "Linear8bitLt " + str(m.weight.dtype).removeprefix("torch.")
    return type(m).__name__ + " " + str(m.weight.dtype).removeprefix("torch.")

hf_map = getattr(model, "hf_device_map", None) or {}
cpu_keys = s.get("cpu_keys") or [k for k, v in hf_map.items() if v == "cpu"]
part = torch.nn.ModuleList([model.get_submodule(k) for k in cpu_keys])  # shared tensors once
extra = offloaded(model)
linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
quantized = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
result.update(
    footprint=leanstream.footprint(model).total_bytes + extra,
    cpu_part=leanstream.footprint(part).total_bytes + extra,
    cpu_kinds=collections.Counter(
        linear_kind(m) for m in part.modules() if isinstance(m, torch.nn.Linear)),
    linears=len(linears),
    quantized=sum(isinstance(m, quantized) for m in linears),
    cpu_layers=sum(k.startswith("model.layers.") for k in cpu_keys),
    cpu_keys=cpu_keys,
)
vocab = model.config.vocab_size
ids = torch.tensor([[t % vocab for t in (128000, 791, 7438, 315, 2324, 374)]], device=device)
with torch.no_grad():
    logits = model(input_ids=ids).logits.float().cpu()
after = rss()  # every weight touched: a model mapped from the file is resident now
result["used_rss"] = after["VmRSS"] - before["VmRSS"]
result["used_anon"] = after["RssAnon"] - before["RssAnon"]
torch.save(logits, args["logits"])
print("result", json.dumps(result), flush=True)
"""


def split(shape: str) -> tuple[dict[str, str], list[str]]:
    """The dict a user writes for a GPU/CPU split of ``shape``, every entry ``"cpu"``,
    and its CPU part (the keys a split would give the CPU)."""
    fields = load_bench.SHAPES[shape]
    layers = fields["num_hidden_layers"]
    half = layers // 2
    cpu = [*(f"model.layers.{i}" for i in range(half, layers)), "model.norm"]
    if not fields["tie_word_embeddings"]:
        cpu.append("lm_head")  # tied, it stays with the embeddings (one tensor)
    keys = ["model.embed_tokens", "model.rotary_emb"]
    keys += [f"model.layers.{i}" for i in range(layers)] + ["model.norm", "lm_head"]
    return dict.fromkeys(keys, "cpu"), cpu


def gpu_budget(shape: str, bits: int) -> int:
    """GPU bytes for the embeddings (and an untied ``lm_head``), room for the largest layer
    (accelerate keeps it free on a device that offloads) and half the decoder layers
    quantized with ``bits``: about half the layers then go to the CPU."""
    from leanstream.placement import weight_bytes

    f = load_bench.SHAPES[shape]
    h, i, v = f["hidden_size"], f["intermediate_size"], f["vocab_size"]
    d = h // f["num_attention_heads"]
    q, kv = f["num_attention_heads"] * d, f["num_key_value_heads"] * d
    spec = SimpleNamespace(bits=bits, quant_type="nf4", blocksize=64, double_quant=False)
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
    layer = sum(sum(weight_bytes(o, n, spec).values()) for o, n in shapes) + 2 * h * 2
    embed = v * h * 2
    heads = embed if f["tie_word_embeddings"] else 2 * embed
    return heads + max(embed, layer) + f["num_hidden_layers"] // 2 * layer


def _span(keys: Iterable[str]) -> str:
    """``model.layers.8-15, model.norm`` for a list of module names."""
    out: list[str] = []
    run: list[int] = []

    def flush() -> None:
        if run:
            out.append(f"model.layers.{run[0]}" + (f"-{run[-1]}" if len(run) > 1 else ""))
            run.clear()

    for key in keys:
        parts = key.split(".")
        if len(parts) == 3 and parts[:2] == ["model", "layers"]:
            if run and int(parts[2]) != run[-1] + 1:
                flush()
            run.append(int(parts[2]))
        else:
            flush()
            out.append(key)
    flush()
    return ", ".join(out)


def _kinds(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "none"


def _rel_err(ref: Path, other: Path) -> str:
    import torch

    try:
        a, b = torch.load(ref), torch.load(other)
        return f"{((a - b).norm() / a.norm()).item():.1e}"
    except Exception as e:  # a table with a hole beats no table
        return f"error: {type(e).__name__}"


def _loadavg() -> float:
    return os.getloadavg()[0]


def measure(
    loaders: dict[str, tuple[str, dict]],
    names: list[str],
    settings_of: Callable[[str, dict], dict],
    folder: Path,
    device: str,
    reps: int,
    timeout: float,
    work: Path,
) -> tuple[dict[str, list[dict]], list[str], bool]:
    """Every loader of ``names``, ``reps`` times, interleaved, each in a fresh child."""
    runs: dict[str, list[dict]] = {n: [] for n in names}
    failures: list[str] = []
    try:
        for rep in range(reps):
            for name in names:  # interleaved, so drift hits every loader alike
                kind, base = loaders[name]
                path = work / f"{device}-{name.replace(' ', '_').replace('/', '_')}-{rep}.pt"
                result = load_bench.try_run(
                    rep,
                    name,
                    failures,
                    kind,
                    settings_of(kind, base),
                    folder,
                    device,
                    path,
                    timeout,
                )
                if result is None:
                    continue
                result["logits"] = path
                runs[name].append(result)
                grow = result["peak_rss"] - result["base_rss"]
                gpu = (
                    f", GPU peak {result['gpu_peak'] / GIB:.2f} GiB" if "gpu_peak" in result else ""
                )
                print(
                    f"rep {rep} {name}: {result['seconds']:.2f} s, peak RSS +{grow / GIB:.2f} GiB"
                    f"{gpu}, model {result['footprint'] / GIB:.3f} GiB, CPU part "
                    f"{result['cpu_part'] / GIB:.3f} GiB ({_kinds(result['cpu_kinds'])}), "
                    f"quantized linears {result['quantized']}/{result['linears']}",
                    flush=True,
                )
    except KeyboardInterrupt:
        print("interrupted: the tables have the runs measured so far", flush=True)
        return runs, failures, True
    return runs, failures, False


def _faster(theirs: float, ours: float) -> str:
    return f"{theirs / ours:.1f}x faster" if theirs >= ours else f"{ours / theirs:.1f}x slower"


def _used(r: dict) -> str:
    return f"{r['used_rss'] / GIB:.2f} GiB ({r['used_anon'] / GIB:.2f})"


def _timing(rs: list[dict]) -> tuple[float, str]:
    median = statistics.median(r["seconds"] for r in rs)
    return median, f"{min(r['seconds'] for r in rs):.2f}-{max(r['seconds'] for r in rs):.2f}"


def cpu_table(
    names: list[str], runs: dict[str, list[dict]], shape: str, size: int, reps: int, busy: str
) -> list[str]:
    """The CPU scenario's table; ``busy``: the load average while it ran."""
    device_map, cpu_keys = split(shape)
    first = [k for k in device_map if k not in cpu_keys]
    ok = {n: rs for n, rs in runs.items() if rs}
    median = {n: _timing(rs)[0] for n, rs in ok.items()}

    def peer(name: str, variant: str = "+fp32 cpu offload") -> str:
        bits = CPU_LOADERS[name][1]["bits"]
        return f"transformers {'nf4' if bits == 4 else 'int8'} ({variant})"

    lines = [
        f"checkpoint: Llama `{shape}` shapes, bf16, {size / GIB:.2f} GiB; CPU, warm page cache; "
        f"{reps} load(s) per loader (median, min-max); {busy}. device_map: a dict of "
        f'{len(device_map)} entries, every one `"cpu"`: {_span(first)} (what a GPU/CPU '
        f"split gives the GPU) and {_span(cpu_keys)} (what it gives the CPU: the **CPU "
        "part**). transformers rows: the same dict, with `llm_int8_enable_fp32_cpu_offload"
        '=True` ("+fp32 cpu offload") or without it and with `llm_int8_skip_modules` = '
        'the CPU part + `lm_head` ("CPU part skipped"). model / CPU part: '
        "`leanstream.footprint` (parameters and buffers, quantization statistics included). "
        "RSS after a forward: the child's own VmRSS (RssAnon) after the logits of a 6-token "
        "prompt minus before the load, every weight touched by then (a tensor that is a view "
        "of the mapped checkpoint is resident only once read); logits: same bits.",
        "",
        "| loader | load s | min-max | load vs transformers: +offload / CPU part skipped | "
        "peak RSS growth (load) | RSS after a forward (anon) | model GiB | CPU part GiB | "
        "CPU part vs transformers (+offload) | CPU part linears | quantized linears | "
        "logits rel. err vs transformers (+offload) |",
        "|" + "---|" * 12,
    ]
    for name in names:
        if name not in ok:
            lines.append(f"| {name} | failed |" + " |" * 10)
            continue
        rs, ref, emulated = ok[name], peer(name), peer(name, "CPU part skipped")
        r = rs[-1]
        speed = size_ratio = err = ""
        if ref == name:
            speed = size_ratio = err = "ref"
        elif ref in ok:
            if name.startswith("leanstream"):
                speed = (
                    _faster(median[ref], median[name])
                    + " / "
                    + (_faster(median[emulated], median[name]) if emulated in ok else "n/a")
                )
            size_ratio = f"{r['cpu_part'] / ok[ref][-1]['cpu_part']:.2f}x"
            err = _rel_err(ok[ref][-1]["logits"], r["logits"])
        grow = max(x["peak_rss"] - x["base_rss"] for x in rs)
        lines.append(
            f"| {name} | {median[name]:.2f} | {_timing(rs)[1]} | {speed} | {grow / GIB:.2f} GiB "
            f"| {_used(r)} | {r['footprint'] / GIB:.3f} | {r['cpu_part'] / GIB:.3f} | "
            f"{size_ratio} | {_kinds(r['cpu_kinds'])} | {r['quantized']}/{r['linears']} | {err} |"
        )
    return lines


def gpu_table(names: list[str], runs: dict[str, list[dict]], shape: str, reps: int) -> list[str]:
    ok = {n: rs for n, rs in runs.items() if rs}
    median = {n: _timing(rs)[0] for n, rs in ok.items()}
    layers = load_bench.SHAPES[shape]["num_hidden_layers"]
    lines = [
        f'GPU scenario: `device_map="auto"`, `max_memory={{0: {gpu_budget(shape, 4) / GIB:.2f} '
        f'GiB (nf4) / {gpu_budget(shape, 8) / GIB:.2f} GiB (int8), "cpu": ...}}`; '
        f"{reps} load(s) per loader (median, min-max); logits compared with the same "
        "library's one-GPU load at the same bits.",
        "",
        "| loader | load s | min-max | host peak RSS growth (load) | host RSS after a forward "
        "(anon) | GPU peak | decoder layers on CPU | CPU part GiB | CPU part linears | "
        "logits rel. err vs one GPU |",
        "|" + "---|" * 10,
    ]
    for name in names:
        if name not in ok:
            lines.append(f"| {name} | failed |" + " |" * 8)
            continue
        rs = ok[name]
        r = rs[-1]
        kind, s = GPU_LOADERS[name]
        ref = f"{kind} {'nf4' if s['bits'] == 4 else 'int8'} 1 GPU"
        err = (
            "ref"
            if ref == name
            else (_rel_err(ok[ref][-1]["logits"], r["logits"]) if ref in ok else "")
        )
        grow = max(x["peak_rss"] - x["base_rss"] for x in rs)
        lines.append(
            f"| {name} | {median[name]:.2f} | {_timing(rs)[1]} | {grow / GIB:.2f} GiB | "
            f"{_used(r)} | {max(x['gpu_peak'] for x in rs) / GIB:.2f} GiB | "
            f"{r['cpu_layers']}/{layers} | {r['cpu_part'] / GIB:.3f} | "
            f"{_kinds(r['cpu_kinds'])} | {err} |"
        )
    return lines


def _names(text: str, known: dict, parser: argparse.ArgumentParser) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if unknown := [n for n in names if n not in known]:
        parser.error(f"unknown loaders {unknown}; known: {', '.join(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=list(load_bench.SHAPES), default="1b")
    parser.add_argument("--reps", type=int, default=3, help="loads per loader (median)")
    parser.add_argument("--loaders", default=",".join(CPU_LOADERS), help="CPU scenario")
    parser.add_argument("--gpu-loaders", default=",".join(GPU_LOADERS), help="GPU scenario")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/leanstream/bench")
    parser.add_argument("--run-timeout", type=float, default=300.0)
    parser.add_argument("--record", action="store_true", help="append the tables to RESULTS.md")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cpu_names = _names(args.loaders, CPU_LOADERS, parser)
    gpu_names = _names(args.gpu_loaders, GPU_LOADERS, parser)

    import torch

    args.cache.mkdir(parents=True, exist_ok=True)
    folder = load_bench.write_checkpoint(args.cache / f"llama-{args.shapes}-bf16", args.shapes)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    device_map, cpu_keys = split(args.shapes)
    work = Path(tempfile.mkdtemp(prefix="leanstream-bench-"))
    load_bench.CHILD = CHILD  # load.run_one runs load.CHILD: ours, through its machinery
    load_start = _loadavg()  # 2 cores shared with other work: say how busy

    def cpu_settings(kind: str, base: dict) -> dict:
        s = dict(base, place=dict(device_map=device_map), cpu_keys=cpu_keys)
        if s.pop("skip", False):
            s["skip_modules"] = [*cpu_keys, "lm_head"]
        return s

    runs, failures, interrupted = measure(
        CPU_LOADERS, cpu_names, cpu_settings, folder, "cpu", args.reps, args.run_timeout, work
    )
    cpu_end = _loadavg()

    cuda = torch.cuda.is_available()
    if not cuda:
        skipped = (
            f"GPU scenario: not run, `torch.cuda.is_available()` is False on this machine "
            f'(would be: `device_map="auto"`, `max_memory={{0: '
            f"{gpu_budget(args.shapes, 4) / GIB:.2f} GiB (nf4) / "
            f'{gpu_budget(args.shapes, 8) / GIB:.2f} GiB (int8), "cpu": ...}}`, loaders '
            f"{', '.join(gpu_names)}); no GPU figure exists."
        )
        print(skipped, flush=True)
        gpu_lines = [skipped]
    else:
        why = "interrupted" if interrupted else "no --gpu-loaders"
        gpu_lines = [f"GPU scenario: not run ({why})"]
    if cuda and gpu_names and not interrupted:
        host = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.8)

        def gpu_settings(kind: str, base: dict) -> dict:
            s = dict(base)
            if s.pop("split"):
                budget = {0: gpu_budget(args.shapes, s["bits"]), "cpu": host}
                s["place"] = dict(device_map="auto", max_memory=budget)
            elif kind == "leanstream":
                s["place"] = dict(device="cuda")
            else:
                s["place"] = dict(device_map={"": 0})
            return s

        gpu_runs, gpu_failures, interrupted = measure(
            GPU_LOADERS,
            gpu_names,
            gpu_settings,
            folder,
            "cuda",
            args.reps,
            args.run_timeout,
            work,
        )
        failures += gpu_failures
        gpu_lines = gpu_table(gpu_names, gpu_runs, args.shapes, args.reps)

    busy = f"load average {load_start:.1f} at the start, {cpu_end:.1f} at the end" + (
        "; INTERRUPTED" if interrupted else ""
    )
    lines = [*cpu_table(cpu_names, runs, args.shapes, size, args.reps, busy), "", *gpu_lines]
    load_bench.publish(
        lines,
        failures,
        work,
        args.record,
        "offload.py",
        argv,
        "transformers",
        "accelerate",
        "bitsandbytes",
    )
    return 1 if failures or interrupted or not any(runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
