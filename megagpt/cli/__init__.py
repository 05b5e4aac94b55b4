"""The command-line programs: each module's main(argv) parses its arguments, prints a user error as one sentence and
returns (or exits with) status 2. launcher/pretrain.py and tools/*.py are thin scripts calling them, and
pyproject.toml's [project.scripts] installs them as megagpt-* commands."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from megagpt.errors import UserError


def reports_user_errors(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """main(argv) -> exit status, where a UserError (a config, data, checkpoint or argument the user can fix) is
    printed as `error: <sentence>` on stderr and the status is 2, the contract of every command."""

    @functools.wraps(main)
    def command(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return command
