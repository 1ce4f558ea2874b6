"""QuantLinear on its own: the patch embedder's input projection of the tiny Gemma 4 vision model.

nn.Linear occurs in Gemma4VisionModel only as the patch embedder's input projection (every other
projection is a Gemma4ClippableLinear); the wrapper wraps the folded copy of it (W' = 2W,
b' = b - W.1, see QuantPatchEmbedder), so that nn.Linear is the module it must match. Its mode is
the model's: it moves only through QuantVisionModel's transitions.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from wrapper_support import (
    assert_on_grid,
    assert_within,
    calibrate,
    fq_bound,
    image_batches,
    linear_bound,
    tiny_vision_model,
    weight_error,
)

from core.ptq import prepare
from core.quant.mode import Mode
from core.wrappers.layers import QuantLinear


@pytest.fixture
def setup(sample_images):
    torch.manual_seed(0)
    qmodel = prepare(tiny_vision_model())
    linear = qmodel.patch_embedder.input_proj
    assert type(linear) is QuantLinear
    x = torch.rand(1, 40, linear.linear.in_features)  # pixels live in [0, 1]
    return qmodel, linear, x, image_batches(qmodel.config, sample_images[:2])


@torch.no_grad()
def test_no_quant_is_bit_exact_with_the_linear_it_wraps(setup):
    qmodel, linear, x, _ = setup
    assert torch.equal(linear(x), linear.linear(x))
    assert torch.equal(linear(x[0]), linear.linear(x[0]))  # 2-D rows as well


@torch.no_grad()
def test_mode_follows_the_model_through_every_transition(setup):
    qmodel, linear, x, batches = setup
    assert linear.mode is Mode.NO_QUANT
    expected = linear.linear(x)
    calibrate(qmodel, batches)
    assert linear.mode is Mode.CALIB
    qmodel.freeze()
    assert linear.mode is Mode.QUANT
    assert not torch.equal(linear(x), expected)
    qmodel.set_mode(Mode.NO_QUANT)
    assert linear.mode is Mode.NO_QUANT
    assert torch.equal(linear(x), linear.linear(x))
    qmodel.set_mode(Mode.QUANT)  # back to QUANT refreezes the same statistics
    assert linear.mode is Mode.QUANT
    qmodel.set_mode(Mode.CALIB)  # and on to more calibration
    assert linear.mode is Mode.CALIB
    assert torch.equal(linear(x), linear.linear(x))


@torch.no_grad()
def test_calib_records_weight_and_output_ranges_without_changing_the_output(setup):
    qmodel, linear, x, batches = setup
    qmodel.enable_calibration()
    out = linear(x)
    assert torch.equal(out, linear.linear(x))
    weight = linear.obs_weight
    assert weight.name == "patch_embedder.input_proj.weight" and weight.per_channel
    assert weight.min_val.shape == (linear.linear.out_features,)
    mins, maxs = linear.linear.weight.aminmax(dim=1)
    assert torch.equal(weight.min_val, mins) and torch.equal(weight.max_val, maxs)
    assert weight.min_source == "weights"
    output = linear.obs_output
    assert output.name == "patch_embedder.input_proj.output" and output.min_val.shape == ()
    assert float(output.min_val) == float(out.min()) and float(output.max_val) == float(out.max())
    assert bool((weight.min_val <= weight.max_val).all()) and float(output.min_val) <= float(output.max_val)


@torch.no_grad()
def test_quant_output_is_on_the_grid_and_within_half_steps(setup):
    qmodel, linear, x, batches = setup
    calibrate(qmodel, batches)
    linear(x)  # x's own output range is part of what the observer saw
    qmodel.freeze()
    y_q = linear(x)
    assert_on_grid(y_q, linear.obs_output)
    weight, bias = linear.linear.weight, linear.linear.bias
    assert_on_grid(linear.weight_fq, linear.obs_weight)
    y = F.linear(x, weight, bias)
    # The weight's rounding reaches the output through |x|; the output rounds once more.
    upstream = linear_bound(x, 0.0, weight, weight_error(weight, linear.obs_weight))
    assert_within(y_q, y, fq_bound(linear.obs_output, y, upstream), "QuantLinear output")


@torch.no_grad()
def test_export_path_is_the_same_arithmetic_as_the_runtime_one(setup):
    qmodel, linear, x, batches = setup
    calibrate(qmodel, batches)
    qmodel.freeze()
    runtime = linear(x)
    with qmodel.exporting():
        exported = linear(x)  # explicit fake-quant weight op, 2-D in and reshaped out
    assert torch.equal(exported, runtime)
