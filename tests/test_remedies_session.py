"""Issue 14.4 at the Session: remedies applied in their order, measured before/after, restored
exactly when cancelled or failed, saved and reloaded without recalibrating, carried by the export.
Most algorithms are fakes that really change the model (tests/remedy_fakes.py); real GPTQ and
SmoothQuant check that the before/after figures measure against the untouched float model."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

import core.session as session_mod
from core import ptq
from core.analysis.compare import compare
from core.analysis.divergence import DivergenceEntry, DivergenceResult
from core.analysis.tap import fp_forward, model_inputs
from core.cancel import CancelToken
from core.errors import CancelledError, ConfigError, NotCalibratedError, SessionFileError
from core.io import file_sha256
from core.remedies import apply as remedy_apply
from core.remedies import rounding
from core.remedies.apply import DivergenceShift
from core.remedies.plan import RemedyStep
from core.remedies.rounding import end_to_end_sqnr_db
from core.session import Session
from core.session_store import REMEDIED_WEIGHTS, REMEDIES, ROUNDED_PREFIX, observer_state
from tests import remedy_fakes
from tests.conftest import MST, calibrated_tiny

GLOB = "encoder.layers.0.mlp.*"
WEIGHT = "encoder.layers.0.mlp.up_proj.linear.weight"
LINEAR = "encoder.layers.0.mlp.up_proj"


@pytest.fixture
def fakes(monkeypatch):
    remedy_fakes.install(monkeypatch)


@pytest.fixture
def session(sample_images, fakes) -> Session:
    return calibrated_tiny(sample_images[:2], MST)


def snapshot(s: Session) -> dict:
    """Everything a cancelled fix must leave as it was."""
    tensors, prov = observer_state(s.qmodel)
    return {
        "params": {k: v.detach().clone() for k, v in s.model.named_parameters()},
        "observers": tensors,
        "provenance": prov,
        "flags": s.qmodel.observer_flags(),
        "config": s.config,
        "stats_version": s.stats_version,
        "qmodel": s.qmodel,
        "remedies": list(s.remedies),
        "mode": s.qmodel.mode,
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["params"].keys() == b["params"].keys()
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    assert a["observers"].keys() == b["observers"].keys()
    for k in a["observers"]:
        assert torch.equal(a["observers"][k], b["observers"][k]), k
    for key in ("provenance", "flags", "config", "stats_version", "remedies", "mode"):
        assert a[key] == b[key], key
    assert a["qmodel"] is b["qmodel"]


def test_gptq_step_rounds_copies_reports_and_announces(session):
    before_w = {k: v.detach().clone() for k, v in session.model.named_parameters()}
    version = session.stats_version
    seen = []
    session.events.calibrated.connect(lambda v: seen.append(("calibrated", v)))
    session.events.remedied.connect(lambda r: seen.append(("remedied", r)))
    res = session.apply_remedies([RemedyStep("gptq", (GLOB,))])
    # the float model stays the original; the matched linears got rounded copies (in the session's new model)
    assert all(torch.equal(v, before_w[k]) for k, v in session.model.named_parameters())
    matched = [m for m, _ in remedy_fakes.matched_linears(session.qmodel, [GLOB])]
    assert res.reports[0].modules == matched == res.reports[0].summary["rounded"]
    assert sorted(session.qmodel.rounded_weights()) == sorted(matched)
    assert [r.step.kind for r in session.remedies] == ["gptq"]
    assert session.stats_version > version
    assert [k for k, _ in seen] == ["calibrated", "remedied"] and seen[1][1] is res
    # measured on the same images before and after; the quantized weights moved, so the error did too
    assert res.before.images == res.after.images
    assert res.sqnr_after_db != res.sqnr_before_db
    assert res.comparison.end_to_end_delta_db == pytest.approx(res.sqnr_after_db - res.sqnr_before_db)
    assert session.last_compare is res.after
    assert json.dumps(res.to_dict())  # JSON-safe for the CLI


def test_the_fix_keeps_both_analyses_maps_and_divergence_and_the_same_before(session):
    """One analysis pass before and after (the views' heatmaps and first divergence come with it),
    while `before` is exactly what compare measured on the same images and model."""
    batches = list(session.batches(session.evaluation_images))
    expected = compare(session.qmodel, batches, total=len(batches))
    res = session.apply_remedies([RemedyStep("gptq", (GLOB,))])
    assert res.before.end_to_end.sqnr_db == expected.end_to_end.sqnr_db
    assert [(m.name, m.sqnr_db) for m in res.before.modules] == [(m.name, m.sqnr_db) for m in expected.modules]
    for analysis, measured in ((res.before_analysis, res.before), (res.after_analysis, res.after)):
        assert analysis.compare is measured
        assert list(analysis.maps) == list(measured.images) and len(measured.images) == len(batches)
        maps = analysis.maps[measured.images[0]]
        assert "encoder.layers.0" in maps.modules() and maps.heatmap("encoder.layers.0").grid.size
        assert analysis.divergence.unit == "layer" and analysis.divergence.located is not None
    # the rounded layer's maps moved, the float model did not: the same grid, other errors
    before_map = res.before_analysis.maps[res.before.images[0]].rows["encoder.layers.0.mlp.up_proj"]
    after_map = res.after_analysis.maps[res.after.images[0]].rows["encoder.layers.0.mlp.up_proj"]
    assert before_map.shape == after_map.shape and not np.array_equal(before_map, after_map)
    shift = res.divergence
    first = res.before_analysis.divergence.located
    assert (shift.before, shift.before_local_db) == (first.name, first.local_sqnr_db)
    same = {e.name: e for e in res.after_analysis.divergence.entries}[first.name]
    assert shift.after_local_db == same.local_sqnr_db and shift.after == res.after_analysis.divergence.located.name
    doc = json.loads(json.dumps(res.to_dict()))
    assert doc["divergence"]["before"] == {"located": first.name, "local_sqnr_db": pytest.approx(first.local_sqnr_db)}
    assert doc["divergence"]["after"]["located"] == shift.after
    assert "maps" not in json.dumps(doc)  # the maps stay in memory, never in the JSON or the session


def _divergence(located: str | None, local: dict[str, float]) -> DivergenceResult:
    entries = [DivergenceEntry(n, "layer", 40.0, 30.0, v, 1.0, 0.0, 0.0) for n, v in local.items()]
    hit = next((e for e in entries if e.name == located), None)
    return DivergenceResult("layer", entries, hit, ["a.jpg"])


def test_the_divergence_shift_says_where_it_was_and_where_it_is_now():
    before = _divergence("encoder.layers.1", {"encoder.layers.0": 30.0, "encoder.layers.1": 18.25})
    moved = DivergenceShift.of(before, _divergence("encoder.layers.0", {"encoder.layers.0": 29.5, "encoder.layers.1": 27.0}))
    assert moved.lines() == (
        "Before the fix: first divergence at encoder.layers.1 (local SQNR 18.25 dB).",
        "After: encoder.layers.1 now 27.00 dB, +8.75 dB; the first divergence is now at encoder.layers.0 (local SQNR 29.50 dB).",
    )
    stayed = DivergenceShift.of(before, _divergence("encoder.layers.1", {"encoder.layers.1": 20.0}))
    assert stayed.lines()[1] == "After: encoder.layers.1 now 20.00 dB, +1.75 dB; the first divergence is still at encoder.layers.1."
    gone = DivergenceShift.of(before, _divergence(None, {"encoder.layers.1": math.inf}))
    assert gone.lines()[1] == "After: encoder.layers.1 now exact (no error); the first divergence is none (no unit loses SQNR)."
    assert gone.to_dict()["after"] == {"same_unit_local_sqnr_db": None, "located": None, "local_sqnr_db": None}


def test_steps_run_smoothing_then_recalibration_then_rounding_then_mixed(session, monkeypatch):
    calls = []

    def record(name, fn):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(rounding, "apply_weight_rounding", record("gptq", remedy_fakes.fake_rounding))
    monkeypatch.setattr(remedy_apply.smoothing, "apply_smoothquant", record("smoothquant", remedy_fakes.fake_smoothquant))
    monkeypatch.setattr(remedy_apply.mixed, "search_mixed_precision", record("mixed", remedy_fakes.fake_search))
    steps = [
        RemedyStep("mixed", params={"target_sqnr_db": 20.0}),
        RemedyStep("gptq", (GLOB,)),
        RemedyStep("smoothquant", (GLOB,), {"alpha": 0.5}),
    ]
    outcome = remedy_apply.apply_plan(
        session.qmodel, session.config, steps, [], [], recalibrate=lambda q: calls.append("recalibrate")
    )
    assert calls == ["smoothquant", "recalibrate", "gptq", "mixed"]
    assert [r.step.kind for r in outcome.reports] == ["smoothquant", "gptq", "mixed"]
    assert outcome.recalibrated
    assert outcome.config.overrides.keys() >= remedy_fakes.POINTS[0].overrides.keys()


def test_smoothing_alone_recalibrates_and_keeps_the_session_calibrated(session):
    res = session.apply_remedies([RemedyStep("cle", (GLOB,))])
    assert res.recalibrated and session.state == "calibrated"
    # the new statistics follow the halved weights: the weight observer's range halved
    ranges = {r.name: r for r in session.observer_table()}
    old = {r.name: r for r in res.observers_before}
    name = "encoder.layers.0.mlp.up_proj.weight"
    assert float(ranges[name].max.max()) == pytest.approx(float(old[name].max.max()) * 0.5, rel=1e-6)


def test_bad_glob_and_bad_settings_are_one_line_errors_before_any_work(session, monkeypatch):
    monkeypatch.setattr(session_mod.Session, "batches", lambda *a, **k: pytest.fail("decoded images"))
    before = snapshot(session)
    with pytest.raises(ConfigError) as e:
        session.apply_remedies([RemedyStep("gptq", ("encoder.layers.0.mlpp.*",))])
    msg = str(e.value)
    assert "\n" not in msg and "encoder.layers.0.mlpp.*" in msg and "closest" in msg
    with pytest.raises(ConfigError, match="alpha"):
        session.apply_remedies([RemedyStep("smoothquant", (GLOB,), {"alpha": 1.5})])
    with pytest.raises(ConfigError, match="target"):
        session.apply_remedies([RemedyStep("mixed")])
    with pytest.raises(ConfigError, match="pooler.nope"):
        session.apply_remedies([RemedyStep("mixed", params={"overrides": {"pooler.nope": "int16"}})])
    assert_same(before, snapshot(session))


def test_an_uncalibrated_session_is_refused(sample_images, fakes):
    s = Session("tiny", max_soft_tokens=MST)
    s.add_images(sample_images[:1])
    with pytest.raises(NotCalibratedError):
        s.apply_remedies([RemedyStep("gptq", (GLOB,))])


@pytest.mark.parametrize("failure", ["cancel", "error"])
def test_a_cancelled_or_failed_fix_restores_the_session_exactly(session, monkeypatch, failure):
    token = CancelToken()

    def change_then_fail(qmodel, batches, globs, method="gptq", **kwargs):
        remedy_fakes.fake_rounding(qmodel, batches, globs, method)  # the weights really changed...
        qmodel.observers()[0].min_val.fill_(-123.0)  # ...and a statistic
        if failure == "cancel":
            token.cancel()
            token.raise_if_cancelled("gptq")
        raise RuntimeError("the algorithm broke")

    monkeypatch.setattr(rounding, "apply_weight_rounding", change_then_fail)
    before = snapshot(session)
    events = []
    session.events.calibrated.connect(events.append)
    session.events.remedied.connect(events.append)
    with pytest.raises(CancelledError if failure == "cancel" else RuntimeError):
        # smoothing first, so the failure comes after a recalibration of the copy too
        session.apply_remedies([RemedyStep("cle", ("encoder.layers.1.*",)), RemedyStep("gptq", (GLOB,))], cancel=token)
    assert_same(before, snapshot(session))
    assert events == []


def test_save_and_load_keep_the_remedies_without_recalibrating(session, tmp_path, monkeypatch):
    res = session.apply_remedies([RemedyStep("gptq", (GLOB,)), RemedyStep("mixed", params={"target_sqnr_db": 20.0})])
    folder = session.save(tmp_path / "s")
    assert (folder / REMEDIES).is_file() and (folder / REMEDIED_WEIGHTS).is_file()
    saved = json.loads((folder / REMEDIES).read_text())
    assert [s["kind"] for s in saved["plan"]] == ["gptq", "mixed"]
    monkeypatch.setattr(ptq, "calibrate", lambda *a, **k: pytest.fail("load recalibrated"))
    loaded = Session.load(folder)
    assert [r.to_json() for r in loaded.remedies] == [r.to_json() for r in session.remedies]
    assert loaded.config == session.config
    want = dict(session.model.named_parameters())
    for name, p in loaded.model.named_parameters():
        assert torch.equal(p, want[name]), name
    assert loaded.evaluate().end_to_end.sqnr_db == pytest.approx(res.sqnr_after_db, abs=1e-9)


def test_a_remedies_file_without_rounded_weights_still_loads(session, tmp_path):
    """Sessions saved before rounded copies existed have only float parameters in the weights file."""
    from safetensors.torch import load_file, save_file

    session.apply_remedies([RemedyStep("gptq", (GLOB,))])
    folder = session.save(tmp_path / "s")
    tensors = load_file(str(folder / REMEDIED_WEIGHTS))
    assert ROUNDED_PREFIX + LINEAR in tensors
    save_file({k: v for k, v in tensors.items() if not k.startswith(ROUNDED_PREFIX)}, str(folder / REMEDIED_WEIGHTS))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["remedies"]["weights_sha256"] = file_sha256(folder / REMEDIED_WEIGHTS)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    loaded = Session.load(folder)
    assert [r.step.kind for r in loaded.remedies] == ["gptq"] and loaded.qmodel.rounded_weights() == {}


def test_a_session_without_remedies_writes_no_remedy_files(session, tmp_path):
    folder = session.save(tmp_path / "plain")
    assert not (folder / REMEDIES).exists() and "remedies" not in json.loads((folder / "manifest.json").read_text())
    assert Session.load(folder).remedies == []


@pytest.mark.parametrize("damage", ["corrupt", "mismatch", "rounded"])
def test_a_damaged_remedy_file_is_a_one_line_error_naming_it(session, tmp_path, damage):
    session.apply_remedies([RemedyStep("gptq", (GLOB,))])
    folder = session.save(tmp_path / "s")
    manifest = json.loads((folder / "manifest.json").read_text())
    if damage == "corrupt":
        (folder / REMEDIES).write_text("{not json")
        name = REMEDIES
    else:
        from safetensors.torch import save_file

        key = WEIGHT if damage == "mismatch" else ROUNDED_PREFIX + LINEAR
        save_file({key: torch.zeros(3, 3)}, str(folder / REMEDIED_WEIGHTS))
        manifest["remedies"]["weights_sha256"] = file_sha256(folder / REMEDIED_WEIGHTS)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        name = REMEDIED_WEIGHTS
    with pytest.raises(SessionFileError) as e:
        Session.load(folder)
    msg = str(e.value)
    assert "\n" not in msg and name in msg and ("corrupt" in msg or "does not fit" in msg)


def test_the_child_process_export_gets_the_remedied_weights(session, tmp_path, monkeypatch):
    session.apply_remedies([RemedyStep("gptq", (GLOB,))])
    seen = {}

    def fake_export_in_process(loader, out_path, **kwargs):
        qmodel, _ = loader()  # what the export child builds its model from
        seen["rounded"] = qmodel.rounded_weights()
        raise CancelledError("stop before converting")

    monkeypatch.setattr(session_mod, "export_in_process", fake_export_in_process)
    with pytest.raises(CancelledError):
        session.export(tmp_path / "m.circle", in_process=False)
    want = session.qmodel.rounded_weights()
    assert LINEAR in want and seen["rounded"].keys() == want.keys()
    assert all(torch.equal(seen["rounded"][n], want[n]) for n in want)


# ---------------------------------------------------------------------------------------------
# Real algorithms: the before/after figures measure against the untouched float model
# ---------------------------------------------------------------------------------------------


def _outputs(qmodel, batches) -> list[torch.Tensor]:
    with torch.no_grad():
        return [qmodel(**model_inputs(b, "cpu")[0]).last_hidden_state for b in batches]


def _db_shift(norm: float, moved: float) -> float:
    """Largest |20 log10(|a| / |b|)| for vectors with |b| = norm and |a - b| <= moved (L2 norms)."""
    return 20 * math.log10(norm / (norm - moved)) if moved < norm else math.inf


def _sum_db(n: int, unit_roundoff: float) -> float:
    """Largest dB change of a sum of n non-negative products by rounding: relative error gamma_n
    = n u / (1 - n u) (Higham, any summation order), as 10 log10(1 / (1 - gamma_n))."""
    gamma = n * unit_roundoff / (1 - n * unit_roundoff)
    return -10 * math.log10(1 - gamma)


@pytest.fixture(scope="module")
def real_gptq(sample_images):
    """A calibrated tiny session, an untouched copy of its float model, and real GPTQ on every linear."""
    s = calibrated_tiny(sample_images[:2], MST)
    untouched = copy.deepcopy(s.model)
    res = s.apply_remedies([RemedyStep("gptq", ("*",))])
    return s, untouched, res


def test_real_gptq_after_sqnr_is_against_the_untouched_float_model(real_gptq):
    """The fix's after-SQNR (compare: the wrapped model's own float pass as reference) equals the
    SQNR against a separate, untouched float model, within the float noise of the two paths."""
    s, untouched, res = real_gptq
    assert res.reports[0].summary["parameters"] == [] and s.qmodel.rounded_weights()
    batches = list(s.batches(s.usable_images()))
    assert [i for b in batches for i in b["image_ids"]] == list(res.after.images)
    expected = end_to_end_sqnr_db(untouched, s.qmodel, batches)
    # The two references: HF's padded float forward (untouched) and the wrapped model's float pass.
    signal = noise = moved = 0.0
    elements = 0
    with torch.no_grad():
        for b in batches:
            inputs, _ = model_inputs(b, "cpu")
            hf = untouched(**inputs).last_hidden_state.double()
            own = fp_forward(s.qmodel, inputs).double()
            s.qmodel.set_keep_float([])
            q = s.qmodel(**inputs).last_hidden_state.double()
            signal += float((hf**2).sum())
            noise += float(((hf - q) ** 2).sum())
            moved += float(((hf - own) ** 2).sum())
            elements = max(elements, hf.numel())
    assert expected == pytest.approx(10 * math.log10(signal / noise), abs=1e-9)
    # compare sums float32 dot products per batch (2**-24 roundoff), end_to_end_sqnr_db float64 ones.
    tolerance = (
        _db_shift(math.sqrt(signal), math.sqrt(moved))
        + _db_shift(math.sqrt(noise), math.sqrt(moved))
        + 2 * _sum_db(elements + 2, 2.0**-24)
        + 2 * _sum_db(elements + 2, 2.0**-53)
    )
    assert abs(res.sqnr_after_db - expected) <= tolerance, (res.sqnr_after_db, expected, tolerance)
    assert tolerance < 0.05  # the check means something: far below what the rounding moves
    assert res.sqnr_after_db > res.sqnr_before_db + 0.1, (res.sqnr_before_db, res.sqnr_after_db)


def test_real_gptq_save_and_load_keep_the_rounded_copies_and_pins(real_gptq, tmp_path):
    s, _, res = real_gptq
    folder = s.save(tmp_path / "s")
    loaded = Session.load(folder)
    want = s.qmodel.rounded_weights()
    got = loaded.qmodel.rounded_weights()
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    linears = dict(loaded.qmodel.wrappers())
    assert all(linears[n].obs_weight.is_pinned for n in want)
    batches = list(s.batches(s.usable_images()))
    assert all(torch.equal(a, b) for a, b in zip(_outputs(loaded.qmodel, batches), _outputs(s.qmodel, batches)))
    assert loaded.evaluate().end_to_end.sqnr_db == pytest.approx(res.sqnr_after_db, abs=1e-9)


def test_real_smoothquant_raises_the_sqnr_on_outliers(sample_images):
    s = Session("tiny+outliers", max_soft_tokens=MST)
    s.add_images(sample_images[:2])
    s.calibrate()
    res = s.apply_remedies([RemedyStep("smoothquant", ("*",), {"alpha": 0.5})])
    assert res.recalibrated and res.reports[0].summary["parameters"]
    assert res.sqnr_after_db > res.sqnr_before_db + 1.0, (res.sqnr_before_db, res.sqnr_after_db)


def test_new_config_keeps_only_the_smoothing_reports(session):
    """A new config re-wraps the model: the rounded copies are gone, so their report must go too;
    smoothing lives in the float weights, which the new wrappers keep, so its report stays."""
    session.apply_remedies([RemedyStep("smoothquant", (GLOB,), {"alpha": 0.5}), RemedyStep("gptq", (GLOB,))])
    assert [r.step.kind for r in session.remedies] == ["smoothquant", "gptq"]
    session.set_config(ptq.PTQConfig())
    assert [r.step.kind for r in session.remedies] == ["smoothquant"]
    assert session.qmodel.rounded_weights() == {}


def test_real_gptq_one_analysis_pass_sees_the_rounded_weights(real_gptq):
    """The lockstep analysis pass switches one step at a time to QUANT and re-caches weights: the
    rounded copies must be what it measures, exactly as the fix's own after-comparison did."""
    s, _, res = real_gptq
    result = s.analyse()
    assert list(result.images) == list(res.after.images)
    assert result.compare.end_to_end.sqnr_db == res.after.end_to_end.sqnr_db
    assert s.qmodel.rounded_weights()  # the pass left the copies in place
