"""A stand-in worker for supervisor tests: behaves well, crashes, hangs, or ignores kill files and SIGTERM.

    python tests/helpers/fake_worker.py --name dl --mode good --kill-file KILL_DL

Every start appends "<pid> <time>" to `<home>/<name>.starts` so tests can count (re)starts and their spacing.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from imageselector.config import load_settings  # noqa: E402
from imageselector.stopping import KILL, Stopper  # noqa: E402
from imageselector.worker import Heartbeat  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--mode", choices=["good", "crash", "hang", "ignore", "crash-first"], default="good")
    ap.add_argument("--kill-file", default=None)
    ap.add_argument("--crash-after", type=float, default=0.2)
    ap.add_argument("--crash-code", type=int, default=3, help="crash: the exit code (75: no space left)")
    ap.add_argument("--crash-times", type=int, default=2, help="crash-first: crash this many starts, then behave")
    ap.add_argument("--beat-every", type=float, default=0.1)
    ap.add_argument("--claim", metavar="STAGE", help="lease 5 rows of this stage at start (and never release them)")
    args = ap.parse_args()
    settings = load_settings()
    # Signal handling first, as a real worker would have it before it reports itself started.
    stopper = Stopper(settings.home, [k for k in (args.kill_file, KILL) if k])
    if args.mode == "ignore":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    elif args.mode == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a deadlocked worker dies on SIGTERM, nothing more
    if args.claim:
        from imageselector import db

        conn = db.connect(settings.db_path)
        db.claim_batch(conn, args.claim, db.make_owner("fake"), 5)
        conn.close()
    starts = settings.home / f"{args.name}.starts"
    with open(starts, "a") as f:
        f.write(f"{os.getpid()} {time.time()}\n")
    n_starts = len(starts.read_text().splitlines())
    hb = Heartbeat(settings.run_dir, args.name)
    hb.beat()
    print(f"fake worker {args.name} mode {args.mode} pid {os.getpid()}", flush=True)
    mode = args.mode
    if mode == "crash-first":
        mode = "crash" if n_starts <= args.crash_times else "good"
    if mode == "crash":
        time.sleep(args.crash_after)
        print("simulated crash", file=sys.stderr, flush=True)
        return args.crash_code
    if mode == "hang":
        while True:  # no more heartbeats, no kill-file checks: a deadlock
            time.sleep(3600)
    if mode == "ignore":
        while True:
            hb.beat()
            time.sleep(args.beat_every)
    while not stopper.wait(args.beat_every):
        hb.beat()
    print(f"stopping: {stopper.reason}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
