"""app.events.on_gui_thread: psygnal emissions from any thread reach the slot on the GUI thread."""

from __future__ import annotations

import gc
import threading

from psygnal import Signal
from PySide6.QtCore import QThread
from PySide6.QtWidgets import QApplication, QWidget

from app.events import on_gui_thread


class _Emitter:
    changed = Signal(int)


class _Receiver(QWidget):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, bool]] = []

    def on_changed(self, value: int) -> None:
        self.calls.append((value, QThread.currentThread() is QApplication.instance().thread()))


def test_emitted_from_a_thread_runs_on_the_gui_thread(qtbot):
    emitter, receiver = _Emitter(), _Receiver()
    qtbot.addWidget(receiver)
    on_gui_thread(emitter.changed, receiver.on_changed)
    worker = threading.Thread(target=emitter.changed.emit, args=(7,), name="ptq-test-emitter")
    worker.start()
    worker.join()
    qtbot.waitUntil(lambda: bool(receiver.calls), timeout=5000)
    assert receiver.calls == [(7, True)]


def test_emitted_on_the_gui_thread_runs_at_once(qtbot):
    emitter, receiver = _Emitter(), _Receiver()
    qtbot.addWidget(receiver)
    on_gui_thread(emitter.changed, receiver.on_changed)
    emitter.changed.emit(3)
    assert receiver.calls == [(3, True)]


def test_a_destroyed_receiver_is_disconnected_and_not_kept_alive(qtbot):
    emitter = _Emitter()
    receiver = _Receiver()
    on_gui_thread(emitter.changed, receiver.on_changed)
    assert len(emitter.changed) == 1
    alive = threading.Event()
    receiver.destroyed.connect(lambda *_: alive.set())
    receiver.deleteLater()
    del receiver
    qtbot.waitUntil(alive.is_set, timeout=5000)
    gc.collect()
    assert len(emitter.changed) == 0
    emitter.changed.emit(1)  # nothing left to call, nothing raised


def test_the_returned_function_disconnects(qtbot):
    emitter, receiver = _Emitter(), _Receiver()
    qtbot.addWidget(receiver)
    disconnect = on_gui_thread(emitter.changed, receiver.on_changed)
    disconnect()
    emitter.changed.emit(5)
    assert receiver.calls == []
