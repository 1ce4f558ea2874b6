"""UI-thread responsiveness while the app calibrates (and exports) the E2B-shaped model.

A 10 ms QTimer heartbeat runs on the UI thread; every gap between two beats longer than the
period is time the UI could not react. Measured side by side in one run: the app idle, then
the app calibrating ``e2b`` on 4 bundled images in its worker thread; with ``--export``, the
Export tab's export run as the GUI runs it (a child process), and with ``--export-in-process``
also the same export on the worker thread (how the GUI exported before), for comparison.
Target: max stall <= 100 ms while calibrating and while exporting.

    QT_QPA_PLATFORM=offscreen .venv/bin/python bench/bench_gui.py [--images 4] [--max-soft-tokens 280]
        [--model tiny] [--export] [--export-in-process]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.main import prepare_qt_environment  # noqa: E402

PERIOD_MS = 10
TARGET_MS = 100.0


class Heartbeat:
    """Records the wall time between beats of a 10 ms timer on the UI thread."""

    def __init__(self) -> None:
        from PySide6.QtCore import Qt, QTimer

        self.timer = QTimer()
        self.timer.setTimerType(Qt.PreciseTimer)
        self.timer.setInterval(PERIOD_MS)
        self.timer.timeout.connect(self._beat)
        self.gaps: list[float] = []
        self._last = 0.0

    def start(self) -> None:
        self.gaps = []
        self._last = time.perf_counter()
        self.timer.start()

    def stop(self) -> list[float]:
        self.timer.stop()
        return list(self.gaps)

    def _beat(self) -> None:
        now = time.perf_counter()
        self.gaps.append((now - self._last) * 1000.0)
        self._last = now


def stall_counts(gaps: list[float]) -> tuple[int, int]:
    """(stalls over 100 ms, stalls over 500 ms)."""
    over = [g - PERIOD_MS for g in gaps]
    return sum(o > TARGET_MS for o in over), sum(o > 500.0 for o in over)


def measure_export(app, window, beat: Heartbeat, out: Path, in_process: bool) -> tuple[list[float], float]:
    """Heartbeat gaps and seconds of one export from the Export tab (in a child process unless in_process)."""
    session = window.session
    if in_process:  # the GUI asks for a child process; put the old in-process export back for comparison
        real = type(session).export
        session.export = lambda *a, **k: real(session, *a, **{**k, "in_process": True})
    done: dict[str, object] = {}
    window.export_tab.sigExported.connect(lambda result: done.setdefault("result", result))
    window.export_tab.path_edit.setText(str(out))
    beat.start()
    t = time.perf_counter()
    window.export_tab.export()
    run_loop_until(app, lambda: "result" in done or window.export_tab.message.level == "error", 1800)
    seconds = time.perf_counter() - t
    gaps = beat.stop()
    if in_process:
        del session.export
    if "result" not in done:
        raise SystemExit(f"export did not finish: {window.export_tab.message.text()}")
    return gaps, seconds


def stalls(gaps: list[float]) -> tuple[float, float, int]:
    """(max stall, p99 stall, beats): a stall is how much longer than the period a gap was."""
    import numpy as np

    if not gaps:
        return float("nan"), float("nan"), 0
    over = np.maximum(np.asarray(gaps) - PERIOD_MS, 0.0)
    return float(over.max()), float(np.percentile(over, 99)), len(gaps)


def run_loop_until(app, predicate, timeout_s: float) -> bool:
    """Spin the real event loop (no processEvents polling) until predicate() or timeout."""
    from PySide6.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    deadline = time.monotonic() + timeout_s
    poll = QTimer()
    poll.setInterval(50)
    poll.timeout.connect(lambda: (predicate() or time.monotonic() > deadline) and loop.quit())
    poll.start()
    loop.exec()
    poll.stop()
    return bool(predicate())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="e2b")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--max-soft-tokens", type=int, default=280)
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    parser.add_argument("--results", action="store_true", help="also measure while the ranges and errors are computed and drawn")
    parser.add_argument("--export", action="store_true", help="also measure an export from the Export tab (child process)")
    parser.add_argument("--export-in-process", action="store_true", help="with --export: also the in-process export, before it")
    args = parser.parse_args(argv)

    prepare_qt_environment()
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from app.qt_main_window import QtMainWindow
    from core.data.resources import sample_images

    app = QApplication.instance() or QApplication([])
    settings = QSettings(str(Path(os.environ.get("TMPDIR", "/tmp")) / "ptq-bench-gui.ini"), QSettings.IniFormat)
    images = sample_images()[: args.images]
    t0 = time.perf_counter()
    window = QtMainWindow(model_spec=args.model, images=images, max_soft_tokens=args.max_soft_tokens, settings=settings)
    window.resize(1360, 860)
    window.show()
    if not run_loop_until(app, lambda: window.session is not None and not window.runner.busy, 900):
        print("model did not load in time", file=sys.stderr)
        return 1
    load_s = time.perf_counter() - t0

    beat = Heartbeat()
    beat.start()
    run_loop_until(app, lambda: False, args.idle_seconds)
    idle = stalls(beat.stop())

    done: dict[str, object] = {}
    window.calibration_tab.sigCalibrated.connect(lambda result: done.setdefault("result", result))
    beat.start()
    t1 = time.perf_counter()
    window.calibration_tab.calibrate()
    ok = run_loop_until(app, lambda: "result" in done, 1800)
    calib_s = time.perf_counter() - t1
    busy = stalls(beat.stop())
    shown = None
    if args.results and ok:
        beat.start()
        t2 = time.perf_counter()
        run_loop_until(app, lambda: window.errors_tab.result is not None and not window.runner.busy, 1800)
        shown = stalls(beat.stop()) + (time.perf_counter() - t2,)
    exports: list[tuple[str, list[float], float]] = []
    if args.export and ok:
        run_loop_until(app, lambda: not window.runner.busy, 1800)  # the analysis chain first: export alone
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            for in_process in (True, False) if args.export_in_process else (False,):
                name = "export (thread)" if in_process else "export (child)"
                exports.append((name, *measure_export(app, window, beat, Path(tmp) / f"{name[8:-1]}.circle", in_process)))
    # let the follow-up work (observer table, evaluation) finish before closing
    window.runner.cancel_all()
    run_loop_until(app, lambda: not window.runner.busy, 600)
    window.close()
    if not ok:
        print("calibration did not finish in time", file=sys.stderr)
        return 1

    result = done["result"]
    print(f"model {args.model}: loaded in {load_s:.1f} s; calibrated {result.images_done} images "
          f"(max_soft_tokens {args.max_soft_tokens}) in {calib_s:.1f} s")
    print(f"{'phase':<16}{'beats':>8}{'max stall ms':>15}{'p99 stall ms':>15}")
    print(f"{'idle':<16}{idle[2]:>8}{idle[0]:>15.1f}{idle[1]:>15.1f}")
    print(f"{'calibrating':<16}{busy[2]:>8}{busy[0]:>15.1f}{busy[1]:>15.1f}")
    if shown is not None:
        print(f"{'results':<16}{shown[2]:>8}{shown[0]:>15.1f}{shown[1]:>15.1f}   (observer table + evaluation, {shown[3]:.1f} s)")
    for name, gaps, seconds in exports:
        worst, p99, beats = stalls(gaps)
        over_100, over_500 = stall_counts(gaps)
        print(f"{name:<16}{beats:>8}{worst:>15.1f}{p99:>15.1f}   ({seconds:.1f} s; stalls > 100 ms: {over_100}, > 500 ms: {over_500})")
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    ratio = busy[0] / idle[0] if idle[0] > 0 else float("inf")
    print(f"max stall calibrating / idle: {ratio:.1f}x")
    measured = [busy[0]] + [stalls(gaps)[0] for name, gaps, _ in exports if name == "export (child)"]
    verdict = "PASS" if max(measured) <= TARGET_MS else "FAIL"
    print(f"target max stall <= {TARGET_MS:.0f} ms (calibrating{', exporting' if exports else ''}): {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
