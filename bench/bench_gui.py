"""UI-thread responsiveness while the app calibrates, analyses and exports the E2B-shaped model.

A 10 ms QTimer heartbeat runs on the UI thread; every gap between two beats longer than the
period is time the UI could not react (a *stall*). Measured side by side in one run, each phase
with its max stall, stalls over 100 and 500 ms, the p99 gap and the load average at its end:

- idle: the app doing nothing (a short look at the machine's noise floor);
- calibration: the Calibration tab's Calibrate, in the worker thread, until ``sigCalibrated``;
- analysis: what follows on its own, as the user sees it with the Errors tab open: the Errors tab's
  ``session.analyse`` (per-module errors, divergence, heatmaps) and its drawing, the Ranges tab's
  observer table, until the worker is idle;
- export (with ``--export``): the Export tab's export (a child process); with
  ``--export-in-process`` also the same export on the worker thread (how the GUI exported before).

The machine's noise floor is also measured all along, beside the app: a separate process (no Qt, no
torch, no GIL shared with the app) runs the same 10 ms beat with sleeps, and its stalls in each phase
are printed under "control". A stall that the control shares is the machine's (other processes, the
scheduler, a loaded VM), not the app's.

The "UI cpu" column is the share of the long stalls that the UI thread spent on the CPU itself (drawing,
slots); the rest it waited (for the GIL, or for a CPU). "UI work" is the most CPU the UI thread spent
between two beats: its longest piece of work, which a loaded machine stretches but does not cause.
A watchdog thread dumps every thread's Python stack (``faulthandler``) when a beat is late, so each
stall over 100 ms (``--causes-over-ms``) is printed with where the UI thread and the worker were.
Target: max stall <= 100 ms in every phase.

    QT_QPA_PLATFORM=offscreen .venv/bin/python bench/bench_gui.py [--images 2] [--max-soft-tokens 70]
        [--model tiny] [--export] [--export-in-process] [--causes 8] [--causes-over-ms 100] [--dump-file stalls.txt]
        [--time-events-ms 20] [--switch-interval-ms 5]
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import os
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.main import prepare_qt_environment  # noqa: E402

PERIOD_MS = 10
TARGET_MS = 100.0
# The watchdog looks this often and dumps the stacks once a beat is this late (by default: inside every
# stall over TARGET_MS, early enough to see what started it).
WATCH_POLL_S = 0.01


@dataclass
class StackDump:
    """Every thread's stack, taken while the UI thread had not beaten for a while."""

    beat_before: float  # perf_counter of the last beat before the stall
    text: str


class Heartbeat:
    """Beats of a 10 ms timer on the UI thread, and a watchdog that dumps the stacks of a late beat."""

    def __init__(self, dump_after_ms: float = 60.0) -> None:
        from PySide6.QtCore import Qt, QTimer

        self.dump_after_ms = dump_after_ms
        self.timer = QTimer()
        self.timer.setTimerType(Qt.PreciseTimer)
        self.timer.setInterval(PERIOD_MS)
        self.timer.timeout.connect(self._beat)
        self.collections: list[tuple[float, float, int]] = []  # UI-thread garbage collections: (start, ms, generation)
        self.beats: list[float] = []  # perf_counter of every beat
        self.cpu: list[float] = []  # the UI thread's CPU time at every beat
        self.dumps: list[StackDump] = []
        self._last = 0.0
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._file = tempfile.TemporaryFile(mode="w+b")
        self._gc_start = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        # The cyclic collector runs in whichever thread allocates past its threshold; on the UI thread
        # its whole pass is a stall.
        if threading.current_thread() is not threading.main_thread():
            return
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.collections.append((self._gc_start, (time.perf_counter() - self._gc_start) * 1000.0, info["generation"]))

    def start(self) -> None:
        """Start beating (and watching) from now."""
        self.beats = [time.perf_counter()]
        self.collections = []
        self.cpu = [time.thread_time()]
        self.dumps = []
        self._last = self.beats[0]
        self.timer.start()
        self._stop.clear()
        self._watchdog = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
        self._watchdog.start()

    def stop(self) -> None:
        """Stop beating and watching."""
        self.timer.stop()
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join()

    def now(self) -> float:
        """A phase boundary: the time of the latest beat."""
        return time.perf_counter()

    def _beat(self) -> None:
        now = time.perf_counter()
        self.beats.append(now)
        self.cpu.append(time.thread_time())
        self._last = now

    def _watch(self) -> None:
        fd = self._file.fileno()
        dumped_for = None
        while not self._stop.wait(WATCH_POLL_S):
            last = self._last
            if last == dumped_for or (time.perf_counter() - last) * 1000.0 < self.dump_after_ms:
                continue
            dumped_for = last
            start = os.lseek(fd, 0, os.SEEK_END)
            faulthandler.dump_traceback(file=fd, all_threads=True)
            end = os.lseek(fd, 0, os.SEEK_END)
            os.lseek(fd, start, os.SEEK_SET)
            self.dumps.append(StackDump(last, os.read(fd, end - start).decode("utf-8", "replace")))


