"""Provenance actions on real photos: locate an extreme, rank images, exclude and recalibrate."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from core.analysis.provenance import ExtremeLocation, NoLocationError, locate_extreme, rank_images, row_axis
from core.cancel import CancelToken
from core.data.grid import patch_layout
from core.errors import ConfigError, NoImagesError, PTQStudioError
from core.models import load_model
from core.ptq import calibrate, prepare
from core.session import MANIFEST, Session
from tests.conftest import calibrated_tiny

MST = 70


def _per_tensor_activations(session):
    return [o for o in session.qmodel.observers() if o.kind == "activation" and not o.per_channel]


def _stats(session):
    return {
        o.name: ({k: v.clone() for k, v in o.state_dict().items()}, o.provenance()) for o in session.qmodel.observers()
    }


def _same_stats(a, b) -> bool:
    return a.keys() == b.keys() and all(
        a[n][1] == b[n][1] and all(torch.equal(a[n][0][k], b[n][0][k]) for k in a[n][0]) for n in a
    )


@pytest.fixture(scope="module")
def calibrated(sample_images) -> Session:
    return calibrated_tiny(sample_images[:3], MST)


def _capture_fp_tensors(session, path) -> dict[str, torch.Tensor]:
    """Every activation observer's tensor for one image, from a freshly prepared float model."""
    qmodel = prepare(load_model("tiny"), session.config)
    captured: dict[str, torch.Tensor] = {}
    for obs in qmodel.observers():
        if obs.kind == "activation":
            obs.collect = lambda x, source=None, _n=obs.name: captured.__setitem__(_n, x.detach().clone())
    batch = dict(session.preprocessor([str(path)]))
    calibrate(qmodel, [batch])  # CALIB is the float static path; the observers above only record
    return captured


# ------------------------------------------------------------------------------ locate_extreme


def test_located_row_holds_the_recorded_extreme(calibrated):
    entries = {e.image_id: e for e in calibrated.images}
    by_image: dict[str, list[tuple[str, str]]] = {}
    for obs in _per_tensor_activations(calibrated):
        for which in ("min", "max"):
            by_image.setdefault(getattr(obs, f"{which}_source"), []).append((obs.name, which))
    assert set(by_image) <= set(entries)
    # The image that set the most extremes, re-run in float: every extreme it set is where we say.
    image_id = max(by_image, key=lambda i: len(by_image[i]))
    tensors = _capture_fp_tensors(calibrated, entries[image_id].path)
    observers = {o.name: o for o in calibrated.qmodel.observers()}
    levels = set()
    for name, which in by_image[image_id]:
        loc = locate_extreme(calibrated, name, which)
        obs = observers[name]
        recorded = float(obs.min_val if which == "min" else obs.max_val)
        t = tensors[name]
        assert isinstance(loc, ExtremeLocation) and loc.image_id == image_id and loc.path == entries[image_id].path
        assert tuple(t.shape) == loc.shape, name
        assert loc.value == recorded and float(t.reshape(-1)[loc.index]) == recorded, name
        assert float(t.min() if which == "min" else t.max()) == recorded, name
        assert loc.row is not None and loc.level in ("patch", "token"), name
        # The extreme lies in the located row (query row for attention) of the float tensor.
        row_values = t.select(row_axis(loc.shape, loc.layout), loc.row)
        assert float(row_values.min() if which == "min" else row_values.max()) == recorded, name
        h, w = loc.image.shape[:2]
        assert loc.image.dtype == np.uint8 and (h, w) == loc.layout.image_size
        assert len(loc.boxes) == len(loc.patches) == (1 if loc.level == "patch" else 9)
        for left, top, right, bottom in loc.boxes:
            assert 0 <= left < right <= w and 0 <= top < bottom <= h
        levels.add(loc.level)
    assert levels == {"patch", "token"}  # both patch-level and pooled (soft-token) observers checked


def test_attention_extremes_use_the_query_row(calibrated):
    loc = locate_extreme(calibrated, "encoder.layers.0.self_attn.probs", "max")
    _, heads, n, n2 = loc.shape
    assert n == n2 == loc.layout.num_patches and heads != n
    assert loc.row == loc.coords[2] and loc.level == "patch" and loc.patches.tolist() == [loc.row]


