"""QuantVisionEncoderLayer on its own: the tiny model's encoder layer, fed what the model feeds it.

It can only run with its children wrapped (four norms, attention, MLP: tested in their own files);
what it adds are the two observed residual sums, checked here.
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
    fq_bound,
    fq_tensors,
    image_batches,
    judged_against_noise,
    tiny_vision_model,
)

from core.ptq import prepare
from core.quant.mode import Mode
from core.wrappers.attention import QuantVisionEncoderLayer

PREFIX = "encoder.layers.0."


@pytest.fixture
def setup(sample_images):
    torch.manual_seed(0)
    qmodel = prepare(tiny_vision_model())
    batches = image_batches(qmodel.config, sample_images[:3])
    layer = qmodel.encoder.layers[0]
    assert type(layer) is QuantVisionEncoderLayer
    return qmodel, layer, qmodel.source.encoder.layers[0], batches


@torch.no_grad()
def test_no_quant_is_bit_exact_with_the_hf_layer(setup):
    qmodel, layer, hf, batches = setup
    pixels = {k: batches[0][k] for k in ("pixel_values", "pixel_position_ids")}
    with calls_of(hf) as hf_calls:
        qmodel.source(**pixels)
    with calls_of(layer) as calls:
        qmodel(**batches[0])
    assert torch.equal(calls[0].args[0], hf_calls[0].args[0])
    assert torch.equal(calls[0].output, hf_calls[0].output)
    assert torch.equal(layer(*calls[0].args), hf_calls[0].output)


@torch.no_grad()
def test_mode_transitions_through_the_model(setup):
    qmodel, layer, _, batches = setup
    with calls_of(layer) as calls:
        qmodel(**batches[0])
    args, expected = calls[0].args, calls[0].output
    calibrate(qmodel, batches)
    assert layer.mode is Mode.CALIB and torch.equal(layer(*args), expected)
    qmodel.freeze()
    assert layer.mode is Mode.QUANT and not torch.equal(layer(*args), expected)
    qmodel.set_mode(Mode.NO_QUANT)
    assert layer.mode is Mode.NO_QUANT and torch.equal(layer(*args), expected)


@torch.no_grad()
def test_calib_records_both_residual_sums_with_their_images(setup):
    qmodel, layer, _, batches = setup
    per_image = calibrate_per_image(qmodel, batches)
    assert [n for n, _ in layer.named_children() if n.startswith("obs_")] == ["obs_attn_residual", "obs_output"]
    for obs in (layer.obs_attn_residual, layer.obs_output):
        assert obs.name == PREFIX + obs.role and obs.min_val.shape == ()
        assert float(obs.min_val) <= float(obs.max_val)
        assert_min_max_provenance(obs, per_image[obs.name])


@torch.no_grad()
def test_no_quant_static_layer_matches_the_padded_one_within_float_noise(setup):
    qmodel, layer, _, batches = setup
    n = qmodel.build_profile(batches[0]["pixel_position_ids"]).num_patches

    def static_output() -> torch.Tensor:
        with calls_of(layer) as calls:
            qmodel(**batches[0], static=True)
        return calls[0].output

    with calls_of(layer) as calls:
        qmodel(**batches[0])
    verdict = judged_against_noise(qmodel, static_output, calls[0].output[:, :n], n)
    assert verdict.ok, verdict.summary


@torch.no_grad()
def test_quant_residual_sums_are_on_their_grids_and_within_half_steps(setup):
    qmodel, layer, _, batches = setup
    calibrate(qmodel, batches)
    qmodel.freeze()
    with calls_of(layer) as calls, fq_tensors(qmodel) as seen:
        qmodel(**batches[1])

    def tensor(name):
        (_, out), = seen[name]
        return out

    residual = calls[0].args[0]
    attn_sum = tensor(PREFIX + "attn_residual")
    assert_on_grid(attn_sum, layer.obs_attn_residual)
    ref = residual.double() + tensor(PREFIX + "post_attention_layernorm.output").double()
    assert_within(attn_sum, ref, fq_bound(layer.obs_attn_residual, ref, U * ref.abs()), "attention residual")
    out = calls[0].output
    assert torch.equal(out, tensor(PREFIX + "output"))
    assert_on_grid(out, layer.obs_output)
    ref = attn_sum.double() + tensor(PREFIX + "post_feedforward_layernorm.output").double()
    assert_within(out, ref, fq_bound(layer.obs_output, ref, U * ref.abs()), "MLP residual")
