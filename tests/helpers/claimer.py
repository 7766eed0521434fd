"""A minimal stage worker for protocol tests: claims 'download' rows, writes an artifact per row
atomically, then commits. `--pause S` sleeps mid-batch so a test can kill -9 it there."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from imageselector import db  # noqa: E402
from imageselector.config import load_settings  # noqa: E402
from imageselector.fsutil import atomic_write_bytes  # noqa: E402
from imageselector.layout import image_path  # noqa: E402
from imageselector.stopping import KILL, KILL_DL, Stopper, refuse_if_killed  # noqa: E402
from imageselector.worker import ClaimedBatch, Heartbeat, run_loop  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--pause", type=float, default=0.0)
    ap.add_argument("--watch", action="store_true")
    args = ap.parse_args()
    s = load_settings()
    conn = db.connect(s.db_path)
    stopper = Stopper(s.home, (KILL, KILL_DL))
    if refuse_if_killed(stopper):
        return 0
    owner = db.make_owner("claimer")
    print("READY", flush=True)

    def batch() -> int:
        with ClaimedBatch.claim(conn, "download", owner, args.batch) as b:
            for i, r in enumerate(b.rows):
                atomic_write_bytes(image_path(s.images_dir, r["listing_id"], r["image_id"]), b"x" * 100, s.tmp_dir)
                if i == 0 and args.pause:
                    print("PAUSED", flush=True)
                    time.sleep(args.pause)
            b.complete([r["rid"] for r in b.rows])
            return len(b)

    run_loop(batch, stopper, watch=args.watch, heartbeat=Heartbeat(s.run_dir, "claimer"), poll_s=0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
