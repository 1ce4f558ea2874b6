"""QuantPatchEmbedder on its own: the tiny model's patch embedder, on preprocessed sample photos.

Its projection is a wrapped child (QuantLinear over the folded copy of HF's input_proj: W' = 2W,
b' = -W.1, tested in test_quant_linear). ``forward`` is HF's padded path, which the model runs in
NO_QUANT only (it never quantizes); CALIB and QUANT run ``forward_static``, called directly here.
"""

import pytest
import torch
import torch.nn.functional as F
import wrapper_support as ws

from core.quant.mode import Mode
from core.wrappers.vision import QuantPatchEmbedder


@pytest.fixture
def setup(sample_images):
    return ws.prepared(sample_images, "patch_embedder", QuantPatchEmbedder)


def _inputs(qmodel, batch):
    """(padded inputs of forward, valid inputs of forward_static, number of valid patches)."""
    positions = batch["pixel_position_ids"]
    padding = (positions == -1).all(dim=-1)
    profile = qmodel.build_profile(positions)
    n = profile.num_patches
    return (batch["pixel_values"], positions, padding), (batch["pixel_values"][:, :n], profile.pos_rows), n


@torch.no_grad()
def test_no_quant_is_bit_exact_with_the_hf_embedder(setup):
    qmodel, embedder, hf, batches = setup
    padded, _, _ = _inputs(qmodel, batches[0])
    assert bool(padded[2].any()), "the image should leave padding"
    assert torch.equal(embedder(*padded), hf(*padded))


@torch.no_grad()
def test_no_quant_static_path_is_hf_maths_on_the_valid_patches(setup):
    qmodel, embedder, hf, batches = setup
    padded, valid, n = _inputs(qmodel, batches[0])
    # Same ops on the same rows (the position rows are HF's own lookup): the same numbers.
    assert torch.equal(embedder.forward_static(*valid), hf(*padded)[:, :n])


@torch.no_grad()
def test_mode_transitions_through_the_model(setup):
    qmodel, embedder, hf, batches = setup
    padded, valid, _ = _inputs(qmodel, batches[0])
    expected = embedder.forward_static(*valid)
    ws.calibrate(qmodel, batches)
    # CALIB computes HF's maths (the folded projection only feeds its observers); so does the padded path.
    assert embedder.mode is Mode.CALIB and torch.equal(embedder(*padded), hf(*padded))
    qmodel.freeze()
    assert embedder.mode is Mode.QUANT and not torch.equal(embedder.forward_static(*valid), expected)
    qmodel.set_mode(Mode.NO_QUANT)
    assert embedder.mode is Mode.NO_QUANT and torch.equal(embedder.forward_static(*valid), expected)
    # QUANT left the folded bias on its int32 grid (unused in NO_QUANT); entering CALIB puts it back.
    assert not torch.equal(embedder.input_proj.linear.bias, embedder.folded_bias)
    qmodel.set_mode(Mode.CALIB)
    assert torch.equal(embedder.input_proj.linear.bias, embedder.folded_bias)


@torch.no_grad()
def test_calib_static_output_is_bit_exact_with_no_quant(setup):
    qmodel, embedder, _, batches = setup
    _, valid, _ = _inputs(qmodel, batches[0])
    expected = embedder.forward_static(*valid)
    qmodel.enable_calibration()
    assert torch.equal(embedder.forward_static(*valid), expected)


@torch.no_grad()
def test_calib_folded_projection_is_hf_projection_within_float_rounding(setup):
    qmodel, embedder, hf, batches = setup
    _, (pixels, _), _ = _inputs(qmodel, batches[0])
    qmodel.enable_calibration()
    folded = embedder.input_proj(pixels)
    weight = hf.input_proj.weight
    centred = 2 * (pixels - 0.5)
    exact = F.linear(2 * pixels.double() - 1, weight.double())
    # The folded bias -W.1 is a float32 sum (gamma_K of |W|.1); each side's GEMM has its own gamma_K;
    # HF's centring rounds once (x - 0.5) before its GEMM.
    ones = torch.ones(1, weight.shape[1])
    bound = (
        ws.matmul_noise(pixels, 2 * weight.t())
        + ws.matmul_noise(ones, weight.t())
        + ws.matmul_noise(centred, weight.t())
        + ws.U * (centred.double().abs() @ weight.double().abs().t())
    )
    ws.assert_within(folded, exact, bound, "folded projection")
    ws.assert_within(hf.input_proj(centred), exact, bound, "HF projection")


@torch.no_grad()
def test_calib_records_pixels_positions_and_output_with_their_images(setup):
    qmodel, embedder, _, batches = setup
    per_image = ws.calibrate_per_image(qmodel, batches)
    ws.assert_observers_recorded(embedder, ["pixels", "position", "output"], per_image)
    assert 0.0 <= float(embedder.obs_pixels.min_val) <= float(embedder.obs_pixels.max_val) <= 1.0


@torch.no_grad()
def test_quant_is_on_the_grids_and_the_folded_bias_on_the_int32_accumulator_grid(setup):
    qmodel, embedder, _, batches = setup
    ws.calibrate(qmodel, batches)
    qmodel.freeze()
    proj = embedder.input_proj
    _, valid, _ = _inputs(qmodel, batches[1])
    with ws.fq_tensors(qmodel) as seen:
        y_q = embedder.forward_static(*valid)
    pixels_q, position_q, hidden_q = (
        ws.fq_output(seen, f"patch_embedder.{role}") for role in ("pixels", "position", "input_proj.output")
    )
    ws.assert_on_grid(pixels_q, embedder.obs_pixels)
    ws.assert_on_grid(position_q, embedder.obs_position)
    ws.assert_on_grid(y_q, embedder.obs_output)
    # The bias the Circle file stores as int32 on the (pixel scale x weight scale) grid, moved by half a step at most.
    step = float(embedder.obs_pixels.scale) * proj.obs_weight.scale.double()
    bias = proj.linear.bias.double()
    codes = bias / step
    assert float((codes - codes.round()).abs().max()) <= 2 * ws.U * float(codes.abs().max())
    assert float(((bias - embedder.folded_bias.double()).abs() - step / 2 - ws.U * bias.abs()).max()) <= 0.0
    # The projection step, on the quantized pixels and the snapped bias.
    weight = proj.linear.weight
    ref = F.linear(pixels_q.double(), weight.double(), bias)
    ws.assert_within(hidden_q, ref, ws.fq_bound(proj.obs_output, ref, ws.linear_bound(pixels_q, 0.0, weight, ws.weight_error(weight, proj.obs_weight))), "projection")
    ref = hidden_q.double() + position_q.double()
    ws.assert_within(y_q, ref, ws.fq_bound(embedder.obs_output, ref, ws.U * ref.abs()), "embedding sum")
    position = valid[1].double()
    ws.assert_within(position_q, position, ws.fq_bound(embedder.obs_position, position), "position rows")
