"""Atomic file and folder writes, and the clean-up of temporaries that killed runs left behind.

Every writer stages its output beside the target under a name that says whose it is::

    .NAME.PID-TOKEN.tmp    a file or folder being written by process PID
    .NAME.PID-TOKEN.old    a replaced session folder on its way out (only where the file
                           system cannot swap two folders in one step)

A later writer of NAME removes the ones whose process is gone (or whose PID now belongs to a
process that started after the temporary was last written), so a ``kill -9`` costs disk only
until the next save or export there. Temporaries of a live process are never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import math
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

__all__ = [
    "json_safe",
    "finite_or_none",
    "file_sha256",
    "StagedFile",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_dir",
    "recover_folder",
    "remove_stale_temps",
    "replace_folder",
    "staged_folder",
    "temp_path",
]

# A temporary last written before its owner started (by more than this) is not that owner's: the
# PID was reused. The slack absorbs coarse timestamps and a file server's clock running behind.
_PID_REUSE_SLACK_S = 60.0
# Temporaries named by earlier versions (mkstemp's random names carry no PID) are removed only
# when they are at least this old, so a run of an older build still writing is left alone.
_LEGACY_MIN_AGE_S = 3600.0


def temp_path(target: str | os.PathLike, kind: str = "tmp") -> Path:
    """A fresh temporary name beside target that names this process (kind "tmp" or "old")."""
    target = Path(target)
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder so a rename inside it survives a power cut (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Stale temporaries
# ---------------------------------------------------------------------------------------------


def _owner_alive(pid: int, mtime: float) -> bool:
    """Whether process pid may still be writing a temporary last modified at mtime."""
    if pid == os.getpid():
        return True  # another thread of this process may be mid-write
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return proc.create_time() <= mtime + _PID_REUSE_SLACK_S
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # cannot tell (access denied): keep it


def _stale_temps(target: Path, kinds: tuple[str, ...] = ("tmp", "old"), legacy_min_age_s: float = _LEGACY_MIN_AGE_S) -> list[Path]:
    """Siblings of target that are temporaries of target whose writer is gone, oldest first."""
    name = re.escape(target.name)
    ours = re.compile(rf"\.{name}\.(\d+)(?:-[0-9a-f]+)?\.({'|'.join(kinds)})")
    # Names earlier versions gave: mkstemp's (files and session folders) and a replaced session.
    legacy_forms = {"tmp": r"[a-z0-9_]{8}\.tmp", "old": r"old-[0-9a-f]{8}"}
    legacy = re.compile(rf"\.{name}\.(?:{'|'.join(legacy_forms[k] for k in kinds)})")
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return []
    now = time.time()
    stale: list[tuple[float, Path]] = []
    for path in siblings:
        m = ours.fullmatch(path.name)
        if m is None and not legacy.fullmatch(path.name):
            continue
        try:
            mtime = path.lstat().st_mtime
        except OSError:
            continue
        if m is not None and not _owner_alive(int(m.group(1)), mtime):
            stale.append((mtime, path))
        elif m is None and now - mtime >= legacy_min_age_s:
            stale.append((mtime, path))
    return [p for _, p in sorted(stale)]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def remove_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Remove target's temporaries left by processes that are gone; returns what was removed.

    A missing target folder is first restored from a replaced copy (recover_folder), so this
    never deletes the only copy of a session.
    """
    target = Path(target)
    recover_folder(target)
    stale = _stale_temps(target)
    for path in stale:
        _remove(path)
    return stale


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


class StagedFile:
    """A file written beside its target and moved over it only on commit().

    Until commit() the target is untouched; discard() (or leaving the ``with`` block without
    committing) removes the temporary. Stale temporaries of the target are removed first.
    """

    def __init__(self, target: str | os.PathLike) -> None:
        self.target = Path(target)
        remove_stale_temps(self.target)
        self.path = temp_path(self.target)
        self.committed = False

    def write(self, data: bytes) -> None:
        """Write data to the temporary (fsynced, with the permissions a plain open() gives)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def commit(self) -> None:
        """Replace the target with the temporary in one rename."""
        os.replace(self.path, self.target)
        self.committed = True
        fsync_dir(self.target.parent)

    def discard(self) -> None:
        """Remove the temporary unless it was committed."""
        if not self.committed:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def __enter__(self) -> StagedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file atomically: temporary beside it, fsync, one rename."""
    with StagedFile(path) as staged:
        staged.write(data)
        staged.commit()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """atomic_write_bytes for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside target; on a clean exit it replaces target
    (replace_folder), on an error it is removed and target is left as it was."""
    target = Path(target)
    remove_stale_temps(target)
    tmp = temp_path(target)
    tmp.mkdir(mode=0o777)  # umask applies, as for any folder the user makes
    try:
        yield tmp
        replace_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step where the OS and file system allow it; False where not."""
    if sys.platform.startswith("linux"):
        fn, args = _libc_function("renameat2"), (-100, os.fsencode(a), -100, os.fsencode(b), 2)  # AT_FDCWD, RENAME_EXCHANGE
    elif sys.platform == "darwin":
        fn, args = _libc_function("renamex_np"), (os.fsencode(a), os.fsencode(b), 2)  # RENAME_SWAP
    else:
        return False
    if fn is None:
        return False
    if fn(*args) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # this file system cannot swap: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


def _libc_function(name: str):
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


def replace_folder(staged: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move a complete folder onto target, never leaving target's path without a folder.

    With an existing target the two are swapped in one step and the old one is removed; where
    the file system cannot swap, the old one is renamed to ``.NAME.PID-TOKEN.old`` first, and a
    crash before the new one is in place is undone by recover_folder on the next load or save.
    """
    staged, target = Path(staged), Path(target)
    if not target.exists():
        os.rename(staged, target)
    elif _exchange(staged, target):
        _remove(staged)  # now holds the old folder; a crash here leaves a stale temp, cleaned later
    else:
        old = temp_path(target, "old")
        os.rename(target, old)
        try:
            os.rename(staged, target)
        except BaseException:
            os.rename(old, target)
            raise
        _remove(old)
    fsync_dir(target.parent)


def recover_folder(target: str | os.PathLike) -> bool:
    """Put back the newest replaced copy of a missing folder left by a crashed replace_folder."""
    target = Path(target)
    if target.exists() or target.is_symlink():
        return False
    for old in reversed(_stale_temps(target, kinds=("old",), legacy_min_age_s=0.0)):
        if old.is_dir() and not old.is_symlink():
            try:
                os.rename(old, target)
            except OSError:
                continue
            fsync_dir(target.parent)
            return True
    return False


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def finite_or_none(x) -> float | None:
    """A float for JSON: inf and nan become None (null), since JSON has neither."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def json_safe(x):
    """A JSON-safe copy: inf/nan -> None, numpy/torch values -> plain numbers and lists, Path -> str."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, (str, int)):
        return x
    if isinstance(x, float):
        return finite_or_none(x)
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if hasattr(x, "tolist"):
        return json_safe(x.tolist())
    if hasattr(x, "item"):
        return json_safe(x.item())
    return str(x)
