"""Architecture sweep (issue 26): leanstream vs transformers + bitsandbytes on every model
type of transformers' causal-LM, seq2seq, masked-LM, image-classification and
image-text-to-text registries, at nf4 and int8, on the CPU.

    python benches/sweep.py                              # every case (a long run)
    python benches/sweep.py --types llama,gpt2,mixtral   # those types, in every registry
    python benches/sweep.py --registry causal-lm --json /tmp/sweep.json

Each type is built tiny and random from transformers' default config, shrunk generically
(``tests/sweep.py``: ``tiny_config``), saved as safetensors, then loaded by leanstream and
by transformers + bitsandbytes; the statuses (equal, beyond, refused, crash, differ,
inspect-mismatch, unbuildable) are those of ``tests/sweep.py``. Cases run one at a time in
a worker subprocess that is restarted after a crash, with ``--timeout`` seconds per case
and setting. One line is printed per case as it ends, then a summary: the count of each
status per setting and the refusals as a share of the buildable cases. ``--json`` is
rewritten after every case, so an interrupted sweep leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import sweep  # tests/sweep.py, the sweep's machinery


def summary(results: list[dict[str, object]]) -> list[str]:
    """Lines of the summary: counts per status and setting, refusals among buildable."""
    lines = []
    for setting in sweep.SETTINGS:
        counts = Counter(str(r[setting]["status"]) for r in results)  # type: ignore[index]
        buildable = len(results) - counts["unbuildable"]
        share = 100 * counts["refused"] / buildable if buildable else 0.0
        text = ", ".join(f"{status} {n}" for status, n in counts.most_common())
        lines.append(f"{setting}: {text}; refused {share:.1f}% of {buildable} buildable")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", help="comma-separated model types (default: all)")
    parser.add_argument(
        "--registry", help=f"comma-separated registries of {', '.join(sweep.REGISTRIES)}"
    )
    parser.add_argument("--json", type=Path, help="write the results here (after every case)")
    parser.add_argument("--timeout", type=float, default=sweep.CASE_TIMEOUT)
    parser.add_argument("--root", type=Path, help="where checkpoints are written (default: tmp)")
    args = parser.parse_args(argv)

    registries = args.registry.split(",") if args.registry else None
    types = args.types.split(",") if args.types else None
    chosen = sweep.cases(registries, types)
    root = args.root or Path(tempfile.mkdtemp(prefix="leanstream-sweep-"))
    results: list[dict[str, object]] = []
    start = time.monotonic()
    print(f"{len(chosen)} cases, checkpoints under {root}", flush=True)
    print(f"{'registry':<11} {'type':<28} {'nf4':<16} {'int8':<16} detail", flush=True)
    with sweep.Worker(root, timeout=args.timeout) as worker:
        for case in chosen:
            row: dict[str, object] = asdict(case)
            for setting in sweep.SETTINGS:
                row[setting] = asdict(worker.run(case, setting))
            shutil.rmtree(root / case.registry / case.model_type, ignore_errors=True)
            results.append(row)
            nf4, int8 = row["nf4"], row["int8"]
            assert isinstance(nf4, dict) and isinstance(int8, dict)
            detail = nf4["detail"] or int8["detail"]
            if nf4["detail"] and int8["detail"] and nf4["detail"] != int8["detail"]:
                detail = f"nf4: {nf4['detail']} | int8: {int8['detail']}"
            print(
                f"{case.registry:<11} {case.model_type:<28} {nf4['status']:<16} "
                f"{int8['status']:<16} {detail}",
                flush=True,
            )
            if args.json:
                elapsed = round(time.monotonic() - start, 1)
                args.json.write_text(json.dumps({"seconds": elapsed, "cases": results}, indent=1))
    print(f"\n{len(results)} cases in {time.monotonic() - start:.0f} s")
    for line in summary(results):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
