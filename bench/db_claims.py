#!/usr/bin/env python3
"""Benchmark the claim protocol at the guide's scale.

Builds a 1.2M-row database, runs 4 worker processes that claim and commit batches of 64 for the
download stage while `image_db.py` runs in a loop, then prints committed rows/s, the median
`image_db.py` time and the lock errors. Goal: >= 5,000 rows/s with 0 lock errors.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imageselector import db  # noqa: E402


def build(path: Path, rows: int) -> float:
    t0 = time.perf_counter()
    conn = db.connect(path)
    chunk = 100_000
    for start in range(0, rows, chunk):
        batch = [
            dict(listing_id=1_000_000 + i // 4, image_id=9_000_000_000 + i, shop_id=i % 5000, hex=f"{i % 0xFFFFFF:06x}",
                 suffix="ab12", is_primary=int(i % 4 == 0), when_made="2020_2026", price=10.0)
            for i in range(start, min(rows, start + chunk))
        ]  # fmt: skip
        db.upsert_images(conn, batch)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - t0


def worker(path: str, seconds: float, batch: int, out: mp.Queue) -> None:
    conn = db.connect(path, migrate=False)
    owner = db.make_owner("bench")
    done = lock_errors = 0
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            rows = db.claim_batch(conn, "download", owner, batch)
            if not rows:
                break
            done += len(db.complete(conn, "download", owner, [r["rid"] for r in rows]))
        except sqlite3.OperationalError as exc:  # retry_on_lock gave up: count it
            if "locked" in str(exc) or "busy" in str(exc):
                lock_errors += 1
            else:
                raise
    out.put((done, lock_errors))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_200_000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        path = home / "etsy_data.db"
        print(f"building {args.rows:,} rows ...", flush=True)
        print(f"built in {build(path, args.rows):.1f}s", flush=True)
        q: mp.Queue = mp.Queue()
        procs = [mp.Process(target=worker, args=(str(path), args.seconds, args.batch, q)) for _ in range(args.workers)]
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        status_times = []
        env = {"IMAGESELECTOR_HOME": str(home), "PATH": "/usr/bin:/bin"}
        while any(p.is_alive() for p in procs):
            s0 = time.perf_counter()
            r = subprocess.run([sys.executable, str(ROOT / "image_db.py")], env=env, capture_output=True, text=True)
            status_times.append(time.perf_counter() - s0)
            if r.returncode != 0:
                print("image_db.py failed:", r.stderr.strip().splitlines()[-1])
        results = [q.get() for _ in procs]
        for p in procs:
            p.join()
        elapsed = time.perf_counter() - t0
        committed = sum(r[0] for r in results)
        lock_errors = sum(r[1] for r in results)
        conn = db.connect(path, migrate=False)
        in_proc = []
        from imageselector.status import figures

        for _ in range(5):
            s0 = time.perf_counter()
            figures.collect(conn)
            in_proc.append(time.perf_counter() - s0)
        flags = conn.execute("SELECT n FROM counters WHERE name='download_done'").fetchone()[0]
        real = conn.execute("SELECT COUNT(*) FROM image_status WHERE download_done=1").fetchone()[0]
    print(f"workers: {args.workers}, batch: {args.batch}, rows: {args.rows:,}, elapsed {elapsed:.1f}s")
    print(f"committed rows: {committed:,} (counter {flags:,}, recount {real:,})")
    print(f"image_db.py runs: {len(status_times)}, median {statistics.median(status_times) * 1000:.0f} ms "
          f"(process start + query), max {max(status_times) * 1000:.0f} ms; query alone median "
          f"{statistics.median(in_proc) * 1000:.1f} ms")  # fmt: skip
    print(f"lock errors: {lock_errors}")
    print(f"committed rows/s: {committed / elapsed:,.0f} (goal >= 5,000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
