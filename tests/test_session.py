"""core.session.Session: images, calibration, what-if, save / load (atomic, versioned, verified)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from core.cancel import CancelToken
from core.errors import SessionFileError, UnwritablePathError
from core.session import FORMAT_VERSION, MANIFEST, OBSERVERS, Session, checkpoint_hash
from tests.conftest import calibrated_tiny

MST = 70
ROOT = Path(__file__).resolve().parents[1]


def _tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _outputs(session: Session, paths) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for p in paths:
            batch = session.preprocessor([p])
            outs.append(session.qmodel(**batch).last_hidden_state)
    return outs


@pytest.fixture(scope="module")
def calibrated_session(sample_images) -> Session:
    return calibrated_tiny(sample_images[:3], MST)


@pytest.fixture(scope="module")
def saved_session(calibrated_session, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sessions") / "tiny.session"
    calibrated_session.save(folder)
    return folder


# ------------------------------------------------------------------------------ images and steps


def test_add_images_reports_bad_files_without_raising(sample_images, mixed_images_dir, missing_image_path):
    s = Session("tiny", max_soft_tokens=MST)
    res = s.add_images([mixed_images_dir, missing_image_path])
    assert len(res.accepted) == 3
    reasons = {Path(e.path).name: e.reason for e in res.rejected}
    assert missing_image_path.name in reasons
    assert any("duplicate" in r for r in reasons.values())
    assert {"empty.jpg", "text_renamed.jpg", "truncated.jpg", "bomb.png", "unsupported_compression.tif"} <= set(reasons)
    assert all(e.status == "rejected" and e.reason for e in res.rejected)
    # Adding an image already in the set rejects it instead of doubling it.
    again = s.add_images([sample_images[0]])
    assert not again.accepted and "already" in again.rejected[0].reason
    s.remove_images([e.path for e in res.accepted[:1]])
    assert len(s.usable_images()) == 2
    s.clear_images()
    assert s.images == []


def test_calibrate_marks_images_used_and_reports(calibrated_session):
    s = calibrated_session
    assert s.state == "calibrated"
    assert s.calibration.images_done == 3 and s.calibration.total_images == 3 and not s.calibration.cancelled
    assert all(e.status == "used" for e in s.images)
    assert len(s.observer_table()) == len(s.qmodel.observers())


def _cancel_after_first_batch():
    token = CancelToken()
    seen = []

    def progress(done, total, msg):
        seen.append((done, total))
        token.cancel()

    return token, progress, seen


def test_cancelled_first_calibration_keeps_the_completed_batches(sample_images):
    s = Session("tiny", max_soft_tokens=MST)
    s.add_images(sample_images[:3])
    token, progress, seen = _cancel_after_first_batch()
    res = s.calibrate(progress=progress, cancel=token)
    assert res.cancelled and res.batches_done == 1 and seen == [(1, 3)]
    assert s.state == "calibrated"
    assert [e.status for e in s.images] == ["used", "ok", "ok"]
    # What one image gave is exactly what a one-image calibration gives.
    one = Session("tiny", max_soft_tokens=MST)
    one.add_images(sample_images[:1])
    one.calibrate()
    for a, b in zip(s.qmodel.observers(), one.qmodel.observers()):
        assert torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point), a.name
    assert s.calibrate().images_done == 3 and s.state == "calibrated"


def test_cancelled_recalibration_restores_the_previous_calibration(sample_images):
    s = Session("tiny", max_soft_tokens=MST)
    s.add_images(sample_images[:3])
    s.calibrate()
    before = {o.name: (o.scale.clone(), o.zero_point.clone(), o.provenance()) for o in s.qmodel.observers()}
    token, progress, _ = _cancel_after_first_batch()
    res = s.calibrate(progress=progress, cancel=token)
    assert res.cancelled and res.batches_done == 1
    assert s.state == "calibrated" and s.calibration.images_done == 3 and not s.calibration.cancelled
    for obs in s.qmodel.observers():
        scale, zp, prov = before[obs.name]
        assert torch.equal(obs.scale, scale) and torch.equal(obs.zero_point, zp) and obs.provenance() == prov


def test_set_config_drops_the_calibration(sample_images):
    from core.config import PTQConfig, QuantSpec

    s = Session("tiny", max_soft_tokens=MST)
    s.add_images(sample_images[:1])
    s.calibrate()
    s.set_config(PTQConfig(activation=QuantSpec(dtype="int16")))
    assert s.state == "prepared" and all(e.status == "ok" for e in s.images)
    s.calibrate()
    assert s.observer_table()[0].dtype == "int16"


def test_evaluate_what_if_and_sensitivity(calibrated_session, sample_images):
    s = calibrated_session
    res = s.evaluate(images=sample_images[3:5])
    assert len(res.images) == 2 and s.last_compare is res
    assert [i.path for i in s.images] == [str(p) for p in sample_images[:3]]  # evaluation adds nothing
    what_if = s.evaluate(images=sample_images[3:5], keep_float=["encoder.layers.*.mlp"])
    assert what_if.keep_float == ["encoder.layers.*.mlp"]
    assert what_if.end_to_end.sqnr_db > res.end_to_end.sqnr_db
    ranked = s.sensitivity(images=sample_images[3:4], unit="kind")
    assert ranked and s.last_sensitivity_baseline is not None
    assert {e.name for e in ranked} >= {"encoder.layers.*.mlp.down_proj", "encoder.layers.*.self_attn"}


def test_core_compare_matches_evaluate_and_observer_table_accepts_a_session(calibrated_session, sample_images):
    import core

    via_core = core.compare(calibrated_session.qmodel, calibrated_session.batches(calibrated_session.entries_for(sample_images[3:4])))
    direct = calibrated_session.evaluate(images=sample_images[3:4])
    assert [m.to_dict() for m in via_core.modules] == [m.to_dict() for m in direct.modules]
    assert [r.name for r in core.observer_table(calibrated_session)] == [o.name for o in calibrated_session.qmodel.observers()]


# ------------------------------------------------------------------------------ save / load


def test_manifest_describes_the_session(saved_session, calibrated_session, sample_images):
    files = sorted(p.name for p in saved_session.iterdir())
    assert files == [MANIFEST, OBSERVERS]  # no stray temp files
    m = json.loads((saved_session / MANIFEST).read_text())
    assert m["format"] == "ptq-studio-session" and m["format_version"] == FORMAT_VERSION
    assert m["model"]["spec"] == "tiny" and m["max_soft_tokens"] == MST
    assert m["config"] == calibrated_session.config.to_dict()
    assert [e["sha256"] for e in m["images"]] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in sample_images[:3]]
    assert m["packages"]["torch"] and m["packages"]["transformers"] and "python" in m["packages"]
    prov = m["observers"]["provenance"]
    assert len(prov) == len(calibrated_session.qmodel.observers())
    assert prov["patch_embedder.input_proj.weight"]["min_source"] == "weights"
    out = prov["output"]  # per-tensor activations also record where their extremes sat
    assert out["max_source"] in {e["image_id"] for e in m["images"]}
    assert len(out["max_shape"]) == 2 and out["max_shape"][1] == calibrated_session.model_info["hidden_size"]  # (tokens, hidden)
    assert 0 <= out["max_index"] < np.prod(out["max_shape"]) and isinstance(out["max_tied"], bool)
    assert m["observers"]["sha256"] == hashlib.sha256((saved_session / OBSERVERS).read_bytes()).hexdigest()


def test_load_restores_quant_mode_without_calibrating(saved_session, calibrated_session, sample_images, monkeypatch):
    import core.ptq

    def no_calibration(*a, **k):
        raise AssertionError("load must not calibrate")

    monkeypatch.setattr(core.ptq, "calibrate", no_calibration)
    loaded = Session.load(saved_session)
    assert loaded.state == "calibrated" and loaded.max_soft_tokens == MST
    paths = sample_images[3:5]
    for a, b in zip(_outputs(calibrated_session, paths), _outputs(loaded, paths)):
        assert torch.equal(a, b)
    t0, t1 = calibrated_session.observer_table(), loaded.observer_table()
    for a, b in zip(t0, t1):
        assert a.to_dict(histogram=True) == b.to_dict(histogram=True)


def test_reload_in_a_new_process_gives_identical_outputs(saved_session, calibrated_session, sample_images, tmp_path):
    paths = sample_images[3:5]
    out_file = tmp_path / "outputs.pt"
    script = (
        "import sys, torch\n"
        "from core.session import Session\n"
        "s = Session.load(sys.argv[1])\n"
        "outs = []\n"
        "with torch.no_grad():\n"
        "    for p in sys.argv[3:]:\n"
        "        outs.append(s.qmodel(**s.preprocessor([p])).last_hidden_state)\n"
        "torch.save(outs, sys.argv[2])\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", script, str(saved_session), str(out_file), *map(str, paths)], check=True, env=env, cwd=ROOT)
    theirs = torch.load(out_file, weights_only=True)
    for a, b in zip(_outputs(calibrated_session, paths), theirs):
        assert torch.equal(a, b)


def test_save_replaces_an_old_session_atomically(calibrated_session, tmp_path, monkeypatch):
    folder = tmp_path / "s"
    calibrated_session.save(folder)
    before = _tree_digest(folder)

    import safetensors.torch

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(UnwritablePathError, match="No space left"):
        calibrated_session.save(folder)
    assert _tree_digest(folder) == before  # the old session survives a failed save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # and no temp folder is left
    monkeypatch.undo()
    calibrated_session.save(folder)  # a good save over it works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_save_refuses_to_replace_a_folder_that_is_not_a_session(calibrated_session, tmp_path):
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "thesis.txt").write_text("do not delete")
    with pytest.raises(UnwritablePathError):
        calibrated_session.save(folder)
    assert (folder / "thesis.txt").read_text() == "do not delete"
    plain = tmp_path / "file"
    plain.write_text("x")
    with pytest.raises(UnwritablePathError):
        calibrated_session.save(plain)
    assert plain.read_text() == "x"


@pytest.mark.parametrize(
    "damage, names",
    [
        (lambda f: (f / MANIFEST).write_text("{ not json"), MANIFEST),
        (lambda f: (f / MANIFEST).write_text(json.dumps({"format": "other"})), MANIFEST),
        (lambda f: (f / MANIFEST).unlink(), MANIFEST),
        (lambda f: (f / OBSERVERS).write_bytes((f / OBSERVERS).read_bytes()[:-100]), OBSERVERS),
        (lambda f: (f / OBSERVERS).unlink(), OBSERVERS),
    ],
    ids=["manifest-garbage", "manifest-foreign", "manifest-missing", "observers-truncated", "observers-missing"],
)
def test_corrupt_session_files_raise_session_file_error(saved_session, tmp_path, damage, names):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(saved_session, folder)
    damage(folder)
    with pytest.raises(SessionFileError) as info:
        Session.load(folder)
    assert names in str(info.value) and "\n" not in str(info.value)


def test_future_format_version_is_refused(saved_session, tmp_path):
    import shutil

    folder = tmp_path / "future"
    shutil.copytree(saved_session, folder)
    m = json.loads((folder / MANIFEST).read_text())
    m["format_version"] = FORMAT_VERSION + 1
    (folder / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(SessionFileError, match="format version"):
        Session.load(folder)


def test_checkpoint_is_referenced_by_hash_and_a_change_is_detected(tmp_path, sample_images):
    from safetensors.torch import load_file, save_file

    from core.models import load_model

    ckpt = tmp_path / "ckpt"
    load_model("tiny").save_pretrained(ckpt)
    s = Session(str(ckpt), max_soft_tokens=MST)
    s.add_images(sample_images[:1])
    s.calibrate()
    folder = tmp_path / "ckpt.session"
    s.save(folder)
    m = json.loads((folder / MANIFEST).read_text())
    assert m["model"]["spec"] == "checkpoint" and m["model"]["path"] == str(ckpt.resolve())
    assert m["model"]["checkpoint_sha256"] == checkpoint_hash(ckpt)
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST, OBSERVERS]  # weights not copied
    loaded = Session.load(folder)
    assert torch.equal(_outputs(s, sample_images[1:2])[0], _outputs(loaded, sample_images[1:2])[0])
    # Change one weight of the checkpoint: the session no longer describes it.
    weights = next(ckpt.glob("*.safetensors"))
    tensors = load_file(weights)
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(SessionFileError, match="changed") as info:
        Session.load(folder)
    assert str(ckpt.resolve()) in str(info.value)


def test_images_changed_since_the_save_are_marked_rejected(calibrated_session, tmp_path, sample_images):
    import shutil

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for p in sample_images[:2]:
        shutil.copy(p, imgs / p.name)
    s = Session("tiny", max_soft_tokens=MST)
    s.add_images(sorted(imgs.iterdir()))
    s.calibrate()
    s.save(tmp_path / "s")
    first, second = sorted(imgs.iterdir())
    first.unlink()
    second.write_bytes(sample_images[5].read_bytes())
    loaded = Session.load(tmp_path / "s")
    assert [e.status for e in loaded.images] == ["rejected", "rejected"]
    assert "missing" in loaded.images[0].reason and "changed" in loaded.images[1].reason
    with pytest.raises(Exception) as info:
        loaded.evaluate()
    assert "no usable images" in str(info.value)
