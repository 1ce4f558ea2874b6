"""The diagnostics commands of `ptq-studio`: images, locate, recalibrate, ab, export --three-way.

Each is run in process on a session quantized from real photographs, and checked against the core
call it wraps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from core.cli import main as cli
from core.session import Session


def run(capfd, *args) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in args])
    out = capfd.readouterr()
    return rc, out.out, out.err


def test_images_ranks_like_the_core(capfd, session_dir):
    rc, out, err = run(capfd, "images", session_dir, "--json")
    assert rc == 0, err
    doc = json.loads(out)
    expected = Session.load(session_dir).rank_images()
    assert [(r["image_id"], r["extremes"], r["min_count"], r["max_count"]) for r in doc["ranking"]] == [
        (r.image_id, r.extremes, r.min_count, r.max_count) for r in expected
    ]
    rc, out, _ = run(capfd, "images", session_dir, "--top", "1")
    assert rc == 0 and expected[0].image_id in out and expected[1].image_id not in out


def test_locate_names_the_image_and_patch_and_draws_it(capfd, session_dir, tmp_path):
    s = Session.load(session_dir)
    name = next(r.name for r in s.observer_table() if r.name.endswith("mlp.act"))
    loc = s.locate_extreme(name, "max")
    png = tmp_path / "loc.png"
    rc, out, err = run(capfd, "locate", session_dir, name, "--png", png, "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["image_id"] == loc.image_id and doc["row"] == loc.row
    assert doc["value"] == pytest.approx(loc.value)
    assert doc["boxes"] == [list(map(int, b)) for b in loc.boxes]
    from PIL import Image

    with Image.open(png) as im:
        assert im.width >= loc.image.shape[1] and im.height > loc.image.shape[0]
    # a weight observer has no image location: one line, exit 2
    weight = next(r.name for r in s.observer_table() if r.kind == "weight")
    rc, _, err = run(capfd, "locate", session_dir, weight)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and weight in err


def test_recalibrate_without_the_top_image(capfd, session_dir, tmp_path):
    top = Session.load(session_dir).rank_images()[0]
    out_dir = tmp_path / "s2"
    rc, out, err = run(capfd, "recalibrate", session_dir, "--exclude", top.image_id, "--out", out_dir, "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["ranges_changed"], "excluding the image that set most extremes changes ranges"
    s2 = Session.load(out_dir)
    assert [e.status for e in s2.images if e.image_id == top.image_id] == ["excluded"]
    sources = {r.min_source for r in s2.observer_table()} | {r.max_source for r in s2.observer_table()}
    assert top.image_id not in sources
    # unknown image: one line naming it, nothing written
    rc, _, err = run(capfd, "recalibrate", session_dir, "--exclude", "nope.jpg", "--out", tmp_path / "s3")
    assert rc == 2 and "nope.jpg" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s3").exists()


def test_ab_int16_layers_wins_and_writes_both_formats(capfd, session_dir, tmp_path):
    y, j = tmp_path / "b.yaml", tmp_path / "b.json"
    rc, out, err = run(
        capfd, "ab", session_dir, "--b-override", "encoder.layers.*=int16", "--tico-yaml", y, "--one-json", j, "--json"
    )
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["end_to_end"]["b"]["sqnr_db"] > doc["end_to_end"]["a"]["sqnr_db"]
    assert doc["end_to_end"]["winner"] == "B"
    assert list(doc["winning_overrides"]) == ["encoder.layers.*"]
    assert "int16" in json.dumps(doc["winning_overrides"]["encoder.layers.*"])
    assert yaml.safe_load(y.read_text())["overrides"]["encoder"]["layers"]
    one = json.loads(j.read_text())
    assert one["default_quantization_dtype"] == "uint8"
    assert {layer["dtype"] for layer in one["layers"]} == {"int16"}
    assert any(n.startswith("encoder.layers.") for layer in one["layers"] for n in layer["names"])
    rc, _, err = run(capfd, "ab", session_dir)
    assert rc == 2 and "config B equals" in err
    rc, _, err = run(capfd, "ab", session_dir, "--b-override", "encoder.layers.*")
    assert rc == 2 and "GLOB=DTYPE" in err


def test_export_three_way(capfd, session_dir, tmp_path):
    out_file = tmp_path / "m.circle"
    rc, out, err = run(capfd, "export", session_dir, "--out", out_file, "--three-way", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    rows = doc["three_way"]["rows"]
    assert doc["three_way"]["intermediates_available"] is True
    assert {r["module"] for r in rows} >= {"encoder.layers.0.mlp.down_proj", "encoder.layers.1"}
    final = rows[-1]
    assert final["fq_vs_circle"]["within_one_step"] == pytest.approx(doc["verify"]["within_one_step"])
    assert all(np.isfinite(r["fp_vs_fq"]["peir"]) and r["fp_vs_fq"]["peir"] > 0 for r in rows)
