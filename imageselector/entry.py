"""What the thin scripts run: `sys.exit(run(main))`.

The one place where a home that cannot be used as it is (the original pipeline's database, or an
upgrade that has not finished) becomes one clear line on stderr and exit code 2, instead of a traceback;
and where a reader that closed stdout early (`image_db.py | head`) ends the command quietly with 0
(`pipes.quiet_broken_pipe`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from imageselector.config import HomeError
from imageselector.pipes import quiet_broken_pipe

HOME_ERROR_EXIT = 2


def run(main: Callable[[], int | None]) -> int:
    try:
        return quiet_broken_pipe(main)
    except HomeError as exc:  # LegacyHomeError and the rest of the family (config.HomeError)
        print(f"error: {exc}", file=sys.stderr)
        return HOME_ERROR_EXIT
