"""The session's evaluation set (issue 13, item 3): a few chosen photos, not every calibration image.

Qt-free: the Session, its folder format and the CLI on the tiny model at 70 soft tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.cli import main as cli
from core.data.eval_set import DEFAULT_EVAL_COUNT
from core.errors import ConfigError
from core.session import MANIFEST, Session
from tests.conftest import calibrated_tiny


@pytest.fixture(scope="module")
def session(sample_images) -> Session:
    """Calibrated on six photos: more than the default evaluation set holds."""
    assert len(sample_images) > DEFAULT_EVAL_COUNT + 1
    return calibrated_tiny(sample_images[: DEFAULT_EVAL_COUNT + 2])


@pytest.fixture
def fresh(session):
    """The module's session with the default evaluation set again after the test."""
    yield session
    session.set_evaluation_images(None)


def _names(entries) -> list[str]:
    return [Path(e.path).name for e in entries]


def test_the_default_is_the_first_few_usable_photos(fresh, sample_images):
    usable = fresh.usable_images()
    assert len(usable) == DEFAULT_EVAL_COUNT + 2
    assert fresh.evaluation_images == usable[:DEFAULT_EVAL_COUNT]
    assert fresh.entries_for(None) == usable[:DEFAULT_EVAL_COUNT]


def test_choosing_by_path_or_id_announces_the_new_set_in_session_order(fresh):
    usable = fresh.usable_images()
    seen = []
    fresh.events.evaluation_changed.connect(seen.append)
    try:
        chosen = fresh.set_evaluation_images([usable[5].image_id, usable[1].path])
        assert chosen == [usable[1], usable[5]]  # the session's order, not the argument's
        assert seen == [[usable[1].path, usable[5].path]]
        fresh.set_evaluation_images([usable[5].path, usable[1].image_id])  # the same set: no announcement
        assert len(seen) == 1
        fresh.set_evaluation_images(None)
        assert seen[-1] == [e.path for e in usable[:DEFAULT_EVAL_COUNT]]
    finally:
        fresh.events.evaluation_changed.disconnect(seen.append)


@pytest.mark.parametrize("bad", ["no_such_photo.jpg", "excluded", []])
def test_a_bad_choice_is_one_line_naming_the_photo_and_changes_nothing(fresh, bad):
    usable = fresh.usable_images()
    fresh.set_evaluation_images([usable[0].path])
    if bad == "excluded":
        fresh.exclude_images([usable[2].path])
        bad, name = [usable[2].path], Path(usable[2].path).name
    else:
        name = "no_such_photo.jpg" if bad else "empty"
    try:
        with pytest.raises(ConfigError) as info:
            fresh.set_evaluation_images(bad)
    finally:
        fresh.include_images([usable[2].path])
    message = str(info.value)
    assert "\n" not in message and name in message
    assert ("include it" in message) or ("add it" in message) or ("choose at least one" in message)
    assert fresh.evaluation_images == [usable[0]]


def test_analysis_runs_on_the_evaluation_set_and_hands_on_each_photo(fresh):
    usable = fresh.usable_images()
    fresh.set_evaluation_images([usable[4].path, usable[2].path])
    ids = [usable[2].image_id, usable[4].image_id]
    partial = []
    res = fresh.analyse(on_image=lambda image_id, r: partial.append((image_id, list(r.images))))
    assert res.images == ids
    assert partial == [(ids[0], ids[:1]), (ids[0 + 1], ids)]
    assert fresh.evaluate().images == ids
    assert fresh.analyse(images=[usable[0].path]).images == [usable[0].image_id]  # explicit images still win


def test_the_set_survives_a_save_and_old_sessions_load_with_the_default(fresh, tmp_path):
    usable = fresh.usable_images()
    fresh.set_evaluation_images([usable[3].path, usable[5].path])
    folder = fresh.save(tmp_path / "s")
    loaded = Session.load(folder)
    assert _names(loaded.evaluation_images) == _names([usable[3], usable[5]])
    # A session saved before the evaluation set existed has no entry in its manifest.
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["evaluation_images"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert _names(Session.load(folder).evaluation_images) == _names(usable[:DEFAULT_EVAL_COUNT])


def test_removed_choices_fall_back_to_the_default(sample_images):
    s = Session("tiny", max_soft_tokens=70)
    s.add_images(sample_images[:6])
    s.set_evaluation_images([sample_images[5]])
    assert _names(s.evaluation_images) == [sample_images[5].name]
    s.remove_images([sample_images[5]])
    assert _names(s.evaluation_images) == [p.name for p in sample_images[:DEFAULT_EVAL_COUNT]]


def _run(capfd, *args) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in args])
    out = capfd.readouterr()
    return rc, out.out, out.err


def test_cli_eval_images_option_names_the_photos(capfd, session_dir):
    names = [Path(e.path).name for e in Session.load(session_dir).usable_images()]
    rc, out, err = _run(capfd, "report", session_dir, "--eval-images", f"*{names[1]}", "--divergence", "off", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert [Path(i["path"]).name for i in doc["evaluation_images"]] == [names[1]]
    assert len(doc["errors"]["images"]) == 1
    rc, out, err = _run(capfd, "report", session_dir, "--divergence", "off")
    assert rc == 0, err
    assert f"Errors on {len(names)} photos: {', '.join(names)}" in out  # the default: all three (<= 4)
    rc, out, err = _run(capfd, "sensitivity", session_dir, "--eval-images", names[0], "--json")
    assert rc == 0, err
    assert [Path(i["path"]).name for i in json.loads(out)["evaluation_images"]] == [names[0]]
    rc, _, err = _run(capfd, "report", session_dir, "--eval-images", "nothing_like_it_*.jpg")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "nothing_like_it_" in err


def test_cli_help_says_the_default(capfd):
    try:
        cli.main(["report", "--help"])
    except SystemExit:
        pass  # argparse's way of ending after --help
    out = " ".join(capfd.readouterr().out.split())
    assert f"first {DEFAULT_EVAL_COUNT} usable photos" in out


def test_excluding_an_evaluation_photo_announces_the_new_set(fresh):
    """The evaluation photos move when one of them is excluded (and back when it is included):
    the views that measure on them must hear it, as they hear set_evaluation_images."""
    usable = fresh.usable_images()
    seen = []
    fresh.events.evaluation_changed.connect(seen.append)
    try:
        fresh.exclude_images([usable[0].path])
        assert seen == [[e.path for e in usable[1 : DEFAULT_EVAL_COUNT + 1]]]
        fresh.exclude_images([usable[-1].path])  # not an evaluation photo: the set is unchanged
        assert len(seen) == 1
        fresh.include_images([usable[0].path, usable[-1].path])
        assert seen[-1] == [e.path for e in usable[:DEFAULT_EVAL_COUNT]]
    finally:
        fresh.events.evaluation_changed.disconnect(seen.append)
