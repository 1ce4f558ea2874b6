"""`ptq-studio` command line: the parser, the dispatch and the error handling. The commands live in
core.cli.commands (quantize, report, export, sensitivity), core.cli.diag (images, locate,
recalibrate, ab) and core.cli.fix (fix); what they share is in core.cli.common. The console script's launcher
(ptq_studio.launcher) opens the GUI when given no argument; here no argument is a usage error.

Exit codes: 0 success; 2 user error (bad arguments, no usable image, unreadable session,
unwritable output), one line on stderr; 1 internal failure (short message; --debug shows the
traceback). With --json exactly one JSON document goes to stdout. What libraries print while
a command runs is held aside and shown on stderr after a success (or with --debug), so an
error stays one line. Progress is drawn on stderr only when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from importlib import metadata

from core.cli import commands, diag, fix
from core.cli.common import Channels, Progress
from core.errors import PTQStudioError, one_line
from core.io import json_safe

PROG = "ptq-studio"
COMMANDS = {**diag.COMMANDS, **commands.COMMANDS, **fix.COMMANDS}


class UsageError(Exception):
    """Bad command-line arguments (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the whole usage)
        raise UsageError(f"{PROG}: error: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = _Parser(prog=PROG, description="Post-training quantization of the Gemma 4 vision encoder.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    commands.add_parsers(sub)
    diag.add_parsers(sub)
    fix.add_parsers(sub)
    return p


def _version() -> str:
    try:
        return metadata.version("ptq-studio")
    except metadata.PackageNotFoundError:
        return "unknown"


def _error_document(command: str | None, kind: str, message: str, exit_code: int) -> str:
    # With --json a script reads stdout only: it gets one document there, also on failure.
    doc = {"command": command, "error": {"type": kind, "message": message, "exit_code": exit_code}}
    return json.dumps(doc, indent=2) + "\n"


def _fail(as_json: bool, command: str | None, kind: str, line: str, message: str, code: int) -> int:
    print(line, file=sys.stderr)
    if as_json:
        sys.stdout.write(_error_document(command, kind, message, code))
        sys.stdout.flush()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """The headless command line (ptq_studio.launcher calls it for any argument list)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    wants_json = "--json" in argv
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        command = next((a for a in argv if not a.startswith("-")), None)
        return _fail(wants_json, command, "UsageError", str(e), str(e).removeprefix(f"{PROG}: error: "), 2)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    if args.version:
        print(f"{PROG} {_version()}")
        return 0
    if not args.command:
        message = (
            "choose a command: quantize, report, export, sensitivity, images, locate, recalibrate, ab, fix "
            f"(see {PROG} --help)"
        )
        return _fail(wants_json, None, "UsageError", f"{PROG}: {message}", message, 2)
    channels = Channels()
    progress = None
    try:
        import torch  # noqa: PLC0415 -- torch costs seconds; usage errors and --help answer without it

        with channels, torch.no_grad():
            progress = Progress(channels.err)
            doc, text = COMMANDS[args.command](args, progress)
            progress.close()
        sys.stderr.write(channels.held())
        if args.json:
            sys.stdout.write(json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n")
        else:
            sys.stdout.write(text + "\n")
        sys.stdout.flush()
        return 0
    except KeyboardInterrupt:
        return _fail(args.json, args.command, "KeyboardInterrupt", f"{PROG}: interrupted", "interrupted", 130)
    except Exception as e:
        if progress is not None and progress.shown:
            sys.stderr.write("\n")
        held = channels.held()
        if debug:
            sys.stderr.write(held)
            traceback.print_exc()
        msg = one_line(e)
        if isinstance(e, PTQStudioError):
            return _fail(args.json, args.command, type(e).__name__, f"{PROG}: error: {msg}", msg, 2)
        line = f"{PROG}: internal error: {type(e).__name__}: {msg[:300]} (rerun with --debug for the traceback)"
        return _fail(args.json, args.command, type(e).__name__, line, msg[:300], 1)


if __name__ == "__main__":
    sys.exit(main())
