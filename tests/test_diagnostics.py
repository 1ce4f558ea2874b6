"""Error heatmaps and the first-divergence locator (core.analysis.heatmaps, core.analysis.divergence) on real photographs.

Tiny model at 70 soft tokens: every test runs in seconds. Values are checked against
independent computations (compare's per-module SQNR, a float forward hook, a broken observer
whose clipped rows are known in advance, an int4 layer).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from core.analysis.divergence import locate_divergence, locate_divergence_batches
from core.analysis.heatmaps import MODEL, image_error_maps, image_error_maps_batch
from core.analysis.tap import ALL_FLOAT
from core.cancel import CancelToken
from core.cli.charts import PEAK, heatmap_file_name, write_heatmap
from core.config import PTQConfig
from core.errors import BadImageError, CancelledError, NotCalibratedError
from core.session import Session

MST = 70


def by_name(paths, name):
    return next(p for p in paths if p.name == name)


@pytest.fixture(scope="module")
def session(sample_images):
    s = Session("tiny", max_soft_tokens=MST)
    s.add_images(sample_images[:4])
    s.calibrate()
    return s


@pytest.fixture(scope="module")
def int4_session(sample_images):
    """Layer 1 (activations and weights) on a 4-bit grid, everything else uint8."""
    config = PTQConfig(overrides={"encoder.layers.1": {"activation": "int4", "weight": {"dtype": "int4", "per_channel": True}}})
    s = Session("tiny", config=config, max_soft_tokens=MST)
    s.add_images(sample_images[:3])
    s.calibrate()
    return s


def float_output_of(qmodel, module, batch) -> torch.Tensor:
    """The FP output of one wrapper (QUANT mode, everything kept float), by a forward hook."""
    seen = {}
    handle = module.register_forward_hook(lambda m, a, o: seen.__setitem__("x", o.detach()))
    try:
        qmodel.set_keep_float(ALL_FLOAT)
        with torch.no_grad():
            qmodel(**batch, static=True)
    finally:
        qmodel.set_keep_float([])
        handle.remove()
    return seen["x"]


# ------------------------------------------------------------------------------ heatmaps


def test_row_errors_agree_with_compare(session, sample_images):
    """The rows' mean relative error is the module's noise/signal: -10 log10 of it is compare's SQNR."""
    image = sample_images[4]
    maps = image_error_maps(session, image)
    res = session.evaluate(images=[image])
    sqnr = {m.name: m.sqnr_db for m in res.modules}
    assert maps.module_order[-1] == MODEL and maps.modules() == maps.module_order
    assert [n for n in maps.module_order if n != MODEL] == [n for n in sqnr if n in maps.rows]
    # every wrapper of the tiny model is patch- or token-level
    assert len(maps.module_order) == len(sqnr) + 1
    for name in maps.module_order:
        rows = maps.rows[name]
        assert rows.ndim == 1 and np.all(np.isfinite(rows)) and np.all(rows >= 0)
        expected = res.end_to_end.sqnr_db if name == MODEL else sqnr[name]
        assert -10 * math.log10(rows.mean()) == pytest.approx(expected, abs=1e-3), name
        assert maps.sqnr_db[name] == pytest.approx(expected, abs=1e-3)
    assert maps.levels["encoder.layers.0"] == "patch" and maps.levels["pooler"] == "token"
    assert maps.levels[MODEL] == "token"
    assert maps.rows["encoder.layers.0"].size == maps.layout.num_patches
    assert maps.rows[MODEL].size == maps.layout.num_tokens
    # per-row SQNR of a row is its own signal over its own noise
    sq = maps.row_sqnr_db["encoder.layers.1"]
    assert sq.shape == maps.rows["encoder.layers.1"].shape and np.all(np.isfinite(sq))
    # the model is left as it was: QUANT with only the config's keep-float modules
    assert all(o.enabled for o in session.qmodel.observers())


