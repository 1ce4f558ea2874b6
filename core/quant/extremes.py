"""The minimum and maximum of a tensor and where they first occur, in one pass.

``Tensor.argmin`` / ``argmax`` on CPU do not vectorise: on the activations of the E2B-sized
encoder each costs about seven ``torch.aminmax`` passes, and calibration needs both for
every observer on the first image (every extreme moves then). Row-wise ``amin`` / ``amax``
over a contiguous tensor viewed as rows a few hundred elements wide cost about what one
``aminmax`` costs (``aminmax`` with a ``dim`` is the slow one), give the same extremes, and
keep one minimum and one maximum per row: the first row holding the extreme, then the first
equal element in it, is its first occurrence in C order, i.e. exactly what ``argmin`` /
``argmax`` return, found without another pass over the tensor.

Tensors far larger than the cache (the attention scores at 2520 patches) are the exception:
there two row reductions read memory twice, so when the extremes probably stay put (an
observer that has seen images already) one ``aminmax`` runs and the rows are reduced only
for an extreme that did move.
"""

from __future__ import annotations

import torch

# Below this size argmin/argmax cost no more than the row bookkeeping.
_MIN_NUMEL = 1 << 14
# Rows at least this wide keep the row reductions vectorised.
_MIN_WIDTH = 64
# Above this many elements (16 MiB of float32) a second read of a tensor no longer comes from the cache.
CACHE_RESIDENT_NUMEL = 1 << 22


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

    `expect_moves` says whether the caller will probably ask where they are (an observer's
    first batch); it only changes the cost, never the answer.
    """

    def __init__(self, x: torch.Tensor, *, expect_moves: bool = True) -> None:
        self.x = x
        self._rows = _rows(x)
        self._row_extremes: dict[str, torch.Tensor] = {}
        if self._rows is None or (not expect_moves and x.numel() > CACHE_RESIDENT_NUMEL):
            self.min, self.max = torch.aminmax(x)
        else:
            self._row_extremes = {"min": self._rows.amin(dim=1), "max": self._rows.amax(dim=1)}
            self.min, self.max = self._row_extremes["min"].min(), self._row_extremes["max"].max()

    def first_index(self, which: str, value: float) -> int:
        """Flat C-order index of the first element equal to the extreme `value` ('min' or 'max').

        Equal to ``int(x.reshape(-1).argmin())`` / ``argmax()`` for any tensor without NaN.
        """
        flat = self.x.reshape(-1)
        rows = self._rows
        if rows is None:  # small or not contiguous: argmin is as cheap
            return int(flat.argmin() if which == "min" else flat.argmax())
        per_row = self._row_extremes.get(which)
        if per_row is None:
            per_row = rows.amin(dim=1) if which == "min" else rows.amax(dim=1)
        hits = (per_row == value).nonzero()
        if hits.numel() == 0:  # NaN matches nothing
            return int(flat.argmin() if which == "min" else flat.argmax())
        row = int(hits[0, 0])
        return row * rows.shape[1] + int((rows[row] == value).nonzero()[0, 0])


def first_extreme_index(x: torch.Tensor, which: str) -> int:
    """Flat C-order index of the first minimum ('min') or maximum ('max') of `x`, as argmin/argmax give."""
    extremes = TensorExtremes(x)
    value = extremes.min if which == "min" else extremes.max
    return extremes.first_index(which, float(value))
