#!/usr/bin/env bash
# GPU tests and GPU load benchmarks, on a machine lent through the `device` tool
# (Python 3.12 with torch, transformers, safetensors, huggingface_hub, but no
# Rust and no bitsandbytes; device/KINDS.md). Here, first: `make gpu-wheels` (the
# leanstream abi3 wheel, bitsandbytes and transformers, into .whl/, which git ignores);
# then `run` with carry [".whl"] and one step per call, each within its own limit:
#
#   bash benches/gpu.sh tests    # pytest -m gpu; ends within ~4 minutes (timeout_s 300)
#   bash benches/gpu.sh bench    # 8B shapes, warm then cold, checkpoint writing included;
#                                # ends within ~6 minutes (timeout_s 420)
#   bash benches/gpu.sh full 1/2 # the whole pytest, CPU tests too, in two calls (1/2, 2/2:
#   bash benches/gpu.sh full 2/2 # every other test file); each ends within ~4.5 minutes
#
# Nothing stops a step early: every part runs (or is skipped, and says why), its exit
# status is kept, a summary of what ran, what failed and where the logs are comes last,
# and the exit status is 1 if anything failed. Logs and the junit XML go to $OUT.
# GPU_BENCH_SHAPES / GPU_BENCH_DEVICE (8b / cuda) let the bench step be tried on a CPU.
set -uo pipefail # no -e: a failing part must not skip the others or the summary
step=${1:-}
part=${2:-}
if [[ $step != tests && $step != bench && $step != full ]] ||
    [[ $step == full && ! ($part =~ ^([1-9][0-9]*)/([1-9][0-9]*)$ &&
        ${BASH_REMATCH[1]} -le ${BASH_REMATCH[2]}) ]]; then
    echo "usage: bash benches/gpu.sh tests|bench|full K/N" >&2
    exit 2
fi
cd "$(dirname "$0")/.." || exit 2
out=${OUT:-/tmp/out}
mkdir -p "$out"
ran=()
failed=()

# record NAME STATUS [NOTE]: one line of the summary
record() {
    local how
    case $2 in
    0) how=ok ;;
    124) how="FAILED: timed out, interrupted" ;;
    137) how="FAILED: timed out, killed" ;;
    *) how="FAILED: exit status $2" ;;
    esac
    ran+=("$1: $how${3:+ ($3)}")
    [[ $2 == 0 ]] || failed+=("$1")
}

finish() {
    echo
    echo "== benches/gpu.sh $step: $SECONDS s"
    local line
    for line in "${ran[@]}"; do echo "  $line"; done
    echo "  failed: ${failed[*]:-nothing}"
    echo "  files under \$OUT: $(cd "$out" && printf '%s ' *)"
    [[ ${#failed[@]} == 0 ]]
    exit $?
}

# the installed wheel, not python/ (no compiled extension there)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >"$out/install.log" 2>&1
status=$?
record "install .whl" $status install.log
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
record nvidia-smi "${PIPESTATUS[0]}"
python3 -c 'import sys, torch, transformers, bitsandbytes, leanstream
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "bitsandbytes", bitsandbytes.__version__,
      "leanstream", leanstream.__file__)' 2>&1 | tee "$out/versions.txt"
imports=${PIPESTATUS[0]}
record imports "$imports"
if [[ $status != 0 || $imports != 0 ]]; then
    record "$step" 1 "not run: the wheels are not importable"
    finish
fi

# pytest NAME SECONDS ARGS...: pytest ARGS, its log and junit XML under $OUT as NAME.*.
# The machine's own torch and transformers may warn where the pinned ones do not: warnings
# are shown, not errors, there. SIGINT after SECONDS (pytest prints its summary and writes
# the XML), SIGKILL 15 s later. Python installs no SIGINT handler where SIGINT is ignored
# (a background job): pytest is started with one.
pytest() {
    local name=$1 seconds=$2
    shift 2
    timeout -s INT -k 15 "$seconds" python3 -c 'import signal, sys, pytest
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(pytest.main(sys.argv[1:]))' -p no:cacheprovider -q -rs -W default --durations=15 \
        --junitxml="$out/$name.xml" "$@" 2>&1 | tee "$out/$name.log"
    record "pytest $name" "${PIPESTATUS[0]}" "$name.log, $name.xml"
}

if [[ $step == tests ]]; then
    pytest gpu-tests 195 -m gpu tests
    finish
fi
if [[ $step == full ]]; then
    # part K of N: every Nth test file from the Kth, GPU tests and CPU tests alike (conftest
    # hides CUDA from the latter, in the test process and in the ones they start)
    k=${part%/*} n=${part#*/}
    files=()
    i=0
    for file in tests/test_*.py; do
        (((i++ % n) + 1 == k)) && files+=("$file")
    done
    pytest "full-$k-of-$n" 250 "${files[@]}"
    finish
fi

# bench: 330 s for the whole step (install and checkpoint writing included), warm up to
# 210 s, cold the rest. load.py's --deadline stops starting runs and kills the one still
# going at its end; `timeout` is only the net under it (a checkpoint write that hangs).
shapes=${GPU_BENCH_SHAPES:-8b}
load_py=(python3 benches/load.py --shapes "$shapes" --device "${GPU_BENCH_DEVICE:-cuda}"
    --cache /tmp/bench --run-timeout 90)
# NAME END ARGS...: benches/load.py ARGS with a deadline at $SECONDS == END
bench() {
    local name=$1 left=$(($2 - SECONDS))
    shift 2
    if ((left < 30)); then
        record "$name" 1 "not run: $left s left"
        return
    fi
    timeout -s INT -k 10 $((left + 15)) "${load_py[@]}" --deadline "$left" "$@" 2>&1 |
        tee "$out/$name.log"
    record "$name" "${PIPESTATUS[0]}" "$name.log"
}
# the transformers peer right after each leanstream loader: the pairs first, if time is short
bench bench-warm 210 --reps 3 --loaders \
    "leanstream nf4,transformers nf4,leanstream int8,transformers int8,leanstream nf4 mapped"
if [[ -f /tmp/bench/llama-$shapes-bf16/model.safetensors.index.json ]]; then
    bench bench-cold 320 --reps 2 --cold --loaders "leanstream nf4,transformers nf4"
else
    record bench-cold 1 "not run: no checkpoint (see bench-warm.log)"
fi
finish