def test_a_pasted_white_square_is_located_in_its_patch(tmp_path, sample_images):
    s = Session("tiny", max_soft_tokens=MST)
    # Rebuild the exact image the model sees (so preprocessing does not resample it again),
    # darken it so nothing else is saturated, and paint one 2 x 2-patch white square.
    batch = s.preprocessor([str(sample_images[0])])
    layout = patch_layout(s.qmodel, batch["pixel_position_ids"])
    seen = layout.image(batch["pixel_values"][0])
    p = layout.patch_size
    col, row = 10, 5
    square = (col * p, row * p, (col + 2) * p, (row + 2) * p)
    img = (seen.astype(np.float64) * 0.6).astype(np.uint8)
    img[square[1] : square[3], square[0] : square[2]] = 255
    target = tmp_path / "white_square.png"
    Image.fromarray(img).save(target)
    other = tmp_path / "dark.png"
    Image.fromarray((np.asarray(Image.open(sample_images[3]).convert("RGB")) * 0.6).astype(np.uint8)).save(other)
    s.add_images([other, target])  # the square is the second image: it must win on value, not order
    s.calibrate()
    loc = locate_extreme(s, "patch_embedder.pixels", "max")
    assert loc.path == str(target) and loc.value == 1.0 and not loc.tied and loc.level == "patch"
    assert loc.pixel == (square[0], square[1])  # the first saturated pixel in the processor's order
    assert loc.layout.image_size == layout.image_size and np.array_equal(loc.image, img)
    ((left, top, right, bottom),) = loc.boxes
    assert square[0] <= left and right <= square[2] and square[1] <= top and bottom <= square[3]
    assert tuple(loc.layout.positions[loc.patches[0]]) == (col, row)


def test_locate_refuses_weights_per_channel_and_unknown_names_in_one_line(calibrated):
    cases = {
        "patch_embedder.input_proj.weight": NoLocationError,  # per-channel weight
        "pooler.root_scale": NoLocationError,  # per-tensor weight constant
        "no.such.observer": ConfigError,
    }
    for name, err in cases.items():
        with pytest.raises(err) as info:
            locate_extreme(calibrated, name, "max")
        assert "\n" not in str(info.value) and name in str(info.value)
    with pytest.raises(ConfigError):
        locate_extreme(calibrated, "output", "middle")
    fresh = Session("tiny", max_soft_tokens=MST)
    with pytest.raises(PTQStudioError, match="calibrate"):
        locate_extreme(fresh, "output", "max")


def test_locate_reports_an_image_that_left_the_session(sample_images, tmp_path):
    s = Session("tiny", max_soft_tokens=MST)
    copy = tmp_path / sample_images[4].name
    shutil.copy(sample_images[4], copy)
    s.add_images([copy])
    s.calibrate()
    copy.unlink()
    with pytest.raises(NoImagesError, match="missing") as info:
        locate_extreme(s, "output", "max")
    assert "\n" not in str(info.value)
    s.remove_images([copy])
    with pytest.raises(NoImagesError, match="no longer in the session"):
        locate_extreme(s, "output", "max")


# ------------------------------------------------------------------------------ rank_images


def test_rank_images_counts_every_untied_extreme(calibrated):
    ranks = rank_images(calibrated)
    used = [e for e in calibrated.images if e.status == "used"]
    assert sorted(r.image_id for r in ranks) == sorted(e.image_id for e in used)
    assert [r.extremes for r in ranks] == sorted((r.extremes for r in ranks), reverse=True)
    observers = [o for o in _per_tensor_activations(calibrated) if o.has_stats]
    ties = sum(int(o.min_tied) + int(o.max_tied) for o in observers)
    # Tensors every image shares (RoPE tables, the pooling matrix, positions) always tie.
    tied_names = {o.name for o in observers if o.min_tied or o.max_tied}
    assert {"encoder.rope_cos", "pooler.matrix"} <= tied_names
    assert sum(r.extremes for r in ranks) == 2 * len(observers) - ties
    for r in ranks:
        assert r.extremes == r.min_count + r.max_count and r.path == next(e.path for e in used if e.image_id == r.image_id)
        for o in observers:
            sets = (o.min_source == r.image_id and not o.min_tied) or (o.max_source == r.image_id and not o.max_tied)
            assert (o.name in r.observers) == sets


# ------------------------------------------------------------------------------ exclude & recalibrate


@pytest.fixture(scope="module")
def recalibrated(sample_images):
    s = Session("tiny", max_soft_tokens=MST)
    s.add_images(sample_images[:3])
    s.calibrate()
    top = rank_images(s)[0]
    before = {o.name: (float(o.min_val), float(o.max_val), o.min_source, o.max_source, o.min_tied, o.max_tied)
              for o in _per_tensor_activations(s)}
    res = s.recalibrate_without([top.image_id])
    return s, top, before, res