CONTROL_BEAT = """
import sys, time
period, last = float(sys.argv[1]), time.perf_counter()
with open(sys.argv[2], "w", buffering=1) as out:
    while True:
        time.sleep(period)
        now = time.perf_counter()
        if now - last > 2 * period:
            out.write(f"{last!r} {now!r}\\n")
        last = now
"""


class ControlBeat:
    """The same beat in a separate plain-Python process: the machine's own stalls, measured beside the app's.
    (perf_counter is CLOCK_MONOTONIC on Linux, so both processes' times compare.)"""

    def __init__(self) -> None:
        import subprocess

        self._file = tempfile.NamedTemporaryFile(prefix="bench-gui-control-", suffix=".txt", delete=False)
        self._file.close()
        self._proc = subprocess.Popen([sys.executable, "-c", CONTROL_BEAT, str(PERIOD_MS / 1000.0), self._file.name])

    def stop(self) -> list[tuple[float, float]]:
        """Stop the process; (start, end) of each of its gaps over two periods."""
        self._proc.terminate()
        self._proc.wait()
        with open(self._file.name) as text:
            gaps = [tuple(float(v) for v in line.split()) for line in text if line.count(" ") == 1]
        os.unlink(self._file.name)
        return gaps


def control_row(phase: "Phase", gaps: list[tuple[float, float]]) -> str:
    """The control process's max stall and stalls over 100 / 500 ms during the phase."""
    t0 = min((a for a, _, _ in phase.gaps), default=0.0)
    t1 = max((a + g / 1000.0 for a, g, _ in phase.gaps), default=0.0)
    stalls = [(b - a) * 1000.0 - PERIOD_MS for a, b in gaps if t0 < b <= t1]
    over_100, over_500 = sum(s > TARGET_MS for s in stalls), sum(s > 500.0 for s in stalls)
    return f"{phase.name:<18}{'':>7}{max(stalls, default=0.0):>10.1f}{over_100:>8}{over_500:>8}"


@dataclass
class Phase:
    """One measured phase: its heartbeat gaps, the stack dumps of its stalls, its length."""

    name: str
    gaps: list[tuple[float, float, float]]  # (beat before, gap ms, UI thread CPU ms in the gap)
    dumps: list[StackDump]
    seconds: float
    load: float = field(default_factory=lambda: os.getloadavg()[0])
    note: str = ""
    collections: list[tuple[float, float, int]] = field(default_factory=list)

    def gc_text(self) -> str:
        """The UI thread's garbage collections in the phase: count, total and longest."""
        if not self.collections:
            return "no UI-thread garbage collection"
        worst = max(self.collections, key=lambda c: c[1])
        return (f"{len(self.collections)} UI-thread garbage collections, {sum(c[1] for c in self.collections):.0f} ms in all, "
                f"longest {worst[1]:.0f} ms (generation {worst[2]})")

    def stalls(self) -> list[float]:
        """How much longer than the period each gap was (ms)."""
        return [max(gap - PERIOD_MS, 0.0) for _, gap, _ in self.gaps]

    def ui_work(self) -> float:
        """The most CPU the UI thread spent between two beats (ms): its own longest piece of work, which the
        machine's load stretches into a stall but does not make."""
        return max((cpu for _, _, cpu in self.gaps), default=0.0)

    def ui_busy(self) -> str:
        """Share of the stalls' time over 100 ms that the UI thread itself spent on the CPU (drawing, slots)."""
        long = [(gap, cpu) for _, gap, cpu in self.gaps if gap - PERIOD_MS > TARGET_MS]
        return f"{100.0 * sum(c for _, c in long) / sum(g for g, _ in long):.0f}%" if long else "-"

    def row(self) -> str:
        """The table row: beats, max stall, stalls > 100 / > 500 ms, p99 gap, load, seconds."""
        import numpy as np

        stalls = self.stalls()
        if not stalls:
            return f"{self.name:<18}{0:>7}"
        gaps = np.asarray([g for _, g, _ in self.gaps])
        over_100 = sum(s > TARGET_MS for s in stalls)
        over_500 = sum(s > 500.0 for s in stalls)
        return (
            f"{self.name:<18}{len(stalls):>7}{max(stalls):>10.1f}{over_100:>8}{over_500:>8}"
            f"{float(np.percentile(gaps, 99)):>10.1f}{self.ui_busy():>8}{self.ui_work():>9.1f}{self.load:>7.2f}{self.seconds:>9.1f}  {self.note}"
        )


