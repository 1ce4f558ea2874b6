"""The export verdict (core.export.verdict): torch's own rounding noise measured here, and the rules on it."""

from __future__ import annotations

import pytest
import torch

from core.data.images import ImagePreprocessor
from core.data.resources import resource_path
from core.export.verdict import (
    FLOAT32_UNIT_ROUNDOFF,
    NoiseFloor,
    gemm_rounding_error,
    judge,
    noise_floor,
    rounding_noise,
)
from core.models import load_model
from core.ptq import prepare


def _floor(within=0.99, steps=2.0, max_abs=0.5, elements=4096):
    return NoiseFloor(rel=3e-7, within_one_step=within, max_steps=steps, max_abs=max_abs, draws=2, elements=elements)


def test_gemm_rounding_error_is_measured_not_assumed():
    q = prepare(load_model("tiny"))
    rel = gemm_rounding_error(q, rows=256)
    # float32 GEMMs against float64: at least the unit roundoff, far below a quantization step.
    assert FLOAT32_UNIT_ROUNDOFF <= rel < 1e-4
    assert gemm_rounding_error(q, rows=256) == rel  # seeded inputs: the same machine says the same


@pytest.fixture
def float_export_module():
    """(prepared tiny model, its export module for one photo at 70 soft tokens, that photo's batch)."""
    q = prepare(load_model("tiny"))
    batch = ImagePreprocessor(q.config, max_soft_tokens=70)([resource_path("samples/astronaut.jpg")])
    return q, q.as_export_module(batch["pixel_position_ids"]), batch


def test_rounding_noise_perturbs_only_inside_and_only_slightly(float_export_module):
    q, module, batch = float_export_module
    with torch.no_grad():
        clean = module(batch["pixel_values"])
        with rounding_noise(q, 1e-6, seed=1):
            noisy = module(batch["pixel_values"])
        again = module(batch["pixel_values"])
    assert torch.equal(clean, again)  # the patch is gone on exit
    rel = float((noisy - clean).norm() / clean.norm())
    assert 0 < rel < 1e-3
    assert not any("fq" in m.__dict__ for m in q.quant_modules())


def test_noise_floor_of_a_float_model_has_no_steps(float_export_module):
    q, module, batch = float_export_module
    with torch.no_grad():
        ref = module(batch["pixel_values"])
        floor = noise_floor(q, module, batch["pixel_values"], ref, None)
    assert floor.within_one_step is None and floor.max_steps is None
    assert 0 < floor.max_abs < 1e-2 * float(ref.abs().max())
    assert floor.elements == ref.numel() and floor.draws >= 2


@pytest.mark.parametrize(
    ("within", "steps", "level"),
    [
        (0.995, 2.0, "verified"),  # better than the floor
        (0.988, 3.0, "verified"),  # within the sampling error, one step more than the floor
        (0.97, 3.0, "check"),  # beyond the noise but not a broken parameter
        (0.86, 33.0, "failed"),  # a halved scale on the residual stream
        (0.995, 62.0, "failed"),  # a few outputs far off: clipped by a wrong output scale
    ],
)
def test_quant_verdict_levels(within, steps, level):
    v = judge(mode="quant", within=within, max_steps=steps, max_abs=steps * 0.1, floor=_floor())
    assert v.level == level, v
    assert "torch vs itself under rounding noise: 99.00%" in v.summary and f"{100 * within:.2f}%" in v.summary
    if level == "verified":
        assert v.ok and not v.reason and not v.advice
    else:
        assert v.reason and v.advice and "three-way" in v.advice


def test_a_step_count_is_whole_up_to_float_rounding():
    """Dequantized values one step apart measure 1 + a few ulp steps: that is one step, not more."""
    exact = _floor(within=1.0, steps=0.0)  # torch never moved this tensor under noise
    one_step = 1.0 + 4.5e-7  # measured on the kernel pass (scalar ATen): |a - b| / scale for one step
    assert judge(mode="quant", within=1.0, max_steps=one_step, max_abs=0.03, floor=exact).level == "verified"
    assert judge(mode="quant", within=1.0, max_steps=2.0, max_abs=0.06, floor=exact).level == "check"


def test_structural_problems_fail_whatever_the_numbers():
    v = judge(mode="quant", within=1.0, max_steps=0.0, max_abs=0.0, floor=_floor(), structural=["1 float tensors without qparams"])
    assert v.level == "failed" and "without qparams" in v.reason


def test_caveats_of_the_users_choices_read_check_not_failed():
    v = judge(mode="quant", within=1.0, max_steps=1.0, max_abs=0.1, floor=_floor(), caveats=["2 float tensors come from kept-float modules"])
    assert v.level == "check" and "kept-float" in v.reason and "int16" in v.advice


def test_float_verdict_against_the_floor():
    floor = _floor(within=None, steps=None, max_abs=1e-4)
    assert judge(mode="float", within=None, max_steps=None, max_abs=1.5e-4, floor=floor).level == "verified"
    assert judge(mode="float", within=None, max_steps=None, max_abs=5e-4, floor=floor).level == "check"
    assert judge(mode="float", within=None, max_steps=None, max_abs=1e-2, floor=floor).level == "failed"