def test_recalibrate_without_drops_the_excluded_images_ranges(recalibrated):
    s, top, before, res = recalibrated
    assert not res.cancelled and res.images_done == res.total_images == 2 and s.state == "calibrated"
    entry = next(e for e in s.images if e.image_id == top.image_id)
    assert entry.status == "excluded" and entry not in s.usable_images() and len(s.images) == 3
    assert [e.status for e in s.images if e is not entry] == ["used", "used"]
    for o in s.qmodel.observers():
        assert top.image_id not in (o.min_source, o.max_source)
    assert top.image_id not in {r.image_id for r in rank_images(s)}
    moved = 0
    for o in _per_tensor_activations(s):
        lo, hi, min_src, max_src, min_tied, max_tied = before[o.name]
        # Untied extremes the image set were strictly beyond every other image's: they move inward.
        if max_src == top.image_id and not max_tied:
            assert float(o.max_val) < hi, o.name
            moved += 1
        if min_src == top.image_id and not min_tied:
            assert float(o.min_val) > lo, o.name
            moved += 1
    assert moved == top.extremes > 0
    # include_images puts it back (not "used": the new statistics never saw it).
    s.include_images([entry.path])
    assert entry.status == "ok" and entry in s.usable_images()
    s.exclude_images([top.image_id])
    assert entry.status == "excluded"


def test_exclude_everything_raises_and_changes_nothing(calibrated):
    statuses = [e.status for e in calibrated.images]
    stats = _stats(calibrated)
    for call in (calibrated.exclude_images, calibrated.recalibrate_without):
        with pytest.raises(NoImagesError) as info:
            call([e.image_id for e in calibrated.images])
        assert "\n" not in str(info.value)
        assert [e.status for e in calibrated.images] == statuses
    with pytest.raises(NoImagesError, match="nope.jpg"):
        calibrated.exclude_images(["nope.jpg"])
    assert _same_stats(stats, _stats(calibrated)) and calibrated.state == "calibrated"


def test_cancelled_recalibration_restores_statistics_and_statuses(calibrated):
    statuses = [e.status for e in calibrated.images]
    stats = _stats(calibrated)
    summary = calibrated.calibration
    token = CancelToken()

    def progress(done, total, message):
        token.cancel()  # after the first of the two remaining images

    victim = calibrated.images[0].image_id
    res = calibrated.recalibrate_without([victim], progress=progress, cancel=token)
    assert res.cancelled and res.batches_done == 1
    assert [e.status for e in calibrated.images] == statuses
    assert _same_stats(stats, _stats(calibrated))
    assert calibrated.state == "calibrated" and calibrated.calibration is summary
    assert locate_extreme(calibrated, "output", "max").image_id == stats["output"][1]["max_source"]


def test_save_load_keeps_locations_and_excluded_status(recalibrated, tmp_path):
    s = recalibrated[0]
    folder = s.save(tmp_path / "excluded.session")
    loaded = Session.load(folder)
    assert [(e.path, e.status) for e in loaded.images] == [(e.path, e.status) for e in s.images]
    assert "excluded" in {e.status for e in loaded.images}
    assert [e.path for e in loaded.usable_images()] == [e.path for e in s.usable_images()]
    for a, b in zip(s.qmodel.observers(), loaded.qmodel.observers()):
        assert a.provenance() == b.provenance(), a.name
    for name in ("patch_embedder.pixels", "encoder.layers.1.mlp.product", "output"):
        a, b = locate_extreme(s, name, "max"), locate_extreme(loaded, name, "max")
        assert (a.image_id, a.index, a.shape, a.row, a.value) == (b.image_id, b.index, b.shape, b.row, b.value)
        assert a.patches.tolist() == b.patches.tolist() and a.boxes == b.boxes
    ranks = rank_images(loaded)
    assert [(r.image_id, r.extremes) for r in ranks] == [(r.image_id, r.extremes) for r in rank_images(s)]

    # A folder saved before locations existed still loads; locating then says to recalibrate.
    manifest = json.loads((folder / MANIFEST).read_text())
    for prov in manifest["observers"]["provenance"].values():
        for key in [k for k in prov if k not in ("min_source", "max_source")]:
            del prov[key]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    old = Session.load(folder)
    assert old.qmodel.observers()[0].min_source == s.qmodel.observers()[0].min_source
    with pytest.raises(NoLocationError, match="calibrate again"):
        locate_extreme(old, "output", "max")
