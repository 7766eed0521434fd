#!/usr/bin/env python3
"""Chaos benchmark: the whole pipeline on the simulator, with and without faults + 20 x kill -9.

    venv/bin/python bench/chaos.py [--listings 150] [--kills 20] [--kill-every 3] [--no-baseline] [--keep DIR]

Prints the chaos tally (kills, restarts, rows done, parked, inconsistencies: goal 0), then the throughput
of a calm run and of the chaos run side by side, the ratio last. Exit code 1 when any inconsistency is found.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imageselector.proving import chaos  # noqa: E402


def _stamp(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listings", type=int, default=150)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--kill-every", type=float, default=3.0, help="mean seconds between kills")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-baseline", action="store_true", help="skip the calm run")
    ap.add_argument("--keep", type=Path, help="run in this folder (kept) instead of a temp folder")
    args = ap.parse_args()
    base = args.keep or Path(tempfile.mkdtemp(prefix="chaos-"))
    runs: dict[str, chaos.ChaosResult] = {}
    plans = [("chaos", dict(kills=args.kills))]
    if not args.no_baseline:
        plans.insert(0, ("calm", dict(kills=0, faults="")))
    for name, kw in plans:
        _stamp(f"--- {name} run: {args.listings} listings, {kw.get('kills')} kills")
        opts = chaos.ChaosOptions(
            home=base / name,
            listings=args.listings,
            kill_every_s=args.kill_every,
            seed=args.seed,
            settle_timeout_s=900,
            **kw,
        )
        runs[name] = chaos.run(opts, log=_stamp)
        print(runs[name].tally(), flush=True)
    print()
    rates = {}
    for name, r in runs.items():
        finished = min((v for k, v in r.done.items() if k.startswith("embed_")), default=0)
        rates[name] = finished / max(r.settle_s, 1e-9) * 60.0
        print(
            f"{name:>6}: {finished} images through all stages in {r.settle_s:.0f} s = {rates[name]:.1f} images/min "
            f"(kills {r.kills}, restarts {r.restarts}, parked {sum(r.parked.values())}, "
            f"orphan vectors {r.orphan_vectors}, "
            f"inconsistencies {len(r.problems)})"
        )
    print(f"folder: {base}")
    if "calm" in rates and rates["calm"] > 0:
        print(f"chaos/calm throughput ratio: {rates['chaos'] / rates['calm']:.2f}")
    return 1 if any(r.problems for r in runs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