def test_heatmap_peak_is_where_a_broken_observer_clips(session, sample_images):
    """Shrink layer 0's output range: the rows that clip most become the heatmap's peak."""
    image = sample_images[4]
    qmodel = session.qmodel
    layer = qmodel.encoder.layers[0]
    obs = layer.obs_output
    batch = session.preprocessor([image])
    base = image_error_maps(session, image).heatmap("encoder.layers.0")
    fp = float_output_of(qmodel, layer, batch)[0]  # (patches, hidden)
    saved = obs.max_val.clone()
    try:
        # Cut the range at the 90th percentile of the rows' maxima: about a tenth of the patches clip.
        obs.max_val.fill_(float(torch.quantile(fp.max(dim=-1).values, 0.9)))
        obs.compute_qparams()
        hi = obs.representable_range()[1]
        clipped = ((fp - hi).clamp(min=0) ** 2).sum(dim=-1).numpy()  # clipped energy per patch
        assert 0 < (clipped > 0).sum() < 0.6 * clipped.size
        hm = image_error_maps(session, image).heatmap("encoder.layers.0")
    finally:
        obs.max_val.copy_(saved)
        obs.compute_qparams()
    assert hm.level == "patch" and hm.row_error.size == clipped.size
    order = np.argsort(-clipped)
    assert hm.peak_row == hm.peak_patch == int(order[0])
    assert tuple(hm.peak_xy) == tuple(int(v) for v in hm.layout.positions[order[0]])
    # the map follows the clipped energy, and the peak stands far above the unbroken map
    assert np.corrcoef(clipped, hm.row_error)[0, 1] > 0.8
    assert hm.row_error[hm.peak_row] > 5 * base.row_error[hm.peak_row]
    assert hm.row_error.max() > 10 * np.median(hm.row_error)
    # rows that did not clip keep (about) their unbroken error
    calm = clipped == 0
    assert np.median(hm.row_error[calm]) < 3 * np.median(base.row_error[calm])
    # the peak shows on the grid at its patch position
    x, y = hm.peak_xy
    assert hm.grid[y, x] == pytest.approx(hm.row_error.max())
    assert np.nanmax(hm.grid) == pytest.approx(hm.row_error.max())
    # and the restored observer gives the unbroken map back
    again = image_error_maps(session, image).heatmap("encoder.layers.0")
    np.testing.assert_array_equal(again.row_error, base.row_error)  # same kernels, same shapes: exact


@pytest.mark.parametrize("name, wide", [("coffee_wide.jpg", True), ("rocket_tall.jpg", False)])
def test_grid_follows_the_image_shape(session, sample_images, name, wide):
    path = by_name(sample_images, name)
    maps = image_error_maps(session, path)
    layout = maps.layout
    rows, cols = layout.grid
    assert (cols > rows) if wide else (rows > cols)
    with Image.open(path) as im:
        w, h = im.size
    assert (cols / rows) == pytest.approx(w / h, rel=0.25)
    assert maps.image.shape == (rows * 16, cols * 16, 3) and maps.image.dtype == np.uint8
    assert maps.image.std() > 5  # a real photo, not a blank canvas
    for module in ("encoder.layers.1", MODEL):
        hm = maps.heatmap(module)
        assert hm.grid.shape == (rows, cols)
        assert np.isnan(hm.grid).sum() == rows * cols - layout.num_patches
        per_patch = hm.grid[layout.positions[:, 1], layout.positions[:, 0]]
        if hm.level == "patch":
            np.testing.assert_array_equal(per_patch, hm.row_error)
        else:  # every patch of a soft token shows that token's error
            np.testing.assert_array_equal(per_patch, hm.row_error[layout.token_of_patch])
        left, top, right, bottom = hm.peak_box()
        assert 0 <= left < right <= cols * 16 and 0 <= top < bottom <= rows * 16
        d = hm.to_dict()
        json.dumps(d)
        assert d["grid"] == [rows, cols] and d["peak_row"] == hm.peak_row and "image" not in d
        assert d["max_error"] == pytest.approx(float(hm.row_error.max()))
    tok = maps.heatmap(MODEL)
    assert tok.level == "token" and len(tok.peak_patches) >= 1
    assert all(layout.token_of_patch[p] == tok.peak_row for p in tok.peak_patches)


def test_image_error_maps_batch_matches_the_session_call(session, sample_images):
    image = sample_images[5]
    batch = dict(session.preprocessor([image]))
    a = image_error_maps_batch(session.qmodel, batch, image_id="x", path=str(image))
    b = image_error_maps(session, image)
    assert a.module_order == b.module_order and a.image_id == "x"
    for m in a.module_order:
        np.testing.assert_array_equal(a.rows[m], b.rows[m])
    np.testing.assert_array_equal(a.image, b.image)
    two = dict(session.preprocessor(sample_images[4:6]))
    with pytest.raises(ValueError):
        image_error_maps_batch(session.qmodel, two)


# ------------------------------------------------------------------------------ locator


