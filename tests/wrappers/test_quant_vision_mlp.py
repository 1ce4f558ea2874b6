"""QuantVisionMLP on its own: the encoder layer's MLP of the tiny model, fed the input the model gives it.

Its projections are wrapped children (QuantClippableLinear, tested in their own file); the MLP
adds the observers of the activation and of the gated product, and the QUANT bound below carries
every quantizer's half step through the MLP's own arithmetic.
"""

import pytest
import torch
import torch.nn.functional as F
import wrapper_support as ws

from core.wrappers.layers import QuantVisionMLP

PREFIX = "encoder.layers.0.mlp."


@pytest.fixture
def setup(sample_images):
    qmodel, mlp, hf, batches = ws.prepared(sample_images, PREFIX[:-1], QuantVisionMLP)
    with torch.no_grad(), ws.calls_of(mlp) as calls:
        qmodel(**batches[0])
    return qmodel, mlp, hf, calls[0].args[0], batches


def lipschitz(fn, lo: float, hi: float, points: int = 200_001) -> float:
    """Largest |fn'| on [lo, hi]: the sampled maximum plus the most it can rise between samples.

    Between samples the slope moves by at most max|fn''| times half the spacing; max|fn''| is
    sampled the same way (GELU's curvature is smooth and bounded, so one refinement suffices).
    """
    with torch.enable_grad():
        t = torch.linspace(lo, hi, points, dtype=torch.float64, requires_grad=True)
        (slope,) = torch.autograd.grad(fn(t).sum(), t, create_graph=True)
        (curve,) = torch.autograd.grad(slope.sum(), t)
    spacing = (hi - lo) / (points - 1)
    return float(slope.abs().max()) + float(curve.abs().max()) * spacing


@torch.no_grad()
def test_bit_exact_with_the_hf_mlp_in_every_mode_but_quant(setup):
    qmodel, mlp, hf, x, batches = setup
    ws.assert_mode_cycle(qmodel, mlp, batches, lambda: mlp(x), lambda: hf(x))


@torch.no_grad()
def test_calib_records_activation_and_product_with_their_images(setup):
    qmodel, mlp, _, _, batches = setup
    per_image = ws.calibrate_per_image(qmodel, batches)
    ws.assert_observers_recorded(mlp, ["act", "product"], per_image)
    # GELU is bounded below by its minimum, about -0.17.
    assert float(mlp.obs_act.min_val) > -0.18


@torch.no_grad()
def test_quant_is_on_the_grid_and_within_the_half_steps_it_carries(setup):
    qmodel, mlp, hf, _, batches = setup
    seen, (calls,) = ws.quant_run(qmodel, batches, mlp)
    x, y_q = calls[0].args[0], calls[0].output
    for obs in (mlp.obs_act, mlp.obs_product, mlp.gate_proj.obs_output, mlp.up_proj.obs_output, mlp.down_proj.obs_output):
        ws.assert_on_grid(ws.fq_output(seen, obs.name), obs)

    def projection(wrapper, inp, inp_err):
        weight = wrapper.linear.weight
        ref = F.linear(inp.double(), weight.double())
        return ref, ws.fq_bound(wrapper.obs_output, ref, ws.linear_bound(inp, inp_err, weight, ws.weight_error(weight, wrapper.obs_weight)))

    gate, gate_err = projection(mlp.gate_proj, x, 0.0)
    up, up_err = projection(mlp.up_proj, x, 0.0)
    gate_q = ws.fq_output(seen, mlp.gate_proj.obs_output.name)
    act_fn = hf.act_fn
    # The activation moves by at most its steepest slope times the gate's error, and float32's own
    # evaluation of it on the quantized gate is measured element by element.
    slope = lipschitz(act_fn, float((gate - gate_err).min()), float((gate + gate_err).max()))
    act = act_fn(gate)
    act_float32 = (act_fn(gate_q).double() - act_fn(gate_q.double())).abs()
    act_err = ws.fq_bound(mlp.obs_act, act, slope * gate_err + act_float32)
    product = act * up
    product_err = ws.fq_bound(
        mlp.obs_product, product, act.abs() * up_err + up.abs() * act_err + act_err * up_err + ws.U * product.abs()
    )
    y, y_err = projection(mlp.down_proj, product, product_err)
    ws.assert_within(y_q, y, y_err, "QuantVisionMLP output")

    # Step by step, each quantized tensor is within its own half step of the float op on the
    # quantized tensors before it (a far tighter check than the carried bound above).
    act_q, up_q, product_q = (ws.fq_output(seen, o.name) for o in (mlp.obs_act, mlp.up_proj.obs_output, mlp.obs_product))
    act_exact = act_fn(gate_q.double())
    ws.assert_within(act_q, act_exact, ws.fq_bound(mlp.obs_act, act_exact, act_float32), "activation step")
    product_exact = act_q.double() * up_q.double()
    ws.assert_within(product_q, product_exact, ws.fq_bound(mlp.obs_product, product_exact, ws.U * product_exact.abs()), "product step")
    y_step, y_step_err = projection(mlp.down_proj, product_q, 0.0)
    ws.assert_within(y_q, y_step, y_step_err, "down projection step")
