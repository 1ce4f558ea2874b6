"""The one bridge from the Session's psygnal events to the Qt GUI thread.

core.Session emits on the thread that called it (the worker), and widgets may only be touched
on the GUI thread, so every tab subscribes through ``on_gui_thread``.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QCoreApplication, QObject, Qt, Signal, Slot


class _GuiRelay(QObject):
    """Lives on the GUI thread; a queued Qt signal carries each emission's arguments to it."""

    sigRelay = Signal(object)

    def __init__(self, deliver: Callable[..., Any]) -> None:
        super().__init__()
        self._deliver = deliver
        app = QCoreApplication.instance()
        if app is not None and self.thread() is not app.thread():
            self.moveToThread(app.thread())
        # Auto: a direct call when emitted on the GUI thread, queued from any other thread.
        self.sigRelay.connect(self._on_relay, Qt.AutoConnection)

    @Slot(object)
    def _on_relay(self, args: tuple) -> None:
        self._deliver(*args)


def on_gui_thread(signal: Any, slot: Callable[..., Any]) -> Callable[[], None]:
    """Connect a psygnal SignalInstance so that `slot` always runs on the Qt GUI thread.

    A bound method is held weakly; when its object is a QObject, the connection ends when that
    object is destroyed, so a subscription never keeps a dead widget alive. Returns a function
    that disconnects.
    """
    owner = getattr(slot, "__self__", None)
    # Hold a bound method weakly: the closures below must not keep its object alive.
    method = weakref.WeakMethod(slot) if inspect.ismethod(slot) else None
    function = None if method is not None else slot
    del slot

    def deliver(*args: Any) -> None:
        target = method() if method is not None else function
        if target is None:
            disconnect()
            return
        try:
            target(*args)
        except RuntimeError as exc:
            # The receiver's C++ half was deleted between the emission and this delivery.
            if "already deleted" not in str(exc):
                raise
            disconnect()

    relay = _GuiRelay(deliver)

    def forward(*args: Any) -> None:
        try:
            relay.sigRelay.emit(args)
        except RuntimeError:  # the relay was deleted while the worker was emitting
            pass

    def disconnect() -> None:
        try:
            signal.disconnect(forward)
        except (ValueError, RuntimeError):
            pass  # already disconnected

    signal.connect(forward)
    if isinstance(owner, QObject):
        # A plain function, so Qt holds no reference to the receiver itself.
        owner.destroyed.connect(lambda *_: disconnect())
    del owner
    return disconnect


class SessionSubscriptions:
    """A widget's connections to one Session's events, replaced together when the session is.

    Handlers of a session the window has replaced must not redraw the new one's view.
    """

    def __init__(self) -> None:
        self._disconnects: list[Callable[[], None]] = []

    def replace(self, events: Any, handlers: dict[str, Callable[..., Any]]) -> None:
        """Drop every earlier connection, then connect each `events.<name>` to its handler on the GUI thread."""
        self.clear()
        if events is None:
            return
        for name, slot in handlers.items():
            self._disconnects.append(on_gui_thread(getattr(events, name), slot))

    def follow(self, session: Any, **handlers: Callable[..., Any]) -> None:
        """replace() for a session (None: follow nothing), handlers named by event."""
        self.replace(session.events if session is not None else None, handlers)

    def clear(self) -> None:
        """Disconnect everything."""
        disconnects, self._disconnects = self._disconnects, []
        for disconnect in disconnects:
            disconnect()
