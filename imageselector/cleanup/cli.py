"""`scripts/cleanup_images.py`: move embedded non-primary images to the backup disk (see stage.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from imageselector import db, layout
from imageselector.cleanup import stage
from imageselector.config import load_settings
from imageselector.logs import Progress
from imageselector.stage_entry import Context, Entry, StageJob, UsageError, run_stage
from imageselector.stopping import KILL, guarded_main

SCRIPT = "cleanup_images"
# .run/cleanup.lock: one mover per catalogue. A refused start (KILL present) exits 2: a script or a
# person must see it did nothing.
ENTRY = Entry(script=SCRIPT, stage="cleanup", kill_files=(KILL,), lock="cleanup", refused_exit=2)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="cleanup_images.py",
        description="Move non-primary images that all five models have embedded from images/ to the backup disk. "
        "Each file is copied, fsynced and verified (size + sha256) before the move is recorded and the original "
        "deleted. Stop with: touch KILL",
    )
    ap.add_argument(
        "--dry-run", action="store_true", help="print how many images (and bytes) would move; change nothing"
    )
    ap.add_argument("--watch", action="store_true", help="keep running, moving new images as they qualify")
    ap.add_argument("--dest", help=f"backup folder (default: CLEANUP_DEST or {layout.DEFAULT_DEST})")
    ap.add_argument("--batch", type=int, default=200, help="images per database transaction (default 200)")
    ap.add_argument("--limit", type=int, help="move at most this many images, then exit")
    ap.add_argument("--poll", type=float, default=60.0, help="seconds between scans in --watch mode (default 60)")
    ap.add_argument(
        "--min-free-mb",
        type=float,
        help=f"free space to leave on the destination (default: CLEANUP_MIN_FREE_MB or {stage.DEFAULT_MIN_FREE_MB:.0f})",
    )
    return ap


def dry_run(settings, conn, dest: Path, margin: int) -> int:  # type: ignore[no-untyped-def]
    count, nbytes = stage.plan(settings, conn)
    print(f"Would move {count:,} images ({stage.fmt_bytes(nbytes)}) from {settings.images_dir} to {dest}")
    try:
        stage.check_destination(dest)
        free = stage.check_space(dest, nbytes, margin)
        print(f"Destination OK: {stage.fmt_bytes(free)} free")
    except stage.DestinationError as exc:
        print(f"Destination NOT usable: {exc}")
    return 0


class CleanupJob(StageJob):
    """The mover under run_stage."""

    def __init__(self, ctx: Context, dest: Path, margin: int, args: argparse.Namespace) -> None:
        settings, log = ctx.settings, ctx.log
        stage.durable(ctx.conn)
        try:
            stage.check_destination(dest)
            count, estimate = stage.estimate_bytes(settings, ctx.conn)
            if args.limit is not None and count:
                estimate = estimate * min(count, args.limit) // count
            stage.check_space(dest, estimate, margin)
        except stage.DestinationError as exc:
            raise UsageError(f"refusing to move images: {exc}") from exc
        if stage.same_filesystem(dest, settings.images_dir if settings.images_dir.exists() else settings.home):
            log.warning("destination %s is on the same disk as images/: moving frees no space there", dest)
        target = count if args.limit is None else min(count, args.limit)
        of = f" of {count:,} qualifying" if target < count else ""
        log.info("moving up to %s%s images (about %s) to %s", f"{target:,}", of, stage.fmt_bytes(estimate), dest)
        self.dest, self.log = dest, log
        self.progress = Progress(log, "images", remaining=lambda: max(0, target - self.mover.moved))
        self.mover = stage.Mover(
            settings, ctx.conn, dest, margin, batch_size=args.batch, limit=args.limit, progress=self.progress
        )
        self.mover.prepare()

    def run_batch(self) -> int:
        return self.mover.run_batch()

    def run(self, ctx: Context, *, watch: bool, poll_s: float) -> None:
        try:
            super().run(ctx, watch=watch, poll_s=poll_s)
        except stage.DestinationError as exc:  # the disk went away or filled up: a configuration problem
            self.log.error("stopped: %s", exc)
            self.exit_code = 2

    def summary(self) -> Iterator[str]:
        self.progress.report(final=True)
        m = self.mover
        failed = f"; {m.failed} failed (originals kept, see bad_records)" if m.failed else ""
        yield f"moved {m.moved:,} images ({stage.fmt_bytes(m.moved_bytes)}) to {self.dest}{failed}"


def main(argv: list[str] | None = None) -> int:
    return guarded_main("cleanup_images.py", lambda: _main(argv))  # the home checks of --dry-run too


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch < 1 or (args.limit is not None and args.limit < 0):
        print("--batch must be >= 1 and --limit >= 0", file=sys.stderr)
        return 2
    settings = load_settings()
    dest = layout.dest_from_settings(settings, args.dest)
    min_free_mb = (
        args.min_free_mb
        if args.min_free_mb is not None
        else settings.get_float("CLEANUP_MIN_FREE_MB", stage.DEFAULT_MIN_FREE_MB)
    )
    margin = int(min_free_mb * 1e6)
    if args.dry_run:  # changes nothing: no log, lock or heartbeat
        conn = db.connect(settings.db_path)
        try:
            return dry_run(settings, conn, dest, margin)
        finally:
            conn.close()
    return run_stage(ENTRY, lambda ctx: CleanupJob(ctx, dest, margin, args), watch=args.watch, poll_s=args.poll)


if __name__ == "__main__":
    sys.exit(main())
