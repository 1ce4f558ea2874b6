"""Issue 14.4 at the Session: remedies applied in their order, measured before/after, restored
exactly when cancelled or failed, saved and reloaded without recalibrating, carried by the export.
The algorithms are fakes that really change weights (tests/remedy_fakes.py)."""

from __future__ import annotations

import json

import pytest
import torch

import core.session as session_mod
from core import ptq
from core.cancel import CancelToken
from core.errors import CancelledError, ConfigError, NotCalibratedError, SessionFileError
from core.io import file_sha256
from core.remedies import apply as remedy_apply
from core.remedies import rounding
from core.remedies.plan import RemedyStep
from core.session import Session
from core.session_store import REMEDIED_WEIGHTS, REMEDIES, observer_state
from tests import remedy_fakes
from tests.conftest import MST, calibrated_tiny

GLOB = "encoder.layers.0.mlp.*"
WEIGHT = "encoder.layers.0.mlp.up_proj.linear.weight"


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


def test_gptq_step_changes_weights_reports_and_announces(session):
    before_w = dict(session.model.named_parameters())[WEIGHT].detach().clone()
    version = session.stats_version
    seen = []
    session.events.calibrated.connect(lambda v: seen.append(("calibrated", v)))
    session.events.remedied.connect(lambda r: seen.append(("remedied", r)))
    res = session.apply_remedies([RemedyStep("gptq", (GLOB,))])
    after_w = dict(session.model.named_parameters())[WEIGHT]
    assert not torch.equal(before_w, after_w)
    assert res.reports[0].modules == [m for m, _ in remedy_fakes.matched_linears(session.qmodel, [GLOB])]
    assert WEIGHT in res.reports[0].summary["parameters"]
    assert [r.step.kind for r in session.remedies] == ["gptq"]
    assert session.stats_version > version
    assert [k for k, _ in seen] == ["calibrated", "remedied"] and seen[1][1] is res
    # measured on the same images before and after; the float weights moved, so the error did too
    assert res.before.images == res.after.images
    assert res.sqnr_after_db != res.sqnr_before_db
    assert res.comparison.end_to_end_delta_db == pytest.approx(res.sqnr_after_db - res.sqnr_before_db)
    assert session.last_compare is res.after
    assert json.dumps(res.to_dict())  # JSON-safe for the CLI


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


def test_a_session_without_remedies_writes_no_remedy_files(session, tmp_path):
    folder = session.save(tmp_path / "plain")
    assert not (folder / REMEDIES).exists() and "remedies" not in json.loads((folder / "manifest.json").read_text())
    assert Session.load(folder).remedies == []


@pytest.mark.parametrize("damage", ["corrupt", "mismatch"])
def test_a_damaged_remedy_file_is_a_one_line_error_naming_it(session, tmp_path, damage):
    session.apply_remedies([RemedyStep("gptq", (GLOB,))])
    folder = session.save(tmp_path / "s")
    manifest = json.loads((folder / "manifest.json").read_text())
    if damage == "corrupt":
        (folder / REMEDIES).write_text("{not json")
        name = REMEDIES
    else:
        from safetensors.torch import save_file

        save_file({WEIGHT: torch.zeros(3, 3)}, str(folder / REMEDIED_WEIGHTS))
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
        seen["weight"] = dict(qmodel.source.named_parameters())[WEIGHT].detach().clone()
        seen["remedied"] = True
        raise CancelledError("stop before converting")

    monkeypatch.setattr(session_mod, "export_in_process", fake_export_in_process)
    with pytest.raises(CancelledError):
        session.export(tmp_path / "m.circle", in_process=False)
    assert torch.equal(seen["weight"], dict(session.model.named_parameters())[WEIGHT])
