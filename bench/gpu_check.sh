#!/usr/bin/env bash
# The one script for a lent GPU machine: offline CUDA build, the full test suite on the GPU,
# compute-sanitizer, then the full benchmark report (python -m pykern.bench). Nothing is installed
# from a network.
#
#   bash bench/gpu_check.sh [OUTDIR]                 OUTDIR: default $OUT, else ./gpu_check_out
#   STEPS="info build test" bash bench/gpu_check.sh  a subset, in this order:
#                                                    info build test sanitizer bench
#   BENCH_ARGS="--quick" ...                         extra arguments for python -m pykern.bench
#   TEST_ARGS="-m gpu" TEST_WORKERS=8 ...           extra pytest arguments (split on spaces);
#   TEST_K="triton-gpu and bf16" ...                 a -k expression; xdist workers
#   T_BUILD, T_TEST, T_SANITIZER, T_BENCH            per-step time limits in seconds
#
# The full GPU report in one device call (10 minutes at most, the build included):
#   STEPS="info build bench" bash bench/gpu_check.sh "$OUT"
# The report's own time target is 5.5 minutes, 1.25x that at most (python -m pykern.bench
# compiles the cases' kernels in worker processes first, then shrinks each case's timing to fit,
# never below 20 repeats); T_BENCH (default 450 s) stops it regardless.
#   RACECHECK_FILES="tests/test_norm.py"             racecheck only these (default: every file)
#   SANITIZER_K="cuda and grads"                     the tests sanitized (-k; default: cuda)
#
# Each step logs to OUTDIR/logs/<step>.log and adds one line to OUTDIR/summary.txt:
# "PASS", "FAIL (exit N)" or "NOT RUN: why". A failing step does not stop the next; the exit
# status is 1 if any step failed. A sanitizer that is missing or refuses the device is "NOT RUN",
# never a pass. summary.txt ends with a RESULT line: without one, the script was killed.
#
# The device tool brings back at most 8 files, at most 2 folders down, so at the end every log
# goes into OUTDIR/all_logs.tar.gz and the top level keeps only: summary.txt, build_tail.log,
# pytest.log, junit.xml, sanitizer.log, report.json, report.md, all_logs.tar.gz. The GPU image has
# no matplotlib: draw the charts afterwards with `python -m pykern.bench charts DIR`.
# Siblings: pykern/bench/ (the benchmarks), bench/README.md (how to read them).

set -u  # no -e: a failing step is recorded and the next one runs

OUTDIR=${1:-${OUT:-./gpu_check_out}}  # relative to where the script is started
mkdir -p "$OUTDIR/logs" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
cd "$(dirname "$0")/.." || exit 2  # the repository root: every step runs from there
LOGS=$OUTDIR/logs
SUMMARY=$OUTDIR/summary.txt
STEPS=${STEPS:-info build test sanitizer bench}
PY=${PYTHON:-python3}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PYTHONUNBUFFERED=1 PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1
FAILED=0
NOT_RUN=""
MAX_LOG_BYTES=$((8 << 20))  # top-level copies of long logs keep their last 8 MiB

say() { echo "$*" | tee -a "$SUMMARY"; }

# A step function may explain itself: `why TEXT` (with return 200: not run) or `note TEXT`
# (an extra summary line under the step's own).
why() { echo "$*" >"$LOGS/$CURRENT.why"; }
note() { echo "$*" >>"$LOGS/$CURRENT.note"; }

run_step() {  # run_step NAME: runs the function step_NAME, output to logs/NAME.log
    local name=$1 start=$SECONDS rc status
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    CURRENT=$name
    echo "[$(date -u +%T)] $name ..."
    (step_"$name") >"$LOGS/$name.log" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then
        status=PASS
    elif [ "$rc" -eq 200 ]; then
        status="NOT RUN: $(cat "$LOGS/$name.why" 2>/dev/null || echo 'no reason given')"
        NOT_RUN="$NOT_RUN $name"
    elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        status="FAIL (timed out, exit $rc)"
        FAILED=1
    else
        status="FAIL (exit $rc)"
        FAILED=1
    fi
    say "$(printf '%-10s %s  [%ss, logs/%s.log]' "$name:" "$status" $((SECONDS - start)) "$name")"
    case $status in FAIL*) tail -n 25 "$LOGS/$name.log" | sed "s/^/  $name| /" ;; esac
    if [ -f "$LOGS/$name.note" ]; then
        sed 's/^/           /' "$LOGS/$name.note" | tee -a "$SUMMARY"
    fi
}

