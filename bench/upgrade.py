"""How long scripts/upgrade_home.py takes on a home the size of the user's, and how much memory it needs.

Builds a seed-era home as the original guide describes it (tests/helpers/legacy_home.py's schema) at scale:
1.2M image rows (945K downloaded, 277K background-removed), 240K listings, 20K flat images (tiny JPEGs),
100K row-order vectors per model at the real dimensions (512, 768, 768, 1024, 768) plus the two CLIP text
indexes; then runs the upgrade as its own process and prints each phase's time (from its output) and
its peak memory (VmHWM from /proc, polled, and the children's max RSS). Goals: database < 2 min, peak < 2 GB.
Usage: venv/bin/python bench/upgrade.py [--rows 1200000] [--vectors 100000] [--images 20000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import shutil
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.helpers.legacy_home import COLUMNS, GUIDE_SCHEMA, MODELS, REAL_DIMS  # noqa: E402

CHUNK = 10_000


def write_flat(path: Path, dim: int, n: int, make) -> None:  # type: ignore[no-untyped-def]
    """A legacy IndexFlatIP file written a chunk at a time (what faiss.write_index would write)."""
    tpl = bytearray(faiss.serialize_index(faiss.IndexFlatIP(dim)).tobytes())
    struct.pack_into("<q", tpl, 8, n)
    with open(path, "wb") as f:
        f.write(bytes(tpl[:37]))
        f.write(struct.pack("<Q", n * dim))
        for start in range(0, n, CHUNK):
            f.write(np.ascontiguousarray(make(start, min(CHUNK, n - start)), dtype=np.float32).tobytes())


def build(home: Path, rows: int, nvec: int, nimg: int) -> dict[str, float]:
    t0 = time.monotonic()
    home.mkdir(parents=True)
    (home / ".env").write_text("ETSY_API_KEY=benchkeystring\n")
    rng = random.Random(1)
    per_listing = 5
    n_dl, n_bg = int(rows * 0.79), int(rows * 0.23)
    con = sqlite3.connect(home / "etsy_data.db")
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(GUIDE_SCHEMA)
    embed_order = rng.sample(range(n_bg), nvec)
    embedded = set(embed_order)

    def pair(i: int) -> tuple[int, int]:
        return 1_000_000_000 + i // per_listing, 3_000_000_000 + 7 * i

    batch = []
    for i in range(rows):
        lid, iid = pair(i)
        e = int(i in embedded)
        batch.append(
            (
                lid,
                iid,
                50_000 + lid % 20_000,
                f"{i:x}",
                "xyz",
                int(i % per_listing == 0),
                "2020_2024",
                9.99,
                1,
                int(i < n_dl),
                int(i < n_bg),
                e,
                e,
                e,
                e,
                e,
            )
        )
        if len(batch) == 100_000:
            con.executemany(f"INSERT INTO image_status ({','.join(COLUMNS)}) VALUES ({','.join('?' * 16)})", batch)
            batch.clear()
    if batch:
        con.executemany(f"INSERT INTO image_status ({','.join(COLUMNS)}) VALUES ({','.join('?' * 16)})", batch)
    con.executemany(
        "INSERT INTO listings VALUES (?,?,?,?,?,?,?,?,?)",
        (
            (1_000_000_000 + k, 50_000 + k % 20_000, f"title {k}", "d", "u", "a,b", "m", "2020_2024", "active")
            for k in range(rows // per_listing)
        ),
    )
    con.executemany("INSERT INTO shops VALUES (?,?,?,?)", ((50_000 + s, 1, "u", f"s{s}") for s in range(20_000)))
    con.commit()
    con.close()
    t_db = time.monotonic() - t0
    images = home / "images"
    images.mkdir()
    bodies = []
    for k in range(16):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (k * 15, 255 - k * 15, 90)).save(buf, format="JPEG")
        bodies.append(buf.getvalue())
    for k in range(nimg):
        i = k * (n_dl // nimg)
        lid, iid = pair(i)
        (images / (f"{lid}_{iid}.jpg" if k % 3 else f"{iid}.jpg")).write_bytes(bodies[k % 16])
    emb = home / "embeddings"
    emb.mkdir()
    (emb / "image_index.json").write_text(json.dumps([list(pair(i)) for i in embed_order]))
    lids = np.array([pair(i)[0] for i in embed_order], dtype=np.int64)
    for m in MODELS:
        d = REAL_DIMS[m]
        seed = MODELS.index(m)
        write_flat(
            emb / f"{m}.faiss",
            d,
            nvec,
            lambda s, n, d=d, seed=seed: np.random.default_rng(seed * 1000 + s).standard_normal((n, d)),
        )
        if m in ("clip_vitb32", "clip_vitl14"):

            def text_rows(s: int, n: int, d: int = d) -> np.ndarray:
                return np.stack([np.random.default_rng(int(x)).standard_normal(d) for x in lids[s : s + n]])

            write_flat(emb / f"{m}_text.faiss", d, nvec, text_rows)
    return {"build_db_s": t_db, "build_s": time.monotonic() - t0}


def run_upgrade(home: Path) -> tuple[int, str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGESELECTOR_", "ETSY_"))}
    env["IMAGESELECTOR_HOME"] = str(home)
    p = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "upgrade_home.py"), "--no-backup"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    hwm = 0
    out: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: out.extend(p.stdout or []), daemon=True)
    reader.start()
    while p.poll() is None:
        try:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm = max(hwm, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.05)
    reader.join()
    return p.returncode, "".join(out), hwm


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_200_000)
    ap.add_argument("--vectors", type=int, default=100_000)
    ap.add_argument("--images", type=int, default=20_000)
    ap.add_argument("--dir", help="where to build the home (default a temp folder, removed after)")
    args = ap.parse_args()
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_upgrade_"))
    home = base / "home"
    try:
        built = build(home, args.rows, args.vectors, args.images)
        size = sum(p.stat().st_size for p in home.rglob("*") if p.is_file())
        print(
            f"built a seed-era home in {built['build_s']:.0f}s ({size / 1e9:.2f} GB): {args.rows:,} rows, "
            f"{args.vectors:,} vectors x 5 models (+2 text), {args.images:,} flat images"
        )
        t0 = time.monotonic()
        rc, out, hwm = run_upgrade(home)
        wall = time.monotonic() - t0
        maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        for line in out.splitlines():
            if line.startswith(
                (
                    "phase times",
                    "database: upgraded",
                    "images:",
                    "upgrade finished",
                    "clip_vitb32",
                    "dinov2_large:",
                    "error",
                )
            ):
                print("  " + line)
        print(
            f"upgrade exit {rc}; wall {wall:.1f}s; peak memory VmHWM {hwm / 2**20:,.0f} MiB"
            f" (children max RSS {maxrss / 2**20:,.0f} MiB); goals: database < 120 s, peak < 2048 MiB"
        )
        return rc
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
