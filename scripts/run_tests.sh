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
    "$PY" -m pytest -q -o timeout=300 tests/app "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ] || ! grep -q "+ Timeout +" "$log"; then
        exit "$rc"
    fi
    echo "GUI tests: a test hung (stacks above); running the GUI tests again in a fresh process" >&2
done
exit "$rc"
