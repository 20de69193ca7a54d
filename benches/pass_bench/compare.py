"""Build pass_bench with LLVM's constraint elimination ON and OFF, run both alternately.

    python3 benches/pass_bench/compare.py [ROUNDS] [REPS]     # defaults: 10 rounds, 15 reps

Each binary goes to its own target dir under /tmp (RUSTFLAGS replaces the repository's
.cargo/config.toml rustflags). Rounds alternate which binary runs first. Per case it prints
the median over rounds of each run's median GB/s, the best of each run's best, and
OFF/ON - 1 of the medians. First it compares the two binaries' machine code for every
function of quant.rs (objdump, addresses masked): identical code cannot differ in speed.
"""

import os
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
reps = sys.argv[2] if len(sys.argv) > 2 else "15"

binaries = {}
for name, value in (("on", "true"), ("off", "false")):
    target = f"/tmp/pass_bench-{name}"
    env = dict(os.environ, CARGO_TARGET_DIR=target)
    env["RUSTFLAGS"] = f"-C llvm-args=-enable-constraint-elimination={value}"
    start = time.monotonic()
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=HERE, env=env, check=True)
    print(f"build {name}: {time.monotonic() - start:.1f} s (incremental if already built)")
    binaries[name] = f"{target}/release/pass_bench"


def quant_code(binary: str) -> dict[str, list[str]]:
    """Instructions of each `quant::` function, with addresses and offsets masked."""
    dump = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", binary], capture_output=True, text=True
    ).stdout
    functions: dict[str, list[str]] = {}
    name = None
    for line in dump.splitlines():
        if m := re.match(r"^[0-9a-f]+ <(.*)>:$", line):
            name = m.group(1) if "quant::" in m.group(1) else None
            functions.setdefault(name, []) if name else None
        elif name and "\t" in line:
            insn = re.sub(r"#.*", "", line.split("\t", 1)[1])
            functions[name].append(re.sub(r"\b(0x)?[0-9a-f]{4,}\b|\+0x[0-9a-f]+>", "A", insn))
    return functions


try:
    on, off = quant_code(binaries["on"]), quant_code(binaries["off"])
    differ = sorted(f for f in on.keys() | off.keys() if on.get(f) != off.get(f))
    size = sum(map(len, on.values()))
    print(f"quant.rs machine code: {len(on)} functions, {size} instructions;", end=" ")
    print(f"differing with the pass on/off: {differ or 'none'}")
except FileNotFoundError:
    print("objdump not found: machine code not compared")

results = defaultdict(lambda: defaultdict(list))  # (mode, shape, threads) -> name -> [(best, med)]
for r in range(rounds):
    for name in ("on", "off") if r % 2 == 0 else ("off", "on"):
        out = subprocess.run([binaries[name], reps], capture_output=True, text=True, check=True)
        for line in out.stdout.splitlines():
            mode, shape, threads, best, median = line.split("\t")
            results[(mode, shape, threads)][name].append((float(best), float(median)))

print(f"\n{rounds} rounds x {reps} reps; GB/s of bf16 input: median of run medians (best of bests)")
print("| mode | shape | thr | ON | OFF | OFF/ON-1 |")
print("|---|---|---|---|---|---|")
for (mode, shape, threads), by in results.items():
    cell = {}
    for name, runs in by.items():
        cell[name] = (statistics.median(m for _, m in runs), max(b for b, _ in runs))
    change = cell["off"][0] / cell["on"][0] - 1
    print(
        f"| {mode} | {shape} | {threads} | {cell['on'][0]:.2f} ({cell['on'][1]:.2f}) "
        f"| {cell['off'][0]:.2f} ({cell['off'][1]:.2f}) | {change:+.1%} |"
    )
