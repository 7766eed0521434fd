"""The one stage entry: everything a stage process does around its work, written once.

    settings -> logging -> Stopper (a kill file present: do not start) -> single-instance lock
    -> temp files of dead writers removed -> database -> leases of dead workers reclaimed
    -> build the stage (the stage's cli.py: its arguments and builders) -> run loop with heartbeat
    -> close -> the final line

Each stage's `cli.py` parses its arguments and hands `run_stage` an `Entry` (names, kill files, leases)
and a builder `build(ctx) -> StageJob`. Exit codes, the same for every stage: 0 done or stopped
gracefully (also: a kill file present at start), 1 a fatal runtime error (`FatalStageError`), 2 a bad
home, usage or configuration (`HomeError`, `UsageError`), said in one line; a full disk ends the process
with one line and `stopping.EXIT_NO_SPACE` (via `stopping.guarded_main`), its rows handed back.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from imageselector import db
from imageselector.config import HomeError, Settings, load_settings
from imageselector.fsutil import clean_tmp, instance_lock, lock_holder
from imageselector.logs import setup_logging
from imageselector.stopping import Stopper, guarded_main, refuse_if_killed
from imageselector.worker import Heartbeat, run_loop


class UsageError(Exception):
    """Arguments or settings that cannot work (an unknown model, a bad file): one line, exit 2."""


class FatalStageError(RuntimeError):
    """The stage cannot go on (every item fails the same way, the cluster is gone): one line, exit 1."""


@dataclass(frozen=True)
class Entry:
    """What differs between stage processes, as data."""

    script: str  # log file `<home>/<script>.log`, and the program name in messages
    stage: str  # heartbeat `.run/<stage>.heartbeat` and the tag on log lines
    kill_files: tuple[str, ...]  # any of them stops the stage (and, present at start, keeps it from starting)
    leases: tuple[str, ...] = ()  # status-database stages whose leases held by dead processes are freed at start
    lock: str | None = None  # an instance lock `.run/<lock>.lock`: a second process exits 2
    rotate_log: bool = True  # False for helper processes that append to a log another process rotates
    clean_tmp: bool = True  # remove temp files left in `.tmp/` by writers that are gone
    secrets: tuple[str, ...] = ()  # values masked in logs besides the API key and secret
    refused_exit: int = 0  # exit code when a kill file present at start keeps the stage from starting
    preflight: Callable[[Settings], None] | None = None  # raises HomeError before anything is written (no log)


@dataclass
class Context:
    """What a builder gets: the process's settings, logger, stopper, database connection and heartbeat."""

    entry: Entry
    settings: Settings
    log: logging.Logger
    stopper: Stopper
    conn: sqlite3.Connection
    heartbeat: Heartbeat
    on_close: list[Callable[[], None]] = field(default_factory=list)


class StageJob:
    """What a builder returns. The default `run` is `worker.run_loop` over `run_batch`."""

    exit_code = 0  # set by the job for a non-fatal failure worth a non-zero exit (e.g. a helper exited 1)

    def run_batch(self) -> int:
        raise NotImplementedError

    def run(self, ctx: Context, *, watch: bool, poll_s: float) -> None:
        run_loop(self.run_batch, ctx.stopper, watch=watch, heartbeat=ctx.heartbeat, poll_s=poll_s, logger=ctx.log)

    def close(self) -> None:
        """Finish or release whatever is in flight (called on every exit, errors included)."""

    def summary(self) -> Iterable[str]:
        """The final line(s): what this run did."""
        return ()


Builder = Callable[[Context], StageJob | int]


def run_stage(entry: Entry, build: Builder, *, watch: bool = False, poll_s: float = 10.0) -> int:
    """Run one stage process from start to its final line; returns the exit code. `build` may return an
    exit code instead of a job when it has nothing to run (e.g. the compute ran on a cluster and is done).
    A home that cannot be used: one line, exit 2; a full disk: one line, `stopping.EXIT_NO_SPACE`."""
    return guarded_main(f"{entry.script}.py", lambda: _stage(entry, build, watch=watch, poll_s=poll_s))


def _stage(entry: Entry, build: Builder, *, watch: bool, poll_s: float) -> int:
    settings = load_settings()
    db.check_usable(settings, write=True)  # a stage writes: a read-only home or unreadable database is said now
    if entry.preflight is not None:
        entry.preflight(settings)
    log = setup_logging(
        entry.script,
        settings.home,
        stage=entry.stage,
        secrets=[*settings.secrets(), *entry.secrets],
        rotate=entry.rotate_log,
    )
    stopper = Stopper(settings.home, entry.kill_files)
    if refuse_if_killed(stopper):
        return entry.refused_exit
    with contextlib.ExitStack() as stack:
        if entry.lock is not None and not stack.enter_context(instance_lock(settings.run_dir, entry.lock)):
            log.error(
                "another %s.py is already running on %s (pid %s, see .run/%s.lock); not starting",
                entry.script,
                settings.home,
                lock_holder(settings.run_dir, entry.lock),
                entry.lock,
            )
            return 2
        try:
            return _run(entry, build, settings, log, stopper, stack, watch=watch, poll_s=poll_s)
        except HomeError as exc:
            log.error("%s", exc)
            return 2
    return 0  # pragma: no cover - the block always returns


def _run(
    entry: Entry,
    build: Builder,
    settings: Settings,
    log: logging.Logger,
    stopper: Stopper,
    stack: contextlib.ExitStack,
    *,
    watch: bool,
    poll_s: float,
) -> int:
    if entry.clean_tmp:
        removed = clean_tmp(settings.tmp_dir)
        if removed:
            log.info("removed %d temp file(s) left by an interrupted run in %s", removed, settings.tmp_dir)
    conn = db.connect(settings.db_path)
    stack.callback(conn.close)
    for name in entry.leases:
        freed = db.reclaim_dead(conn, name)
        if freed:
            log.info("released %d row(s) of %s leased by dead %s processes", freed, name, entry.script)
    ctx = Context(entry, settings, log, stopper, conn, Heartbeat(settings.run_dir, entry.stage))
    stack.callback(lambda: [f() for f in reversed(ctx.on_close)])
    try:
        job = build(ctx)
    except UsageError as exc:
        log.error("%s", exc)
        return 2
    if isinstance(job, int):
        return job
    code = 0
    try:
        job.run(ctx, watch=watch, poll_s=poll_s)
    except FatalStageError as exc:
        log.error("giving up: %s", exc)
        code = 1
    finally:
        job.close()
        for line in job.summary():
            log.info("%s", line)
    return code or job.exit_code
