"""The fast extreme locator agrees with argmin / argmax exactly (first occurrence in C order)."""

from __future__ import annotations

import pytest
import torch

from core.quant import extremes
from core.quant.extremes import TensorExtremes, first_extreme_index

SHAPES = [(5,), (1, 96, 300), (1, 4, 97, 97), (3, 7, 2, 700), (20000,), (4096, 4), (1, 70, 8, 32)]


def _variants(shape, gen):
    x = torch.randn(shape, generator=gen)
    yield x
    yield x.round()  # many exact ties
    yield torch.zeros(shape)  # every element is both extremes
    yield (x * 3).clamp(-1, 1)  # saturated: the extreme fills many columns
    spikes = x.clone().reshape(-1)
    if spikes.numel() > 10:
        spikes[[7, -3]] = -100.0
        spikes[[-1, spikes.numel() // 2]] = 100.0
    yield spikes.reshape(shape)
    yield x.transpose(0, -1)  # not contiguous


@pytest.mark.parametrize("shape", SHAPES)
def test_first_extreme_index_matches_argmin_and_argmax(shape):
    gen = torch.Generator().manual_seed(0)
    for x in _variants(shape, gen):
        flat = x.reshape(-1)
        assert first_extreme_index(x, "min") == int(flat.argmin())
        assert first_extreme_index(x, "max") == int(flat.argmax())


@pytest.mark.parametrize("expect_moves", [True, False])
def test_tensor_extremes_equal_aminmax(expect_moves, monkeypatch):
    monkeypatch.setattr(extremes, "CACHE_RESIDENT_NUMEL", 1000)  # the lazy path for large tensors, on small ones
    gen = torch.Generator().manual_seed(1)
    for x in _variants((2, 50, 400), gen):
        ext = TensorExtremes(x, expect_moves=expect_moves)
        mn, mx = torch.aminmax(x)
        assert float(ext.min) == float(mn) and float(ext.max) == float(mx)
        assert ext.first_index("min", float(mn)) == int(x.reshape(-1).argmin())
        assert ext.first_index("max", float(mx)) == int(x.reshape(-1).argmax())