def test_locator_finds_the_int4_layer(int4_session, sample_images):
    images = sample_images[4:6]
    res = locate_divergence(int4_session, images=images, unit="layer")
    names = [e.name for e in res.entries]
    assert names == ["patch_embedder", "encoder.layers.0", "encoder.layers.1", "pooler", MODEL]
    assert res.located.name == "encoder.layers.1" and res.located.adds_error
    assert len(res.images) == 2 and res.unit == "layer"
    e = {x.name: x for x in res.entries}
    l1 = e["encoder.layers.1"]
    others = [x for x in res.entries if x.name != "encoder.layers.1"]
    assert all(l1.local_sqnr_db < x.local_sqnr_db - 10 for x in others)
    assert l1.jump_db > 10
    # bookkeeping: a unit's input is the previous one's output; the first unit reads raw pixels
    assert math.isinf(e["patch_embedder"].input_sqnr_db)
    assert e["patch_embedder"].local_sqnr_db == pytest.approx(e["patch_embedder"].output_sqnr_db, abs=1e-6)
    for prev, cur in zip(res.entries, res.entries[1:]):
        assert cur.input_sqnr_db == pytest.approx(prev.output_sqnr_db, abs=1e-6)
        assert cur.jump_db == pytest.approx(min(cur.input_sqnr_db, res.reference_db) - cur.output_sqnr_db, abs=1e-6)
    # the reference (clean-input cap) is the median local SQNR
    assert res.reference_db == pytest.approx(float(np.median([x.local_sqnr_db for x in res.entries])))
    assert e["patch_embedder"].jump_db == pytest.approx(res.reference_db - e["patch_embedder"].output_sqnr_db)
    # the cumulative output error matches compare's streamed per-module error
    cmp_ = int4_session.evaluate(images=images)
    sq = {m.name: m.sqnr_db for m in cmp_.modules}
    for name in ("patch_embedder", "encoder.layers.0", "encoder.layers.1", "pooler"):
        assert e[name].output_sqnr_db == pytest.approx(sq[name], abs=1e-3)
    assert e[MODEL].output_sqnr_db == pytest.approx(cmp_.end_to_end.sqnr_db, abs=1e-3)
    assert e[MODEL].cumulative_mse == pytest.approx(cmp_.end_to_end.mse, rel=1e-4)
    line = res.summary_line()
    assert line.startswith("first divergence: encoder.layers.1 loses ") and "\n" not in line
    doc = json.loads(json.dumps(res.to_dict()))
    assert doc["located"]["name"] == "encoder.layers.1" and len(doc["entries"]) == 5
    assert doc["entries"][0]["input_sqnr_db"] is None  # inf -> null


def test_locator_module_unit_points_inside_the_int4_layer(int4_session, sample_images):
    res = locate_divergence(int4_session, images=sample_images[4:5], unit="module")
    assert res.located.name.startswith("encoder.layers.1.")
    names = [e.name for e in res.entries]
    assert names[0] == "patch_embedder.input_proj" and names[-2:] == ["pooler", MODEL]
    assert "encoder.layers.0.self_attn.q_norm" in names and "encoder.layers.1" not in names
    inside = [e for e in res.entries if e.name.startswith("encoder.layers.1.")]
    outside = [e for e in res.entries if not e.name.startswith("encoder.layers.1.")]
    assert max(e.local_sqnr_db for e in inside) < np.median([e.local_sqnr_db for e in outside]) - 10
    assert res.located.adds_error


def test_locator_on_a_uniform_config_and_batches(session, sample_images):
    """Plain uint8: no unit stands out like an int4 layer; batched input is split per image."""
    batch = dict(session.preprocessor(sample_images[4:6]))
    batch["image_ids"] = ["a", "b"]
    res = locate_divergence_batches(session.qmodel, [batch], unit="layer")
    assert res.images == ["a", "b"]
    one = locate_divergence(session, images=sample_images[4:6], unit="layer")
    for x, y in zip(res.entries, one.entries):
        assert x.name == y.name and x.output_sqnr_db == pytest.approx(y.output_sqnr_db, abs=1e-9)
    assert all(e.local_sqnr_db > 20 for e in res.entries)
    # A float patch embedder hands layer 0 a clean input: then layer 0 alone on its float input
    # is exactly layer 0 in the quantized run (same static maths, same quantized RoPE tables).
    what_if = locate_divergence(session, images=sample_images[4:5], unit="layer", keep_float=["patch_embedder"])
    e = {x.name: x for x in what_if.entries}
    assert math.isinf(e["encoder.layers.0"].input_sqnr_db)
    assert e["encoder.layers.0"].local_sqnr_db == pytest.approx(e["encoder.layers.0"].output_sqnr_db, abs=1e-4)
    mods = locate_divergence(session, images=sample_images[4:5], unit="module", keep_float=["patch_embedder"])
    e = {x.name: x for x in mods.entries}
    norm = e["encoder.layers.0.input_layernorm"]
    assert math.isinf(norm.input_sqnr_db) and norm.local_sqnr_db == pytest.approx(norm.output_sqnr_db, abs=1e-4)
    assert all(o.enabled for o in session.qmodel.observers())
    assert not any("forward" in w.__dict__ or "forward_static" in w.__dict__ for _, w in session.qmodel.wrappers())


