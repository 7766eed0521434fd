"""`python -m imageselector.etsy.simulator --port P --listings N [--qps Q] [--qpd D] [--faults SPEC] [--seed S]`.

Prints `SIMULATOR READY api_base=<...> cdn_base=<...>` once listening; runs until SIGTERM/SIGINT (exit 0).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from imageselector.etsy.simulator.faults import RATE_FIELDS, Faults
from imageselector.etsy.simulator.server import Simulator


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m imageselector.etsy.simulator",
        description="Local Etsy Open API v3 + image CDN for tests and offline runs.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: a free one)")
    p.add_argument("--listings", type=int, default=1000, help="catalogue size in listings (default 1000)")
    p.add_argument("--seed", type=int, default=1, help="catalogue / fault seed (default 1)")
    p.add_argument("--qps", type=float, default=10, help="per-second request limit (default 10; 0 = none)")
    p.add_argument("--qpd", type=int, default=10000, help="rolling 24 h request limit (default 10000; 0 = none)")
    p.add_argument(
        "--faults", default="", help=f"fault rates, e.g. 'api_429=0.05,cdn_404=0.01' ({', '.join(RATE_FIELDS)})"
    )
    p.add_argument("--max-offset", type=int, default=12000, help="largest offset accepted (default 12000)")
    p.add_argument("--cdn-latency-ms", type=float, default=0, help="added to every CDN answer (default 0)")
    p.add_argument("--api-key", default="sim-keystring", help="valid keystring (default sim-keystring)")
    p.add_argument("--shared-secret", default="sim-secret", help="valid shared secret (default sim-secret)")
    p.add_argument(
        "--no-retry-after", action="store_true", help="omit retry-after on 429s (the real API sometimes does)"
    )
    p.add_argument(
        "--when-made-drift",
        type=float,
        default=0.0,
        help="share of listings whose when_made is a 2026-era value outside the OAS enum (default 0)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        faults = Faults.parse(args.faults)
    except ValueError as e:
        print(f"simulator: {e}", file=sys.stderr)
        return 2
    if args.listings < 1:
        print("simulator: --listings must be >= 1", file=sys.stderr)
        return 2
    sim = Simulator(
        listings=args.listings,
        seed=args.seed,
        qps=args.qps,
        qpd=args.qpd,
        faults=faults,
        max_offset=args.max_offset,
        cdn_latency_ms=args.cdn_latency_ms,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        shared_secret=args.shared_secret,
        retry_after=not args.no_retry_after,
        when_made_drift=args.when_made_drift,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        sim.start()
    except OSError as e:
        print(f"simulator: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 2
    print(f"SIMULATOR READY api_base={sim.api_base} cdn_base={sim.cdn_base}", flush=True)
    while not stop.wait(0.5):
        pass
    sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
