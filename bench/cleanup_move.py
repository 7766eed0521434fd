"""What the safety of scripts/cleanup_images.py costs: a verified, durable move vs a plain `shutil.move`.

Same files, same destination (a tmpfs under /dev/shm when there is one, i.e. another filesystem, as the
backup disk is), one run. Prints images/s and MB/s of each, then the ratio plain / verified last.
Usage: venv/bin/python bench/cleanup_move.py [--n 1000] [--size 100000]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imageselector import db  # noqa: E402
from imageselector.cleanup import stage  # noqa: E402
from imageselector.config import load_settings  # noqa: E402
from imageselector.layout import image_path, image_relpath  # noqa: E402
from tests.helpers.cleanup_setup import make_catalogue  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--dest-parent", help="where to put the destination (default /dev/shm: a tmpfs, fsync is free)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench_cleanup_"))
    shm = Path(args.dest_parent) if args.dest_parent else Path("/dev/shm") if Path("/dev/shm").is_dir() else base
    out_root = Path(tempfile.mkdtemp(prefix="bench_cleanup_dest_", dir=shm))
    try:
        settings = load_settings(base / "home")
        conn = stage.durable(db.connect(settings.db_path))
        make_catalogue(conn, settings.images_dir, n=args.n, size=args.size)
        movable = conn.execute(f"SELECT listing_id, image_id FROM image_status WHERE {stage.ELIGIBLE_SQL}").fetchall()
        nbytes = sum(image_path(settings.images_dir, *r).stat().st_size for r in movable)
        # plain: shutil.move to another filesystem (copy + unlink, no fsync, no verification, no record)
        keep = base / "keep"
        shutil.copytree(settings.images_dir, keep)
        plain_dest = out_root / "plain"
        t0 = time.perf_counter()
        for r in movable:
            d = plain_dest / image_relpath(*r)
            d.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(image_path(settings.images_dir, *r), d)
        plain_s = time.perf_counter() - t0
        shutil.rmtree(settings.images_dir)
        shutil.copytree(keep, settings.images_dir)
        # verified: the real mover (temp + fsync + rename + dir fsync, sha256 re-read, recorded, then delete)
        safe_dest = out_root / "safe"
        safe_dest.mkdir()
        mover = stage.Mover(settings, conn, safe_dest, 0, batch_size=200)
        mover.prepare()
        t0 = time.perf_counter()
        while mover.run_batch():
            pass
        safe_s = time.perf_counter() - t0
        assert mover.moved == len(movable), (mover.moved, len(movable))
        conn.close()
        mb = nbytes / 1e6
        print(
            f"images: {len(movable)} x ~{args.size / 1000:.0f} KB to {out_root} (other filesystem: "
            f"{stage.same_filesystem(out_root, base) is False})"
        )
        print(f"plain shutil.move : {len(movable) / plain_s:8.1f} img/s {mb / plain_s:8.1f} MB/s")
        print(f"verified move     : {len(movable) / safe_s:8.1f} img/s {mb / safe_s:8.1f} MB/s")
        print(f"ratio plain/verified time: {safe_s / plain_s:.2f}x")
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(out_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
