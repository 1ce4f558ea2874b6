"""QuantClippableLinear on its own: projections of the tiny model built with use_clipped_linears.

The MLP's down projection gets finite clamp bounds at half of what the sample images reach, so
both clamps bite; the query projection gets HF's infinite defaults back (core.models seeds finite
ones), whose clamps are no-ops and get no observer.
"""

import pytest
import torch
import torch.nn.functional as F
import wrapper_support as ws

from core.ptq import prepare
from core.wrappers.layers import QuantClippableLinear

NAME = "encoder.layers.0.mlp.down_proj"


@pytest.fixture
def setup(sample_images):
    torch.manual_seed(0)
    model = ws.tiny_vision_model(use_clipped_linears=True)
    batches = ws.image_batches(model.config, sample_images[:2])
    hf = model.get_submodule(NAME)
    with torch.no_grad(), ws.calls_of(hf.linear) as seen:
        model(**ws.pixels(batches[0]))
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
    wrapper = qmodel.get_submodule(NAME)
    assert type(wrapper) is QuantClippableLinear
    # Rows that reach past both input bounds (the clamps must matter).
    rows = 2 * x[0, :40] + 0.1 * torch.randn(40, x.shape[-1])
    return qmodel, wrapper, wrapper.source, rows, batches


def observer_names(wrapper):
    return [n for n, _ in wrapper.named_children() if n.startswith("obs_")]


def test_infinite_bounds_get_no_clamp_observers(setup):
    qmodel, wrapper, _, _, _ = setup
    plain = qmodel.encoder.layers[0].self_attn.q_proj
    assert type(plain) is QuantClippableLinear and plain.source.use_clipped_linears
    assert (plain.clip_in, plain.clip_out) == (False, False)
    assert observer_names(plain) == ["obs_weight", "obs_output"]
    rows = torch.randn(8, plain.linear.in_features) * 1e30  # nothing is clamped
    assert torch.equal(plain(rows), plain.source(rows))
    assert observer_names(wrapper) == ["obs_input_clamped", "obs_weight", "obs_linear", "obs_output"]


@torch.no_grad()
def test_bit_exact_with_the_hf_module_in_every_mode_but_quant(setup):
    qmodel, wrapper, hf, rows, batches = setup
    assert torch.equal(wrapper(rows[None]), hf(rows[None]))  # batched rows as well
    ws.assert_mode_cycle(qmodel, wrapper, batches, lambda: wrapper(rows), lambda: hf(rows))


@torch.no_grad()
def test_calib_records_the_clamped_ranges_without_changing_the_output(setup):
    qmodel, wrapper, hf, rows, _ = setup
    qmodel.enable_calibration()
    assert torch.equal(wrapper(rows), hf(rows))
    clamped = wrapper.obs_input_clamped
    assert clamped.name == NAME + ".input_clamped"
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
    ws.calibrate(qmodel, batches)
    wrapper(rows)
    qmodel.freeze()
    with ws.fq_tensors(qmodel) as seen:
        y_q = wrapper(rows)
    for role in ("input_clamped", "linear", "output"):
        ws.assert_on_grid(ws.fq_output(seen, f"{NAME}.{role}"), getattr(wrapper, f"obs_{role}"))
    # Float reference and the error each quantizer may add on the way (clamps are 1-Lipschitz).
    a = torch.clamp(rows, hf.input_min, hf.input_max)
    a_err = ws.fq_bound(wrapper.obs_input_clamped, a)
    weight = wrapper.linear.weight
    lin = F.linear(a, weight)
    lin_upstream = ws.linear_bound(a, a_err, weight, ws.weight_error(weight, wrapper.obs_weight))
    lin_err = ws.fq_bound(wrapper.obs_linear, lin, lin_upstream)
    y = torch.clamp(lin, hf.output_min, hf.output_max)
    ws.assert_within(y_q, y, ws.fq_bound(wrapper.obs_output, y, lin_err), "QuantClippableLinear output")
