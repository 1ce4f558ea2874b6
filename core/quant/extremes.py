"""The minimum and maximum of a tensor and where they first occur, in about one pass each.

``Tensor.argmin`` / ``argmax`` on CPU do not vectorise: on the activations of the E2B-sized
encoder each costs about seven ``torch.aminmax`` passes, and calibration needs both for
every observer on the first image (every extreme moves then). Viewing a contiguous tensor as
rows a few hundred elements wide, the column-wise ``amin`` / ``amax`` is an elementwise
minimum of rows (vectorised, about one pass); the few columns that hold the extreme are
then scanned, and the first row holding it gives the first occurrence in C order. The
index is exactly what ``argmin`` / ``argmax`` return (the first index of the extreme).
"""

from __future__ import annotations

import torch

# Below this size argmin/argmax cost no more than the column search's fixed overhead.
_MIN_NUMEL = 1 << 14
# Rows at least this wide keep the column reduction vectorised.
_MIN_WIDTH = 64
# Beyond this many columns holding the extreme (a saturated tensor) scanning them costs more
# than argmin itself.
_MAX_CANDIDATES = 8
# Elements checked for a known extreme before any reduction (saturated tensors end here).
_PREFIX = 4096


def _rows(x: torch.Tensor) -> torch.Tensor | None:
    """`x` as a (rows, width) view with width >= _MIN_WIDTH, or None when argmin is as cheap."""
    n = x.numel()
    if n < _MIN_NUMEL or not x.is_contiguous():
        return None
    width = 1
    for dim in reversed(x.shape):
        width *= int(dim)
        if width >= _MIN_WIDTH:
            break
    if width >= n:
        return None
    return x.view(-1, width)


class TensorExtremes:
    """The min and max of one tensor (0-d tensors) and, on demand, where each first occurs.

    With `locate` true both locations are known to be needed (an observer's first batch), so
    the column reductions replace ``aminmax`` instead of following it.
    """

    def __init__(self, x: torch.Tensor, *, locate: bool = False) -> None:
        self.x = x
        self._rows = _rows(x)
        self._columns: dict[str, torch.Tensor] = {}
        if locate and self._rows is not None:
            self._columns = {"min": self._rows.amin(dim=0), "max": self._rows.amax(dim=0)}
            self.min, self.max = self._columns["min"].min(), self._columns["max"].max()
        else:
            self.min, self.max = torch.aminmax(x)

    def first_index(self, which: str, value: float) -> int:
        """Flat C-order index of the first element equal to the extreme `value` ('min' or 'max').

        Equal to ``int(x.reshape(-1).argmin())`` / ``argmax()`` for any tensor without NaN.
        """
        is_min = which == "min"
        flat = self.x.reshape(-1)
        rows = self._rows
        if rows is None:
            return int(flat.argmin() if is_min else flat.argmax())
        early = (flat[:_PREFIX] == value).nonzero()
        if early.numel():
            return int(early[0, 0])
        columns = self._columns.get(which)
        if columns is None:
            columns = rows.amin(dim=0) if is_min else rows.amax(dim=0)
        candidates = (columns == value).nonzero().reshape(-1)
        if not 0 < candidates.numel() <= _MAX_CANDIDATES:  # NaN matches nothing; saturation too much
            return int(flat.argmin() if is_min else flat.argmax())
        # Every occurrence lies in a candidate column, so the first row holding one of them is the
        # first row holding the extreme at all; its first equal element is the answer.
        if candidates.numel() == 1:
            column = int(candidates[0])
            return int((rows[:, column] == value).nonzero()[0, 0]) * rows.shape[1] + column
        row = int((rows.index_select(1, candidates) == value).any(dim=1).nonzero()[0, 0])
        return row * rows.shape[1] + int((rows[row] == value).nonzero()[0, 0])


def first_extreme_index(x: torch.Tensor, which: str) -> int:
    """Flat C-order index of the first minimum ('min') or maximum ('max') of `x`, as argmin/argmax give."""
    extremes = TensorExtremes(x)
    value = extremes.min if which == "min" else extremes.max
    return extremes.first_index(which, float(value))
