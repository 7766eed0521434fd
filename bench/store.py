#!/usr/bin/env python3
"""Benchmark the embedding store: writer memory at two catalogue sizes, and bytes written over a build.

1. Peak RSS of embed.py's store path at 100k and at 1M stored vectors per model, five models at their
   real dims (clip_vitb32 512, clip_vitl14 768, dinov2_base 768, dinov2_large 1024, dinov3_base 768),
   plus the two CLIP text stores (one vector per listing, 5 images a listing). For each size a data home
   is made: a status database whose rows are all flagged embedded, and stores pre-populated by writing
   top-level segments directly (their keys for real; their vectors as sparse holes unless --dense: the
   writer never reads a top-level segment's vectors, and 1M x 5 dense is 15 GB of disk). A child
   process then runs what embed.py runs (`EmbedStage.open`: lock, migration check, reconcile of flags
   against store, text backfill check; then `--flushes` flushes of `--flush` new vectors per model
   through `StoreWriter.append/commit`, background compaction on), and reports VmHWM from /proc.
2. Bytes written over a whole build: an empty store, `--build` vectors of `--build-dim` dims in flushes
   of `--flush`, with background compaction; all segment and manifest bytes written / the final size.

Last line (compared across runs):
    store: peak RSS growth 100k -> 1M vectors per model: X MB; bytes written / final size: Y
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from imageselector import db  # noqa: E402
from imageselector.vectorstore.segments import Layout  # noqa: E402
from imageselector.vectorstore.store import FORMAT, MANIFEST, CompactionPolicy, StoreWriter  # noqa: E402

DIMS = {"clip_vitb32": 512, "clip_vitl14": 768, "dinov2_base": 768, "dinov2_large": 1024, "dinov3_base": 768}
TEXT = ("clip_vitb32", "clip_vitl14")
PER_LISTING = 5
SEG_ROWS = 262_144


def _source(m: str) -> str:
    return f"bench:{m}"


def make_db(path: Path, n: int) -> None:
    conn = db.connect(path)
    flags = ", ".join(f"embed_{m}" for m in DIMS)
    ones = ", ".join("1" for _ in DIMS)
    sql = (
        f"INSERT INTO image_status (listing_id, image_id, shop_id, to_download, download_done, bg_removed, {flags},"
        f" gid) VALUES (?, ?, 1, 1, 1, 1, {ones}, ?)"
    )
    conn.execute("BEGIN")
    step = 50_000
    for s in range(0, n, step):
        g = range(s, min(n, s + step))
        conn.executemany(sql, ((10_000_000 + i // PER_LISTING, 50_000_000 + i, i) for i in g))
    conn.execute("COMMIT")
    conn.close()


def write_store(emb: Path, name: str, dim: int, keys: np.ndarray, key: str, dense: bool, rng) -> int:  # type: ignore[no-untyped-def]
    """Top-level segments of `keys` and their manifest, written directly (what a long build leaves)."""
    d = emb / name
    d.mkdir(parents=True, exist_ok=True)
    segs = []
    for i, s in enumerate(range(0, len(keys), SEG_ROWS)):
        k = keys[s : s + SEG_ROWS]
        lay = Layout(dim, len(k), 0)
        fname = f"g{i + 1:010d}-bench.seg"
        with open(d / fname, "wb") as f:
            f.write(lay.header())
            f.seek(lay.keys)
            f.write(k.astype("<i8").tobytes())
            f.seek(lay.gens)
            f.write(np.full(len(k), i + 1, "<i4").tobytes())
            if dense:
                f.seek(lay.vecs)
                for a in range(0, len(k), 16384):
                    f.write(rng.random((min(16384, len(k) - a), dim), dtype=np.float32).tobytes())
            f.truncate(lay.size)
        segs.append(
            {"file": fname, "rows": len(k), "dels": 0, "bytes": lay.size, "level": 2, "gen_lo": i + 1,
             "gen_hi": i + 1, "key_min": int(k[0]), "key_max": int(k[-1]), "shadows": False}
        )  # fmt: skip
    doc = {
        "format": FORMAT, "model": name, "dim": dim, "key": key, "source": _source(name.removesuffix("_text")),
        "standin": False, "generation": len(segs), "version": len(segs), "count": len(keys),
        "tombstones_dropped_gen": 0, "segments": segs,
    }  # fmt: skip
    (d / MANIFEST).write_text(json.dumps(doc))
    return sum(s["bytes"] for s in segs)


def make_home(home: Path, n: int, dense: bool) -> None:
    emb = home / "embeddings"
    emb.mkdir(parents=True)
    (home / "images").mkdir()
    make_db(home / "etsy_data.db", n)
    rng = np.random.default_rng(0)
    gids = np.arange(n, dtype=np.int64)
    listings = np.unique(10_000_000 + gids // PER_LISTING)
    for m, dim in DIMS.items():
        write_store(emb, m, dim, gids, "gid", dense, rng)
        if m in TEXT:
            write_store(emb, f"{m}_text", dim, listings, "listing_id", dense, rng)


# ---------------------------------------------------------------- the child: embed.py's store path


class _Spec:
    standin = False

    def __init__(self, m: str) -> None:
        self.m = m

    def describe(self) -> str:
        return _source(self.m)


class _Enc:
    """What EmbedStage.open asks of an encoder (no weights: the store path is what is measured)."""

    def __init__(self, m: str, dim: int) -> None:
        self.spec, self.dim, self.has_text = _Spec(m), dim, m in TEXT

    def encode_texts(self, texts):  # type: ignore[no-untyped-def]
        return np.zeros((len(texts), self.dim), np.float32)


def hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(home: Path, flushes: int, flush: int) -> None:
    from imageselector.config import load_settings
    from imageselector.embedding.stage import EmbedStage, Options
    from imageselector.stopping import KILL, KILL_EMBED, Stopper

    settings = load_settings(home)
    conn = db.connect(settings.db_path)
    encoders = {m: _Enc(m, d) for m, d in DIMS.items()}
    stopper = Stopper(settings.home, (KILL_EMBED, KILL), install_signals=False)
    stage = EmbedStage(settings, conn, encoders, Options(), stopper)  # type: ignore[arg-type]
    base = hwm_mb()
    t0 = time.perf_counter()
    stage.open()
    opened = hwm_mb()
    t_open = time.perf_counter() - t0
    top = int(conn.execute("SELECT MAX(gid) FROM image_status").fetchone()[0]) + 1
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    for i in range(flushes):
        gids = np.arange(top + i * flush, top + (i + 1) * flush, dtype=np.int64)
        for m, d in DIMS.items():
            stage.store.append(m, gids, rng.random((flush, d), dtype=np.float32))
        stage.store.commit()
    stage.store.close()  # waits for the running merge
    print(
        json.dumps(
            {
                "hwm_mb": hwm_mb(),
                "before_open_mb": base,
                "after_open_mb": opened,
                "open_s": t_open,
                "flush_s": time.perf_counter() - t0,
                "compactions": stage.store.compactions,
                "repairs": stage.repairs,
            }
        )
    )


# ---------------------------------------------------------------- bytes written over a build


def build(dirpath: Path, n: int, dim: int, flush: int) -> dict:
    emb, tmp = dirpath / "embeddings", dirpath / ".tmp"
    w = StoreWriter(emb, tmp, policy=CompactionPolicy())
    w.open_model("build", dim, text=False, source="bench", standin=False)
    rng = np.random.default_rng(2)
    pool = rng.random((flush * 4, dim), dtype=np.float32)
    t0 = time.perf_counter()
    for s in range(0, n, flush):
        k = np.arange(s, min(n, s + flush), dtype=np.int64)
        off = (s // flush) % 3 * flush
        w.append("build", k, pool[off : off + len(k)])
        w.commit()
    w.close()
    final = sum(p.stat().st_size for p in (emb / "build").iterdir())
    doc = json.loads((emb / "build" / MANIFEST).read_text())
    return {
        "written": w.bytes_written,
        "final": final,
        "ratio": w.bytes_written / final,
        "segments": len(doc["segments"]),
        "compactions": w.compactions,
        "seconds": time.perf_counter() - t0,
    }


def _n(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000", help="stored vectors per model (default 100k,1M)")
    ap.add_argument("--flushes", type=int, default=40, help="flushes the child makes after open (default 40)")
    ap.add_argument("--flush", type=int, default=1024, help="new vectors per model per flush (default 1024)")
    ap.add_argument("--build", type=int, default=1_000_000, help="vectors in the bytes-written build")
    ap.add_argument("--build-dim", type=int, default=512)
    ap.add_argument("--dense", action="store_true", help="write the pre-populated vectors for real (15 GB at 1M)")
    ap.add_argument("--dir", help="scratch folder (default: a temp dir, removed afterwards)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), int(args.child[1]), int(args.child[2]))
        return 0
    sizes = [int(x) for x in args.sizes.split(",")]
    scratch = Path(tempfile.mkdtemp(prefix="bench_store_", dir=args.dir))
    hwm: dict[int, float] = {}
    try:
        for n in sizes:
            home = scratch / f"home_{n}"
            t0 = time.perf_counter()
            make_home(home, n, args.dense)
            print(f"{n:,} vectors per model: home made in {time.perf_counter() - t0:.1f} s", flush=True)
            env = {**os.environ, "IMAGESELECTOR_HOME": str(home), "PYTHONPATH": str(ROOT)}
            cmd = [sys.executable, __file__, "--child", str(home), str(args.flushes), str(args.flush)]
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if r.returncode:
                print(r.stderr[-3000:], file=sys.stderr)
                return 1
            res = json.loads(r.stdout.strip().splitlines()[-1])
            hwm[n] = res["hwm_mb"]
            print(
                f"  embed store path: peak RSS {res['hwm_mb']:.0f} MB (imports {res['before_open_mb']:.0f} MB, "
                f"after open+reconcile {res['after_open_mb']:.0f} MB); open {res['open_s']:.1f} s; "
                f"{args.flushes} flushes x {args.flush} x 5 models in {res['flush_s']:.1f} s, "
                f"{res['compactions']} merges; repairs {sum(sum(v.values()) - v['vectors'] for v in res['repairs'].values())}",
                flush=True,
            )
            shutil.rmtree(home)
        b = build(scratch / "build", args.build, args.build_dim, args.flush)
        print(
            f"build of {args.build:,} x {args.build_dim}-d in flushes of {args.flush}: {b['written'] / 1e9:.2f} GB written, "
            f"final {b['final'] / 1e9:.2f} GB in {b['segments']} segments, {b['compactions']} merges, {b['seconds']:.0f} s"
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    growth = hwm[sizes[-1]] - hwm[sizes[0]]
    print(
        f"store: peak RSS growth {_n(sizes[0])} -> {_n(sizes[-1])} vectors per model: {growth:.0f} MB; "
        f"bytes written / final size: {b['ratio']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
