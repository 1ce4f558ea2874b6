"""One analysis pass (core.analysis.analysis_pass) gives what the three separate chains give.

Tiny model at 70 soft tokens. The one pass runs the very same float and quantized forwards per
image as ``compare``, ``locate_divergence`` and ``image_error_maps`` (same graph, same inputs,
same accumulators fed in the same order; a second tap only reads the tensors), so every number
is compared for exact equality, not within a tolerance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.analysis.analysis_pass import AnalysisResult, analyse
from core.analysis.compare import compare
from core.analysis.divergence import locate_divergence_batches
from core.analysis.tap import ALL_FLOAT
from core.cancel import CancelToken
from core.errors import CancelledError
from core.wrappers.vision import StaticCarry
from tests.conftest import calibrated_tiny


@pytest.fixture(scope="module")
def session(sample_images):
    return calibrated_tiny(sample_images[:3])


@pytest.fixture(scope="module")
def images(sample_images):
    return sample_images[:2]


@pytest.fixture(scope="module")
def one_pass(session, images):
    seen: list[tuple[str, AnalysisResult]] = []
    events: list[tuple[str, object]] = []
    session.events.evaluated.connect(lambda r: events.append(("evaluated", r)))
    session.events.analysed.connect(lambda view, r: events.append((view, r)))
    res = session.analyse(images=images, on_image=lambda i, r: seen.append((i, r)))
    return res, seen, list(events)  # what this run announced (later tests evaluate again)


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def test_module_errors_equal_evaluate(session, images, one_pass):
    res, _, _ = one_pass
    ref = session.evaluate(images=images)
    assert res.compare.images == ref.images
    assert [m.name for m in res.compare.modules] == [m.name for m in ref.modules]
    for a, b in [*zip(res.compare.modules, ref.modules), (res.compare.end_to_end, ref.end_to_end)]:
        for key in ("sqnr_db", "mse", "max_abs", "cosine", "peir", "clipped_fraction", "num_values", "fp_min", "fp_max"):
            assert same(getattr(a, key), getattr(b, key)), (a.name, key)
        assert np.array_equal(a.samples_fp, b.samples_fp) and np.array_equal(a.samples_q, b.samples_q)


@pytest.mark.parametrize("unit", ["layer", "module"])
def test_divergence_equals_locate_divergence(session, images, one_pass, unit):
    res = one_pass[0] if unit == "layer" else session.analyse(images=images, unit=unit)
    ref = session.locate_divergence(images=images, unit=unit)
    assert res.divergence.to_dict() | {"seconds": 0} == ref.to_dict() | {"seconds": 0}


def test_maps_equal_image_error_maps(session, images, one_pass):
    res, _, _ = one_pass
    assert list(res.maps) == res.compare.images
    for path, (image_id, maps) in zip(images, res.maps.items()):
        ref = session.image_error_maps(path)
        assert image_id == ref.image_id and maps.path == ref.path
        assert maps.modules() == ref.modules() and maps.modules()
        for m in ref.modules():
            assert np.array_equal(maps.rows[m], ref.rows[m]), m
            assert np.array_equal(maps.row_sqnr_db[m], ref.row_sqnr_db[m]), m
            assert maps.sqnr_db[m] == ref.sqnr_db[m] and maps.levels[m] == ref.levels[m]
        assert np.array_equal(maps.image, ref.image)


def test_partial_results_after_each_image_and_events(one_pass):
    res, seen, events = one_pass
    assert [i for i, _ in seen] == res.compare.images
    first = seen[0][1]
    assert first.compare.images == res.compare.images[:1] and list(first.maps) == res.compare.images[:1]
    assert first.divergence.images == res.compare.images[:1] and first.divergence.entries
    assert seen[-1][1].compare.end_to_end.sqnr_db == res.compare.end_to_end.sqnr_db
    views = [v for v, _ in events]
    assert views == ["evaluated", "divergence", "heatmaps"]
    assert events[0][1] is res.compare and events[1][1] is res.divergence and events[2][1] is res.maps


def test_cancel_raises_and_restores_the_model(session, images):
    token = CancelToken()
    token.cancel()
    with pytest.raises(CancelledError, match="Analysis"):
        analyse(session.qmodel, session.batches(session.entries_for(images)), cancel=token)
    # Cancelled half-way through the first image: the taps are gone, a later run still works.
    calls = []

    def progress(done, total, msg):
        calls.append(msg)
        token.cancel()

    token = CancelToken()
    with pytest.raises(CancelledError):
        analyse(session.qmodel, session.batches(session.entries_for(images)), progress=progress, cancel=token)
    assert len(calls) == 1 and "steps" in calls[0]
    assert "forward" not in session.qmodel.encoder.layers[0].__dict__
    assert session.analyse(images=images[:1]).compare.modules


def test_batches_of_several_images_give_the_same_numbers(session, images, one_pass):
    """A batch of two is split into images of one (ids and paths with them): the same numbers."""
    res = one_pass[0]
    entries = session.entries_for(images)
    batch = dict(session.preprocessor([e.path for e in entries]))
    batch["image_ids"] = [e.image_id or e.path.name for e in entries]
    batch["paths"] = [str(e.path) for e in entries]
    two = analyse(session.qmodel, [batch])
    assert two.compare.images == res.compare.images
    assert [m.sqnr_db for m in two.compare.modules] == [m.sqnr_db for m in res.compare.modules]
    assert [m.path for m in two.maps.values()] == [m.path for m in res.maps.values()]


@pytest.mark.parametrize("keep", [[], ALL_FLOAT])
def test_static_steps_chained_are_forward_static(session, images, keep):
    """The steps the pass runs in lockstep compute exactly what forward_static computes."""
    qmodel = session.qmodel
    batch = next(iter(session.batches(session.entries_for(images[:1]))))
    profile = qmodel.build_profile(batch["pixel_position_ids"])
    pixels = batch["pixel_values"][:, : profile.num_patches]
    try:
        qmodel.set_keep_float(keep)
        with torch.no_grad(), qmodel.static_path():
            carry = StaticCarry(pixels)
            for step in qmodel.static_steps(profile):
                carry = step.run(carry)
            assert torch.equal(carry.hidden, qmodel.forward_static(pixels, profile))
    finally:
        qmodel.set_keep_float([])


def test_keep_float_what_if_equals_the_separate_calls(session, images):
    """Modules kept float for this run only: the step-by-step flags give the separate calls' numbers."""
    keep = ["encoder.layers.0.mlp*", "pooler"]
    batches = lambda: session.batches(session.entries_for(images))  # noqa: E731 -- fresh stream per call
    res = analyse(session.qmodel, batches(), keep_float=keep)
    ref = compare(session.qmodel, batches(), keep_float=keep)
    div = locate_divergence_batches(session.qmodel, batches(), keep_float=keep)
    assert res.compare.keep_float == keep and [m.name for m in res.compare.modules] == [m.name for m in ref.modules]
    for a, b in [*zip(res.compare.modules, ref.modules), (res.compare.end_to_end, ref.end_to_end)]:
        assert same(a.sqnr_db, b.sqnr_db) and same(a.clipped_fraction, b.clipped_fraction), a.name
    assert res.divergence.to_dict() | {"seconds": 0} == div.to_dict() | {"seconds": 0}
    assert session.qmodel.kept_float_modules() == []  # the what-if is undone


def test_fake_quantized_weights_are_held_for_one_step_at_a_time(session, images):
    """While the pass runs, only the wrappers of the step being run hold fake-quantized weight copies
    (the model's weights are not doubled); afterwards every quantized wrapper holds its copy again."""
    qmodel = session.qmodel
    linears = [(n, w) for n, w in qmodel.wrappers() if hasattr(w, "weight_fq") and hasattr(w, "linear")]
    cached_before = {n for n, w in linears if w.weight_fq is not None}
    assert cached_before  # a calibrated model caches them (QUANT's speed elsewhere)
    holders: list[set[str]] = []

    def step_of(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:3]) if parts[0] == "encoder" else parts[0]

    def record(module, args, out) -> None:
        holders.append({step_of(n) for n, w in linears if w.weight_fq is not None} | {step_of(module.module_name)})

    handles = [w.register_forward_hook(record) for _, w in linears]
    try:
        analyse(qmodel, session.batches(session.entries_for(images[:1])))
    finally:
        for h in handles:
            h.remove()
    assert holders and all(len(h) == 1 for h in holders), holders
    assert {n for n, w in linears if w.weight_fq is not None} == cached_before
