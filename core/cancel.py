"""A cancel token shared between the UI thread and a worker thread."""

from __future__ import annotations

import threading

from core.errors import CancelledError


class CancelToken:
    """Thread-safe cancellation flag; long loops check it between batches."""

    def __init__(self) -> None:
        # An Event, not a bool, so setting it from the UI thread is visible to the worker at once.
        self._event = threading.Event()

    def cancel(self) -> None:
        """Ask the running work to stop at its next check."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        """Whether cancel() has been called."""
        return self._event.is_set()

    def raise_if_cancelled(self, what: str | None = None) -> None:
        """Raise CancelledError if cancel() has been called; `what` names the step in its message."""
        if self._event.is_set():
            if what is None:
                raise CancelledError()
            raise CancelledError(f"{what} cancelled by the user; run it again to get results")

    def __repr__(self) -> str:
        return f"CancelToken(cancelled={self.cancelled})"
