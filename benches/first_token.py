"""First forward after a CPU load: bitsandbytes' AVX512-BF16 layout made at load, or not.

    python benches/first_token.py --shapes 1b --reps 3 [--record]

On a CPU where bitsandbytes (0.50) detects AVX512-BF16, a 4-bit layer's first eval
forward converts its weight to the fused kernel's layout. leanstream makes that layout
while loading (``cpu_kernel="auto"``, :mod:`leanstream.cpu_layout`). Three ways to load
the same Llama-shaped NF4 model on the CPU, each run in its own fresh process (imports
and the model's transformers modules loaded before the clock starts), warm page cache:

* ``at load``: leanstream's default, the layout made while streaming;
* ``at first forward``: the layout left to bitsandbytes' first forward, as before
  (leanstream's check of bitsandbytes' conversion made to fail, so the load keeps the
  plain layout and bitsandbytes converts);
* ``plain``: ``cpu_kernel="plain"``, bitsandbytes' plain kernel, no conversion at all;
* with ``--before DIR``: another build's default load (``DIR`` its ``python/`` folder, built
  in place), e.g. the commit before this work, where bitsandbytes converts at first forward.

Each run times the load call, the first forward of a 16-token prompt, the second, and
greedy generation of 8 new tokens (after those two). The checkpoint is benches/load.py's
(cached under ~/.cache/leanstream/bench). Targets of issue 23: first forward <= 1.5 x the
second + 0.1 s, load no more than 5 % slower than ``at first forward``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import load as bench

MODES = {
    "at load": "auto",
    "at first forward": "bitsandbytes",
    "plain kernel": "plain",
}

CHILD = r"""
import json, sys, time
import torch, transformers, bitsandbytes
import transformers.models.llama.modeling_llama
import leanstream, leanstream.loader  # imports, not load time

folder, mode, out = sys.argv[1], sys.argv[2], sys.argv[3]
kwargs = {}
if mode == "bitsandbytes":  # leanstream does not convert: bitsandbytes' forward does
    from leanstream import cpu_layout

    cpu_layout.agrees = lambda: False
elif mode == "plain":
    kwargs["cpu_kernel"] = "plain"
t0 = time.perf_counter()
model = leanstream.load(folder, bits=4, quant_type="nf4", device="cpu", progress=False, **kwargs)
t1 = time.perf_counter()
ids = torch.arange(1, 17).reshape(1, 16)
times = []
with torch.no_grad():
    for _ in range(2):
        start = time.perf_counter()
        logits = model(input_ids=ids).logits
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    generate = time.perf_counter() - start
layers = [m for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
packed = sum(bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in layers)
json.dump(dict(load=t1 - t0, first=times[0], second=times[1], generate=generate,
               packed=f"{packed}/{len(layers)}", threads=torch.get_num_threads()), open(out, "w"))
"""


def run(folder: Path, mode: str, work: Path, python: Path | None = None) -> dict:
    out = work / "result.json"
    script = work / "child.py"
    script.write_text(CHILD)
    env_path = str(python or Path(__file__).parents[1] / "python")
    proc = subprocess.run(
        [sys.executable, str(script), str(folder), mode, str(out)],
        env={**__import__("os").environ, "PYTHONPATH": env_path},
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", choices=list(bench.SHAPES), default="1b")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="append to benches/RESULTS.md")
    parser.add_argument(
        "--before",
        type=Path,
        metavar="DIR",
        help="the python/ folder of another leanstream build (e.g. a checkout of the commit "
        "before this work, built in place): its default load is one more row",
    )
    args = parser.parse_args(argv)
    modes = dict(MODES)
    if args.before is not None:
        modes[f"before ({args.before})"] = "before"
    import bitsandbytes.functional as F

    folder = bench.write_checkpoint(
        Path.home() / ".cache" / "leanstream" / "bench" / args.shapes, args.shapes
    )
    print(f"bitsandbytes detects AVX512-BF16: {bool(F.has_avx512bf16())}", flush=True)
    results: dict[str, list[dict]] = {name: [] for name in modes}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run(folder, "auto", work)  # warm the page cache and the imports' files
        for rep in range(args.reps):
            for name, mode in modes.items():  # interleaved: drift hits every mode alike
                python = args.before if mode == "before" else None
                result = run(folder, "auto" if mode == "before" else mode, work, python)
                results[name].append(result)
                print(f"rep {rep} {name}: {json.dumps(result)}", flush=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    base = med("at first forward", "load")
    lines = [
        f"Llama-{args.shapes} shapes, NF4, CPU, warm page cache; median of {args.reps} "
        "(each run a fresh process)",
        "",
        "| layout made | load | first forward | second forward | first <= 1.5 x second "
        "+ 0.1 s | 8 new tokens | load vs at first forward | layers in the fused layout |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in modes:
        load, first, second = med(name, "load"), med(name, "first"), med(name, "second")
        ok = "yes" if first <= 1.5 * second + 0.1 else "no"
        lines.append(
            f"| {name} | {load:.2f} s | {first:.3f} s | {second:.3f} s | {ok} | "
            f"{med(name, 'generate'):.2f} s | {load / base:.2f}x | "
            f"{results[name][-1]['packed']} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.record:
        bench.record_run("first_token.py", argv, table, "transformers", "bitsandbytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
