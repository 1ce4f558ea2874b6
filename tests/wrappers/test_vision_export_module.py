"""VisionExportModule on its own: the static export adapter of the tiny model, for one image layout.

It wraps a QuantVisionModel (every child wrapped) and holds one profile's position constants as
buffers; ``forward`` is ``forward_export``, the graph torch.export traces.
"""

import pytest
import torch
import wrapper_support as ws

from core.errors import ExportError
from core.quant.mode import Mode
from core.wrappers import QuantVisionModel, VisionExportModule


@pytest.fixture
def setup(sample_images):
    qmodel, _, model, batches = ws.prepared(sample_images, "", QuantVisionModel)
    return qmodel, model, batches


def test_positions_are_required_and_calibration_must_be_finished(setup):
    qmodel, _, batches = setup
    with pytest.raises(ExportError, match="pixel_position_ids"):
        qmodel.as_export_module()
    qmodel.enable_calibration()
    with pytest.raises(ExportError, match="calibrating"):
        qmodel.as_export_module(batches[0]["pixel_position_ids"])
    qmodel.set_mode(Mode.NO_QUANT)
    with pytest.raises(ExportError, match="valid patches first"):
        qmodel.as_export_module(batches[0]["pixel_position_ids"].flip(1))


@torch.no_grad()
def test_profile_constants_are_buffers_and_forward_is_forward_export(setup):
    qmodel, _, batches = setup
    module = qmodel.as_export_module(batches[0]["pixel_position_ids"])
    assert type(module) is VisionExportModule
    profile = qmodel.build_profile(batches[0]["pixel_position_ids"])
    buffers = dict(module.named_buffers(recurse=False))
    for name in ("pos_rows", "cos", "sin_signed", "pool"):
        assert torch.equal(buffers[name], getattr(profile, name))
    pixels = batches[0]["pixel_values"]
    assert torch.equal(module(pixels), module.forward_export(pixels))


@torch.no_grad()
def test_no_quant_export_matches_hf_within_float_noise(setup):
    qmodel, model, batches = setup
    batch = batches[0]
    module = qmodel.as_export_module(batch["pixel_position_ids"])
    reference = model(pixel_values=batch["pixel_values"], pixel_position_ids=batch["pixel_position_ids"]).last_hidden_state
    verdict = ws.judged_against_noise(qmodel, lambda: module(batch["pixel_values"]), reference, module.num_patches)
    assert verdict.ok, verdict.summary
    # forward_export is the static path itself: bit-exact with it.
    assert torch.equal(module(batch["pixel_values"]), qmodel(**batch, static=True).last_hidden_state)


@torch.no_grad()
def test_quant_export_is_bit_exact_with_the_runtime_static_path(setup):
    qmodel, _, batches = setup
    ws.calibrate(qmodel, batches)
    qmodel.freeze()
    batch = batches[1]
    module = qmodel.as_export_module(batch["pixel_position_ids"])
    # Explicit weight fake-quant ops and 2-D projections instead of cached weights: the same arithmetic.
    with ws.fq_tensors(qmodel) as seen:
        exported = module(batch["pixel_values"])
    assert torch.equal(exported, qmodel(**batch).last_hidden_state)
    ws.assert_on_grid(exported, qmodel.obs_output)
    # The graph input is quantized before the slice (an integer graph input), and only once more after.
    first_pixels, _ = seen["patch_embedder.pixels"][0]
    assert first_pixels.shape == batch["pixel_values"].shape
    assert not qmodel.ctx.exporting  # the flag is back once the export forward returns
