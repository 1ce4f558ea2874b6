"""QuantRMSNorm on its own: the encoder layer's input norm (with scale) and the attention's v_norm (without).

The static path (one Circle RMS_NORM op) runs only inside the model's static forward, which sets the
shared context's ``static`` flag; its inputs and outputs are read there with a forward hook.
"""

import pytest
import torch
import wrapper_support as ws

from core.quant.mode import Mode
from core.wrappers.layers import QuantRMSNorm

NAMES = {"scaled": "encoder.layers.0.input_layernorm", "unscaled": "encoder.layers.0.self_attn.v_norm"}


@pytest.fixture(params=["scaled", "unscaled"])
def setup(request, sample_images):
    qmodel, norm, hf, batches = ws.prepared(sample_images, NAMES[request.param], QuantRMSNorm)
    assert norm.with_scale is (request.param == "scaled")
    return qmodel, norm, hf, batches


def _weight(norm):
    return norm.source.weight if norm.with_scale else norm.unit_weight


def _normalized(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) in float64: the exact value both float32 paths approximate."""
    x64 = x.double()
    return x64 * (x64.pow(2).mean(-1, keepdim=True) + eps).pow(-0.5)


def _float32_error(x: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Bound on a float32 RMS norm's distance from `exact`: a mean of K squares (gamma_K), a division,
    a sum with eps, a power (its input's relative error halves, plus one rounding), two products."""
    k = x.shape[-1]
    return (k * ws.U / (1 - k * ws.U) + 4 * ws.U) * exact.abs()


@torch.no_grad()
def test_no_quant_is_bit_exact_with_the_hf_norm(setup):
    _, norm, hf, _ = setup
    x = 3 * torch.randn(2, 7, 5, _weight(norm).shape[0])
    assert torch.equal(norm(x), hf(x))


@torch.no_grad()
def test_mode_transitions_through_the_model(setup):
    qmodel, norm, hf, batches = setup
    x = torch.randn(1, 9, _weight(norm).shape[0])
    ws.assert_mode_cycle(qmodel, norm, batches, lambda: norm(x), lambda: hf(x))


@torch.no_grad()
def test_calib_records_weight_and_output_ranges_with_their_images(setup):
    qmodel, norm, _, batches = setup
    per_image = ws.calibrate_per_image(qmodel, batches)
    weight = _weight(norm)
    assert norm.obs_weight.name == norm.module_name + ".weight"
    assert norm.obs_weight.min_val.shape == ()  # one scale for the elementwise constant
    assert float(norm.obs_weight.min_val) == float(weight.min()) and float(norm.obs_weight.max_val) == float(weight.max())
    assert norm.with_scale or float(norm.obs_weight.min_val) == 1.0  # the unit scale
    assert norm.obs_output.min_val.shape == () and float(norm.obs_output.min_val) <= float(norm.obs_output.max_val)
    ws.assert_min_max_provenance(norm.obs_output, per_image[norm.obs_output.name])


@torch.no_grad()
def test_calib_does_not_change_the_static_output(setup):
    qmodel, norm, _, batches = setup
    qmodel.enable_calibration()
    with ws.calls_of(norm) as calib_calls:
        qmodel(**batches[0])
    qmodel.set_mode(Mode.NO_QUANT)
    # The same input through NO_QUANT's static path (upstream, the patch embedder's CALIB path differs).
    with ws.fed_with(norm, calib_calls[0].args), ws.calls_of(norm) as float_calls:
        qmodel(**batches[0], static=True)
    assert torch.equal(calib_calls[0].output, float_calls[0].output)


@torch.no_grad()
def test_no_quant_static_op_matches_the_hf_norm_within_float_noise(setup):
    qmodel, norm, hf, batches = setup

    def static_output() -> torch.Tensor:
        with ws.calls_of(norm) as calls:
            qmodel(**batches[0], static=True)
        return calls[0].output

    with ws.calls_of(norm) as calls:
        qmodel(**batches[0], static=True)
    x = calls[0].args[0]
    verdict = ws.judged_against_noise(qmodel, static_output, hf(x), x.reshape(-1, x.shape[-1]).shape[0])
    assert verdict.ok, verdict.summary
    exact = _normalized(x, norm.eps) * _weight(norm).double()
    ws.assert_within(calls[0].output, exact, _float32_error(x, exact), "static RMS_NORM")


@torch.no_grad()
def test_quant_output_is_on_the_grid_and_within_half_steps(setup):
    qmodel, norm, _, batches = setup
    _, (calls,) = ws.quant_run(qmodel, batches, norm)
    x, y_q = calls[0].args[0], calls[0].output
    ws.assert_on_grid(y_q, norm.obs_output)
    weight = _weight(norm)
    ws.assert_on_grid(norm.weight_fq, norm.obs_weight)
    normalized = _normalized(x, norm.eps)
    y = normalized * weight.double()
    # The scale's rounding reaches the output through |x/rms(x)|, plus the float32 evaluation.
    upstream = normalized.abs() * ws.weight_error(weight, norm.obs_weight) + _float32_error(x, y)
    ws.assert_within(y_q, y, ws.fq_bound(norm.obs_output, y, upstream), "QuantRMSNorm output")
