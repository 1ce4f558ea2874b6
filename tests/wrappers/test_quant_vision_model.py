"""QuantVisionModel on its own: the root of the tiny model's wrapped tree and the owner of its mode.

It can only run with every child wrapped (tested in their own files); what it adds are the mode
transitions of the whole tree, the per-image static path and the standardization observers.
"""

import pytest
import torch
import wrapper_support as ws

from core.errors import NotCalibratedError
from core.quant.mode import Mode
from core.wrappers import QuantVisionModel

STANDARDIZE = ["std_bias", "centered", "std_scale", "output"]


@pytest.fixture
def setup(sample_images):
    qmodel, _, model, batches = ws.prepared(sample_images, "", QuantVisionModel)
    return qmodel, model, batches, sample_images


@torch.no_grad()
def test_no_quant_is_bit_exact_with_hf_alone_and_in_a_padded_batch(setup):
    qmodel, model, batches, images = setup
    for batch in batches:
        assert torch.equal(qmodel(**batch).last_hidden_state, model(**ws.pixels(batch)).last_hidden_state)
    batch = ws.padded_batch(model.config, [images[0], images[1], images[5]])
    assert torch.equal(qmodel(**batch).last_hidden_state, model(**ws.pixels(batch)).last_hidden_state)


@torch.no_grad()
def test_mode_transitions_of_the_whole_tree(setup):
    qmodel, _, batches, _ = setup
    wrappers = [w for _, w in qmodel.wrappers()]
    assert qmodel.mode is Mode.NO_QUANT and not qmodel.is_calibrated
    with pytest.raises(NotCalibratedError, match="calibrate"):
        qmodel.freeze()
    assert qmodel.mode is Mode.NO_QUANT
    ws.calibrate(qmodel, batches[:1])
    assert {w.mode for w in wrappers} == {Mode.CALIB} and qmodel.is_calibrated
    seen_once = int(qmodel.encoder.obs_rope_cos.num_seen)
    qmodel.freeze()
    assert {w.mode for w in wrappers} == {Mode.QUANT}
    assert all(bool(o.frozen) for o in qmodel.observers())
    qmodel.set_mode(Mode.NO_QUANT)
    assert {w.mode for w in wrappers} == {Mode.NO_QUANT}
    qmodel.enable_calibration(reset=False)  # more images on top of what was seen
    qmodel(**batches[1])
    assert int(qmodel.encoder.obs_rope_cos.num_seen) > seen_once
    qmodel.enable_calibration()  # reset: everything forgotten
    assert qmodel.mode is Mode.CALIB
    # Weights do not depend on images: entering CALIB records them again at once.
    assert all(o.has_stats == (o.kind == "weight") for o in qmodel.observers())
    qmodel.set_mode(Mode.NO_QUANT)


@torch.no_grad()
def test_calib_output_is_the_static_float_output_bit_for_bit(setup):
    qmodel, model, batches, _ = setup
    expected = qmodel(**batches[0], static=True).last_hidden_state
    qmodel.enable_calibration()
    # CALIB observes and computes the same float maths (the folded projection only feeds observers).
    assert torch.equal(qmodel(**batches[0], static=True).last_hidden_state, expected)


@torch.no_grad()
def test_no_quant_static_path_matches_hf_within_float_noise(setup):
    qmodel, model, batches, _ = setup
    batch = batches[0]
    n = qmodel.build_profile(batch["pixel_position_ids"]).num_patches
    reference = model(**ws.pixels(batch)).last_hidden_state
    verdict = ws.judged_against_noise(qmodel, lambda: qmodel(**batch, static=True).last_hidden_state, reference, n)
    assert verdict.ok, verdict.summary


@torch.no_grad()
def test_calib_records_standardization_with_its_images_and_every_observer_in_forward_order(setup):
    qmodel, model, batches, _ = setup
    per_image = ws.calibrate_per_image(qmodel, batches)
    names = [o.name for o in qmodel.observers()]
    assert len(names) == len(set(names))
    assert names[0] == "patch_embedder.pixels" and names[-4:] == STANDARDIZE
    assert all(o.has_stats and bool((o.min_val <= o.max_val).all()) for o in qmodel.observers())
    assert float(qmodel.obs_std_bias.min_val) == float(model.std_bias.min())
    assert float(qmodel.obs_std_scale.max_val) == float(model.std_scale.max())
    ws.assert_observers_recorded(qmodel, STANDARDIZE, per_image)
    # Without image ids the statistics still count; the image is simply unnamed.
    qmodel.enable_calibration()
    qmodel(**ws.pixels(batches[0]))
    assert qmodel.obs_output.max_source is None and qmodel.obs_output.has_stats


@torch.no_grad()
def test_quant_standardization_is_on_its_grids_and_within_half_steps(setup):
    qmodel, model, batches, _ = setup
    seen, _ = ws.quant_run(qmodel, batches)
    out = ws.fq_output(seen, "output")

    def tensor(name):
        return ws.fq_output(seen, name)

    bias_q = qmodel.fq_weight(model.std_bias, qmodel.obs_std_bias, None)
    scale_q = qmodel.fq_weight(model.std_scale, qmodel.obs_std_scale, None)
    ws.assert_on_grid(bias_q, qmodel.obs_std_bias)
    ws.assert_on_grid(scale_q, qmodel.obs_std_scale)
    ws.assert_on_grid(out, qmodel.obs_output)
    pooled = tensor("pooler.output")[0]
    ref = pooled.double() - bias_q.double()
    centered = tensor("centered")
    ws.assert_on_grid(centered, qmodel.obs_centered)
    ws.assert_within(centered, ref, ws.fq_bound(qmodel.obs_centered, ref, ws.U * ref.abs()), "centred")
    ref = centered.double() * scale_q.double()
    ws.assert_within(out, ref, ws.fq_bound(qmodel.obs_output, ref, ws.U * ref.abs()), "standardized output")
    # Carried from float standardization of the same pooled rows: both constants' half steps too.
    bias_err, scale_err = ws.fq_bound(qmodel.obs_std_bias, model.std_bias), ws.fq_bound(qmodel.obs_std_scale, model.std_scale)
    centred_float = pooled.double() - model.std_bias.double()
    centred_err = ws.fq_bound(qmodel.obs_centered, centred_float, bias_err + ws.U * centred_float.abs())
    y = centred_float * model.std_scale.double()
    y_err = ws.fq_bound(
        qmodel.obs_output, y, centred_err * (model.std_scale.double() + scale_err) + centred_float.abs() * scale_err + ws.U * y.abs()
    )
    ws.assert_within(out, y, y_err, "standardization")
