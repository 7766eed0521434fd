#!/usr/bin/env python3
"""Does sync reach the configured QPS without the pacing causing 429s?

Starts the simulator (limit 10 QPS, no faults) and `sync_data.py` against it with
qps_config.json at the same 10 QPS, measures the simulator's accepted requests over `--seconds`, then
stops sync with KILL. Prints achieved QPS, the limit, the 429s the pacing caused (simulator stat
`429_qps`), and last the ratio achieved / limit (goal >= 0.95, with 0 pacing 429s).

    venv/bin/python bench/sync_pacing.py [--seconds 60] [--qps 10] [--listings 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imageselector import db  # noqa: E402
from imageselector.etsy.simulator import Simulator  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="measured window (default 60)")
    ap.add_argument("--qps", type=float, default=10.0, help="simulator limit and qps_config.json rate (default 10)")
    ap.add_argument("--listings", type=int, default=20000, help="simulated catalogue size (default 20000)")
    ap.add_argument("--concurrency", type=int, default=8, help="ETSY_CONCURRENCY for sync (default 8)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data home (database, sync_data.log)")
    args = ap.parse_args()

    home = Path(tempfile.mkdtemp(prefix="sync_pacing_"))
    # The simulator runs in this process, sync in its own: they share no interpreter lock.
    sim = Simulator(listings=args.listings, seed=1, qps=args.qps, qpd=10_000_000).start()
    sync = None
    try:
        api_base = sim.api_base
        (home / "qps_config.json").write_text(
            json.dumps(
                {"qps": args.qps, "min_qps": 1.0, "max_qps": args.qps, "updated_at": time.time(), "reason": "bench"}
            )  # fmt: skip
        )
        env = {
            **os.environ,
            "IMAGESELECTOR_HOME": str(home),
            "ETSY_API_BASE": api_base,
            "ETSY_API_KEY": "sim-keystring",
            "ETSY_SHARED_SECRET": "sim-secret",
            "ETSY_CONCURRENCY": str(args.concurrency),
            "ETSY_LOG_INTERVAL_S": "15",
        }
        sync = subprocess.Popen([sys.executable, str(ROOT / "sync_data.py")], cwd=ROOT, env=env)
        deadline = time.monotonic() + 60
        while sim.stats.snapshot().get("requests", 0) == 0:
            if time.monotonic() > deadline or sync.poll() is not None:
                print("sync never reached the simulator", file=sys.stderr)
                return 1
            time.sleep(0.05)
        time.sleep(2.0)  # past start-up (ping, first pages)
        s0, t0 = sim.stats.snapshot(), time.monotonic()
        time.sleep(args.seconds)
        s1, t1 = sim.stats.snapshot(), time.monotonic()
        (home / "KILL").touch()
        rc = sync.wait(timeout=60)
        accepted = (s1.get("requests", 0) - s1.get("429_injected", 0) - s1.get("429_qps", 0)) - (
            s0.get("requests", 0) - s0.get("429_injected", 0) - s0.get("429_qps", 0)
        )
        elapsed = t1 - t0
        achieved = accepted / elapsed
        print(f"window:                 {elapsed:.1f} s (after 2 s of start-up), catalogue {args.listings:,} listings")
        print(f"requests accepted:      {accepted:,}")
        print(f"429s caused by pacing:  {s1.get('429_qps', 0)} (whole run; goal 0)")
        print(f"sync exit code:         {rc} (after KILL)")
        conn = sqlite3.connect(home / "etsy_data.db")
        stats = json.loads(conn.execute("SELECT value FROM kv WHERE key=?", (db.KV_SYNC_STATS,)).fetchone()[0])
        conn.close()
        print(f"mean request latency:   {stats.get('latency_ms_avg')} ms (as sync saw it)")
        print(f"limit QPS:              {args.qps:.2f}")
        print(f"achieved QPS:           {achieved:.2f}")
        print(f"achieved / limit:       {achieved / args.qps:.3f} (goal >= 0.95)")
        return 0
    finally:
        if sync is not None and sync.poll() is None:
            sync.terminate()
            sync.wait(timeout=30)
        sim.stop()
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
