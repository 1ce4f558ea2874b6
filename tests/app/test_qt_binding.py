"""The Qt binding itself: a Signal.emit must not lose references (PySide6 6.12.0 drops one to True
on every emit, and the process aborts once True's count runs out: "bool_dealloc")."""

from __future__ import annotations

import sys

from PySide6.QtCore import QObject, Signal


class _Emitter(QObject):
    plain = Signal()
    value = Signal(object)


def test_emit_keeps_the_reference_counts_of_true_false_and_none(qapp):
    emitter = _Emitter()
    received = []
    emitter.value.connect(received.append)
    emitter.plain.connect(lambda: received.append(None))
    before = [sys.getrefcount(x) for x in (True, False, None)]
    for i in range(500):
        emitter.plain.emit()
        emitter.value.emit(i)
    received.clear()  # it held 500 Nones of its own
    after = [sys.getrefcount(x) for x in (True, False, None)]
    # A few references may come and go with the interpreter's own caches, never one per emit.
    assert all(abs(a - b) < 50 for a, b in zip(after, before)), f"True/False/None refcounts moved by {[a - b for a, b in zip(after, before)]}"
