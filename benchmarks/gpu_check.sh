#!/usr/bin/env bash
# `make gpu-check`: on a machine with a CUDA GPU and torch preinstalled (where nothing else can be
# installed): build resfast with its CUDA kernels, run the tests that need a GPU, then
# every benchmark on the GPU; the tables are printed last.
#
# Everything lands under $OUT (default gpu-out), written as it goes so that a run cut short keeps
# what it did, and within what a lent GPU machine hands back (8 files, 2 folders deep):
#   $OUT/gpu_check.log                        all output
#   $OUT/results/<gpu>/{optim,bn,train}.csv   rows, written path by path
#   $OUT/results/<gpu>/optim_host.csv         host time per optimizer step
#   $OUT/results/<gpu>/{optim,bn,train}.png   charts
#
# Settings:
#   GPU_CHECK_STEPS   the steps, in order (default "install tests bench")
#   PYTHON            the interpreter that has torch (default python3)
#   arguments         passed to benchmarks/run_all.py, e.g. --bench optim
#
# A lent machine runs one command for at most 10 minutes and keeps the build only while warm: split
# the work into calls and tag the parts (docs/benchmarks.md, "On a lent GPU machine"), e.g.
#   GPU_CHECK_STEPS="install tests" bash benchmarks/gpu_check.sh
#   GPU_CHECK_STEPS="bench" bash benchmarks/gpu_check.sh --bench optim --tag r50 --params resnet50,flat
#   GPU_CHECK_STEPS="bench" bash benchmarks/gpu_check.sh --bench bn --tag bf16 --dtype bf16
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-gpu-out}"
PY="${PYTHON:-python3}"
STEPS="${GPU_CHECK_STEPS:-install tests bench}"
LOG="$OUT/gpu_check.log"
mkdir -p "$OUT/results"
unset TRITON_INTERPRET # real Triton kernels on the GPU, never the interpreter
export PYTHONUNBUFFERED=1
failed=()

# run NAME COMMAND...: the command's output goes to the terminal and the log; failures are counted.
run() {
    local name=$1 start=$SECONDS rc
    shift
    echo "=== $name: $* ($(date -u '+%Y-%m-%d %H:%M:%S UTC'))" | tee -a "$LOG"
    "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
}

for step in $STEPS; do
    case $step in
    install | tests | bench) ;;
    *)
        echo "unknown step '$step' in GPU_CHECK_STEPS; choose from: install tests bench" >&2
        exit 2
        ;;
    esac
done

run environment bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; \
    $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
\"triton\", triton.__version__, \"gpu\", torch.cuda.get_device_name())'"

for step in $STEPS; do
    case $step in
    install)
        # --no-deps: torch is there already and nothing can be fetched.
        run install env TORCH_CUDA_ARCH_LIST=9.0 "$PY" -m pip install --no-build-isolation --no-deps -e .
        run backends "$PY" -c "import resfast.backends as b; b.info()"
        ;;
    tests)
        # The tests that need a GPU (marked `gpu` by tests/conftest.py), in parallel where pytest-xdist
        # is installed; CI runs everything else on the CPU.
        parallel=()
        "$PY" -c "import xdist" 2>/dev/null && parallel=(-n 8)
        "$PY" -c "import pytest_timeout" 2>/dev/null && parallel+=(--timeout 300)
        run tests "$PY" -m pytest -q -p no:cacheprovider -m gpu "${parallel[@]}" tests
        ;;
    bench) run bench "$PY" benchmarks/run_all.py --device cuda --out "$OUT/results" "$@" ;;
    esac
done

echo "=== gpu_check: ${#failed[@]} step(s) failed${failed[*]:+: ${failed[*]}}" | tee -a "$LOG"
# The tables last: the end of the output is what a remote call shows.
if [[ " $STEPS " == *" bench "* ]]; then
    "$PY" benchmarks/run_all.py --report "$OUT/results" 2>&1 | tee -a "$LOG"
fi
[ "${#failed[@]}" -eq 0 ]
