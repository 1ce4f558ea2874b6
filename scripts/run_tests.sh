#!/usr/bin/env bash
# The whole suite, headless: core tests, then the GUI tests in a process of their own.
#
# Every test runs under pytest-timeout (pyproject.toml): a test that hangs gets every thread's
# stack dumped and its process stopped, instead of eating CI's time budget. The GUI tests have
# hung once in CI (never here, in many runs); if their process is stopped by that timeout, the
# stacks stay in the log and the GUI tests run once more in a fresh process. Any ordinary test
# failure fails the run at once, with no retry.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
# Tests whose verdicts are numbers computed by torch (and TICO's runtime): run under a second kernel path.
NUMERIC_TESTS=(tests/test_verdict.py tests/test_export.py tests/test_ptq.py tests/test_quant_primitives.py
    tests/test_threeway.py tests/test_models.py tests/test_extremes.py tests/wrappers)
export QT_QPA_PLATFORM=${QT_QPA_PLATFORM:-offscreen}
export QTWEBENGINE_CHROMIUM_FLAGS=${QTWEBENGINE_CHROMIUM_FLAGS:---no-sandbox}

"$PY" -m pytest -q --ignore=tests/app "$@" || exit $?

# The numeric tests once more on another CPU kernel path and thread count: ATen's scalar kernels,
# MKL and oneDNN held to AVX2, one thread. A tolerance tuned on one CPU fails here first, in CI,
# instead of on a user's machine (every numeric verdict is judged against core.export.verdict's measured
# noise floor, so it must pass under any of these).
if [ "${PTQ_SKIP_KERNEL_PASS:-0}" != 1 ]; then
    ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=1 \
        "$PY" -m pytest -q -m "not slow" "${NUMERIC_TESTS[@]}" "$@" || exit $?
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
for attempt in 1 2; do
    # Not a pipe into tee: a helper process that outlives a stopped pytest (QtWebEngine's
    # zygote) would hold the pipe open and stall the run. tail follows the file until pytest ends.
    # pytest-timeout's thread needs the GIL to fire; a deadlock in which a thread holds the GIL
    # while it waits on a Qt mutex would never end. So the whole GUI run is also bounded from
    # outside: SIGABRT makes faulthandler dump every thread's stack, SIGKILL follows 30 s later.
    timeout --signal=ABRT --kill-after=30 "${GUI_TESTS_LIMIT:-900}" \
        "$PY" -m pytest -q -o timeout=300 tests/app "$@" >"$log" 2>&1 &
    pid=$!
    tail -n +1 -f --pid="$pid" "$log"
    wait "$pid"
    rc=$?
    hung=0
    grep -q "+ Timeout +" "$log" && hung=1
    case "$rc" in 124|134|137) hung=1 ;; esac
    if [ "$rc" -eq 0 ] || [ "$hung" -eq 0 ]; then
        exit "$rc"
    fi
    echo "GUI tests: a test hung (stacks above); running the GUI tests again in a fresh process" >&2
done
exit "$rc"
