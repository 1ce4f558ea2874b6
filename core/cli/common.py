"""What every `ptq-studio` command shares: argument types, output checks, loading a session, the
images text, the table format, and the progress line and held-aside library output.

Nothing here imports torch, numpy or PIL at module level: core.cli.main imports this module to
answer `--help` and usage errors, which must stay fast.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from core.config import check_globs
from core.data.eval_set import DEFAULT_EVAL_COUNT
from core.errors import ConfigError, NoImagesError, UnwritablePathError


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """--json, --debug and --device, which every command takes."""
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="torch device (default cpu)")


def add_evaluation_flags(parser: argparse.ArgumentParser) -> None:
    """--images (any photos) or --eval-images (some of the session's), for the commands that evaluate."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--images", nargs="+", metavar="PATH",
        help="evaluate on these image files or folders instead (they need not be in the session)",
    )
    group.add_argument(
        "--eval-images", nargs="+", metavar="GLOB",
        help="evaluate on these of the session's photos: paths, image ids or globs over them "
        f"(default: the session's evaluation set, its first {DEFAULT_EVAL_COUNT} usable photos unless one was chosen)",
    )


def count(minimum: int):
    """An argparse type: an integer of at least `minimum` (a negative --top would slice from the end)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value

    parse.__name__ = "count"  # argparse names the type in its message
    return parse


# ---------------------------------------------------------------------------------------------
# progress and held-aside output
# ---------------------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, stream):
        self.stream = stream
        self.enabled = bool(getattr(stream, "isatty", lambda: False)())
        self._last = 0.0
        self.shown = False  # a line is on screen (main ends it before an error line)

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        width = 28
        frac = done / total if total else 0.0
        bar = "#" * int(width * frac) + "-" * (width - int(width * frac))
        self.stream.write(f"\r[{bar}] {done}/{total} {message[:60]:<60}")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        """End the progress line."""
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False


class Channels:
    """While a command runs, what libraries write to fd 1 and fd 2 is held aside.

    C libraries (libtiff, for one) print their own warnings straight to fd 2; a user error must
    still come out as one line. The held text is shown after a successful run, or with --debug.
    """

    def __init__(self):
        self.noise = tempfile.TemporaryFile()
        self.err = sys.stderr
        self._saved: list[tuple[int, int]] = []

    def __enter__(self) -> "Channels":
        sys.stdout.flush()
        sys.stderr.flush()
        fds = (1, 2)  # our own output is written after the command, to the real streams
        try:
            for fd in fds:
                self._saved.append((fd, os.dup(fd)))
                os.dup2(self.noise.fileno(), fd)
        except OSError:  # no real file descriptors (embedded interpreter): leave the streams alone
            self._restore()
            return self
        saved_err = dict(self._saved).get(2)
        self.err = os.fdopen(os.dup(saved_err), "w", encoding="utf-8", errors="replace") if saved_err else sys.stderr
        # Python-level streams too: they may not be fd 1/2 (pytest's capture, IDE consoles).
        self._streams = (sys.stdout, sys.stderr)
        self._held_stream = os.fdopen(os.dup(self.noise.fileno()), "w", encoding="utf-8", errors="replace")
        sys.stderr = sys.stdout = self._held_stream
        return self

    def _restore(self) -> None:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        if getattr(self, "_streams", None):
            sys.stdout, sys.stderr = self._streams
            self._streams = None
            self._held_stream.close()
        for fd, saved in reversed(self._saved):
            os.dup2(saved, fd)
            os.close(saved)
        self._saved.clear()

    def __exit__(self, *exc) -> None:
        self._restore()
        if self.err is not sys.stderr:
            self.err.flush()
            self.err.close()
            self.err = sys.stderr

    def held(self) -> str:
        """What the libraries wrote meanwhile ("" once read)."""
        if self.noise.closed:
            return ""
        self.noise.seek(0)
        text = self.noise.read().decode("utf-8", errors="replace")
        self.noise.close()
        return text


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------


def fmt(x, digits: int = 4) -> str:
    """A table cell: '-' for None, 4 significant digits, scientific outside [1e-3, 1e5)."""
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        if math.isnan(x):
            return "nan"
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}g}"
    return str(x)


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain-text table: first column left-aligned, the rest right-aligned, a rule under the header."""
    cells = [header] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def images_dict(accepted, rejected) -> dict[str, Any]:
    """The accepted and rejected images of a command, as its JSON document lists them."""
    return {
        "accepted": [{"path": e.path, "image_id": e.image_id, "sha256": e.sha256} for e in accepted],
        "rejected": [{"path": e.path, "reason": e.reason} for e in rejected],
    }


def rejected_text(rejected) -> str:
    """One 'rejected: PATH: REASON' line per rejected image."""
    return "\n".join(f"rejected: {e.path}: {e.reason}" for e in rejected)


def no_images_error(rejected) -> NoImagesError:
    """The error of a command left with no image: names the first rejected one and why."""
    if rejected:
        first = rejected[0]
        more = f"; {len(rejected) - 1} more rejected" if len(rejected) > 1 else ""
        return NoImagesError(None, f"{first.path}: {first.reason}{more}")
    return NoImagesError(None, "no image paths were given")


