"""Entry point of the `ptq-studio` console script: no argument opens the GUI, anything else runs core.cli.main.

It lives above both `app` and `core` so that `core` never imports `app` (import-linter checks this,
see pyproject.toml). Each side is imported only when chosen, so `ptq-studio --help` loads neither
Qt nor torch.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Open the main window when called with no argument; otherwise run the headless command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        from app.main import main as gui_main  # noqa: PLC0415 -- Qt loads only when the window opens

        return int(gui_main() or 0)
    from core.cli.main import main as cli_main  # noqa: PLC0415 -- the GUI path never loads the CLI

    return cli_main(argv)
