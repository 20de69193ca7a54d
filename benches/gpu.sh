#!/usr/bin/env bash
# GPU tests and GPU load benchmarks, on a machine lent through the `device` tool
# (Python 3.12 with torch, transformers, safetensors, huggingface_hub, but no
# Rust and no bitsandbytes; device/KINDS.md). Here, first: `make gpu-wheels` (the
# leanstream abi3 wheel, bitsandbytes and transformers, into .whl/, which git ignores);
# then `run` with carry [".whl"] and the command `bash benches/gpu.sh`.
#
#   bash benches/gpu.sh            # pytest -m gpu, then 8B shapes warm and cold
#   bash benches/gpu.sh tests      # only the GPU tests
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# the installed wheel, not python/ (no compiled extension there); the machine's own torch and
# transformers may warn where the pinned ones do not: warnings are shown, not errors, there
python3 -m pytest -p no:cacheprovider -m gpu -q -rs -W default tests 2>&1 | tee "$out/gpu-tests.log"
[[ "${1:-all}" == tests ]] && exit 0
bench=(python3 benches/load.py --shapes 8b --device cuda --cache /tmp/bench)
"${bench[@]}" --reps 3 --loaders "leanstream nf4,leanstream nf4 mapped,leanstream int8,transformers nf4,transformers int8" \
    2>&1 | tee "$out/bench-warm.log"
"${bench[@]}" --reps 2 --cold --loaders "leanstream nf4,transformers nf4" 2>&1 | tee "$out/bench-cold.log"