step_info() {
    echo "date:   $(date -u +%FT%TZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    git status --short 2>/dev/null | head -n 40
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader |
        sed 's/^/gpu: /' >"$LOGS/info.note"
    "$CUDA_HOME/bin/nvcc" --version || command -v nvcc
    "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "CUDA", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as err:
    print("triton: not importable:", err)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"L2 {p.L2_cache_size >> 20} MiB, {p.total_memory >> 30} GiB")
else:
    raise SystemExit("torch sees no CUDA GPU")
EOF
}

step_build() {
    export PYKERN_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16}
    # The device image's $CXX (/opt/gcc/bin/g++) finds no libstdc++.so and links libstdc++.a
    # into pykern._C; that second C++ runtime crashed (SIGSEGV) formatting the numbers of a C++
    # error message (seen 2026-11-25). Build and link with a g++ that uses the shared
    # libstdc++, as torch does. CXX and LDSHARED only: Triton compiles its C helpers with $CC.
    local cxx
    for cxx in "${CXX:-g++}" g++ /usr/bin/g++; do
        case "$("$cxx" -print-file-name=libstdc++.so 2>/dev/null)" in
            /*) export CXX=$cxx LDSHARED="$cxx -shared"; break ;;
        esac
    done
    echo "C++ compiler: ${CXX:-default}"
    if ! timeout "${T_BUILD:-1500}" "$PY" -m pip install -v --no-build-isolation --no-deps \
        --no-index -e .; then
        echo "== pip's editable build failed; falling back to setup.py build_ext --inplace"
        note "pip -e failed; built with setup.py build_ext --inplace instead"
        timeout "${T_BUILD:-1500}" "$PY" setup.py build_ext --inplace || return $?
    fi
    # What the tests and benchmarks will import, and proof the CUDA kernels are in it.
    "$PY" -m pykern info || return $?
    "$PY" -c "import pykern; assert pykern.has_cuda(), 'pykern was built without CUDA kernels'"
    # A C++ argument check must reach Python as a ValueError, not crash the process.
    "$PY" -c "
import torch, pykern._ext as e
try:
    e._C.permute_copy_cpu(torch.zeros(2, 3), [0])
except ValueError as err:
    print('C++ errors reach Python:', err)
else:
    raise SystemExit('a bad perm was not refused')"
}

step_test() {
    # pytest-xdist (on the device image) spreads the suite over TEST_WORKERS processes sharing
    # the GPU; pytest-timeout turns a hung test into a failure instead of a killed step.
    local extra=()
    if "$PY" -c "import xdist" 2>/dev/null; then extra+=(-n "${TEST_WORKERS:-8}"); fi
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then extra+=(--timeout 300); fi
    TRITON_INTERPRET=0 timeout "${T_TEST:-1800}" "$PY" -m pytest tests -q -ra "${extra[@]}" \
        ${TEST_ARGS:-} ${TEST_K:+-k "$TEST_K"} --junitxml="$OUTDIR/junit.xml"
    local rc=$?
    tail -n 1 "$LOGS/test.log" >"$LOGS/test.note"  # pytest's "N passed, M skipped" line
    return $rc
}

find_sanitizer() {
    local p
    for p in "$(command -v compute-sanitizer)" "$CUDA_HOME/bin/compute-sanitizer" \
        "$CUDA_HOME/compute-sanitizer/compute-sanitizer"; do
        if [ -n "$p" ] && [ -x "$p" ]; then echo "$p"; return 0; fi
    done
    return 1
}

# sanitize TOOL LABEL PYTEST_ARGS...: one compute-sanitizer run; adds its line to the note.
# Returns 0 (clean), 5 (no test ran) or the failure's exit status.
sanitize() {
    local tool=$1 label=$2 rc errors
    shift 2
    echo "== $tool: pytest $*"
    timeout "${T_SANITIZER:-1200}" "$CS" --tool "$tool" --error-exitcode 1 \
        "$PY" -m pytest "$@" -q -m gpu -k "${SANITIZER_K:-cuda}" >"$LOGS/sanitizer_$label.log" 2>&1
    rc=$?
    cat "$LOGS/sanitizer_$label.log"
    # Tests that all skipped (no GPU, no CUDA build) checked nothing: not a clean bill.
    if [ "$rc" -eq 0 ] && ! grep -qE '[0-9]+ passed' "$LOGS/sanitizer_$label.log"; then rc=5; fi
    errors=$(grep -m1 'ERROR SUMMARY' "$LOGS/sanitizer_$label.log")
    case $rc in
        0) note "$tool $label: clean (${errors:-no error summary})" ;;
        5) note "$tool $label: no test ran under -m gpu -k cuda (nothing checked)" ;;
        *) note "$tool $label: FAIL exit $rc (${errors:-see logs/sanitizer_$label.log})" ;;
    esac
    return $rc
}

step_sanitizer() {
    if ! CS=$(find_sanitizer); then
        why "compute-sanitizer not found (PATH, $CUDA_HOME/bin)"
        return 200
    fi
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1 TRITON_INTERPRET=0  # no pool hiding overruns
    echo "== probe: $CS on one torch allocation"
    if ! timeout 300 "$CS" --tool memcheck --error-exitcode 1 "$PY" -c \
        "import torch; x = torch.ones(4096, device='cuda'); print(float(x.sum()))" \
        >"$LOGS/sanitizer_probe.log" 2>&1; then
        cat "$LOGS/sanitizer_probe.log"
        why "compute-sanitizer failed on one CUDA allocation: $(grep -m1 -iE 'not supported|error' \
            "$LOGS/sanitizer_probe.log" || tail -n 1 "$LOGS/sanitizer_probe.log")"
        return 200
    fi
    local rc failed=0 checked=0 file
    sanitize memcheck all tests
    rc=$?
    case $rc in 0) checked=1 ;; 5) ;; *) failed=1 ;; esac
    for file in ${RACECHECK_FILES:-tests/test_*.py}; do
        sanitize racecheck "$(basename "$file" .py)" "$file"
        rc=$?
        case $rc in 0) checked=1 ;; 5) ;; *) failed=1 ;; esac
    done
    [ "$failed" -eq 0 ] || return 1
    [ "$checked" -eq 1 ] || { why "no GPU test ran under -m gpu -k cuda"; return 200; }
}

step_bench() {
    # The progress bar goes to stderr, one line per case here (not a terminal); the log keeps it.
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
    TRITON_INTERPRET=0 timeout "${T_BENCH:-450}" "$PY" -m pykern.bench --device cuda \
        --out "$OUTDIR/bench" ${BENCH_ARGS:-}
    local rc=$?
    cp "$OUTDIR/bench/report.json" "$OUTDIR/bench/report.md" "$OUTDIR/" || return 1
    grep -m1 'records,' "$LOGS/bench.log" >"$LOGS/bench.note"
    return $rc
}

collect() {  # the top-level files, and everything else in one tarball
    [ -f "$LOGS/build.log" ] && tail -n 100 "$LOGS/build.log" >"$OUTDIR/build_tail.log"
    [ -f "$LOGS/test.log" ] && tail -c "$MAX_LOG_BYTES" "$LOGS/test.log" >"$OUTDIR/pytest.log"
    if [ -f "$LOGS/sanitizer.log" ]; then
        tail -c "$MAX_LOG_BYTES" "$LOGS/sanitizer.log" >"$OUTDIR/sanitizer.log"
    fi
    if tar -czf "$OUTDIR/all_logs.tar.gz" -C "$OUTDIR" logs $([ -d "$OUTDIR/bench" ] && echo bench)
    then
        rm -rf "$LOGS" "$OUTDIR/bench"
    fi
}

trap 'say "RESULT: interrupted"; collect; exit 143' TERM INT

say "gpu_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
say "steps: $STEPS; output: $OUTDIR"
for step in info build test sanitizer bench; do
    run_step "$step"
done
if [ "$FAILED" -ne 0 ]; then
    say "RESULT: FAIL"
elif [ -n "$NOT_RUN" ]; then
    say "RESULT: PASS, but not run:$NOT_RUN"
else
    say "RESULT: PASS"
fi
collect
exit "$FAILED"
