"""Issue 11.3 and 11.6 at the Session: images are not held decoded; saves never lose a session."""

from __future__ import annotations

import gc
import os
import weakref

import pytest

import core.data.images as images_mod
import core.io as cio
from core.session import MANIFEST, Session
from tests.conftest import calibrated_tiny

MST = 70



@pytest.fixture(scope="module")
def calibrated(sample_images) -> Session:
    return calibrated_tiny(sample_images[:1], MST)


# ------------------------------------------------------------------------------------ images


def test_add_images_decodes_one_image_at_a_time_and_keeps_none(sample_images, tmp_path, monkeypatch):
    from PIL import Image

    live: set[int] = set()
    peak = 0

    def counted_open(path, max_pixels=None):
        nonlocal peak
        image = real_open(path, max_pixels)
        key = id(image)
        live.add(key)
        weakref.finalize(image, live.discard, key)
        peak = max(peak, len(live))
        return image

    real_open = images_mod.open_image
    monkeypatch.setattr(images_mod, "open_image", counted_open)
    # Twelve distinct files (copies with one pixel changed), so none is rejected as a duplicate.
    for i in range(12):
        with Image.open(sample_images[i % len(sample_images)]) as im:
            im = im.convert("RGB")
            im.putpixel((0, 0), (i, i, i))
            im.save(tmp_path / f"photo_{i:02d}.png")
    session = Session("tiny", max_soft_tokens=MST)
    result = session.add_images([tmp_path])
    assert len(result.accepted) == 12 and not result.rejected
    gc.collect()
    assert peak <= 2, f"{peak} decoded images were alive at once"
    assert not live, "the session still holds decoded images after add_images"
    assert not any(isinstance(v, Image.Image) for v in vars(session).values())
    assert all(set(vars(e)) == {"path", "image_id", "sha256", "status", "reason"} for e in session.images)


def test_rejections_and_duplicates_still_reported(sample_images, mixed_images_dir):
    session = Session("tiny", max_soft_tokens=MST)
    session.add_images(sample_images[:2])
    result = session.add_images([sample_images[0], mixed_images_dir])
    reasons = {e.path: e.reason for e in result.rejected}
    assert reasons[str(sample_images[0])] == "already in the image set"
    assert result.accepted and all(e.status == "ok" for e in result.accepted)
    assert len(reasons) >= 2  # the bad files of the mixed folder as well


# ------------------------------------------------------------------------------------ saves


def test_save_over_a_session_leaves_only_the_session(calibrated, tmp_path, dead_pid):
    folder = tmp_path / "s"
    calibrated.save(folder)
    stale = tmp_path / f".s.{dead_pid}-0badf00d.tmp"  # a save killed mid-write
    stale.mkdir()
    (stale / "observers.safetensors").write_bytes(b"half")
    calibrated.save(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    Session.load(folder)


def test_load_recovers_a_session_a_killed_save_moved_aside(calibrated, tmp_path, dead_pid):
    folder = tmp_path / "s"
    calibrated.save(folder)
    # The state a save killed between its two renames leaves (file systems that cannot swap).
    aside = tmp_path / f".s.{dead_pid}-12345678.old"
    os.rename(folder, aside)
    new = tmp_path / f".s.{dead_pid}-9abcdef0.tmp"
    calibrated.save(tmp_path / "other")
    os.rename(tmp_path / "other", new)
    loaded = Session.load(folder)
    assert loaded.state == "calibrated" and (folder / MANIFEST).is_file()
    calibrated.save(folder)  # the next save clears what the killed one left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_save_without_folder_swap_support_still_replaces(calibrated, tmp_path, monkeypatch):
    monkeypatch.setattr(cio, "_exchange", lambda a, b: False)
    folder = tmp_path / "s"
    calibrated.save(folder)
    calibrated.save(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    Session.load(folder)


def test_sensitivity_decodes_images_as_it_goes(calibrated, sample_images, monkeypatch):
    live: set[int] = set()
    peak = 0
    real = calibrated.preprocessor

    class Counting:
        def __call__(self, paths):
            nonlocal peak
            batch = real(paths)
            key = id(batch["pixel_values"])
            live.add(key)
            weakref.finalize(batch["pixel_values"], live.discard, key)
            peak = max(peak, len(live))
            return batch

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(calibrated, "preprocessor", Counting())
    ranked = calibrated.sensitivity(images=sample_images[:4])
    assert ranked
    assert peak <= 2, f"{peak} preprocessed images were held at once"
