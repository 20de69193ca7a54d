"""CPU quantization kernels: leanstream's Rust quantizer vs bitsandbytes, GB/s of bf16 input.

    python benches/quantize.py                      # nf4 + int8, 1 thread and all cores
    python benches/quantize.py --kernels nf4,fp4,int8 --reps 7 --record

Weights are random bf16 matrices with Llama-3.2-1B's shapes. Each thread count runs in
its **own fresh process** (``torch.set_num_threads(n)`` for bitsandbytes, ``threads=n``
for leanstream), which times both implementations on every matrix, interleaved, best of
``--reps`` after a warm-up. Output allocation is included on both sides; every pair of
results is checked to be bit-identical before it is timed. Prints a markdown table;
``--record`` appends it to benches/RESULTS.md with date, machine, versions and command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {  # meta-llama/Llama-3.2-1B
    "2048x2048": (2048, 2048),  # q_proj, o_proj
    "512x2048": (512, 2048),  # k_proj, v_proj
    "8192x2048": (8192, 2048),  # gate_proj, up_proj
    "2048x8192": (2048, 8192),  # down_proj
    "128256x2048": (128256, 2048),  # embed_tokens / lm_head
}
KERNELS = {
    "nf4": "4-bit NF4, blocksize 64",
    "fp4": "4-bit FP4, blocksize 64",
    "int8": "LLM.int8 row-wise (incl. the cast to float16)",
}

CHILD = r"""
import json, sys, time
args = json.loads(sys.argv[1])
import torch
torch.set_num_threads(args["threads"])
import bitsandbytes.functional as F
from leanstream import _core

def ours_4bit(w, quant_type):
    n = w.numel()
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.empty(-(n // -64), dtype=torch.float32)
    _core.quantize_4bit(w.reshape(-1).view(torch.uint8).numpy(), "BF16", packed.numpy(),
                        absmax.numpy(), quant_type=quant_type, blocksize=64,
                        threads=args["threads"])
    return packed, absmax

def bnb_4bit(w, quant_type):
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    return packed, state.absmax

def ours_int8(w):
    cb = torch.empty(w.shape, dtype=torch.int8)
    scb = torch.empty(w.shape[0], dtype=torch.float32)
    _core.quantize_int8(w.reshape(-1).view(torch.uint8).numpy(), "BF16", w.shape[1], cb.numpy(),
                        scb.numpy(), threads=args["threads"])
    return cb, scb

def bnb_int8(w):
    cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
    return cb, scb

def best(fn, w, reps):
    fn(w)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(w)
        times.append(time.perf_counter() - start)
    return min(times)

out = {}
generator = torch.Generator().manual_seed(0)
for shape_name, shape in args["shapes"].items():
    w = torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
    for kernel in args["kernels"]:
        if kernel == "int8":
            ours, ref = ours_int8, bnb_int8
        else:
            ours = lambda w, k=kernel: ours_4bit(w, k)
            ref = lambda w, k=kernel: bnb_4bit(w, k)
        a, b = ours(w), ref(w)
        same = all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b))
        if not same:
            raise SystemExit(f"{kernel} {shape_name}: leanstream and bitsandbytes differ")
        del a, b
        reps = args["reps"]
        # bitsandbytes is slow on the embedding matrix: fewer repetitions there
        ref_reps = reps if w.numel() < 50_000_000 else max(1, reps // 3)
        out[f"{kernel} {shape_name}"] = dict(
            ours=w.nbytes / best(ours, w, reps) / 1e9,
            bnb=w.nbytes / best(ref, w, ref_reps) / 1e9,
        )
    del w
print(json.dumps(out))
"""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_child(threads: int, shapes: dict, kernels: list[str], reps: int) -> dict:
    args = dict(threads=threads, shapes=shapes, kernels=kernels, reps=reps)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default="nf4,int8", help=f"comma-separated: {list(KERNELS)}")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="thread counts to run")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--record", action="store_true", help="append the table to RESULTS.md")
    args = parser.parse_args(argv)

    kernels = [k.strip() for k in args.kernels.split(",")]
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        parser.error(f"unknown kernels {unknown}; choose from {list(KERNELS)}")
    shapes = {name.strip(): SHAPES[name.strip()] for name in args.shapes.split(",")}
    thread_counts = sorted({int(t) for t in args.threads.split(",")})
    results = {}
    for threads in thread_counts:
        print(f"{threads} thread(s)...", file=sys.stderr)
        results[threads] = run_child(threads, shapes, kernels, args.reps)

    header = "| kernel | matrix | " + " | ".join(
        f"bnb {t}T GB/s | leanstream {t}T GB/s | speed-up {t}T" for t in thread_counts
    )
    lines = [
        f"GB/s of bf16 input, best of {args.reps}; "
        + "; ".join(f"{k}: {KERNELS[k]}" for k in kernels),
        "",
        header + " |",
        "|---|---|" + "---|---|---|" * len(thread_counts),
    ]
    for kernel in kernels:
        for shape in shapes:
            row = f"| {kernel} | {shape} |"
            for threads in thread_counts:
                r = results[threads][f"{kernel} {shape}"]
                row += f" {r['bnb']:.3f} | {r['ours']:.2f} | {r['ours'] / r['bnb']:.0f}x |"
            lines.append(row)
    table = "\n".join(lines)
    print(table)
    if args.record:
        import bitsandbytes
        import torch

        command = " ".join(argv if argv is not None else sys.argv[1:])
        section = (
            f"\n## {time.strftime('%Y-%m-%d')} — `python benches/quantize.py {command}`\n\n"
            f"Machine: {cpu_model()}, {os.cpu_count()} cores (`nproc`), {platform.machine()}; "
            f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, "
            f"Python {platform.python_version()}\n\n"
        )
        with open(Path(__file__).with_name("RESULTS.md"), "a") as f:
            f.write(section + table + "\n")


if __name__ == "__main__":
    main()
