"""The Errors tab's module table sorts itself: O(rows) data() calls per refresh, same order, selection kept."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
from PySide6.QtCore import QItemSelectionModel, Qt

from app.qt_errors_tab import QtErrorsTab
from app.qt_module_errors_table import SORT_ROLE, ModuleErrorModel

ROWS = 700  # about E2B's module count at 70 soft tokens


def _modules(n: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    # Coarse SQNRs so ties occur; a few NaNs (no value) as a module without samples gives.
    return [
        SimpleNamespace(
            name=f"encoder.layers.{i // 20}.m{i % 20}",
            kind="linear" if i % 3 else "norm",
            sqnr_db=float("nan") if i % 97 == 5 else float(rng.randint(0, 40)),
            peir=rng.random(),
            mse=rng.random(),
            max_abs=rng.random(),
            cosine=rng.random(),
            clipped_fraction=0.0,
            samples_fp=[0.0, 1.0],  # the scatter draws the selected module
            samples_q=[0.0, 1.0],
        )
        for i in range(n)
    ]


@pytest.fixture
def tab(qtbot):
    """An Errors tab without a window: the table, its proxy and the view as the app builds them."""
    widget = QtErrorsTab(SimpleNamespace(submit=lambda *args, **kwargs: None))
    qtbot.addWidget(widget)
    widget.resize(1200, 800)
    widget.show()
    return widget


def _shown(tab, column: int, role=Qt.DisplayRole) -> list:
    return [tab.proxy.data(tab.proxy.index(r, column), role) for r in range(tab.proxy.rowCount())]


def _expected_names(mods: list, key, descending: bool = False) -> list[str]:
    """Names sorted as the table promises: stable from forward order, NaN keys last in both directions."""
    valued = [m for m in mods if not (isinstance(key(m), float) and math.isnan(key(m)))]
    nans = [m for m in mods if m not in valued]
    return [m.name for m in sorted(valued, key=key, reverse=descending) + nans]


def test_set_modules_calls_data_a_bounded_number_of_times(tab, monkeypatch):
    calls = 0
    data = ModuleErrorModel.data

    def counting(self, index, role=Qt.DisplayRole):
        nonlocal calls
        calls += 1
        return data(self, index, role)

    monkeypatch.setattr(ModuleErrorModel, "data", counting)
    mods = _modules(ROWS)
    prepared = ModuleErrorModel.prepare(mods)
    tab.model.set_modules(mods, (), prepared)
    # A comparator sort in the proxy asks twice per comparison: ~2 n log2 n = 13,000 calls here.
    # The filter reads each name once; allow a few reads a row, far below n log n.
    assert calls <= 3 * ROWS, calls
    assert _shown(tab, 1) == _expected_names(mods, lambda m: m.sqnr_db)


def test_header_sort_both_ways_and_filter(tab):
    mods = _modules(ROWS)
    tab.model.set_modules(mods, ())
    assert _shown(tab, 1) == _expected_names(mods, lambda m: m.sqnr_db)  # worst SQNR on top
    tab.table.sortByColumn(3, Qt.DescendingOrder)
    assert _shown(tab, 1) == _expected_names(mods, lambda m: m.sqnr_db, descending=True)
    tab.table.sortByColumn(1, Qt.AscendingOrder)
    assert _shown(tab, 1) == sorted(m.name for m in mods)
    tab.table.sortByColumn(6, Qt.DescendingOrder)
    assert _shown(tab, 1) == _expected_names(mods, lambda m: m.max_abs, descending=True)
    # a new result keeps the chosen order
    fresh = _modules(ROWS, seed=1)
    tab.model.set_modules(fresh, ())
    assert _shown(tab, 1) == _expected_names(fresh, lambda m: m.max_abs, descending=True)
    assert tab.model.forward == fresh  # the depth chart's forward order
    tab.filter_edit.setText("LAYERS.3.")
    names = _shown(tab, 1)
    assert names == [n for n in _expected_names(fresh, lambda m: m.max_abs, descending=True) if ".layers.3." in n]
    assert len(names) == 20
    tab.table.sortByColumn(0, Qt.AscendingOrder)
    assert _shown(tab, 0, SORT_ROLE) == sorted(_shown(tab, 0, SORT_ROLE)) and len(names) == 20


def test_keep_float_column_sorts_checked_first(tab):
    mods = _modules(50)
    keep = {mods[7].name, mods[30].name}
    tab.model.set_modules(mods, keep)
    tab.table.sortByColumn(ModuleErrorModel.KEEP_COL, Qt.DescendingOrder)
    assert _shown(tab, 1)[:2] == [mods[7].name, mods[30].name]


def test_selection_follows_the_module_through_a_sort(tab):
    mods = _modules(ROWS)
    tab.model.set_modules(mods, ())
    target = mods[123].name
    tab.select_module(target)
    assert tab.selected_module() == target
    before = tab.table.selectionModel().currentIndex().row()
    tab.table.sortByColumn(3, Qt.DescendingOrder)
    current = tab.table.selectionModel().currentIndex()
    assert current.row() != before  # the row moved ...
    assert tab.selected_module() == target  # ... and the selection with it
    selected = tab.table.selectionModel().selectedRows(1)
    assert [i.data() for i in selected] == [target]
    # and again for the top row, sorted by name
    tab.table.selectionModel().setCurrentIndex(
        tab.proxy.index(0, 1), QItemSelectionModel.ClearAndSelect | QItemSelectionModel.Rows
    )
    top = tab.proxy.index(0, 1).data()
    tab.table.sortByColumn(1, Qt.AscendingOrder)
    assert tab.selected_module() == top
