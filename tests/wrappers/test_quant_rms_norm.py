"""QuantRMSNorm on its own: the encoder layer's input norm (with scale) and the attention's v_norm (without).

The static path (one Circle RMS_NORM op) runs only inside the model's static forward, which sets the
shared context's ``static`` flag; its inputs and outputs are read there with a forward hook.
"""

from __future__ import annotations

import pytest
import torch
from wrapper_support import (
    U,
    assert_min_max_provenance,
    assert_on_grid,
    assert_within,
    calibrate,
    calibrate_per_image,
    calls_of,
    fed_with,
    fq_bound,
    image_batches,
    judged_against_noise,
    tiny_vision_model,
    weight_error,
)

from core.ptq import prepare
from core.quant.mode import Mode
from core.wrappers.layers import QuantRMSNorm


@pytest.fixture
def setup(sample_images):
    torch.manual_seed(0)
    qmodel = prepare(tiny_vision_model())
    batches = image_batches(qmodel.config, sample_images[:3])
    layer = qmodel.encoder.layers[0]
    norms = {"scaled": layer.input_layernorm, "unscaled": layer.self_attn.v_norm}
    for norm in norms.values():
        assert type(norm) is QuantRMSNorm
    return qmodel, norms, batches


def _normalized(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) in float64: the exact value both float32 paths approximate."""
    x64 = x.double()
    return x64 * (x64.pow(2).mean(-1, keepdim=True) + eps).pow(-0.5)


@pytest.mark.parametrize("which", ["scaled", "unscaled"])
@torch.no_grad()
def test_no_quant_is_bit_exact_with_the_hf_norm(setup, which):
    qmodel, norms, _ = setup
    norm = norms[which]
    assert norm.with_scale is (which == "scaled")
    x = 3 * torch.randn(2, 7, 5, norm.source.weight.shape[0] if norm.with_scale else norm.unit_weight.shape[0])
    assert torch.equal(norm(x), norm.source(x))


@torch.no_grad()
def test_mode_transitions_through_the_model(setup):
    qmodel, norms, batches = setup
    norm = norms["scaled"]
    x = torch.randn(1, 9, norm.source.weight.shape[0])
    calibrate(qmodel, batches)
    assert norm.mode is Mode.CALIB and torch.equal(norm(x), norm.source(x))
    qmodel.freeze()
    assert norm.mode is Mode.QUANT and not torch.equal(norm(x), norm.source(x))
    qmodel.set_mode(Mode.NO_QUANT)
    assert norm.mode is Mode.NO_QUANT and torch.equal(norm(x), norm.source(x))


@torch.no_grad()
def test_calib_records_weight_and_output_ranges_with_their_images(setup):
    qmodel, norms, batches = setup
    per_image = calibrate_per_image(qmodel, batches)
    scaled, unscaled = norms["scaled"], norms["unscaled"]
    weight = scaled.source.weight
    assert scaled.obs_weight.name == "encoder.layers.0.input_layernorm.weight"
    assert scaled.obs_weight.min_val.shape == ()  # one scale for the elementwise constant
    assert float(scaled.obs_weight.min_val) == float(weight.min()) and float(scaled.obs_weight.max_val) == float(weight.max())
    assert float(unscaled.obs_weight.min_val) == float(unscaled.obs_weight.max_val) == 1.0  # the unit scale
    for norm in norms.values():
        assert norm.obs_output.min_val.shape == ()
        assert float(norm.obs_output.min_val) <= float(norm.obs_output.max_val)
        assert_min_max_provenance(norm.obs_output, per_image[norm.obs_output.name])


@torch.no_grad()
def test_calib_does_not_change_the_static_output(setup):
    qmodel, norms, batches = setup
    norm = norms["scaled"]
    qmodel.enable_calibration()
    with calls_of(norm) as calib_calls:
        qmodel(**batches[0])
    qmodel.set_mode(Mode.NO_QUANT)
    # The same input through NO_QUANT's static path (upstream, the patch embedder's CALIB path differs).
    with fed_with(norm, calib_calls[0].args), calls_of(norm) as float_calls:
        qmodel(**batches[0], static=True)
    assert torch.equal(calib_calls[0].output, float_calls[0].output)


@pytest.mark.parametrize("which", ["scaled", "unscaled"])
@torch.no_grad()
def test_no_quant_static_op_matches_the_hf_norm_within_float_noise(setup, which):
    qmodel, norms, batches = setup
    norm = norms[which]

    def static_output() -> torch.Tensor:
        with calls_of(norm) as calls:
            qmodel(**batches[0], static=True)
        return calls[0].output

    with calls_of(norm) as calls:
        qmodel(**batches[0], static=True)
    x = calls[0].args[0]
    rows = x.reshape(-1, x.shape[-1]).shape[0]
    verdict = judged_against_noise(qmodel, static_output, norm.source(x), rows)
    assert verdict.ok, verdict.summary


@pytest.mark.parametrize("which", ["scaled", "unscaled"])
@torch.no_grad()
def test_quant_output_is_on_the_grid_and_within_half_steps(setup, which):
    qmodel, norms, batches = setup
    norm = norms[which]
    calibrate(qmodel, batches)
    qmodel.freeze()
    with calls_of(norm) as calls:
        qmodel(**batches[1])
    x, y_q = calls[0].args[0], calls[0].output
    assert_on_grid(y_q, norm.obs_output)
    weight = norm.source.weight if norm.with_scale else norm.unit_weight
    assert_on_grid(norm.weight_fq, norm.obs_weight)
    normalized = _normalized(x, norm.eps)
    y = normalized * weight.double()
    k = x.shape[-1]
    # The scale's rounding reaches the output through |x/rms(x)|. float32 evaluates a mean of K squares
    # (gamma_K), a division, a sum with eps, a power (its input's relative error halves, plus one
    # rounding) and two products: within (gamma_K + 4U) of the exact value.
    upstream = normalized.abs() * weight_error(weight, norm.obs_weight) + (k * U / (1 - k * U) + 4 * U) * y.abs()
    assert_within(y_q, y, fq_bound(norm.obs_output, y, upstream), f"{which} QuantRMSNorm output")
