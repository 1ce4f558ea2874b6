"""QuantVisionEncoder on its own: the tiny model's encoder (two layers here, so the shared tables matter).

It can only run with its layers wrapped (tested in their own files); what it adds is the RoPE
table pair, observed once and handed to every layer, and HF's additive mask on the padded path.
"""

import torch
import wrapper_support as ws

from core.wrappers.attention import QuantVisionEncoder, rope_tables


def two_layer_encoder(sample_images):
    """A fresh wrapped model per test (the tests move its mode) with two layers to share the tables."""
    qmodel, encoder, hf, batches = ws.prepared(sample_images, "encoder", QuantVisionEncoder, num_hidden_layers=2)
    assert len(encoder.layers) == 2
    return qmodel, encoder, hf, batches


@torch.no_grad()
def test_bit_exact_with_the_hf_encoder_in_every_mode_but_quant(sample_images):
    qmodel, encoder, hf, batches = two_layer_encoder(sample_images)
    call, hf_call = ws.paired_calls(qmodel, encoder, hf, batches[0])
    assert torch.equal(call.args[0], hf_call.kwargs["inputs_embeds"])
    assert torch.equal(call.output, hf_call.output.last_hidden_state)
    ws.assert_mode_cycle_on_model_input(qmodel, encoder, batches)


@torch.no_grad()
def test_calib_records_the_rope_tables_once_for_all_layers(sample_images):
    qmodel, encoder, _, batches = two_layer_encoder(sample_images)
    per_image = ws.calibrate_per_image(qmodel, batches)
    for obs in (encoder.obs_rope_cos, encoder.obs_rope_sin):
        assert obs.name == f"encoder.{obs.role}" and obs.min_val.shape == ()
        assert all(len(tables) == 1 for tables in per_image[obs.name].values())  # once per image, not per layer
        assert -1.0 <= float(obs.min_val) <= float(obs.max_val) <= 1.0
        ws.assert_min_max_provenance(obs, per_image[obs.name])
    # Every image has a patch at (0, 0), where cos is 1: a table all images share ties, the first keeps it.
    assert float(encoder.obs_rope_cos.max_val) == 1.0 and encoder.obs_rope_cos.max_tied
    assert encoder.obs_rope_cos.max_source == batches[0]["image_ids"][0]


@torch.no_grad()
def test_no_quant_static_layers_match_the_padded_encoder_within_float_noise(sample_images):
    qmodel, encoder, _, batches = two_layer_encoder(sample_images)
    # run_layers is called directly (no hook sees it): its output is the last layer's.
    verdict = ws.judge_static_against_padded(qmodel, batches[0], encoder.layers[-1], padded_module=encoder)
    assert verdict.ok, verdict.summary


@torch.no_grad()
def test_quant_tables_are_on_their_grids_and_every_layer_gets_the_same_ones(sample_images):
    qmodel, encoder, _, batches = two_layer_encoder(sample_images)
    seen, (first, second) = ws.quant_run(qmodel, batches, *encoder.layers)
    batch = batches[1]
    n = qmodel.build_profile(batch["pixel_position_ids"]).num_patches
    cos, sin_signed = rope_tables(encoder.rotary_emb, batch["pixel_position_ids"][:, :n], encoder.head_dim)
    for obs, ref in ((encoder.obs_rope_cos, cos), (encoder.obs_rope_sin, sin_signed)):
        table = ws.fq_output(seen, obs.name)
        ws.assert_on_grid(table, obs)
        ws.assert_within(table, ref, ws.fq_bound(obs, ref, ws.U * ref.abs()), obs.name)
        index = 0 if obs is encoder.obs_rope_cos else 1
        assert torch.equal(first[0].args[1][index], table) and torch.equal(second[0].args[1][index], table)
    assert first[0].args[2] is None and second[0].args[2] is None  # the static path masks nothing
