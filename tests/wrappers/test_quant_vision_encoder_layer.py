"""QuantVisionEncoderLayer on its own: the tiny model's encoder layer, fed what the model feeds it.

It can only run with its children wrapped (four norms, attention, MLP: tested in their own files);
what it adds are the two observed residual sums, checked here.
"""

import pytest
import torch
import wrapper_support as ws

from core.wrappers.attention import QuantVisionEncoderLayer

PREFIX = "encoder.layers.0."


@pytest.fixture
def setup(sample_images):
    return ws.prepared(sample_images, PREFIX[:-1], QuantVisionEncoderLayer)


@torch.no_grad()
def test_bit_exact_with_the_hf_layer_in_every_mode_but_quant(setup):
    qmodel, layer, hf, batches = setup
    call, hf_call = ws.paired_calls(qmodel, layer, hf, batches[0])
    assert torch.equal(call.args[0], hf_call.args[0])
    assert torch.equal(call.output, hf_call.output)
    ws.assert_mode_cycle_on_model_input(qmodel, layer, batches)


@torch.no_grad()
def test_calib_records_both_residual_sums_with_their_images(setup):
    qmodel, layer, _, batches = setup
    per_image = ws.calibrate_per_image(qmodel, batches)
    ws.assert_observers_recorded(layer, ["attn_residual", "output"], per_image)


@torch.no_grad()
def test_no_quant_static_layer_matches_the_padded_one_within_float_noise(setup):
    qmodel, layer, _, batches = setup
    verdict = ws.judge_static_against_padded(qmodel, batches[0], layer)
    assert verdict.ok, verdict.summary


@torch.no_grad()
def test_quant_residual_sums_are_on_their_grids_and_within_half_steps(setup):
    qmodel, layer, _, batches = setup
    seen, (calls,) = ws.quant_run(qmodel, batches, layer)

    def tensor(name):
        return ws.fq_output(seen, name)

    residual = calls[0].args[0]
    attn_sum = tensor(PREFIX + "attn_residual")
    ws.assert_on_grid(attn_sum, layer.obs_attn_residual)
    ref = residual.double() + tensor(PREFIX + "post_attention_layernorm.output").double()
    ws.assert_within(attn_sum, ref, ws.fq_bound(layer.obs_attn_residual, ref, ws.U * ref.abs()), "attention residual")
    out = calls[0].output
    assert torch.equal(out, tensor(PREFIX + "output"))
    ws.assert_on_grid(out, layer.obs_output)
    ref = attn_sum.double() + tensor(PREFIX + "post_feedforward_layernorm.output").double()
    ws.assert_within(out, ref, ws.fq_bound(layer.obs_output, ref, ws.U * ref.abs()), "MLP residual")