# ------------------------------------------------------------------------------ errors


def test_not_calibrated_and_bad_image(sample_images, bad_images, session):
    fresh = Session("tiny", max_soft_tokens=MST)
    fresh.add_images(sample_images[:1])
    with pytest.raises(NotCalibratedError) as e:
        image_error_maps(fresh, sample_images[0])
    assert "\n" not in str(e.value)
    with pytest.raises(NotCalibratedError):
        locate_divergence(fresh)
    with pytest.raises(BadImageError) as e:
        image_error_maps(session, bad_images["truncated.jpg"])
    assert "truncated.jpg" in str(e.value)


def test_cancel(session, sample_images):
    token = CancelToken()
    token.cancel()
    with pytest.raises(CancelledError):
        image_error_maps(session, sample_images[4], cancel=token)
    with pytest.raises(CancelledError):
        locate_divergence(session, images=sample_images[4:6], cancel=token)

    # Cancelled once the first progress report arrives (mid-run).
    late = CancelToken()
    with pytest.raises(CancelledError):
        locate_divergence(session, images=sample_images[4:6], progress=lambda *_: late.cancel(), cancel=late)
    late = CancelToken()
    with pytest.raises(CancelledError):
        image_error_maps(session, sample_images[4], progress=lambda *_: late.cancel(), cancel=late)
    # nothing left patched or kept float: a fresh run gives the same numbers as before
    qmodel = session.qmodel
    assert all(o.enabled for o in qmodel.observers())
    assert not any("fq" in m.__dict__ for m in qmodel.quant_modules())
    assert not any("forward" in w.__dict__ or "forward_static" in w.__dict__ for _, w in qmodel.wrappers())
    a = image_error_maps(session, sample_images[4])
    assert a.sqnr_db[MODEL] == pytest.approx(session.evaluate(images=[sample_images[4]]).end_to_end.sqnr_db, abs=1e-3)


def test_progress_reports(session, sample_images):
    seen = []
    locate_divergence(session, images=sample_images[4:6], progress=lambda d, t, m: seen.append((d, t)))
    assert seen[-1] == (6, 6) and [d for d, _ in seen] == list(range(1, 7))
    seen.clear()
    image_error_maps(session, sample_images[4], progress=lambda d, t, m: seen.append((d, t)))
    assert seen[-1] == (2, 2)


# ------------------------------------------------------------------------------ heatmap PNG


def test_heatmap_png(session, sample_images, tmp_path):
    maps = image_error_maps(session, by_name(sample_images, "coffee_wide.jpg"))
    hm = maps.heatmap()
    path = write_heatmap(tmp_path / heatmap_file_name(maps.path), hm)
    assert path.name == "heatmap_coffee_wide.png"
    with Image.open(path) as im:
        assert im.format == "PNG"
        rgb = np.asarray(im.convert("RGB"))
    h, w = hm.image.shape[:2]
    zoom = max(1.0, 640 / max(h, w))
    assert rgb.shape[1] >= w * zoom + 100 and rgb.shape[0] >= h * zoom
    left, top = 12, 74  # where heatmap_chart puts the image
    x0, y0, _, y1 = (int(round(v * zoom)) for v in hm.peak_box())
    assert tuple(rgb[top + (y0 + y1) // 2, left + x0]) == PEAK  # the peak's outline
    # the colour bar: brightest (max) at the top, darkest (min) at the bottom
    bar_x = left + int(round(w * zoom)) + 20 + 9
    assert rgb[top + 2, bar_x].sum() > 600 and rgb[top + max(120, int(round(h * zoom)) - 20) - 3, bar_x].sum() < 60
    used = set()
    assert [heatmap_file_name(p, used) for p in ("a/x.jpg", "b/x.jpg", "x.png#123")] == [
        "heatmap_x.png", "heatmap_x_2.png", "heatmap_x_3.png"
    ]
