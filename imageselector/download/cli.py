"""`scripts/image_downloader.py`: download product photos from the Etsy CDN into images/ (stop: touch KILL_DL).

This file holds the stage's arguments and builders; `stage_entry.run_stage` does the rest.
Exit codes: 0 done or stopped gracefully, 1 fatal runtime error, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
from collections.abc import Iterator

from imageselector import db
from imageselector.cdn import SIZES
from imageselector.config import PROJECT_ROOT, HomeError, load_settings
from imageselector.download.engines import DONE, ENGINES, PARK, RELEASE, RETRY, EngineOptions, make_engine
from imageselector.download.stage import SCRIPT, STAGE, DownloadStage, images_gone, log, log_waiting, reconcile
from imageselector.fsutil import is_disk_full
from imageselector.imagecheck import DEFAULT_MAX_PIXELS
from imageselector.logs import Progress
from imageselector.stage_entry import Context, Entry, StageJob, UsageError, run_stage
from imageselector.stopping import EXIT_NO_SPACE, KILL, KILL_DL, Stopper

DEFAULT_ENGINE = "async"


def build_parser(settings_get=lambda name, default: default) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
    p = argparse.ArgumentParser(
        prog="image_downloader.py",
        description="Download product photos from the Etsy CDN into images/ (stop: touch KILL_DL).",
    )
    p.add_argument(
        "--watch", action="store_true", help="keep polling for new rows instead of exiting when none are left"
    )
    p.add_argument(
        "--size",
        default=settings_get("DOWNLOAD_SIZE", "570xN"),
        choices=SIZES,
        help="CDN size tag (default 570xN: about 70 KB, enough for 224-pixel models; fullxfull = original)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=int(settings_get("DOWNLOAD_CONCURRENCY", 64)),
        help="requests in flight per process (default 64)",
    )
    p.add_argument(
        "--per-host",
        type=int,
        default=int(settings_get("DOWNLOAD_PER_HOST", 64)),
        help="most requests in flight to one host per process (default 64)",
    )
    p.add_argument("--batch-size", type=int, default=200, help="rows claimed per database transaction (default 200)")
    p.add_argument(
        "--timeout",
        type=float,
        default=20.0,
        help="read timeout in seconds: the longest silence of a response (default 20)",
    )
    p.add_argument("--connect-timeout", type=float, default=5.0, help="connect timeout in seconds (default 5)")
    p.add_argument("--total-timeout", type=float, default=60.0, help="longest one request may take in all (default 60)")
    p.add_argument(
        "--tries",
        type=int,
        default=3,
        help="attempts per image within one claim before the database's backoff takes over (default 3)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="decompression-bomb guard: park images with more pixels",
    )
    p.add_argument(
        "--engine",
        choices=sorted(ENGINES),
        default=DEFAULT_ENGINE,
        help=f"concurrency design (default {DEFAULT_ENGINE}; see docs/download.md)",
    )
    p.add_argument(
        "--poll", type=float, default=10.0, help="with --watch: seconds between polls when idle (default 10)"
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="at start check every flagged image's file exists and decodes (full decode, slow: about a millisecond "
        "per image), and fetch again what fails (default: a random sample of 2,000 checked for existence)",
    )
    p.add_argument(
        "--refetch-missing",
        action="store_true",
        help="start even when images/ is missing or empty while rows say downloaded (downloads them all again)",
    )
    p.add_argument("--no-reconcile", action="store_true", help="skip the start-up check of flags against files")
    p.add_argument(
        "--processes",
        type=int,
        default=int(settings_get("DOWNLOAD_PROCESSES", 1)),
        help="downloader processes (default 1); more helps only when one process is CPU-bound",
    )
    p.add_argument("--helper", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress lines (default 10)")
    return p


def _start_helpers(args: argparse.Namespace, argv: list[str]) -> list[subprocess.Popen]:
    """`--processes N`: N-1 more copies of this worker; the claim protocol keeps their rows apart."""
    script = PROJECT_ROOT / "scripts" / "image_downloader.py"
    procs = []
    for i in range(1, args.processes):
        cmd = [sys.executable, str(script), *argv, "--processes", "1", "--no-reconcile", "--helper", str(i)]
        procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL))
    log.info("started %d more downloader processes: pids %s", len(procs), " ".join(str(p.pid) for p in procs))
    return procs


def _wait_helpers(procs: list[subprocess.Popen], stopper: Stopper) -> int:
    worst = 0
    for p in procs:
        if stopper.reason and stopper.reason.startswith("signal") and p.poll() is None:
            p.send_signal(signal.SIGTERM)  # a kill file reaches them directly; a signal has to be passed on
        rc = p.wait()
        if rc:
            log.warning("downloader process %d exited with code %d", p.pid, rc)
        worst = max(worst, rc)
    return worst


class DownloadJob(StageJob):
    """The stage under run_stage, plus the helper processes of `--processes` and the closing report."""

    def __init__(self, ctx: Context, args: argparse.Namespace, argv: list[str]) -> None:
        settings, conn = ctx.settings, ctx.conn
        self.args, self.conn, self.stopper = args, conn, ctx.stopper
        gone = None if args.refetch_missing or args.helper else images_gone(conn, settings.images_dir)
        if gone:
            raise UsageError(gone)
        if not args.no_reconcile:
            res = reconcile(
                conn,
                settings.images_dir,
                full=args.verify,
                decode=args.verify,
                tmp_dir=settings.tmp_dir,
                max_pixels=args.max_pixels,
            )
            how = "every row" if res.full else "a random sample"
            log.info(
                "flags vs files (%s): %d flagged images checked, %d missing and reset", how, res.checked, res.missing
            )
            if res.decoded:
                log.info("verify: %d files did not decode and will be fetched again", res.undecodable)
        opts = EngineOptions(
            concurrency=args.concurrency,
            per_host=args.per_host,
            connect_timeout=args.connect_timeout,
            read_timeout=args.timeout,
            total_timeout=args.total_timeout,
            tries=args.tries,
            max_pixels=args.max_pixels,
        )
        self.helpers = _start_helpers(args, argv) if args.processes > 1 else []
        self.engine = make_engine(args.engine, opts, settings.tmp_dir)
        self.progress = Progress(
            log, "images", interval=args.progress_interval, remaining=lambda: db.backlog(conn, STAGE)
        )
        self.stage = DownloadStage(
            conn,
            self.engine,
            images_dir=settings.images_dir,
            cdn_base=settings.cdn_base,
            size=args.size,
            batch_size=args.batch_size,
            stopper=ctx.stopper,
            progress=self.progress,
        )
        log.info(
            "downloading %s images from %s into %s: engine %s, %d in flight (%d per host), %d rows waiting",
            args.size,
            settings.cdn_base,
            settings.images_dir,
            self.engine.name,
            opts.concurrency,
            opts.per_host,
            db.backlog(conn, STAGE),
        )

    def run_batch(self) -> int:
        return self.stage.run_batch()

    def close(self) -> None:
        self.stage.shutdown()
        self.progress.report(final=True)
        rc = _wait_helpers(self.helpers, self.stopper)
        if rc:
            self.exit_code = rc if rc == EXIT_NO_SPACE else 1
        if self.engine.fatal:
            log.error("stopped: %s (the rows were handed back, nothing failed)", self.engine.fatal)
            self.exit_code = EXIT_NO_SPACE if is_disk_full(self.engine.fatal_exc) else 1

    def summary(self) -> Iterator[str]:
        c = self.stage.counts
        yield f"downloaded {c[DONE]}, parked {c[PARK]}, to retry later {c[RETRY]}, handed back {c[RELEASE]}"
        if not self.args.helper:
            log_waiting(self.conn)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings()
    except HomeError as exc:
        print(f"image_downloader.py: {exc}", file=sys.stderr)
        return 2
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(lambda n, d: settings.get(n) or d).parse_args(argv)
    except ValueError as exc:  # a DOWNLOAD_* setting that is not a number
        print(f"image_downloader: bad setting: {exc}", file=sys.stderr)
        return 2
    if min(args.concurrency, args.per_host, args.batch_size, args.tries, args.processes) < 1:
        print(
            "image_downloader: --concurrency, --per-host, --batch-size, --tries and --processes must be at least 1",
            file=sys.stderr,
        )
        return 2
    helper = bool(args.helper)
    entry = Entry(
        script=SCRIPT,
        stage=f"{STAGE}-{args.helper}" if helper else STAGE,
        kill_files=(KILL_DL, KILL),
        leases=() if helper else (STAGE,),  # the main process cleans up; its helpers start after that
        rotate_log=not helper,
        clean_tmp=not helper,
    )
    return run_stage(entry, lambda ctx: DownloadJob(ctx, args, argv), watch=args.watch, poll_s=args.poll)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