def slice_phase(beat: Heartbeat, name: str, t0: float, t1: float, note: str = "") -> Phase:
    """The gaps that ended within [t0, t1] and the dumps taken in them."""
    gaps = [
        (a, (b - a) * 1000.0, (cb - ca) * 1000.0)
        for a, b, ca, cb in zip(beat.beats, beat.beats[1:], beat.cpu, beat.cpu[1:])
        if t0 < b <= t1
    ]
    starts = {a for a, _, _ in gaps}
    collections = [c for c in beat.collections if t0 < c[0] <= t1]
    return Phase(name, gaps, [d for d in beat.dumps if d.beat_before in starts], t1 - t0, note=note, collections=collections)


FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')


def thread_stacks(text: str) -> list[tuple[bool, list[tuple[str, str, str]]]]:
    """(is the main thread, frames innermost first as (file, line, func)) per thread of a dump."""
    main_ident = threading.main_thread().ident
    stacks = []
    for block in re.split(r"\n(?=(?:Current thread|Thread) 0x)", text.strip()):
        head = block.splitlines()[0] if block else ""
        match = re.search(r"0x([0-9a-f]+)", head)
        if match is None or head.startswith("Current thread"):
            continue  # the watchdog itself
        frames = [(m["file"], m["line"], m["func"]) for m in FRAME.finditer(block)]
        stacks.append((int(match.group(1), 16) == main_ident, frames))
    return stacks


def where(frames: list[tuple[str, str, str]]) -> str:
    """The innermost frame, and the innermost frame of this repository below it."""
    if not frames:
        return "-"

    def short(frame: tuple[str, str, str]) -> str:
        path = Path(frame[0])
        try:
            path = path.relative_to(ROOT)
        except ValueError:
            path = Path(*path.parts[-2:])
        return f"{path}:{frame[1]} {frame[2]}"

    ours = next((f for f in frames if f[0].startswith(str(ROOT)) and "/bench/" not in f[0]), None)
    text = short(frames[0])
    return text if ours is None or ours == frames[0] else f"{text} <- {short(ours)}"


def causes(phase: Phase, over_ms: float = TARGET_MS) -> list[tuple[str, int, float, float]]:
    """(where the UI thread and the busiest other thread were, count, worst stall, UI CPU ms in it) over the
    stalls longer than over_ms."""
    worst = {a: (g - PERIOD_MS, cpu) for a, g, cpu in phase.gaps}
    counts: Counter[str] = Counter()
    peak: dict[str, tuple[float, float]] = {}
    for dump in phase.dumps:
        stall, cpu = worst.get(dump.beat_before, (0.0, 0.0))
        if stall <= over_ms:
            continue
        stacks = thread_stacks(dump.text)
        ui = next((frames for is_main, frames in stacks if is_main), [])
        others = [frames for is_main, frames in stacks if not is_main and frames]
        # The thread doing work: the one deepest in this repository's code (the session worker).
        busy = max(others, key=lambda fr: sum(f[0].startswith(str(ROOT)) for f in fr), default=[])
        key = f"UI: {where(ui)}\n      other: {where(busy)}"
        counts[key] += 1
        peak[key] = max(peak.get(key, (0.0, 0.0)), (stall, cpu))
    return [(key, n, *peak[key]) for key, n in counts.most_common()]


