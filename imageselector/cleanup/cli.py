"""`scripts/cleanup_images.py`: move embedded non-primary images to the backup disk (see stage.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from imageselector import db, layout
from imageselector.cleanup import stage
from imageselector.config import load_settings
from imageselector.fsutil import instance_lock, lock_holder
from imageselector.logs import Progress, setup_logging
from imageselector.stopping import KILL, Stopper, guarded_main, refuse_if_killed
from imageselector.worker import Heartbeat, run_loop

SCRIPT = "cleanup_images"
LOCK_NAME = "cleanup"  # .run/stage.lock


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


def main(argv: list[str] | None = None) -> int:
    return guarded_main("cleanup_images.py", lambda: _main(argv))


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch < 1 or (args.limit is not None and args.limit < 0):
        print("--batch must be >= 1 and --limit >= 0", file=sys.stderr)
        return 2
    settings = load_settings()
    log = setup_logging(SCRIPT, settings.home, secrets=settings.secrets())
    dest = layout.dest_from_settings(settings, args.dest)
    min_free_mb = (
        args.min_free_mb
        if args.min_free_mb is not None
        else settings.get_float("CLEANUP_MIN_FREE_MB", stage.DEFAULT_MIN_FREE_MB)
    )
    margin = int(min_free_mb * 1e6)
    conn = stage.durable(db.connect(settings.db_path))
    try:
        if args.dry_run:
            return dry_run(settings, conn, dest, margin)
        stopper = Stopper(settings.home, (KILL,))
        if refuse_if_killed(stopper):
            return 2  # a refused start is not a success: a script or a person must see it did nothing
        # two movers on one catalogue would race on the same files
        with instance_lock(settings.run_dir, LOCK_NAME) as mine:
            if not mine:
                log.error(
                    "another cleanup_images.py is already running (pid %s, see .run/%s.lock)",
                    lock_holder(settings.run_dir, LOCK_NAME),
                    LOCK_NAME,
                )
                return 2
            return _move(settings, conn, dest, margin, args, stopper, log)
    finally:
        conn.close()


def _move(settings, conn, dest: Path, margin: int, args, stopper: Stopper, log) -> int:  # type: ignore[no-untyped-def]
    try:
        stage.check_destination(dest)
        count, estimate = stage.estimate_bytes(settings, conn)
        if args.limit is not None and count:
            estimate = estimate * min(count, args.limit) // count
        stage.check_space(dest, estimate, margin)
    except stage.DestinationError as exc:
        log.error("refusing to move images: %s", exc)
        return 2
    if stage.same_filesystem(dest, settings.images_dir if settings.images_dir.exists() else settings.home):
        log.warning("destination %s is on the same disk as images/: moving frees no space there", dest)
    target = count if args.limit is None else min(count, args.limit)
    of = f" of {count:,} qualifying" if target < count else ""
    log.info("moving up to %s%s images (about %s) to %s", f"{target:,}", of, stage.fmt_bytes(estimate), dest)
    progress = Progress(log, "images", remaining=lambda: max(0, target - mover.moved))
    mover = stage.Mover(settings, conn, dest, margin, batch_size=args.batch, limit=args.limit, progress=progress)
    try:
        mover.prepare()
        run_loop(
            mover.run_batch,
            stopper,
            watch=args.watch,
            heartbeat=Heartbeat(settings.run_dir, "cleanup"),
            poll_s=args.poll,
            logger=log,
        )
    except stage.DestinationError as exc:
        log.error("stopped: %s", exc)
        return 2
    finally:
        progress.report(final=True)
    log.info(
        "moved %s images (%s) to %s%s",
        f"{mover.moved:,}",
        stage.fmt_bytes(mover.moved_bytes),
        dest,
        f"; {mover.failed} failed (originals kept, see bad_records)" if mover.failed else "",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
