"""QuantPooler on its own: the tiny model's pooler, fed the encoder output of preprocessed sample photos.

HF pools with a one-hot matmul over every padded patch and then keeps the valid rows; the static
path (``forward_static``, called directly) is one constant matmul over the valid patches onto the
valid rows (the profile's pooling matrix), then the sqrt(hidden) scale as a quantized constant.
"""

import pytest
import torch
import wrapper_support as ws

from core.wrappers.vision import QuantPooler


@pytest.fixture
def setup(sample_images):
    return ws.prepared(sample_images, "pooler", QuantPooler)


@torch.no_grad()
def _padded_call(qmodel, pooler, batch):
    """The pooler's inputs and output in the model's NO_QUANT padded run."""
    with ws.calls_of(pooler) as calls:
        qmodel(**batch)
    return calls[0]


def _static_inputs(qmodel, pooler, batch):
    """(valid rows of the encoder output, the profile's pooling matrix) for forward_static."""
    profile = qmodel.build_profile(batch["pixel_position_ids"])
    return _padded_call(qmodel, pooler, batch).args[0][:, : profile.num_patches], profile.pool


@torch.no_grad()
def test_no_quant_is_bit_exact_with_the_hf_pooler(setup):
    qmodel, pooler, hf, batches = setup
    call = _padded_call(qmodel, pooler, batches[0])
    hidden, mask = hf(*call.args)
    assert torch.equal(call.output[0], hidden) and torch.equal(call.output[1], mask)


@torch.no_grad()
def test_no_quant_static_matmul_matches_hf_pooling_within_float_noise(setup):
    qmodel, pooler, _, batches = setup
    call = _padded_call(qmodel, pooler, batches[0])
    profile = qmodel.build_profile(batches[0]["pixel_position_ids"])
    n = profile.num_patches
    hidden = call.args[0][:, :n]
    pooled, keep = call.output
    reference = pooled[keep][None]
    assert profile.pool.shape == (1, reference.shape[1], n)
    verdict = ws.judged_against_noise(qmodel, lambda: pooler.forward_static(hidden, profile.pool), reference, n)
    assert verdict.ok, verdict.summary


@torch.no_grad()
def test_mode_transitions_through_the_model(setup):
    qmodel, pooler, hf, batches = setup
    hidden, pool = _static_inputs(qmodel, pooler, batches[0])
    expected = pooler.forward_static(hidden, pool)
    ws.assert_mode_cycle(qmodel, pooler, batches, lambda: pooler.forward_static(hidden, pool), lambda: expected)


@torch.no_grad()
def test_calib_records_matrix_pooled_scale_and_output(setup):
    qmodel, pooler, _, batches = setup
    per_image = ws.calibrate_per_image(qmodel, batches)
    ws.assert_observers_recorded(pooler, ["matrix", "pooled", "root_scale", "output"], per_image)
    k = qmodel.config.pooling_kernel_size
    # The averaging matrix holds 0 and 1/k^2 only; every image's matrix reaches both, so later images tie.
    assert float(pooler.obs_matrix.min_val) == 0.0 and float(pooler.obs_matrix.max_val) == float(torch.tensor(1.0 / (k * k)))
    assert pooler.obs_matrix.max_tied
    root = pooler.obs_root_scale
    assert float(root.min_val) == float(root.max_val) == qmodel.config.hidden_size**0.5 and root.min_source == "weights"


@torch.no_grad()
def test_quant_is_on_the_grids_and_within_half_steps(setup):
    qmodel, pooler, _, batches = setup
    hidden, pool = _static_inputs(qmodel, pooler, batches[1])
    ws.calibrate(qmodel, batches)
    pooler.forward_static(hidden, pool)  # its own input's range, so nothing saturates by choice of input
    qmodel.freeze()
    with ws.fq_tensors(qmodel) as seen:
        y_q = pooler.forward_static(hidden, pool)
    for role in ("matrix", "pooled", "output"):
        ws.assert_on_grid(ws.fq_output(seen, f"pooler.{role}"), getattr(pooler, f"obs_{role}"))
    root_q = pooler.fq_weight(pooler.root_scale, pooler.obs_root_scale, None)
    ws.assert_on_grid(root_q, pooler.obs_root_scale)
    # Carried from the float pooling: matrix rounding through |hidden|, the pooled sum's own rounding,
    # the scale's rounding through |pooled|, and the output's.
    pool, root = pool.double(), pooler.root_scale.double()
    matrix_err = ws.fq_bound(pooler.obs_matrix, pool)
    pooled = pool @ hidden.double()
    pooled_err = ws.fq_bound(pooler.obs_pooled, pooled, matrix_err @ hidden.double().abs() + ws.matmul_noise(pool + matrix_err, hidden))
    root_err = ws.fq_bound(pooler.obs_root_scale, root)
    y = pooled * root
    y_err = ws.fq_bound(
        pooler.obs_output, y, pooled_err * (root + root_err) + pooled.abs() * root_err + ws.U * (y.abs() + pooled_err * root)
    )
    ws.assert_within(y_q, y, y_err, "QuantPooler output")
