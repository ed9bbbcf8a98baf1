#!/usr/bin/env bash
# `make gpu-check` / `make gpu-check-quick`: on a machine with a CUDA GPU and torch preinstalled (where
# nothing else can be installed): build resfast with its CUDA kernels, run the tests that need a GPU,
# a compute-sanitizer memcheck, then the benchmarks on the GPU; the tables are printed last.
#
# Everything lands under $OUT (default gpu-out), written as it goes so that a run cut short keeps
# what it did, and within what a lent GPU machine hands back (8 files, 2 folders deep):
#   $OUT/gpu_check.log                        all output
#   $OUT/results/<gpu>/{optim,bn,train}.csv   rows, written path by path
#   $OUT/results/<gpu>/optim_host.csv         host time per optimizer step
#   $OUT/results/<gpu>/{optim,bn,train}.png   charts (the quick profile deletes them: the CSVs hold it all)
#
# Settings:
#   GPU_CHECK_STEPS   the steps, in order (default "install tests sanitize bench"), from:
#                       install   pip install -e . with the CUDA kernels for sm_90
#                       tests     every test that needs a GPU (pytest -m gpu)
#                       sanitize  compute-sanitizer memcheck over tests/gpu_sanitize.py
#                       bench     benchmarks/run_all.py: every benchmark, full selections
#                       optim bn train   one benchmark, the quick profile's selection
#                       launches  benchmarks/step_launches.py: launches, kernel and wall time per
#                                 optimizer step on ResNet-50's tensors
#   GPU_CHECK_QUICK   1: the quick profile's defaults (below): steps "install tests launches sanitize optim bn
#                     train", each stopped at its time limit so that the whole fits one 8-minute call
#   PYTHON            the interpreter that has torch (default python3)
#   arguments         passed to benchmarks/run_all.py in the bench step, e.g. --bench optim
#
# A step past its time limit gets SIGINT (pytest and the benchmarks then print what they finished),
# then SIGKILL 20 s later. Limits in seconds, full / quick profile:
#   install 300/150   tests 1200/150   sanitize 600/90   bench 3600   optim 600/60   bn 600/70
#   train 900/75   launches 300/60
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-gpu-out}"
PY="${PYTHON:-python3}"
QUICK="${GPU_CHECK_QUICK:-0}"
if [ "$QUICK" = 1 ]; then
    STEPS="${GPU_CHECK_STEPS:-install tests launches sanitize optim bn train}"
    declare -A LIMIT=([install]=150 [tests]=150 [sanitize]=90 [optim]=60 [bn]=70 [train]=75 [launches]=60)
else
    STEPS="${GPU_CHECK_STEPS:-install tests sanitize bench}"
    declare -A LIMIT=([install]=300 [tests]=1200 [sanitize]=600 [bench]=3600 [optim]=600 [bn]=600 [train]=900
        [launches]=300)
fi
LOG="$OUT/gpu_check.log"
RESULTS="$OUT/results"
mkdir -p "$RESULTS"
unset TRITON_INTERPRET # real Triton kernels on the GPU, never the interpreter
export PYTHONUNBUFFERED=1
failed=()
summary=()

# run NAME COMMAND...: at most LIMIT[NAME] seconds (none for unnamed steps); the output goes to the
# terminal and the log; failures are counted and every step's time is kept for the summary.
run() {
    local name=$1 start=$SECONDS rc
    shift
    local limit=(timeout -s INT -k 20 "${LIMIT[$name]:-86400}")
    echo "=== $name: $* ($(date -u '+%Y-%m-%d %H:%M:%S UTC'))" | tee -a "$LOG"
    # tee in a process substitution, not a pipeline: a grandchild that outlives the stopped step
    # (compute-sanitizer's target did once) would hold a pipeline's tee, and the script, forever.
    "${limit[@]}" "$@" > >(tee -a "$LOG") 2>&1
    rc=$?
    local verdict="exit $rc"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 130 ] && verdict="stopped at its ${LIMIT[$name]} s limit (exit $rc)"
    echo "=== $name: $verdict after $((SECONDS - start)) s" | tee -a "$LOG"
    summary+=("$(printf '%-12s %-48s %5d s' "$name" "$verdict" $((SECONDS - start)))")
    [ "$rc" -eq 0 ] || failed+=("$name ($verdict)")
}

# bench NAME ARGS...: one benchmark through run_all.py into $RESULTS.
bench() {
    local name=$1
    shift
    run "$name" "$PY" benchmarks/run_all.py --device cuda --out "$RESULTS" --bench "$name" "$@"
    # A lent machine hands back at most 8 files: the quick profile keeps the CSVs, not the charts.
    [ "$QUICK" = 1 ] && find "$RESULTS" -name '*.png' -delete
}

for step in $STEPS; do
    case $step in
    install | tests | sanitize | bench | optim | bn | train | launches) ;;
    *)
        echo "unknown step '$step' in GPU_CHECK_STEPS; choose from: install tests sanitize bench optim bn train launches" >&2
        exit 2
        ;;
    esac
done

run environment bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,temperature.gpu \
    --format=csv; $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", \
torch.version.cuda, \"triton\", triton.__version__, \"gpu\", torch.cuda.get_device_name())'"

for step in $STEPS; do
    case $step in
    install)
        # --no-deps: torch is there already and nothing can be fetched.
        run install env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" \
            "$PY" -m pip install --no-build-isolation --no-deps -e .
        run backends "$PY" -c "import resfast.backends as b; b.info()"
        ;;
    tests)
        # The tests that need a GPU (marked `gpu` by tests/conftest.py), in parallel where pytest-xdist
        # is installed; CI runs everything else on the CPU. -rfE: every failure's one line, at the end.
        parallel=()
        "$PY" -c "import xdist" 2>/dev/null && parallel=(-n 8)
        "$PY" -c "import pytest_timeout" 2>/dev/null && parallel+=(--timeout 120)
        run tests "$PY" -m pytest -q -rfE --tb=line -p no:cacheprovider -m gpu "${parallel[@]}" tests
        ;;
    sanitize)
        # The workload stops starting cases 30 s before the step's limit and says what it left.
        run sanitize compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
            "$PY" -m tests.gpu_sanitize $((${LIMIT[sanitize]} - 30))
        ;;
    bench) run bench "$PY" benchmarks/run_all.py --device cuda --out "$RESULTS" "$@" ;;
    # The quick profile's selections: the optimizer step on ResNet-50's parameters (no torch.compile
    # rows: each compiles for about a minute), the BN+add+ReLU shapes of the targets, both models'
    # training throughput against eager.
    optim) bench optim --tag r50 --params resnet50 --dtype fp32,bf16 --compile off ;;
    bn)
        bench bn --tag bf16 --shape 256x256x56x56,256x1024x14x14,512x64x32x32 --dtype bf16 \
            --layout channels_last --residual add
        ;;
    train) bench train --compile off ;;
    launches) run launches "$PY" benchmarks/step_launches.py --device cuda ;;
    esac
done

echo "=== gpu_check: ${#failed[@]} step(s) failed${failed[*]:+: ${failed[*]}}" | tee -a "$LOG"
# The tables last: the end of the output is what a remote call shows.
if [[ " $STEPS " =~ \ (bench|optim|bn|train)\  ]]; then
    "$PY" benchmarks/run_all.py --report "$RESULTS" 2>&1 | tee -a "$LOG"
fi
printf '%s\n' "--- steps" "${summary[@]}" | tee -a "$LOG"
[ "${#failed[@]}" -eq 0 ]
