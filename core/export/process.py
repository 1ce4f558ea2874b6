"""Export in a child process, so that the GUI's window never stalls while TICO converts.

TICO's converter is pure Python: on a worker thread it holds the GIL for seconds at a time and the
UI thread cannot run. Here ``export_circle`` runs in a child started with the "spawn" method (a
fresh interpreter: no Qt, no inherited threads or locks), rebuilds the wrapped model with a
picklable ``loader``, streams ``progress(done, total, message)`` back through a queue and returns
the same ExportResult (or raises the same ``core.errors`` exception, with the same one-line
message) as the in-process export. A cancel is passed on to the child, which stops at its next
check as in-process; a child that does not stop within CANCEL_GRACE_S is terminated. Either way the
file at the target stays as it was: the pipeline writes through core.io.StagedFile, and the parent
removes a killed child's temporary (core.io.remove_stale_temps).
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import time
from pathlib import Path
from typing import Any, Callable

from core import errors
from core.errors import CancelledError, ExportError, PTQStudioError, exception_line
from core.export.pipeline import ExportResult, Progress, export_cancelled, export_circle
from core.io import remove_stale_temps

__all__ = ["export_in_process", "CANCEL_GRACE_S"]

# How long a cancelled child may take to reach its next cancel check before it is terminated.
CANCEL_GRACE_S = 1.0
# How often the parent looks at the cancel token while the child is quiet.
POLL_S = 0.05
# Once the child has exited, how long its last message may take to arrive through the pipe.
DRAIN_S = 2.0


class _ChildCancel:
    """The child's view of the parent's cancel token: a process-shared event."""

    def __init__(self, event: Any) -> None:
        self.event = event

    @property
    def cancelled(self) -> bool:
        """Whether the parent asked the export to stop."""
        return self.event.is_set()

    def raise_if_cancelled(self, what: str | None = None) -> None:
        """CancelledError once the parent asked the export to stop."""
        if self.event.is_set():
            raise CancelledError() if what is None else CancelledError(f"{what} cancelled by the user")


def _error_payload(exc: BaseException) -> tuple[str, str, dict[str, Any]]:
    """(class name, one-line message, picklable attributes) of an exception raised in the child."""
    if isinstance(exc, PTQStudioError):
        state = {k: v for k, v in vars(exc).items() if isinstance(v, (str, int, float, bool, Path, type(None)))}
        return type(exc).__name__, exc.message, state
    return "", exception_line(exc), {}


def _rebuild_error(name: str, message: str, state: dict[str, Any]) -> PTQStudioError:
    """The child's core.errors exception again: same class, same message, same attributes."""
    cls = getattr(errors, name, None) if name else None
    if not (isinstance(cls, type) and issubclass(cls, PTQStudioError)):
        return ExportError(f"the export process failed: {message}")
    # Not cls(message): the subclasses build their message from other arguments.
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    exc.__dict__.update(state)
    return exc


def _child_main(messages: Any, cancel_event: Any, loader: Callable[[], tuple[Any, Any]], out: str, kwargs: dict) -> None:
    """Entry point of the child: build the model, export it, send back the result or the error."""
    try:
        qmodel, preprocessor = loader()
        result = export_circle(
            qmodel,
            out_path=out,
            progress=lambda done, total, message: messages.put(("progress", done, total, message)),
            cancel=_ChildCancel(cancel_event),
            preprocessor=preprocessor,
            **kwargs,
        )
        messages.put(("result", result))
    except BaseException as exc:  # every failure goes back to the parent, which raises it there
        messages.put(("error", *_error_payload(exc)))


def export_in_process(
    loader: Callable[[], tuple[Any, Any]],
    out_path: str | os.PathLike[str],
    progress: Progress | None = None,
    cancel: Any = None,
    **export_kwargs: Any,
) -> ExportResult:
    """export_circle(qmodel, out_path, preprocessor=..., **export_kwargs) run in a spawned child;
    `loader()` (picklable: a module-level function or a partial of one) returns (qmodel, preprocessor)."""
    out = Path(out_path).expanduser()
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    cancel_event = context.Event()
    child = context.Process(
        target=_child_main, args=(messages, cancel_event, loader, str(out), export_kwargs), name="ptq-export", daemon=True
    )
    child.start()
    try:
        return _wait_for_child(child, messages, cancel_event, out, progress, cancel)
    finally:
        _stop(child)
        messages.close()
        messages.cancel_join_thread()  # a killed child's queue may never drain
        remove_stale_temps(out)  # a terminated child's staged file (its process is gone now)


def _wait_for_child(child, messages, cancel_event, out: Path, progress: Progress | None, cancel: Any) -> ExportResult:
    """Relay the child's messages until its result or error; pass a cancel on to it."""
    cancel_sent_at: float | None = None
    exited_at: float | None = None
    clock = time.monotonic
    while True:
        if cancel_sent_at is None and cancel is not None and getattr(cancel, "cancelled", False):
            cancel_event.set()  # the child stops at its next check, keeping the earlier file
            cancel_sent_at = clock()
        if cancel_sent_at is not None and clock() - cancel_sent_at > CANCEL_GRACE_S:
            raise export_cancelled(out)  # the caller's finally terminates the child
        try:
            message = messages.get(timeout=POLL_S)
        except queue_module.Empty:
            if child.is_alive():
                continue
            exited_at = exited_at if exited_at is not None else clock()
            if clock() - exited_at < DRAIN_S:
                continue
            if cancel_sent_at is not None:
                raise export_cancelled(out) from None
            raise ExportError(
                f"the export process ended without a result (exit code {child.exitcode}); "
                "it may have run out of memory: close other programs or export with fewer soft tokens"
            ) from None
        kind = message[0]
        if kind == "progress":
            if progress is not None:
                progress(*message[1:])
        elif kind == "result":
            return message[1]
        else:
            raise _rebuild_error(*message[1:])


def _stop(child) -> None:
    """Let a finished child exit; terminate (then kill) one that is still running."""
    child.join(timeout=CANCEL_GRACE_S)
    if child.is_alive():
        child.terminate()
        child.join(timeout=5.0)
    if child.is_alive():
        child.kill()
        child.join()