def timed_application(threshold_ms: float):
    """A QApplication whose notify() records every event delivery that costs the UI thread more than
    threshold_ms of CPU, by receiver class and event type (Qt-side timing of paints, layouts and slots)."""
    from PySide6.QtWidgets import QApplication

    class TimedApplication(QApplication):
        def __init__(self, argv: list[str]) -> None:
            super().__init__(argv)
            self.slow: list[tuple[float, float, str]] = []  # (perf_counter, CPU ms, what)

        def notify(self, receiver, event) -> bool:  # noqa: N802 - Qt override
            if threading.current_thread() is not threading.main_thread():
                return super().notify(receiver, event)  # the worker's own events (its whole tasks)
            start = time.thread_time()
            handled = super().notify(receiver, event)
            cpu = (time.thread_time() - start) * 1000.0
            if cpu > threshold_ms:
                name = receiver.objectName() if hasattr(receiver, "objectName") else ""
                what = f"{type(receiver).__name__}{f' {name!r}' if name else ''} {event.type().name}"
                self.slow.append((time.perf_counter(), cpu, what))
            return handled

    return TimedApplication([])


def run_loop_until(app, predicate, timeout_s: float) -> bool:
    """Spin the real event loop (no processEvents polling) until predicate() or timeout."""
    from PySide6.QtCore import QEventLoop, QTimer

    loop, deadline = QEventLoop(), time.monotonic() + timeout_s

    def check() -> None:
        if predicate() or time.monotonic() > deadline:
            loop.quit()

    poll = QTimer(interval=50, timeout=check)
    poll.start()
    loop.exec()
    poll.stop()
    return bool(predicate())


def measure_export(app, window, beat: Heartbeat, out: Path, in_process: bool) -> Phase:
    """One export from the Export tab (in a child process unless in_process)."""
    session = window.session
    if in_process:  # the GUI asks for a child process; put the old in-process export back for comparison
        real = type(session).export
        session.export = lambda *a, **k: real(session, *a, **{**k, "in_process": True})
    done: dict[str, object] = {}
    window.export_tab.sigExported.connect(lambda result: done.setdefault("result", result))
    window.export_tab.path_edit.setText(str(out))
    window.tabs.setCurrentWidget(window.export_tab)
    beat.start()
    t = beat.now()
    window.export_tab.export()
    run_loop_until(app, lambda: "result" in done or window.export_tab.message.level == "error", 1800)
    end = beat.now()
    beat.stop()
    if in_process:
        del session.export
    if "result" not in done:
        raise SystemExit(f"export did not finish: {window.export_tab.message.text()}")
    return slice_phase(beat, "export (thread)" if in_process else "export (child)", t, end)


