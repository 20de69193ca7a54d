"""FLUX transformer benchmark: leanstream vs diffusers + bitsandbytes, on the CPU.

    python benches/flux.py                       # FLUX-shaped, 288 M parameters, 549 MiB bf16
    python benches/flux.py --shapes tiny --reps 1    # a smoke test
    python benches/flux.py --loaders "diffusers nf4,diffusers int8"
    python benches/flux.py --reps 3 --record     # append the table to benches/RESULTS.md

Writes (once, cached under ``~/.cache/leanstream/bench``) a diffusers component folder of
a ``FluxTransformer2DModel`` with FLUX.1-dev's architecture (guidance embedding, T5 and
CLIP projections of 4096 and 768, 64 latent channels, rotary axes 16/56/56, 2 single-stream
blocks per double-stream block) at reduced depth and width (``SHAPES``), as
``save_pretrained`` writes it: ``config.json`` and ``diffusion_pytorch_model-*.safetensors``
shards with their index. Values are cut from the seeded pool of ``benches/load.py``
(std 0.02), norm scales 1.

Each loader runs in its own fresh process through ``benches/load.py``'s machinery
(imports before the clock, only the load call timed, ``/proc/<pid>/status`` sampled every
5 ms for the peak RSS). leanstream calls ``leanstream.load(folder, bits=..., device="cpu")``;
diffusers is ``tests/diffusers_models.py``'s ``reference``: ``from_pretrained`` with
``diffusers.BitsAndBytesConfig`` and ``device_map="cpu"``, its GPU check patched
(``cpu_bitsandbytes``: diffusers refuses to quantize without a GPU although bitsandbytes
quantizes on the CPU). Both compute in bf16. After the load each child reports, outside
the timing: the model's bytes (``leanstream.footprint``), a SHA-256 of every tensor of its
``state_dict`` (packed weights, absmax, code books, SCB, ...), and the output of one
forward pass (``forward_inputs`` of the tests). The table says whether leanstream's
tensors and output are identical to diffusers' at the same settings.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import load as load_bench  # benches/load.py: value pool, child runner, record

GIB, MIB = load_bench.GIB, load_bench.MIB
TESTS = Path(__file__).resolve().parent.parent / "tests"  # diffusers_models.py

_FLUX = dict(  # black-forest-labs/FLUX.1-dev, less the depth and width
    patch_size=1,
    in_channels=64,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
SHAPES: dict[str, dict[str, Any]] = {
    # FLUX.1-dev has 19 + 38 blocks of width 3072 (24 heads of 128): 11.9 B parameters
    "288m": dict(
        _FLUX, num_layers=4, num_single_layers=8, attention_head_dim=128, num_attention_heads=8
    ),
    "tiny": dict(
        _FLUX, num_layers=1, num_single_layers=2, attention_head_dim=128, num_attention_heads=2
    ),
}

LOADERS = {
    "leanstream nf4": ("leanstream", dict(bits=4, quant_type="nf4")),
    "leanstream nf4+dq": ("leanstream", dict(bits=4, quant_type="nf4", double_quant=True)),
    "leanstream int8": ("leanstream", dict(bits=8)),
    "diffusers nf4": ("diffusers", dict(bits=4, quant_type="nf4")),
    "diffusers nf4+dq": ("diffusers", dict(bits=4, quant_type="nf4", double_quant=True)),
    "diffusers int8": ("diffusers", dict(bits=8)),
}
DEFAULT_LOADERS = "leanstream nf4,leanstream int8,diffusers nf4,diffusers int8"

CHILD = (
    r"""
import hashlib, json, sys, time
args = json.loads(sys.argv[1])
import torch, transformers, accelerate, diffusers, bitsandbytes  # before the clock starts
import leanstream
"""
    + f"sys.path.insert(0, {str(TESTS)!r})\n"
    + r"""
from diffusers_models import forward, reference
kind, s, folder = args["kind"], dict(args["settings"]), args["folder"]
dtype = torch.bfloat16
with open(folder + "/config.json") as f:
    getattr(diffusers, json.load(f)["_class_name"])  # diffusers imports its model code lazily
