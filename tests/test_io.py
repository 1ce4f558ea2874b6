"""Issue 11.6: atomic writes, no window without a session, and no leftovers from killed runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import core.io as cio
from core.io import atomic_write_bytes, recover_folder, remove_stale_temps, replace_folder, staged_folder

ROOT = Path(__file__).resolve().parents[1]



def _run_killed(script: str) -> None:
    """Run script in a fresh interpreter that SIGKILLs itself where the script says so."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _folder(path: Path, content: str) -> Path:
    path.mkdir()
    (path / "manifest.json").write_text(content)
    return path


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------ files


def test_atomic_write_replaces_and_leaves_nothing_beside(tmp_path):
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert _names(tmp_path) == ["a.bin"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_kill_9_mid_write_leaves_a_temp_the_next_writer_removes(tmp_path):
    target = tmp_path / "m.circle"
    target.write_bytes(b"earlier")
    _run_killed(
        f"""
        import os, signal
        from core.io import StagedFile
        staged = StagedFile({str(target)!r})
        staged.write(b"x" * 100000)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    leftovers = [p for p in tmp_path.iterdir() if p.name != "m.circle"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".m.circle.") and leftovers[0].name.endswith(".tmp")
    assert target.read_bytes() == b"earlier"
    atomic_write_bytes(target, b"new")  # the next run that writes there
    assert _names(tmp_path) == ["m.circle"]
    assert target.read_bytes() == b"new"


def test_temps_of_live_writers_and_of_other_names_are_kept(tmp_path, dead_pid):
    target = tmp_path / "m.circle"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        live = tmp_path / f".m.circle.{sleeper.pid}-12345678.tmp"  # written by a run still going
        live.write_bytes(b"in progress")
        mine = cio.temp_path(target)  # another thread of this process
        mine.write_bytes(b"in progress")
        other = tmp_path / f".other.circle.{dead_pid}-12345678.tmp"  # someone else's target
        other.write_bytes(b"x")
        dead = tmp_path / f".m.circle.{dead_pid}-abcdef01.tmp"
        dead.write_bytes(b"x")
        # A PID reused by a process that started after the temp was written: the writer is gone.
        reused = tmp_path / f".m.circle.{sleeper.pid}-abcdef02.tmp"
        reused.write_bytes(b"x")
        hour_ago = time.time() - 3600
        os.utime(reused, (hour_ago, hour_ago))
        removed = remove_stale_temps(target)
        assert sorted(p.name for p in removed) == sorted([dead.name, reused.name])
        assert live.exists() and mine.exists() and other.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_legacy_temps_are_removed_once_old(tmp_path):
    target = tmp_path / "s"
    young = tmp_path / ".s.ab_cd123.tmp"  # mkstemp's name, as earlier versions wrote it
    old = tmp_path / ".s.zz9y8x7w.tmp"
    old_session = tmp_path / ".s.old-0123abcd"
    for p in (young, old, old_session):
        p.mkdir()
    day_ago = time.time() - 86400
    for p in (old, old_session):
        os.utime(p, (day_ago, day_ago))
    _folder(target, "current")
    remove_stale_temps(target)
    assert _names(tmp_path) == [young.name, "s"]


# ------------------------------------------------------------------------------------ folders


def test_replace_folder_swaps_in_one_step(tmp_path):
    target = _folder(tmp_path / "s", "old")
    with staged_folder(target) as tmp:
        (tmp / "manifest.json").write_text("new")
        assert (target / "manifest.json").read_text() == "old"  # untouched until the block ends
    assert (target / "manifest.json").read_text() == "new"
    assert _names(tmp_path) == ["s"]


def test_failed_staged_folder_keeps_the_old_one(tmp_path):
    target = _folder(tmp_path / "s", "old")
    with pytest.raises(RuntimeError):
        with staged_folder(target) as tmp:
            (tmp / "manifest.json").write_text("half")
            raise RuntimeError("disk full")
    assert (target / "manifest.json").read_text() == "old"
    assert _names(tmp_path) == ["s"]


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_kill_9_during_replacement_never_loses_the_session(tmp_path, swap):
    """Killed right after the first rename: the path holds a session again after recovery."""
    target = _folder(tmp_path / "s", "old")
    _run_killed(
        f"""
        import os, signal
        import core.io as cio
        from pathlib import Path
        if {swap == "two renames"}:
            cio._exchange = lambda a, b: False  # a file system that cannot swap folders
        real_rename, real_exchange = os.rename, cio._exchange
        def rename(a, b):
            real_rename(a, b)
            os.kill(os.getpid(), signal.SIGKILL)
        def exchange(a, b):
            done = real_exchange(a, b)
            if done:
                os.kill(os.getpid(), signal.SIGKILL)
            return done
        os.rename, cio._exchange = rename, exchange
        with cio.staged_folder(Path({str(target)!r})) as tmp:
            (tmp / "manifest.json").write_text("new")
        """
    )
    recover_folder(target)  # what Session.load and the next save do first
    assert (target / "manifest.json").read_text() in ("old", "new")
    remove_stale_temps(target)
    assert _names(tmp_path) == ["s"]


def test_two_rename_fallback_without_a_crash(tmp_path, monkeypatch):
    monkeypatch.setattr(cio, "_exchange", lambda a, b: False)
    target = _folder(tmp_path / "s", "old")
    staged = _folder(cio.temp_path(target), "new")
    replace_folder(staged, target)
    assert (target / "manifest.json").read_text() == "new"
    assert _names(tmp_path) == ["s"]


def test_recover_folder_leaves_an_existing_folder_alone(tmp_path, dead_pid):
    target = _folder(tmp_path / "s", "current")
    _folder(tmp_path / f".s.{dead_pid}-12345678.old", "older")
    assert not recover_folder(target)
    assert (target / "manifest.json").read_text() == "current"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