def measure_calibration_and_analysis(app, window, beat: Heartbeat) -> list[Phase]:
    """Calibrate from the Calibration tab, then let the Errors tab (the one shown) analyse and draw."""
    marks: dict[str, object] = {}

    def calibrated(result) -> None:
        marks.setdefault("calibrated", beat.now())
        marks.setdefault("result", result)

    window.calibration_tab.sigCalibrated.connect(calibrated)
    beat.start()
    t0 = beat.now()
    window.calibration_tab.calibrate()
    if not run_loop_until(app, lambda: "calibrated" in marks, 3600):
        beat.stop()
        raise SystemExit("calibration did not finish in time")
    run_loop_until(app, lambda: window.errors_tab.result is not None and not window.runner.busy, 3600)
    t2 = beat.now()
    beat.stop()
    t1 = marks["calibrated"]
    calibration = slice_phase(beat, "calibration", t0, t1, f"{marks['result'].images_done} images calibrated")
    return [calibration, slice_phase(beat, "analysis", t1, t2, "analyse + tables/charts drawn")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="e2b")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--max-soft-tokens", type=int, default=70)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--export", action="store_true", help="also measure an export from the Export tab (child process)")
    parser.add_argument("--export-in-process", action="store_true", help="with --export: also the in-process export, before it")
    parser.add_argument("--causes", type=int, default=6, help="print where the threads were for this many kinds of stall per phase")
    parser.add_argument("--causes-over-ms", type=float, default=TARGET_MS, help="where the threads were in stalls longer than this")
    parser.add_argument("--dump-file", type=Path, help="write every stack dump of those stalls here")
    parser.add_argument("--time-events-ms", type=float, help="list the event deliveries that cost the UI thread more CPU than this")
    parser.add_argument("--switch-interval-ms", type=float, help="override the GIL switch interval the app sets (experiments)")
    args = parser.parse_args(argv)

    prepare_qt_environment()
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from app.qt_main_window import QtMainWindow
    from core.data.resources import sample_images

    app = QApplication.instance() or (timed_application(args.time_events_ms) if args.time_events_ms else QApplication([]))
    settings = QSettings(str(Path(os.environ.get("TMPDIR", "/tmp")) / "ptq-bench-gui.ini"), QSettings.IniFormat)
    images = sample_images()[: args.images]
    t0 = time.perf_counter()
    window = QtMainWindow(model_spec=args.model, images=images, max_soft_tokens=args.max_soft_tokens, settings=settings)
    window.resize(1360, 860)
    window.show()
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000.0)
    if not run_loop_until(app, lambda: window.session is not None and not window.runner.busy, 900):
        print("model did not load in time", file=sys.stderr)
        return 1
    load_s = time.perf_counter() - t0

    # The user watches the results arrive on the Errors tab; its first paint is the tab switch's cost
    # (a user's action), not a stall of the calibration, so it happens before anything is measured.
    window.tabs.setCurrentWidget(window.errors_tab)
    run_loop_until(app, lambda: False, 1.0)
    control = ControlBeat()
    beat = Heartbeat(dump_after_ms=min(60.0, 0.6 * args.causes_over_ms))
    beat.start()
    t = beat.now()
    run_loop_until(app, lambda: False, args.idle_seconds)
    end = beat.now()
    beat.stop()
    print(f"model {args.model}: loaded in {load_s:.1f} s; {len(images)} images, max_soft_tokens {args.max_soft_tokens}; "
          f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, "
          f"GIL switch interval {sys.getswitchinterval() * 1000:g} ms")
    print(f"{'phase':<18}{'beats':>7}{'max ms':>10}{'>100ms':>8}{'>500ms':>8}{'p99 gap':>10}{'UI cpu':>8}{'UI work':>9}{'load1':>7}{'seconds':>9}")
    phases = [slice_phase(beat, "idle", t, end, "noise floor")]
    print(phases[-1].row(), flush=True)
    phases += measure_calibration_and_analysis(app, window, beat)
    print(phases[-2].row(), phases[-1].row(), sep="\n", flush=True)
    if args.export:
        with tempfile.TemporaryDirectory() as tmp:
            for in_process in (True, False) if args.export_in_process else (False,):
                phases.append(measure_export(app, window, beat, Path(tmp) / f"out_{in_process}.circle", in_process))
                print(phases[-1].row(), flush=True)
    window.runner.cancel_all()
    run_loop_until(app, lambda: not window.runner.busy, 600)
    window.close()
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    control_gaps = control.stop()
    print("control: the machine's noise floor in the same phases (a plain process beating beside the app):")
    for phase in phases:
        print(control_row(phase, control_gaps))
    for phase in phases:
        print(f"{phase.name}: {phase.gc_text()}")
    for phase in phases:
        t0 = min((a for a, _, _ in phase.gaps), default=0.0)
        t1 = max((a + g / 1000.0 for a, g, _ in phase.gaps), default=0.0)
        slow = sorted((e for e in getattr(app, "slow", []) if t0 < e[0] <= t1), key=lambda e: -e[1])
        for _, cpu, what in slow[:8]:
            print(f"  {phase.name}: event {what}: {cpu:.0f} ms of UI-thread CPU")
    for phase in phases:
        found = causes(phase, args.causes_over_ms)
        if found and args.causes:
            print(f"-- stalls over {args.causes_over_ms:.0f} ms in {phase.name}, by where the threads were:")
            for key, n, worst, cpu in found[: args.causes]:
                print(f"  {n:>3} x (worst {worst:.0f} ms, UI on CPU {cpu:.0f} ms of it) {key}")
    if args.dump_file is not None:
        with args.dump_file.open("w") as out:
            for phase in phases:
                worst = {a: (g - PERIOD_MS, cpu) for a, g, cpu in phase.gaps}
                for dump in phase.dumps:
                    stall, cpu = worst.get(dump.beat_before, (0.0, 0.0))
                    if stall > args.causes_over_ms:
                        out.write(f"=== {phase.name}: stall {stall:.0f} ms, UI on CPU {cpu:.0f} ms\n{dump.text}\n")
    measured = [max(p.stalls(), default=0.0) for p in phases if p.name not in ("idle", "export (thread)")]
    verdict = "PASS" if max(measured) <= TARGET_MS else "FAIL"
    print(f"target max stall <= {TARGET_MS:.0f} ms (calibration, analysis{', export' if args.export else ''}): {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
