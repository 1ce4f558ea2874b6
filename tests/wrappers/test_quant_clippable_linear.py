"""QuantClippableLinear on its own: projections of the tiny model built with use_clipped_linears.

The MLP's down projection gets finite clamp bounds at half of what the sample images reach, so
both clamps bite; the query projection gets HF's infinite defaults back (core.models seeds finite
ones), whose clamps are no-ops and get no observer.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from wrapper_support import (
    assert_on_grid,
    assert_within,
    calibrate,
    calls_of,
    fq_bound,
    fq_tensors,
    image_batches,
    linear_bound,
    tiny_vision_model,
    weight_error,
)

from core.ptq import prepare
from core.quant.mode import Mode
from core.wrappers.layers import QuantClippableLinear


@pytest.fixture
def setup(sample_images):
    torch.manual_seed(0)
    model = tiny_vision_model(use_clipped_linears=True)
    batches = image_batches(model.config, sample_images[:2])
    hf = model.encoder.layers[0].mlp.down_proj
    with torch.no_grad(), calls_of(hf.linear) as seen:
        model(**{k: v for k, v in batches[0].items() if k != "image_ids"})
    x, y = seen[0].args[0], seen[0].output
    with torch.no_grad():
        hf.input_min.fill_(float(x.min()) / 2)
        hf.input_max.fill_(float(x.max()) / 2)
        hf.output_min.fill_(float(y.min()) / 2)
        hf.output_max.fill_(float(y.max()) / 2)
        plain = model.encoder.layers[0].self_attn.q_proj
        for bound in (plain.input_min, plain.output_min):
            bound.fill_(-float("inf"))
        for bound in (plain.input_max, plain.output_max):
            bound.fill_(float("inf"))
    qmodel = prepare(model)
    wrapper = qmodel.encoder.layers[0].mlp.down_proj
    assert type(wrapper) is QuantClippableLinear
    # Rows that reach past both input bounds (the clamps must matter).
    rows = 2 * x[0, :40] + 0.1 * torch.randn(40, x.shape[-1])
    return qmodel, wrapper, wrapper.source, rows, batches


def test_infinite_bounds_get_no_clamp_observers(setup):
    qmodel, wrapper, _, _, _ = setup
    plain = qmodel.encoder.layers[0].self_attn.q_proj
    assert type(plain) is QuantClippableLinear and plain.source.use_clipped_linears
    assert (plain.clip_in, plain.clip_out) == (False, False)
    assert [n for n, _ in plain.named_children() if n.startswith("obs_")] == ["obs_weight", "obs_output"]
    rows = torch.randn(8, plain.linear.in_features) * 1e30  # nothing is clamped
    assert torch.equal(plain(rows), plain.source(rows))
    assert [n for n, _ in wrapper.named_children() if n.startswith("obs_")] == [
        "obs_input_clamped", "obs_weight", "obs_linear", "obs_output"
    ]


@torch.no_grad()
def test_no_quant_is_bit_exact_with_the_hf_module(setup):
    qmodel, wrapper, hf, rows, _ = setup
    assert wrapper.mode is Mode.NO_QUANT
    assert torch.equal(wrapper(rows), hf(rows))
    assert torch.equal(wrapper(rows[None]), hf(rows[None]))


@torch.no_grad()
def test_mode_transitions_through_the_model(setup):
    qmodel, wrapper, hf, rows, batches = setup
    calibrate(qmodel, batches)
    assert wrapper.mode is Mode.CALIB and torch.equal(wrapper(rows), hf(rows))
    qmodel.freeze()
    assert wrapper.mode is Mode.QUANT and not torch.equal(wrapper(rows), hf(rows))
    qmodel.set_mode(Mode.NO_QUANT)
    assert wrapper.mode is Mode.NO_QUANT and torch.equal(wrapper(rows), hf(rows))


@torch.no_grad()
def test_calib_records_the_clamped_ranges_without_changing_the_output(setup):
    qmodel, wrapper, hf, rows, batches = setup
    qmodel.enable_calibration()
    assert torch.equal(wrapper(rows), hf(rows))
    clamped = wrapper.obs_input_clamped
    assert clamped.name == "encoder.layers.0.mlp.down_proj.input_clamped"
    # The rows reach past both bounds, so the clamped range is exactly the bounds.
    assert float(clamped.min_val) == float(hf.input_min) and float(clamped.max_val) == float(hf.input_max)
    out = wrapper.obs_output
    assert float(out.min_val) == float(hf.output_min) and float(out.max_val) == float(hf.output_max)
    inner = wrapper.obs_linear
    assert float(inner.min_val) < float(hf.output_min) and float(inner.max_val) > float(hf.output_max)
    assert wrapper.obs_weight.min_val.shape == (wrapper.linear.out_features,)
    for obs in (clamped, inner, out, wrapper.obs_weight):
        assert bool((obs.min_val <= obs.max_val).all()), obs.name


@torch.no_grad()
def test_quant_is_on_the_grid_and_within_half_steps(setup):
    qmodel, wrapper, hf, rows, batches = setup
    calibrate(qmodel, batches)
    wrapper(rows)
    qmodel.freeze()
    with fq_tensors(qmodel) as seen:
        y_q = wrapper(rows)
    prefix = "encoder.layers.0.mlp.down_proj."
    for role in ("input_clamped", "linear", "output"):
        (_, tensor), = seen[prefix + role]
        assert_on_grid(tensor, getattr(wrapper, f"obs_{role}"))
    # Float reference and the error each quantizer may add on the way (clamps are 1-Lipschitz).
    a = torch.clamp(rows, hf.input_min, hf.input_max)
    a_err = fq_bound(wrapper.obs_input_clamped, a)
    weight = wrapper.linear.weight
    lin = F.linear(a, weight)
    lin_err = fq_bound(wrapper.obs_linear, lin, linear_bound(a, a_err, weight, weight_error(weight, wrapper.obs_weight)))
    y = torch.clamp(lin, hf.output_min, hf.output_max)
    assert_within(y_q, y, fq_bound(wrapper.obs_output, y, lin_err), "QuantClippableLinear output")
