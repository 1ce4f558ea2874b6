"""A tab's subscriptions to the Session's events, moved to each new session the window takes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.events import on_gui_thread


class SessionSubscription:
    """Connects slots (on the GUI thread) to one session's events; following another drops the old ones."""

    def __init__(self) -> None:
        self._disconnect: list[Callable[[], None]] = []

    def follow(
        self,
        session: Any,
        on_calibrated: Callable[[int], Any],
        on_config_changed: Callable[[Any], Any],
        on_images_changed: Callable[[], Any],
    ) -> None:
        """Subscribe to this session's calibrated, config_changed and images_changed (None: to nothing)."""
        for disconnect in self._disconnect:
            disconnect()
        self._disconnect = []
        if session is not None:
            events = session.events
            self._disconnect = [
                on_gui_thread(events.calibrated, on_calibrated),
                on_gui_thread(events.config_changed, on_config_changed),
                on_gui_thread(events.images_changed, on_images_changed),
            ]
