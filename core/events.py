"""The Session's change announcements: one Qt-free psygnal group per session.

Front ends subscribe instead of being told by hand (napari's layer events are the model). A
signal is emitted on the thread that called the Session method, usually a worker thread, so a
GUI must hop to its own thread before touching widgets (app.events.on_gui_thread does that).
"""

from __future__ import annotations

from psygnal import Signal, SignalGroup


class SessionEvents(SignalGroup):
    """What changed in a Session; connect with ``session.events.<name>.connect(callback)``."""

    # images added, removed, cleared, excluded or included (not the status changes a calibration makes)
    images_changed = Signal()
    # the new PTQConfig: the model was prepared again, so the statistics are gone
    config_changed = Signal(object)
    # new statistics: the session's stats_version after calibrate, recalibrate_without (also when
    # it restores the earlier ones) or load
    calibrated = Signal(int)
    # the paths of the evaluation images after Session.set_evaluation_images changed them (what
    # analyse / evaluate / sensitivity use when given no images)
    evaluation_changed = Signal(list)
    # the CompareResult of evaluate()
    evaluated = Signal(object)
    # the ExportResult of export()
    exported = Signal(object)
    # an analysis view's result, named by its view: ("sensitivity", [SensitivityEntry, ...]); a new
    # view (a module in core.analysis plus a Session method) announces itself here, views subscribe
    analysed = Signal(str, object)
    # a finished remedy run's FixResult (core.remedies.apply): the model's weights, statistics
    # and perhaps per-module dtypes changed; `calibrated` with the new stats_version comes first
    remedied = Signal(object)
