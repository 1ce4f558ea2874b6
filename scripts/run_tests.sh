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
export QT_QPA_PLATFORM=${QT_QPA_PLATFORM:-offscreen}
export QTWEBENGINE_CHROMIUM_FLAGS=${QTWEBENGINE_CHROMIUM_FLAGS:---no-sandbox}

"$PY" -m pytest -q --ignore=tests/app "$@" || exit $?

log=$(mktemp)
trap 'rm -f "$log"' EXIT
for attempt in 1 2; do
    # Not a pipe into tee: a helper process that outlives a stopped pytest (QtWebEngine's
    # zygote) would hold the pipe open and stall the run. tail follows the file until pytest ends.
    "$PY" -m pytest -q -o timeout=300 tests/app "$@" >"$log" 2>&1 &
    pid=$!
    tail -n +1 -f --pid="$pid" "$log"
    wait "$pid"
    rc=$?
    if [ "$rc" -eq 0 ] || ! grep -q "+ Timeout +" "$log"; then
        exit "$rc"
    fi
    echo "GUI tests: a test hung (stacks above); running the GUI tests again in a fresh process" >&2
done
exit "$rc"
