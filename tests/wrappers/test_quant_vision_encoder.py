"""QuantVisionEncoder on its own: the tiny model's encoder (two layers here, so the shared tables matter).

It can only run with its layers wrapped (tested in their own files); what it adds is the RoPE
table pair, observed once and handed to every layer, and HF's additive mask on the padded path.
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
from core.wrappers.attention import QuantVisionEncoder, rope_tables


@pytest.fixture
def setup(sample_images):
    torch.manual_seed(0)
    qmodel = prepare(tiny_vision_model(num_hidden_layers=2))
    batches = image_batches(qmodel.config, sample_images[:3])
    encoder = qmodel.encoder
    assert type(encoder) is QuantVisionEncoder and len(encoder.layers) == 2
    return qmodel, encoder, qmodel.source.encoder, batches


@torch.no_grad()
def test_no_quant_is_bit_exact_with_the_hf_encoder(setup):
    qmodel, encoder, hf, batches = setup
    pixels = {k: batches[0][k] for k in ("pixel_values", "pixel_position_ids")}
    with calls_of(hf) as hf_calls:
        qmodel.source(**pixels)
    with calls_of(encoder) as calls:
        qmodel(**batches[0])
    hf_call = hf_calls[0]
    assert torch.equal(calls[0].args[0], hf_call.kwargs["inputs_embeds"])
    assert torch.equal(calls[0].output, hf_call.output.last_hidden_state)
    assert torch.equal(encoder(*calls[0].args), hf_call.output.last_hidden_state)


@torch.no_grad()
def test_mode_transitions_through_the_model(setup):
    qmodel, encoder, _, batches = setup
    with calls_of(encoder) as calls:
        qmodel(**batches[0])
    args, expected = calls[0].args, calls[0].output
    calibrate(qmodel, batches)
    assert encoder.mode is Mode.CALIB and torch.equal(encoder(*args), expected)
    qmodel.freeze()
    assert encoder.mode is Mode.QUANT and not torch.equal(encoder(*args), expected)
    qmodel.set_mode(Mode.NO_QUANT)
    assert encoder.mode is Mode.NO_QUANT and torch.equal(encoder(*args), expected)


@torch.no_grad()
def test_calib_records_the_rope_tables_once_for_all_layers(setup):
    qmodel, encoder, _, batches = setup
    per_image = calibrate_per_image(qmodel, batches)
    for obs in (encoder.obs_rope_cos, encoder.obs_rope_sin):
        assert obs.name == f"encoder.{obs.role}" and obs.min_val.shape == ()
        assert all(len(tables) == 1 for tables in per_image[obs.name].values())  # once per image, not per layer
        assert -1.0 <= float(obs.min_val) <= float(obs.max_val) <= 1.0
        assert_min_max_provenance(obs, per_image[obs.name])
    # Every image has a patch at (0, 0), where cos is 1: a table all images share ties, the first keeps it.
    assert float(encoder.obs_rope_cos.max_val) == 1.0 and encoder.obs_rope_cos.max_tied
    assert encoder.obs_rope_cos.max_source == batches[0]["image_ids"][0]


@torch.no_grad()
def test_no_quant_static_layers_match_the_padded_encoder_within_float_noise(setup):
    qmodel, encoder, _, batches = setup
    n = qmodel.build_profile(batches[0]["pixel_position_ids"]).num_patches

    def static_output() -> torch.Tensor:
        with calls_of(encoder.layers[-1]) as calls:  # run_layers is called directly, not through a hook
            qmodel(**batches[0], static=True)
        return calls[0].output

    with calls_of(encoder) as calls:
        qmodel(**batches[0])
    verdict = judged_against_noise(qmodel, static_output, calls[0].output[:, :n], n)
    assert verdict.ok, verdict.summary


@torch.no_grad()
def test_quant_tables_are_on_their_grids_and_every_layer_gets_the_same_ones(setup):
    qmodel, encoder, _, batches = setup
    calibrate(qmodel, batches)
    qmodel.freeze()
    batch = batches[1]
    n = qmodel.build_profile(batch["pixel_position_ids"]).num_patches
    with fq_tensors(qmodel) as seen, calls_of(encoder.layers[0]) as first, calls_of(encoder.layers[1]) as second:
        qmodel(**batch)
    cos, sin_signed = rope_tables(encoder.rotary_emb, batch["pixel_position_ids"][:, :n], encoder.head_dim)
    for obs, ref in ((encoder.obs_rope_cos, cos), (encoder.obs_rope_sin, sin_signed)):
        (_, table), = seen[obs.name]
        assert_on_grid(table, obs)
        assert_within(table, ref, fq_bound(obs, ref, U * ref.abs()), obs.name)
        index = 0 if obs is encoder.obs_rope_cos else 1
        assert torch.equal(first[0].args[1][index], table) and torch.equal(second[0].args[1][index], table)
    assert first[0].args[2] is None and second[0].args[2] is None  # the static path masks nothing