print("ready", flush=True)
sys.stdin.readline()
start = time.perf_counter()
if kind == "leanstream":
    if s["bits"] == 4:
        s["compute_dtype"] = dtype  # as reference(): compute in the model's dtype
    model = leanstream.load(folder, device="cpu", progress=False, **s)
else:
    model = reference(folder, dtype=dtype, **s)
seconds = time.perf_counter() - start
print("loaded", flush=True)
sys.stdin.readline()
digests = {}
for name, tensor in model.state_dict().items():
    data = tensor.detach().as_subclass(torch.Tensor).contiguous().reshape(-1).view(torch.uint8)
    digest = hashlib.sha256(data.numpy()).hexdigest()
    digests[name] = [str(tensor.dtype), list(tensor.shape), digest]
torch.save(forward(model, seed=0).float(), args["logits"])
result = {"seconds": seconds, "class": type(model).__name__,
          "footprint": leanstream.footprint(model).total_bytes, "digests": digests}
print("result", json.dumps(result), flush=True)
"""
)


def _norm_scales(model: Any) -> set[str]:
    """Names of the scale parameters of ``model``'s norms (LayerNorm, RMSNorm, ...)."""
    return {
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if type(module).__name__.endswith("Norm") and module._parameters.get("weight") is not None
    }


def build_empty(shape: str) -> Any:
    """The ``SHAPES[shape]`` FluxTransformer2DModel on the meta device, in bf16."""
    import torch
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(SHAPES[shape])
    # nn.Module's own cast: ModelMixin.to logs a warning about float32 modules (none here)
    return torch.nn.Module.to(model, torch.bfloat16)


def write_checkpoint(folder: Path, shape: str, shard_size: str = "200MB") -> Path:
    """Random bf16 weights for ``SHAPES[shape]``, written by diffusers' ``save_pretrained``
    in shards of at most ``shard_size``.

    The values are cut from ``benches/load.py``'s seeded pool (std 0.02), each parameter
    at an offset of its own; norm scales are 1. Written into a temporary folder, renamed
    into place when complete.
    """
    if (folder / "config.json").exists():
        return folder
    import time

    import torch

    start = time.monotonic()
    model = build_empty(shape)
    if len(model.state_dict()) != len(list(model.parameters())):
        raise SystemExit("the model has persistent buffers: fill them too")
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    pool = torch.randn(load_bench.POOL_VALUES, generator=generator).mul_(0.02)
    pool = pool.to(torch.bfloat16)
    norms = _norm_scales(model)
    with torch.no_grad():
        for i, (name, param) in enumerate(model.named_parameters()):
            if name in norms:
                param.fill_(1.0)
            else:
                offset = (i * 7_919_993) % load_bench.POOL_VALUES
                load_bench._fill(param.view(-1), pool, offset)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        model.save_pretrained(tmp, max_shard_size=shard_size)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    print(f"wrote {folder}: {size / MIB:.0f} MiB, {time.monotonic() - start:.1f} s", flush=True)
    return folder


def _peer(name: str) -> str:
    """The diffusers loader with the settings of ``name`` (itself for a diffusers one)."""
    return name.replace("leanstream", "diffusers", 1)


def compare_state(ours: dict, theirs: dict) -> str:
    """'identical', or what differs between two children's state_dict digests."""
    if ours.keys() != theirs.keys():
        only_ours, only_theirs = (
            sorted(ours.keys() - theirs.keys()),
            sorted(theirs.keys() - ours.keys()),
        )
        return (
            f"**keys differ**: {len(only_ours)} only in leanstream {only_ours[:2]}, "
            f"{len(only_theirs)} only in diffusers {only_theirs[:2]}"
        )
    differ = sorted(k for k in ours if ours[k] != theirs[k])
    if differ:
        first = differ[0]
        return (
            f"**{len(differ)} of {len(ours)} tensors differ** (first `{first}`: "
            f"{ours[first][:2]} vs {theirs[first][:2]})"
        )
    return f"identical ({len(ours)} tensors)"


