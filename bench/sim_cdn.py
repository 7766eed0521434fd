"""Simulator CDN throughput: images/s served cold (generated) and warm (cached), 8 concurrent clients.

    venv/bin/python bench/sim_cdn.py [--images 600] [--size 570xN] [--clients 8]

Prints cold and warm images/s side by side, the API's pages/s, and the ratio cold/warm LAST.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import requests  # noqa: E402

from imageselector.etsy.simulator import Simulator  # noqa: E402

_local = threading.local()


def _session() -> requests.Session:
    s = getattr(_local, "s", None)
    if s is None:
        s = _local.s = requests.Session()
    return s


def fetch_all(urls: list[str], clients: int, headers: dict | None = None) -> tuple[float, int]:
    def one(u: str) -> int:
        r = _session().get(u, headers=headers, timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code} for {u}")
        return len(r.content)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        total = sum(ex.map(one, urls))
    return time.perf_counter() - t0, total


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=600)
    p.add_argument("--size", default="570xN")
    p.add_argument("--clients", type=int, default=8)
    args = p.parse_args()
    with Simulator(listings=max(200, args.images), seed=1, qps=0, qpd=0) as sim:
        cat = sim.catalogue
        urls = [sim.image_url(j, args.size) for j in range(min(args.images, len(cat.image_ids)))]
        cpu0 = time.process_time()
        cold_s, nbytes = fetch_all(urls, args.clients)
        cpu_cold = time.process_time() - cpu0
        warm_s, _ = fetch_all(urls, args.clients)
        api = [f"{sim.api_base}/listings/active?limit=100&offset={100 * (k % 20)}" for k in range(400)]
        api_s, _ = fetch_all(api, 4, headers={"x-api-key": sim.api_key_header})
    n = len(urls)
    cold, warm = n / cold_s, n / warm_s
    print(
        f"cores={os.cpu_count()} load_avg_1m={os.getloadavg()[0]:.1f} images={n} size={args.size} clients={args.clients}"
    )
    print(f"mean JPEG bytes:            {nbytes / n / 1000:.1f} KB")
    print(
        f"cold (generate+serve):      {cold:.0f} images/s  ({cpu_cold / n * 1000:.1f} ms CPU per image, this process)"
    )
    print(f"warm (served from cache):   {warm:.0f} images/s")
    print(f"API findAllListingsActive:  {len(api) / api_s:.0f} pages/s of 100 listings (4 clients, no rate limit)")
    print(f"ratio cold/warm:            {cold / warm:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
