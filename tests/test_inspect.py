"""core.analysis metrics, observer table, compare and sensitivity: metric maths, streaming accumulators, what-if."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core.analysis.compare import compare
from core.analysis.metrics import (
    OUTLIER_RATIO_THRESHOLD,
    SAMPLE_SIZE,
    ErrorAccumulator,
    ReservoirSample,
    clipped_fraction,
    cosine,
    max_abs,
    mse,
    outlier_ratio,
    peir,
    sqnr_db,
)
from core.analysis.observer_table import observer_table
from core.analysis.sensitivity import sensitivity, sensitivity_units
from core.analysis.tap import fp_forward, module_output_observers
from core.cancel import CancelToken
from core.data.images import ImagePreprocessor
from core.errors import CancelledError, ConfigError
from core.export.verdict import noise_floor
from core.models import load_model
from core.ptq import calibrate, convert, prepare
from core.quant.mode import Mode

MST = 70  # smallest soft-token budget: keeps the tiny model fast


# ------------------------------------------------------------------------------ metric maths


def test_metric_functions_match_their_definitions():
    fp = torch.tensor([0.0, 1.0, 2.0, 4.0])
    q = torch.tensor([0.0, 1.5, 2.0, 3.0])
    assert peir(fp, q) == pytest.approx(1.0 / 4.0)  # max|diff| 1 over range 4
    assert mse(fp, q) == pytest.approx((0.25 + 1.0) / 4)
    assert max_abs(fp, q) == pytest.approx(1.0)
    assert sqnr_db(fp, q) == pytest.approx(10 * math.log10(21.0 / 1.25))
    assert cosine(fp, q) == pytest.approx(float(fp @ q / (fp.norm() * q.norm())))
    assert clipped_fraction(fp, 0.5, 3.0) == pytest.approx(2 / 4)
    assert sqnr_db(fp, fp) == math.inf
    assert peir(fp, fp) == 0.0 and cosine(fp, fp) == pytest.approx(1.0)


def test_accumulator_streams_the_same_numbers_as_whole_tensors():
    g = torch.Generator().manual_seed(0)
    fp = torch.randn(20, 300, 16, generator=g) * 3
    q = fp + 0.05 * torch.randn(fp.shape, generator=g)
    acc = ErrorAccumulator("m", clip_range=(-4.0, 4.0))
    for chunk_fp, chunk_q in zip(fp, q):  # 20 "images"
        acc.update(chunk_fp, chunk_q)
    r = acc.result()
    assert r.num_values == fp.numel()
    assert r.peir == pytest.approx(peir(fp, q), rel=1e-6)
    assert r.sqnr_db == pytest.approx(sqnr_db(fp, q), rel=1e-5)
    assert r.mse == pytest.approx(mse(fp, q), rel=1e-5)
    assert r.max_abs == pytest.approx(max_abs(fp, q), rel=1e-6)
    assert r.cosine == pytest.approx(cosine(fp, q), rel=1e-7)
    assert r.clipped_fraction == pytest.approx(clipped_fraction(fp, -4.0, 4.0))
    assert (r.fp_min, r.fp_max) == (float(fp.min()), float(fp.max()))


def test_reservoir_is_bounded_seeded_uniform_and_keeps_pairs_together():
    def run(seed):
        res = ReservoirSample(SAMPLE_SIZE, seed)
        for i in range(50):  # 50 chunks of 100k: 5M values stream through
            fp = torch.arange(i * 100_000, (i + 1) * 100_000, dtype=torch.float32)
            res.update(fp, 2 * fp)
            assert len(res) == SAMPLE_SIZE
        return res

    a, b, c = run(1), run(1), run(2)
    assert np.array_equal(a.fp, b.fp) and np.array_equal(a.q, b.q)  # same seed, same sample
    assert not np.array_equal(a.fp, c.fp)
    assert np.array_equal(a.q, 2 * a.fp)  # fp and q stay paired
    assert len(np.unique(a.fp)) == SAMPLE_SIZE  # without replacement
    # Uniform over the whole stream: every tenth of it gets about a tenth of the sample.
    counts = np.histogram(a.fp, bins=10, range=(0, 5_000_000))[0]
    assert counts.min() > 0.07 * SAMPLE_SIZE and counts.max() < 0.13 * SAMPLE_SIZE


def test_reservoir_small_streams_are_kept_whole():
    res = ReservoirSample(100, 0)
    res.update(torch.arange(30.0), torch.arange(30.0))
    res.update(torch.arange(30.0, 60.0), torch.arange(30.0, 60.0))
    assert sorted(res.fp.tolist()) == list(range(60))


def test_outlier_ratio_flags_ranges_dominated_by_a_few_values():
    rng = np.random.default_rng(0)
    normal = rng.normal(size=200_000)
    counts, edges = np.histogram(normal, bins=128)
    ratio = outlier_ratio(counts, edges, normal.min(), normal.max())
    assert 1.0 <= ratio < OUTLIER_RATIO_THRESHOLD
    spiky = np.concatenate([normal, [300.0, -250.0]])  # two values stretch the range 60x
    counts, edges = np.histogram(spiky, bins=128)
    ratio = outlier_ratio(counts, edges, spiky.min(), spiky.max())
    assert ratio > OUTLIER_RATIO_THRESHOLD


# ------------------------------------------------------------------------------ on the tiny model


@pytest.fixture(scope="module")
def tiny_pre():
    model = load_model("tiny")
    return model, ImagePreprocessor(model.config, max_soft_tokens=MST)


def _batches(pre, paths):
    return [dict(pre([p]), image_ids=[p.name]) for p in paths]


@pytest.fixture(scope="module")
def calibrated(tiny_pre, sample_images):
    model, pre = tiny_pre
    qmodel = prepare(model)
    calibrate(qmodel, _batches(pre, sample_images[:4]))
    convert(qmodel)
    return qmodel


def test_observer_table_lists_every_observer_in_forward_order(calibrated, sample_images):
    records = observer_table(calibrated)
    observers = calibrated.observers()
    assert [r.name for r in records] == [o.name for o in observers]
    cal_names = {p.name for p in sample_images[:4]}
    for r in records:
        assert r.has_stats and r.dtype == "uint8" and r.scheme == "affine"
        assert r.hist_counts.shape == (len(r.hist_edges) - 1,) and len(r.hist_counts) <= 2048
        assert r.outlier == (r.outlier_ratio > OUTLIER_RATIO_THRESHOLD)
        if r.kind == "weight":
            assert r.min_source == "weights"
        else:
            # provenance: the image id starts with the file name of one calibration image
            assert r.max_source.split("#")[0] in cal_names
            assert r.range_min <= r.range_max
    per_channel = [r for r in records if r.per_channel]
    assert per_channel and all(isinstance(r.scale, np.ndarray) and r.scale.size == r.min.size for r in per_channel)
    d = per_channel[0].to_dict()
    assert d["channels"] == per_channel[0].min.size and set(d["scale"]) == {"min", "max", "mean"}


def test_compare_covers_every_wrapper_in_forward_order(calibrated, tiny_pre, sample_images):
    _, pre = tiny_pre
    calls = []
    res = compare(calibrated, _batches(pre, sample_images[4:6]), progress=lambda d, t, m: calls.append((d, t)))
    names = [n for n, _ in calibrated.wrappers()]
    assert [m.name for m in res.modules] == names
    assert calls == [(1, 2), (2, 2)]
    assert res.images == [p.name for p in sample_images[4:6]]
    for m in res.modules:
        assert 0 < m.peir < 1 and math.isfinite(m.sqnr_db) and 0.9 < m.cosine <= 1.0
        assert 0.0 <= m.clipped_fraction < 0.05
        assert m.samples_fp.shape == m.samples_q.shape and m.samples_fp.size <= SAMPLE_SIZE
    e2e = res.end_to_end
    assert 10 < e2e.sqnr_db < 60 and e2e.cosine > 0.95
    # The attention's output is its o_proj's output: same numbers.
    attn = next(m for m in res.modules if m.name.endswith("layers.0.self_attn"))
    o_proj = next(m for m in res.modules if m.name.endswith("layers.0.self_attn.o_proj"))
    assert attn.sqnr_db == o_proj.sqnr_db and attn.kind == "attention" and o_proj.kind == "linear"
    assert calibrated.ctx.mode is Mode.QUANT


def test_compare_on_calibration_images_clips_nothing(calibrated, tiny_pre, sample_images):
    # Min-max ranges were set by exactly these images, so no FP value can fall outside them.
    _, pre = tiny_pre
    res = compare(calibrated, _batches(pre, sample_images[:4]))
    assert all(m.clipped_fraction == 0.0 for m in res.modules)
    assert res.end_to_end.clipped_fraction == 0.0


def test_compare_is_reproducible_and_its_state_does_not_grow(calibrated, tiny_pre, sample_images):
    _, pre = tiny_pre
    one = compare(calibrated, _batches(pre, sample_images[4:5]))
    again = compare(calibrated, _batches(pre, sample_images[4:5]))
    for a, b in zip(one.modules, again.modules):
        assert a.to_dict() == b.to_dict() and np.array_equal(a.samples_fp, b.samples_fp)
    many = compare(calibrated, _batches(pre, sample_images[4:8]))
    assert all(m.samples_fp.size == SAMPLE_SIZE for m in many.modules)  # bounded, not 4x


def test_what_if_keep_float_is_temporary(calibrated, tiny_pre, sample_images):
    _, pre = tiny_pre
    batch = _batches(pre, sample_images[5:6])
    with torch.no_grad():
        before = calibrated(**{k: v for k, v in batch[0].items() if k != "image_ids"}).last_hidden_state
    base = compare(calibrated, batch)
    all_float = compare(calibrated, batch, keep_float=["*"])
    assert all_float.end_to_end.max_abs == 0.0 and all_float.end_to_end.sqnr_db == math.inf
    assert all_float.keep_float == ["*"]
    layer0 = compare(calibrated, batch, keep_float=["encoder.layers.0"])
    assert layer0.end_to_end.sqnr_db > base.end_to_end.sqnr_db
    # Restored: every observer quantizes again and the output is what it was.
    assert all(o.enabled for o in calibrated.observers())
    with torch.no_grad():
        after = calibrated(**{k: v for k, v in batch[0].items() if k != "image_ids"}).last_hidden_state
    assert torch.equal(before, after)


def test_compare_cancels_between_images(calibrated, tiny_pre, sample_images):
    _, pre = tiny_pre
    token = CancelToken()

    def progress(done, total, msg):
        token.cancel()

    with pytest.raises(CancelledError):
        compare(calibrated, _batches(pre, sample_images[4:7]), progress=progress, cancel=token)
    assert calibrated.ctx.mode is Mode.QUANT and all(o.enabled for o in calibrated.observers())


def test_module_output_observers_resolve_containers(calibrated):
    resolved = {name: obs.name for name, _, obs in module_output_observers(calibrated)}
    assert resolved["encoder.layers.0.self_attn"] == "encoder.layers.0.self_attn.o_proj.output"
    assert resolved["encoder.layers.0.mlp"] == "encoder.layers.0.mlp.down_proj.output"
    last = calibrated.config.num_hidden_layers - 1
    assert resolved["encoder"] == f"encoder.layers.{last}.output"


def test_sensitivity_units():
    class Fake:
        def wrappers(self):
            names = ["patch_embedder", "patch_embedder.input_proj", "encoder"]
            for i in range(2):
                names += [f"encoder.layers.{i}", f"encoder.layers.{i}.self_attn", f"encoder.layers.{i}.mlp.down_proj"]
            return [(n, None) for n in names + ["pooler"]]

    assert sensitivity_units(Fake(), "layer") == [("encoder.layers.0", ["encoder.layers.0"]), ("encoder.layers.1", ["encoder.layers.1"])]
    kinds = [name for name, _ in sensitivity_units(Fake(), "kind")]
    assert kinds == [
        "patch_embedder",
        "patch_embedder.input_proj",
        "encoder.layers.*.self_attn",
        "encoder.layers.*.mlp.down_proj",
        "pooler",
    ]
    with pytest.raises(ConfigError):
        sensitivity_units(Fake(), "block")


def test_sensitivity_ranks_layers_and_restores_the_model(calibrated, tiny_pre, sample_images):
    _, pre = tiny_pre
    batches = _batches(pre, sample_images[4:6])
    calls = []
    baseline, ranked = sensitivity(calibrated, batches, "layer", progress=lambda d, t, m: calls.append((d, t)))
    layers = calibrated.config.num_hidden_layers
    assert len(ranked) == layers and calls[-1] == (2 * (layers + 1), 2 * (layers + 1))
    gains = [e.improvement_db for e in ranked]
    assert gains == sorted(gains, reverse=True)
    for e in ranked:
        assert e.improvement_db == pytest.approx(e.sqnr_db - baseline.sqnr_db)
    # Same numbers as a what-if evaluation of the best layer.
    best = compare(calibrated, batches, keep_float=ranked[0].globs)
    assert best.end_to_end.sqnr_db == pytest.approx(ranked[0].sqnr_db, rel=1e-9)
    assert calibrated.ctx.mode is Mode.QUANT and all(o.enabled for o in calibrated.observers())


def test_sensitivity_is_cancellable(calibrated, tiny_pre, sample_images):
    _, pre = tiny_pre
    token = CancelToken()
    token.cancel()
    with pytest.raises(CancelledError):
        sensitivity(calibrated, _batches(pre, sample_images[4:5]), "kind", cancel=token)


def test_fp_reference_is_the_float_model(calibrated, tiny_pre, sample_images):
    # compare's FP pass runs the QUANT graph with every observer kept float; it must be the
    # float model's output up to float32 rounding (far below any quantization error).
    model, pre = tiny_pre
    batch = pre([sample_images[6]])
    with torch.no_grad():
        hf = model(**batch).last_hidden_state
        ours = fp_forward(calibrated, batch)
    calibrated.set_keep_float([])
    assert ours.shape == hf.shape
    # The static path against HF's padded one: other GEMM shapes, so another summation order.
    # Judged against torch's own rounding noise on this machine (core.export.verdict), not a constant.
    float_model = prepare(model)
    module = float_model.as_export_module(batch["pixel_position_ids"])
    with torch.no_grad():
        static = module(batch["pixel_values"])
        floor = noise_floor(float_model, module, batch["pixel_values"], static, None)
    assert float((ours - hf).abs().max()) <= floor.max_abs, floor