def compare_output(ours: Path, theirs: Path) -> str:
    import torch

    a, b = torch.load(ours), torch.load(theirs)
    if a.shape == b.shape and torch.equal(a, b):
        return "equal"
    if a.shape != b.shape:
        return f"**shapes differ** {tuple(a.shape)} vs {tuple(b.shape)}"
    return f"**differs**, rel. err {((a - b).norm() / b.norm()).item():.1e}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=list(SHAPES), default="288m")
    parser.add_argument("--reps", type=int, default=2, help="loads per loader (median)")
    parser.add_argument("--loaders", default=DEFAULT_LOADERS, help="comma-separated names")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/leanstream/bench")
    parser.add_argument("--run-timeout", type=float, default=300.0)
    parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    names = [n.strip() for n in args.loaders.split(",")]
    if unknown := [n for n in names if n not in LOADERS]:
        parser.error(f"unknown loaders {unknown}; known: {', '.join(LOADERS)}")

    folder = write_checkpoint(args.cache / f"flux-{args.shapes}-bf16", args.shapes)
    shards = sorted(folder.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    params = sum(p.numel() for p in build_empty(args.shapes).parameters())
    print(f"{folder}: {params / 1e6:.1f} M parameters, {size / MIB:.0f} MiB", flush=True)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    failures: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="leanstream-bench-"))
    load_bench.CHILD = CHILD  # load.run_one runs load.CHILD: ours, through its machinery
    interrupted = False
    load_start = os.getloadavg()[0]  # 2 cores shared with other work: say how busy
    try:
        for rep in range(args.reps):
            for name in names:  # interleaved, so drift hits every loader alike
                kind, settings = LOADERS[name]
                path = work / f"{name.replace(' ', '_')}-{rep}.pt"
                result = load_bench.try_run(
                    rep, name, failures, kind, settings, folder, "cpu", path, args.run_timeout
                )
                if result is None:
                    continue
                result["output"] = path
                runs[name].append(result)
                grow = result["peak_rss"] - result["base_rss"]
                print(
                    f"rep {rep} {name}: {result['seconds']:.2f} s, peak RSS +{grow / GIB:.2f} "
                    f"GiB, model {result['footprint'] / MIB:.1f} MiB",
                    flush=True,
                )
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: the table has the runs measured so far", flush=True)

    ok = {n: runs[n] for n in names if runs[n]}
    median = {n: statistics.median(r["seconds"] for r in rs) for n, rs in ok.items()}
    fields = ", ".join(f"{k}={v}" for k, v in SHAPES[args.shapes].items())
    lines = [
        f"checkpoint: FluxTransformer2DModel, `{args.shapes}` shapes ({fields}), "
        f"{params / 1e6:.1f} M parameters, bf16, {size / MIB:.0f} MiB in {len(shards)} "
        f"shard{'s' if len(shards) > 1 else ''}; CPU, warm page cache; "
        f"{args.reps} load(s) per loader (median, min-max); "
        f"load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
        + ("; INTERRUPTED" if interrupted else ""),
        "",
        "| loader | load s | min-max | vs diffusers | peak RSS growth | model MiB | "
        "tensors vs diffusers | output vs diffusers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        if name not in ok:
            lines.append(f"| {name} | failed |" + " |" * 6)
            continue
        rs, peer = ok[name], _peer(name)
        ratio = state = output = ""
        if name != peer and peer in ok:
            best = min(x["seconds"] for x in ok[peer]) / min(x["seconds"] for x in rs)
            ratio = f"{median[peer] / median[name]:.1f}x faster (fastest runs: {best:.1f}x)"
            state = compare_state(rs[-1]["digests"], ok[peer][-1]["digests"])
            output = compare_output(rs[-1]["output"], ok[peer][-1]["output"])
        elif name == peer:
            ratio = state = output = "ref"
        grow = max(r["peak_rss"] - r["base_rss"] for r in rs)
        lines.append(
            f"| {name} | {median[name]:.2f} | {min(x['seconds'] for x in rs):.2f}-"
            f"{max(x['seconds'] for x in rs):.2f} | {ratio} | {grow / GIB:.2f} GiB | "
            f"{rs[-1]['footprint'] / MIB:.1f} | {state} | {output} |"
        )
    load_bench.publish(
        lines, failures, work, args.record, "flux.py", argv, "diffusers", "bitsandbytes"
    )
    return 1 if failures or interrupted or not ok else 0


if __name__ == "__main__":
    sys.exit(main())
