"""QuantLinear on its own: the patch embedder's input projection of the tiny Gemma 4 vision model.

nn.Linear occurs in Gemma4VisionModel only as the patch embedder's input projection (every other
projection is a Gemma4ClippableLinear); the wrapper wraps the folded copy of it (W' = 2W,
b' = b - W.1, see QuantPatchEmbedder), so that nn.Linear is the module it must match. Its mode is
the model's: it moves only through QuantVisionModel's transitions.
"""

import pytest
import torch
import torch.nn.functional as F
import wrapper_support as ws

from core.quant.mode import Mode
from core.wrappers.layers import QuantLinear


@pytest.fixture
def setup(sample_images):
    qmodel, linear, _, batches = ws.prepared(sample_images, "patch_embedder.input_proj", QuantLinear, images=2)
    x = torch.rand(1, 40, linear.linear.in_features)  # pixels live in [0, 1]
    return qmodel, linear, x, batches


@torch.no_grad()
def test_no_quant_is_bit_exact_with_the_linear_it_wraps(setup):
    _, linear, x, _ = setup
    assert torch.equal(linear(x), linear.linear(x))
    assert torch.equal(linear(x[0]), linear.linear(x[0]))  # 2-D rows as well


@torch.no_grad()
def test_mode_follows_the_model_through_every_transition(setup):
    qmodel, linear, x, batches = setup
    ws.assert_mode_cycle(qmodel, linear, batches, lambda: linear(x), lambda: linear.linear(x))
    qmodel.set_mode(Mode.QUANT)  # back to QUANT refreezes the same statistics
    assert linear.mode is Mode.QUANT
    qmodel.set_mode(Mode.CALIB)  # and on to more calibration
    assert linear.mode is Mode.CALIB and torch.equal(linear(x), linear.linear(x))


@torch.no_grad()
def test_calib_records_weight_and_output_ranges_without_changing_the_output(setup):
    qmodel, linear, x, _ = setup
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
    ws.calibrate(qmodel, batches)
    linear(x)  # x's own output range is part of what the observer saw
    qmodel.freeze()
    y_q = linear(x)
    ws.assert_on_grid(y_q, linear.obs_output)
    weight, bias = linear.linear.weight, linear.linear.bias
    ws.assert_on_grid(linear.weight_fq, linear.obs_weight)
    y = F.linear(x, weight, bias)
    # The weight's rounding reaches the output through |x|; the output rounds once more.
    upstream = ws.linear_bound(x, 0.0, weight, ws.weight_error(weight, linear.obs_weight))
    ws.assert_within(y_q, y, ws.fq_bound(linear.obs_output, y, upstream), "QuantLinear output")


@torch.no_grad()
def test_export_path_is_the_same_arithmetic_as_the_runtime_one(setup):
    qmodel, linear, x, batches = setup
    ws.calibrate(qmodel, batches)
    qmodel.freeze()
    runtime = linear(x)
    with qmodel.exporting():
        exported = linear(x)  # explicit fake-quant weight op, 2-D in and reshaped out
    assert torch.equal(exported, runtime)
