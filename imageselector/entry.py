"""What the thin scripts run: `sys.exit(run(main))`.

The one place where a home that cannot be used as it is (the original pipeline's database, or an
upgrade that has not finished) becomes one clear line on stderr and exit code 2, instead of a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from imageselector.config import HomeError

HOME_ERROR_EXIT = 2


def run(main: Callable[[], int | None]) -> int:
    try:
        return int(main() or 0)
    except HomeError as exc:  # LegacyHomeError and the rest of the family (config.HomeError)
        print(f"error: {exc}", file=sys.stderr)
        return HOME_ERROR_EXIT