# ---------------------------------------------------------------------------------------------
# inputs and outputs, checked before any work starts
# ---------------------------------------------------------------------------------------------


def check_output(path: str | Path, flag: str, kind: str = "file") -> Path:
    """Refuse an output that cannot be written, before any work starts; nothing is created yet.

    kind "file": a file whose folder may be missing (it is created when written, see
    ensure_parent); "folder": a folder written into; "session": a folder that replaces itself
    atomically, so its parent must be writable. Missing folders count as writable when the
    nearest existing one is.
    """
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise UnwritablePathError(path, f"it is a folder; {flag} names a file")
    if kind != "file" and path.exists() and not path.is_dir():
        raise UnwritablePathError(path, f"a file is in the way; {flag} names a folder")
    folder = path.absolute() if kind == "folder" else path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UnwritablePathError(path, f"{folder} is a file, not a writable folder")
    try:
        # A real write, not os.access: root passes every access check, even on a read-only mount.
        with tempfile.TemporaryFile(dir=folder, prefix=".ptq-write-check-"):
            pass
    except OSError as e:
        raise UnwritablePathError(path, f"{folder} is not writable: {e.strerror or e}") from None
    if kind == "file" and path.exists() and not os.access(path, os.W_OK):
        raise UnwritablePathError(path, "the existing file is read-only")
    return path


def check_new_session_folder(path: Path) -> None:
    """Refuse to replace a non-empty folder that is not a PTQ Studio session (--out of quantize, recalibrate)."""
    from core.session import MANIFEST  # noqa: PLC0415 -- core.session loads torch (seconds); --help stays fast

    if path.is_dir() and any(path.iterdir()) and not (path / MANIFEST).is_file():
        raise UnwritablePathError(path, "the folder exists and is not a PTQ Studio session; pick a new --out")


def ensure_parent(path: str | Path) -> Path:
    """Create the missing folders above an output file (every command does, as quantize always has)."""
    path = Path(path)
    try:
        path.absolute().parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UnwritablePathError(path, e.strerror or str(e)) from None
    return path


def check_soft_tokens(n: int | None, flag: str = "--max-soft-tokens") -> None:
    """ConfigError unless `n` is None or a soft-token count the image processor supports."""
    from core.data.images import SUPPORTED_SOFT_TOKENS  # noqa: PLC0415 -- loads torch and transformers (seconds)

    if n is not None and n not in SUPPORTED_SOFT_TOKENS:
        raise ConfigError(f"{flag} {n} is not supported; use one of {', '.join(map(str, SUPPORTED_SOFT_TOKENS))}")


def load_session(path, device: str):
    """Session.load of a command's SESSION argument."""
    from core.session import Session  # noqa: PLC0415 -- core.session loads torch (seconds); --help stays fast

    return Session.load(path, device=device)


def expand_images(session, items, flag: str) -> list[str]:
    """Image ids named by paths, ids or globs over them; a name or glob that matches none is a ConfigError."""
    entries = [e for e in session.images if e.status != "rejected"]

    def keys(e) -> tuple[str, ...]:
        return (e.image_id, e.path, Path(e.path).name)

    ids: list[str] = []
    for item in items:
        resolved = str(Path(item).resolve())
        hits = [e for e in entries if item in keys(e) or str(Path(e.path).resolve()) == resolved]
        if not hits:
            hits = [e for e in entries if any(fnmatchcase(k, item) for k in keys(e))]
        if not hits:
            check_globs([item], [k for e in entries for k in keys(e)], "image", flag)
        ids += [e.image_id for e in hits if e.image_id not in ids]
    return ids


def evaluation_images(session, args) -> tuple[list[str] | None, list, list]:
    """(images for the Session call or None, rejected, the entries evaluated) from --images / --eval-images."""
    if args.images:
        probe = session.probe_images(args.images)
        if not probe.accepted:
            raise no_images_error(probe.rejected)
        return [e.path for e in probe.accepted], probe.rejected, probe.accepted
    if args.eval_images:
        session.set_evaluation_images(expand_images(session, args.eval_images, "--eval-images"))
    entries = session.evaluation_images
    if not entries:
        raise NoImagesError(args.session, "no calibration image is still on disk unchanged; pass --images")
    return None, [], entries


def evaluation_list(entries) -> list[dict[str, str]]:
    """The photos the numbers are from, as the JSON documents list them."""
    return [{"image_id": e.image_id or Path(e.path).name, "path": e.path} for e in entries]


def evaluation_text(entries) -> str:
    """'on 2 photos: a.jpg, b.jpg': the photos the numbers are from."""
    n = len(entries)
    return f"on {n} photo{'s' if n != 1 else ''}: " + ", ".join(Path(e.path).name for e in entries)


def module_names(session) -> list[str]:
    """The module names a glob of this session's model can match."""
    from core.analysis.abtest import owner_modules  # noqa: PLC0415 -- loads torch (seconds); --help stays fast

    return owner_modules(session.qmodel)
