"""How long `evaluate.py` takes on a synthetic catalogue, and what batching the queries buys.

Builds a data home with L listings x P photos, five flat IndexIDMap2 indexes at the real dimensions whose
vectors are a per-listing centre plus per-model noise (a "good" model has little noise), runs the whole
evaluation once (timing its phases from the log), then times the same queries on one index searched one at a
time vs in one batch. Prints the figures side by side and the ratio last.
Usage: venv/bin/python bench/evaluate.py [--listings 4000 --photos 5 --sample 500]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from imageselector import db  # noqa: E402
from imageselector.config import load_settings  # noqa: E402
from imageselector.evaluation import stage as evaluation  # noqa: E402
from tests.helpers.rows import image_rows  # noqa: E402

DIMS = {"clip_vitb32": 512, "clip_vitl14": 768, "dinov2_base": 768, "dinov2_large": 1024, "dinov3_base": 768}
NOISE = {"clip_vitb32": 5.0, "clip_vitl14": 4.0, "dinov2_base": 3.5, "dinov2_large": 3.0, "dinov3_base": 4.5}


def build(home: Path, listings: int, photos: int, seed: int = 0) -> None:
    settings = load_settings(home)
    conn = db.connect(settings.db_path)
    n = listings * photos
    db.upsert_images(conn, image_rows(n, per_listing=photos))
    gids = np.array([r[0] for r in conn.execute("SELECT gid FROM image_status ORDER BY gid")], dtype=np.int64)
    conn.close()
    settings.embeddings_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, dim in DIMS.items():
        centres = rng.normal(size=(listings, dim)).astype(np.float32)
        v = np.repeat(centres, photos, axis=0) + NOISE[name] * rng.normal(size=(n, dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        index.add_with_ids(v, gids)
        faiss.write_index(index, str(settings.embeddings_dir / f"{name}.faiss"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listings", type=int, default=4000)
    ap.add_argument("--photos", type=int, default=5)
    ap.add_argument("--sample", type=int, default=500)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        home = Path(tmp) / "home"
        t0 = time.perf_counter()
        build(home, args.listings, args.photos)
        print(
            f"catalogue: {args.listings:,} listings x {args.photos} photos, 5 indexes ({time.perf_counter() - t0:.1f} s to build)"
        )
        settings = load_settings(home)
        conn = db.connect(settings.db_path, readonly=True)
        opts = evaluation.Options(sample=args.sample, n_boot=1000, with_text=False)
        t0, c0 = time.perf_counter(), time.process_time()
        res = evaluation.run(settings, conn, opts)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
        conn.close()
        print(
            f"evaluate: {res['queries']['eval']} eval + {res['queries']['fit']} fit queries, whole run {total:.1f} s wall, {cpu:.1f} s CPU"
        )
        for m in res["methods"]:
            lm = m["metrics"]["listing_map10"]
            print(
                f"  {m['name']:<16} L mAP@10 {lm['mean']:.3f} [{lm['lo']:.3f}, {lm['hi']:.3f}]  {m['query_ms']:.2f} ms/query"
            )
        print("  fitted rrf weights:", res["weights"]["fitted"]["rrf"])
        li = evaluation.LoadedIndex.open("dinov2_large", settings.embeddings_dir)
        q = li.sample_vectors(args.sample, 1)
        t0 = time.perf_counter()
        for i in range(len(q)):
            li.index.search(q[i : i + 1], 101)
        single = time.perf_counter() - t0
        t0 = time.perf_counter()
        li.index.search(q, 101)
        batch = time.perf_counter() - t0
        print(f"dinov2_large, {len(q)} queries one at a time: {single:.2f} s")
        print(f"dinov2_large, {len(q)} queries in one batch : {batch:.2f} s")
        print(f"ratio one-at-a-time / batch: {single / batch:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
