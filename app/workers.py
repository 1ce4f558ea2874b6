"""Run Session calls off the UI thread: one worker thread, one task at a time.

The Session is not thread-safe, so every call that touches it (load, add images, calibrate,
evaluate, export, save) goes through one ``SessionRunner``: a QObject living in a QThread that
runs submitted tasks in order. Progress and results come back as queued signals; widgets are
never touched from the worker, and there is no ``processEvents()`` loop anywhere.
"""

from __future__ import annotations

import gc
import itertools
import sys
import time
import traceback
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from PySide6.QtCore import QObject, QThread, QTimer, Signal, Slot

from core.cancel import CancelToken

# Every QThread the app starts, so tests (and shutdown) can check that none is left running.
_LIVE_THREADS: "weakref.WeakSet[QThread]" = weakref.WeakSet()

# The worker and the UI thread share one GIL. A waiting thread gets it back only after the switch
# interval (CPython's default: 5 ms), and a paint gives it up and waits again hundreds of times, so
# while the worker ran a pure-Python stretch (resetting 1,192 observers, collecting weight statistics)
# one pyqtgraph paint of 35 ms CPU kept the window still for 370 ms (bench/bench_gui.py, e2b). At 1 ms
# the same calibration stalled it at most 71 ms; the worker loses nothing measurable.
GIL_SWITCH_INTERVAL_S = 0.001


def share_gil_with_ui() -> None:
    """Shorten the interpreter's GIL switch interval to GIL_SWITCH_INTERVAL_S (never lengthen it)."""
    if sys.getswitchinterval() > GIL_SWITCH_INTERVAL_S:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)


def live_threads() -> list[QThread]:
    """Return the app's worker threads that are still running."""
    return [t for t in list(_LIVE_THREADS) if t.isRunning()]


@dataclass
class Task:
    """One Session call submitted to the runner."""

    name: str
    fn: Callable[..., Any]
    takes_progress: bool = True
    task_id: int = 0
    token: CancelToken = field(default_factory=CancelToken)
    on_done: Callable[[Any], None] | None = None
    on_error: Callable[[BaseException], None] | None = None
    on_progress: Callable[[int, int, str], None] | None = None
    on_started: Callable[[], None] | None = None
    started_at: float = 0.0


def freeze_long_lived_objects() -> None:
    """Take every object alive now out of the cyclic garbage collector's scans (gc.freeze)."""
    # The first task loads the model: it imports torch, transformers and TICO, millions of objects that
    # live as long as the app. Each full collection walked all of them again, on whichever thread
    # allocated last: 425 ms on the UI thread in one analysis (bench/bench_gui.py, tiny). Frozen objects
    # are still freed by reference counting; only cycles among them are never collected.
    gc.freeze()


