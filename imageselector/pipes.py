"""Entry points whose output is piped: `image_db.py | head` stops quietly when the reader has had enough.

Python ignores SIGPIPE, so a write to a pipe whose reader is gone raises BrokenPipeError: a traceback,
then a second one when the interpreter flushes stdout at exit. Here the error ends the command with
exit status 0 and no message (the reader chose to stop; under `set -o pipefail` that is not a failure),
and stdout is pointed at /dev/null so the final flush has nowhere to fail.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable


def _stdout_is_pipe() -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode) or stat.S_ISSOCK(
            os.fstat(sys.stdout.fileno()).st_mode
        )
    except (OSError, ValueError, AttributeError):
        return False


def quiet_broken_pipe(main: Callable[[], int | None]) -> int:
    """Run `main()`; a reader that closed our stdout early ends it with 0, silently. Returns the exit status."""
    leaving: SystemExit | None = None
    rc: int | None = 0
    try:
        try:
            rc = main()
        except SystemExit as exc:  # argparse's --help and errors: flush what they printed first
            leaving = exc
        sys.stdout.flush()
    except BrokenPipeError:
        if not _stdout_is_pipe():
            raise  # a socket or pipe of the program's own, not our stdout: a real error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    if leaving is not None:
        raise leaving
    return int(rc or 0)
