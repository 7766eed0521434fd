"""Simulator CDN throughput: images/s served cold (generated) and warm (cached), 8 concurrent clients.

    venv/bin/python bench/sim_cdn.py [--images 600] [--size 570xN] [--clients 8]

The simulator runs as its own process (`python -m imageselector.etsy.simulator`, as the demo and the
scripts run it); the URLs come from a local Catalogue with the same seed (it is deterministic). Prints cold
and warm images/s side by side, the server's CPU per image, the API's pages/s, and the ratio cold/warm LAST.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from imageselector import cdn  # noqa: E402
from imageselector.etsy.simulator.catalogue import Catalogue  # noqa: E402

SEED = 1
_local = threading.local()


def _session() -> requests.Session:
    s = getattr(_local, "s", None)
    if s is None:
        s = _local.s = requests.Session()
    return s


def server_cpu(base: str) -> float:
    """CPU seconds the simulator process has used (its /_sim/stats reports them)."""
    return requests.get(base + "/_sim/stats", timeout=30).json()["process_cpu_s"]


def fetch_all(urls: list[str], clients: int, headers: dict | None = None) -> tuple[float, int]:
    def one(u: str) -> int:
        r = _session().get(u, headers=headers, timeout=120)
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
    listings = max(200, args.images)
    cmd = [sys.executable, "-m", "imageselector.etsy.simulator", "--listings", str(listings), "--seed", str(SEED)]
    proc = subprocess.Popen([*cmd, "--qps", "0", "--qpd", "0"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        ready = proc.stdout.readline().split()  # SIMULATOR READY api_base=... cdn_base=...
        base = dict(kv.split("=", 1) for kv in ready[2:])
        cat = Catalogue(listings, SEED)
        urls = []
        for j in range(min(args.images, len(cat.image_ids))):
            shop_id = int(cat.shop_ids[cat.shop_of[cat.listing_of_image(j)]])
            urls.append(
                cdn.build_image_url(
                    base["cdn_base"], shop_id, cat.image_hex(j), int(cat.image_ids[j]), cat.image_suffix(j), args.size
                )
            )
        cpu0 = server_cpu(base["cdn_base"])
        cold_s, nbytes = fetch_all(urls, args.clients)
        cpu_cold = server_cpu(base["cdn_base"]) - cpu0
        cpu0 = server_cpu(base["cdn_base"])
        warm_s, _ = fetch_all(urls, args.clients)
        cpu_warm = server_cpu(base["cdn_base"]) - cpu0
        api = [f"{base['api_base']}/listings/active?limit=100&offset={100 * (k % 20)}" for k in range(400)]
        api_s, _ = fetch_all(api, 4, headers={"x-api-key": "sim-keystring:sim-secret"})
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    n = len(urls)
    cold, warm = n / cold_s, n / warm_s
    print(
        f"cores={os.cpu_count()} load_avg_1m={os.getloadavg()[0]:.1f} images={n} size={args.size} clients={args.clients}"
    )
    print(f"mean JPEG bytes:            {nbytes / n / 1000:.1f} KB")
    print(f"cold (generate+serve):      {cold:.0f} images/s   server CPU {cpu_cold / n * 1000:.1f} ms/image")
    print(f"warm (served from cache):   {warm:.0f} images/s   server CPU {cpu_warm / n * 1000:.1f} ms/image")
    print(f"API findAllListingsActive:  {len(api) / api_s:.0f} pages/s of 100 listings (4 clients, no rate limit)")
    print(f"ratio cold/warm:            {cold / warm:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