class _SessionWorker(QObject):
    """Lives in the worker thread; runs one task per queued ``run_task`` call."""

    sigStarted = Signal(int)  # task id
    sigProgress = Signal(int, int, int, str)  # task id, done, total, message
    sigFinished = Signal(int, object)  # task id, result
    sigFailed = Signal(int, object, str)  # task id, exception, traceback text

    @Slot(object)
    def run_task(self, task: Task) -> None:
        # Grad mode is thread-local: entering no_grad on the UI thread would not reach here.
        import torch  # noqa: PLC0415 -- torch stays off this module's import path

        def progress(done: int, total: int, message: str = "") -> None:
            self.sigProgress.emit(task.task_id, int(done), int(total), str(message))

        self.sigStarted.emit(task.task_id)
        kwargs: dict[str, Any] = {}
        if task.takes_progress:
            kwargs = {"progress": progress, "cancel": task.token}
        try:
            with torch.no_grad():
                result = task.fn(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the window
            self.sigFailed.emit(task.task_id, exc, traceback.format_exc())
            return
        self.sigFinished.emit(task.task_id, result)


class SessionRunner(QObject):
    """Queue of Session calls executed in order on one worker thread."""

    sigBusyChanged = Signal(bool)
    # Emitted when the worker *starts* a task (not when it is queued), so "running" means running.
    sigTaskStarted = Signal(str)
    sigQueueChanged = Signal()
    _sigSubmit = Signal(object)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        share_gil_with_ui()  # a second Python thread from now on: the UI thread must get the GIL back quickly
        self._ids = itertools.count(1)
        self._tasks: dict[int, Task] = {}
        self._running: int | None = None
        self._later: list[str] = []  # names of GUI-thread steps scheduled by later(), not yet run
        self._announced = False  # the busy state sigBusyChanged last announced
        self._froze = False
        self._thread = QThread()
        self._thread.setObjectName("ptq-session-worker")
        self._worker = _SessionWorker()
        self._worker.moveToThread(self._thread)
        self._sigSubmit.connect(self._worker.run_task)
        self._worker.sigStarted.connect(self._on_started)
        self._worker.sigProgress.connect(self._on_progress)
        self._worker.sigFinished.connect(self._on_finished)
        self._worker.sigFailed.connect(self._on_failed)
        self._thread.finished.connect(self._worker.deleteLater)
        _LIVE_THREADS.add(self._thread)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """Whether a task is queued or running, or a step scheduled by later() has not run yet."""
        return bool(self._tasks) or bool(self._later)

    def pending(self) -> list[str]:
        """Names of the queued and running tasks, oldest first (then the GUI steps still to run)."""
        return [t.name for t in self._tasks.values()] + self._later

    def later(self, name: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the GUI thread on a later pass of the event loop, counted as busy until it ran.

        A result that takes several pieces of drawing gets the window's paint and input in between
        (each piece alone stays under the 100 ms a stall may last), while whoever waits for the runner to
        go idle still sees the whole result drawn and whatever its last piece submits."""
        self._later.append(name)
        self._settle()

        def run() -> None:
            try:
                fn()
            finally:
                self._later.remove(name)
                self._settle()

        # A real timer (1 ms), not singleShot(0): that one is a posted event, delivered in the same drain of
        # posted events as the paints and layouts the first pass caused, so no timer (input, the window's
        # own) would run in between (measured: 140-180 ms without a beat on e2b).
        QTimer.singleShot(1, run)

    def running(self) -> str:
        """Name of the task the worker is running now ("" when none has started)."""
        task = self._tasks.get(self._running) if self._running is not None else None
        return task.name if task is not None else ""

    def queued(self) -> list[str]:
        """Names of the tasks waiting behind the running one, oldest first."""
        return [t.name for tid, t in self._tasks.items() if tid != self._running]

    def submit(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        takes_progress: bool = True,
        on_done: Callable[[Any], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
        on_progress: Callable[[int, int, str], None] | None = None,
        on_started: Callable[[], None] | None = None,
    ) -> Task:
        """Queue ``fn`` (called with progress=, cancel= when takes_progress) on the worker."""
        task = Task(
            name=name,
            fn=fn,
            takes_progress=takes_progress,
            task_id=next(self._ids),
            on_done=on_done,
            on_error=on_error,
            on_progress=on_progress,
            on_started=on_started,
            started_at=time.monotonic(),
        )
        self._tasks[task.task_id] = task
        self._announce()
        self._sigSubmit.emit(task)
        self.sigQueueChanged.emit()
        return task

    def cancel_all(self) -> None:
        """Ask every queued and running task to stop at its next check."""
        for task in self._tasks.values():
            task.token.cancel()

    def shutdown(self, timeout_ms: int = 30000) -> bool:
        """Cancel pending work, stop the thread and wait for it; True if it stopped."""
        self.cancel_all()
        self._thread.quit()
        stopped = self._thread.wait(timeout_ms)
        return bool(stopped)

    def _finish(self, task_id: int) -> Task | None:
        task = self._tasks.pop(task_id, None)
        if task_id == self._running:
            self._running = None
        return task

    def _announce(self) -> None:
        """Emit sigBusyChanged when busy differs from what it said last (a task's callback that queues more
        work between a task's end and the announcement keeps one busy stretch)."""
        if self.busy != self._announced:
            self._announced = self.busy
            self.sigBusyChanged.emit(self._announced)

    def _settle(self) -> None:
        """Announce the queue after a task or a later() step was added or ended."""
        self._announce()
        self.sigQueueChanged.emit()

    @Slot(int)
    def _on_started(self, task_id: int) -> None:
        task = self._tasks.get(task_id)
        if task is None:
            return
        self._running = task_id
        task.started_at = time.monotonic()
        if task.on_started is not None:
            task.on_started()
        self.sigTaskStarted.emit(task.name)
        self.sigQueueChanged.emit()

    @Slot(int, int, int, str)
    def _on_progress(self, task_id: int, done: int, total: int, message: str) -> None:
        task = self._tasks.get(task_id)
        if task is not None and task.on_progress is not None:
            task.on_progress(done, total, message)

    @Slot(int, object)
    def _on_finished(self, task_id: int, result: Any) -> None:
        if not self._froze:  # once, after the model load (the first task): see freeze_long_lived_objects
            self._froze = True
            freeze_long_lived_objects()
        task = self._finish(task_id)
        try:
            # The callback runs before idle is announced: what it submits or defers keeps the runner busy.
            if task is not None and task.on_done is not None:
                task.on_done(result)
        finally:
            self._settle()

    @Slot(int, object, str)
    def _on_failed(self, task_id: int, exc: BaseException, text: str) -> None:
        task = self._finish(task_id)
        try:
            if task is not None:
                exc.__dict__.setdefault("_ptq_traceback", text)
                if task.on_error is not None:
                    task.on_error(exc)
        finally:
            self._settle()
