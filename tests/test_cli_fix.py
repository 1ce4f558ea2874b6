"""`ptq-studio fix` and the remedies line of `report`, run in process on a saved tiny session with
fake remedy algorithms (tests/remedy_fakes.py) that really change weights."""

from __future__ import annotations

import json
import shutil

import pytest

from core.cli import main as cli
from core.remedies import rounding
from core.session import Session
from tests import remedy_fakes

GLOB = "encoder.layers.0.mlp.*"
LINEAR = "encoder.layers.0.mlp.up_proj"


def run(capfd, *args) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in args])
    out = capfd.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def folder(session_dir, tmp_path, monkeypatch):
    remedy_fakes.install(monkeypatch)
    copy = tmp_path / "s"
    shutil.copytree(session_dir, copy)
    return copy


def listing(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_fix_applies_saves_and_prints_before_and_after(capfd, folder):
    assert Session.load(folder).qmodel.rounded_weights() == {}
    rc, out, err = run(capfd, "fix", folder, "--gptq", GLOB, "--smoothquant", "encoder.layers.1.mlp.*=0.25", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert [r["step"]["kind"] for r in doc["reports"]] == ["smoothquant", "gptq"]
    assert doc["reports"][0]["step"]["params"]["alphas"] == {"encoder.layers.1.mlp.*": 0.25}
    e2e = doc["end_to_end"]
    assert e2e["delta_db"] == pytest.approx(e2e["after_sqnr_db"] - e2e["before_sqnr_db"])
    assert doc["recalibrated"] is True
    # the first divergence before -> after: the unit located before, its local SQNR then and now, the unit located now
    div = doc["divergence"]
    assert div["unit"] == "layer" and div["before"]["located"] and div["after"]["located"]
    assert isinstance(div["before"]["local_sqnr_db"], float) and isinstance(div["after"]["same_unit_local_sqnr_db"], float)
    loaded = Session.load(folder)
    assert [r.step.kind for r in loaded.remedies] == ["smoothquant", "gptq"]
    assert LINEAR in loaded.qmodel.rounded_weights()  # the saved fix holds the rounded weights
    # the re-evaluation of the saved session gives the figure fix printed
    assert loaded.evaluate().end_to_end.sqnr_db == pytest.approx(e2e["after_sqnr_db"], abs=1e-9)


def test_fix_text_and_report_name_the_applied_remedies(capfd, folder):
    rc, out, err = run(capfd, "fix", folder, "--adaround", GLOB, "--target-sqnr", "20")
    assert rc == 0, err
    assert "adaround" in out and "mixed" in out and "End to end on" in out and " dB -> " in out
    assert "Before the fix: first divergence at " in out and "After: " in out and "the first divergence is " in out
    rc, out, err = run(capfd, "report", folder, "--divergence", "off")
    assert rc == 0, err
    assert f"Remedies: adaround ({GLOB}:" in out and "mixed (*:" in out
    rc, out, _ = run(capfd, "report", folder, "--divergence", "off", "--json")
    assert [r["step"]["kind"] for r in json.loads(out)["remedies"]] == ["adaround", "mixed"]


@pytest.mark.parametrize(
    "flags, code, words",
    [
        (["--gptq", "encoder.layers.0.mlpp.*"], 2, ["encoder.layers.0.mlpp.*", "closest"]),
        (["--smoothquant", f"{GLOB}=2"], 2, ["alpha"]),
        (["--smoothquant", f"{GLOB}=x"], 2, ["ALPHA"]),
        ([], 2, ["at least one remedy"]),
        (["--target-sqnr", "20", "--within-int16", "1"], 2, ["not allowed with"]),
    ],
)
def test_bad_flags_are_one_line_and_leave_the_session_alone(capfd, folder, flags, code, words):
    before = listing(folder)
    rc, _, err = run(capfd, "fix", folder, *flags)
    assert rc == code and len(err.strip().splitlines()) == 1
    assert all(w in err for w in words), err
    assert listing(folder) == before


def test_a_failing_remedy_never_touches_the_saved_session(capfd, folder, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the algorithm broke")

    monkeypatch.setattr(rounding, "apply_weight_rounding", broken)
    before = listing(folder)
    rc, _, err = run(capfd, "fix", folder, "--gptq", GLOB, "--json")
    assert rc == 1 and "the algorithm broke" in err
    assert listing(folder) == before


def test_fix_out_writes_a_new_session_and_keeps_the_original(capfd, folder, tmp_path):
    before = listing(folder)
    out = tmp_path / "fixed"
    rc, stdout, err = run(capfd, "fix", folder, "--smoothquant", GLOB, "--cle", "encoder.layers.1.*", "--out", out, "--json")
    assert rc == 0, err
    doc = json.loads(stdout)
    assert doc["session"] == str(out) and [s["kind"] for s in doc["steps"]] == ["smoothquant", "cle"]
    assert doc["steps"][0]["params"] == {}  # no ALPHA given: the default (core.remedies.apply.DEFAULT_ALPHA)
    assert listing(folder) == before and Session.load(folder).remedies == []
    assert [r.step.kind for r in Session.load(out).remedies] == ["smoothquant", "cle"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    rc, _, err = run(capfd, "fix", folder, "--gptq", GLOB, "--out", other)  # never over a folder that is not a session
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "not a PTQ Studio session" in err
    assert (other / "keep.txt").read_text() == "mine"
