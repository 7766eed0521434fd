#!/usr/bin/env python3
"""Ensemble search at a million images: HNSW (fp16) vs exact flat search, per model and fused.

Data: for each of the five models, at its real dimension, `--n` clustered unit vectors with the shape
of a catalogue: topics (clusters) -> listings (4 images each, near one listing centre) -> images.
Uniform random vectors would make HNSW recall meaningless (ENVIRONMENT_NOTES), so none are used.
Queries are new photos of existing listings (listing centre + noise), the same listings in every model.

Models are generated, indexed and measured ONE AT A TIME (1M x 1024 fp32 alone is 4 GB) and freed;
per-query times are kept, so the ensemble latency of query j is the sum of the five models' times for
query j plus the measured fusion time: what one search does, run sequentially as the service runs it.
Recall@10: per model, HNSW top-10 image ids vs exact top-10; fused, the top-10 listings of RRF over
HNSW results vs RRF over exact results.

    venv/bin/python bench/search.py                 # 1M per model, all five (about 15-25 min on 2 cores)
    venv/bin/python bench/search.py --n 100000      # quick
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imageselector.fusion import aggregate_max, rrf_fuse  # noqa: E402
from imageselector.search.indexes import IndexPolicy, new_hnsw, set_ef_search  # noqa: E402

DIMS = {"clip_vitb32": 512, "clip_vitl14": 768, "dinov2_base": 768, "dinov2_large": 1024, "dinov3_base": 768}
IMAGES_PER_LISTING = 4
CHUNK = 50_000
TIE = 0.01  # cosine: 'as similar as the exact 10th' for the near-tie recall


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


class Noise:
    """Variation around a centre: mostly inside a low-rank subspace (real embeddings have a low intrinsic
    dimension, tens not hundreds), plus a small isotropic part. `rank=0` gives isotropic full-dim noise,
    a worst case for any graph index. cos(centre + noise, centre) ~ 1/sqrt(1 + radius^2)."""

    def __init__(self, rng: np.random.Generator, dim: int, rank: int, iso: float = 0.15) -> None:
        self.rng, self.dim, self.rank, self.iso = rng, dim, rank, iso
        self.basis = rng.standard_normal((rank, dim), dtype=np.float32) / np.float32(np.sqrt(dim)) if rank else None

    def __call__(self, m: int, radius: float) -> np.ndarray:
        if self.basis is None:
            return self.rng.standard_normal((m, self.dim), dtype=np.float32) * np.float32(radius / np.sqrt(self.dim))
        z = self.rng.standard_normal((m, self.rank), dtype=np.float32) * np.float32(radius / np.sqrt(self.rank))
        iso = self.rng.standard_normal((m, self.dim), dtype=np.float32) * np.float32(
            self.iso * radius / np.sqrt(self.dim)
        )
        return z @ self.basis + iso


def make_model_data(
    n: int, dim: int, n_topics: int, seed: int, query_listings: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray]:
    """(database [n, dim], queries [len(query_listings), dim]); gid // 4 is the listing."""
    rng = np.random.default_rng(seed)
    noise = Noise(rng, dim, rank)
    n_listings = (n + IMAGES_PER_LISTING - 1) // IMAGES_PER_LISTING
    topics = _unit_rows(rng.standard_normal((n_topics, dim), dtype=np.float32))
    # topic sizes are skewed, as real catalogues are (many mugs, few anvils)
    p = rng.zipf(1.3, n_topics).astype(np.float64)
    topic_of = rng.choice(n_topics, n_listings, p=p / p.sum())
    centres = np.empty((n_listings, dim), np.float32)
    for s in range(0, n_listings, CHUNK):
        e = min(s + CHUNK, n_listings)
        centres[s:e] = _unit_rows(topics[topic_of[s:e]] + noise(e - s, 1.0))  # cos ~0.7 to topic
    xb = np.empty((n, dim), np.float32)
    for s in range(0, n, CHUNK):
        e = min(s + CHUNK, n)
        xb[s:e] = _unit_rows(centres[np.arange(s, e) // IMAGES_PER_LISTING] + noise(e - s, 0.6))
    xq = _unit_rows(centres[query_listings] + noise(len(query_listings), 0.6))
    del centres
    return xb, xq


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def bench_model(name: str, dim: int, args: argparse.Namespace, query_listings: np.ndarray, seed: int) -> dict:
    t0 = time.perf_counter()
    xb, xq = make_model_data(args.n, dim, args.topics, seed, query_listings, args.rank)
    t_gen = time.perf_counter() - t0
    nq, kk = len(xq), args.per_model_k

    t0 = time.perf_counter()
    gt_scores, gt_ids = faiss.knn(xq, xb, kk, metric=faiss.METRIC_INNER_PRODUCT)
    t_gt = time.perf_counter() - t0
    flat_times = []
    for j in range(min(args.flat_queries, nq)):
        t = time.perf_counter()
        faiss.knn(xq[j : j + 1], xb, kk, metric=faiss.METRIC_INNER_PRODUCT)
        flat_times.append(time.perf_counter() - t)

    policy = IndexPolicy(m=args.m, ef_construction=args.efc, fp16=not args.fp32)
    index = new_hnsw(dim, policy)
    t0 = time.perf_counter()
    for s in range(0, args.n, CHUNK):
        e = min(s + CHUNK, args.n)
        index.add_with_ids(xb[s:e], np.arange(s, e, dtype=np.int64))
    t_build = time.perf_counter() - t0
    del xb
    gc.collect()

    out = {
        "name": name,
        "dim": dim,
        "gen_s": t_gen,
        "gt_s": t_gt,
        "build_s": t_build,
        "flat_times": flat_times,
        "gt_ids": gt_ids,
        "gt_scores": gt_scores,
        "ef": {},
    }
    for ef in args.ef:
        set_ef_search(index, ef)
        index.search(xq[:5], kk)  # warm
        times, ids_all, sc_all = [], np.empty((nq, kk), np.int64), np.empty((nq, kk), np.float32)
        for j in range(nq):
            t = time.perf_counter()
            s_, i_ = index.search(xq[j : j + 1], kk)
            times.append(time.perf_counter() - t)
            ids_all[j], sc_all[j] = i_[0], s_[0]
        rec = np.mean([len(set(ids_all[j, :10]) & set(gt_ids[j, :10])) / 10 for j in range(nq)])
        # misses among near-ties: HNSW top-10 items whose similarity is within TIE of the exact 10th
        tie = np.mean(np.minimum(10, (sc_all[:, :10] >= gt_scores[:, 9:10] - TIE).sum(axis=1)) / 10)
        out["ef"][ef] = {
            "times": np.array(times),
            "ids": ids_all,
            "scores": sc_all,
            "recall10": float(rec),
            "tie10": float(tie),
        }
    out["peak_rss_gb"] = rss_gb()
    del index, xq
    gc.collect()
    return out


def fuse_top(per_model: dict[str, tuple[np.ndarray, np.ndarray]], k: int = 10) -> tuple[list[int], float]:
    t = time.perf_counter()
    lists = {m: aggregate_max(ids, sc, lambda g: int(g) // IMAGES_PER_LISTING) for m, (ids, sc) in per_model.items()}
    top = [f.listing_id for f in rrf_fuse(lists)[:k]]
    return top, time.perf_counter() - t


def pct(a, q) -> float:  # type: ignore[no-untyped-def]
    return float(np.percentile(np.asarray(a) * 1000, q))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors per model (default 1M)")
    ap.add_argument("--models", default=",".join(DIMS), help="comma-separated subset of the five")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--flat-queries", type=int, default=10, help="single queries timed with exact search")
    ap.add_argument("--topics", type=int, default=0, help="clusters (default n/250)")
    ap.add_argument("--rank", type=int, default=64, help="intrinsic dimension of the variation (0: isotropic)")
    ap.add_argument("--m", type=int, default=IndexPolicy.m)
    ap.add_argument("--efc", type=int, default=IndexPolicy.ef_construction)
    ap.add_argument("--ef", default="64,128,256", help="efSearch values to measure")
    ap.add_argument("--per-model-k", type=int, default=200, help="hits per model (the service uses max(100, 10k))")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fp32", action="store_true", help="HNSWFlat instead of fp16 storage")
    args = ap.parse_args(argv)
    args.ef = [int(x) for x in args.ef.split(",")]
    args.topics = args.topics or max(10, args.n // 250)
    models = [m for m in args.models.split(",") if m]
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(12345)
    n_listings = args.n // IMAGES_PER_LISTING
    query_listings = rng.choice(n_listings, args.queries, replace=False)
    print(
        f"bench/search.py: n={args.n:,} per model, models={','.join(models)}, {args.queries} queries, "
        f"{args.topics} topics, variation rank {args.rank or 'full (isotropic)'}, HNSW M={args.m} efC={args.efc} {'fp32' if args.fp32 else 'fp16'}, "
        f"per-model k={args.per_model_k}, {args.threads} threads; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    results = {}
    for i, name in enumerate(models):
        r = bench_model(name, DIMS[name], args, query_listings, seed=1000 + i)
        results[name] = r
        line = " ".join(
            f"ef{ef}: p50 {pct(v['times'], 50):.2f} ms recall@10 {v['recall10']:.3f} (tie {v['tie10']:.3f})"
            for ef, v in r["ef"].items()
        )
        print(
            f"  {name:13s} d={r['dim']:4d} gen {r['gen_s']:.0f}s build {r['build_s']:.0f}s "
            f"({args.n / r['build_s']:.0f}/s) load {os.getloadavg()[0]:.1f} exact p50 {pct(r['flat_times'], 50):.1f} ms | {line} | peak RSS {r['peak_rss_gb']:.1f} GB",
            flush=True,
        )
    nq = args.queries
    # exact ensemble: per-query sum of per-model exact times (fewer samples) + fusion
    flat_sum = np.sum([np.array(r["flat_times"]) for r in results.values()], axis=0)
    exact_top, fuse_s = [], []
    for j in range(nq):
        top, dt = fuse_top({m: (r["gt_ids"][j], r["gt_scores"][j]) for m, r in results.items()})
        exact_top.append(top)
        fuse_s.append(dt)
    print(
        f"\nensemble of {len(results)} models ({', '.join(results)}), {nq} queries; fusion p50 {pct(fuse_s, 50):.2f} ms"
    )
    print(
        f"  exact flat : p50 {pct(flat_sum, 50) + pct(fuse_s, 50):8.1f} ms  (sum of per-model exact searches + fusion)"
    )
    best = None
    for ef in args.ef:
        total = np.sum([r["ef"][ef]["times"] for r in results.values()], axis=0)
        fused_rec, fuse_t = [], []
        for j in range(nq):
            top, dt = fuse_top({m: (r["ef"][ef]["ids"][j], r["ef"][ef]["scores"][j]) for m, r in results.items()})
            fuse_t.append(dt)
            fused_rec.append(len(set(top) & set(exact_top[j])) / 10)
        total = total + np.array(fuse_t)
        per_model = np.mean([r["ef"][ef]["recall10"] for r in results.values()])
        print(
            f"  HNSW ef={ef:<4d}: p50 {pct(total, 50):8.1f} ms  p95 {pct(total, 95):8.1f} ms  "
            f"recall@10 per model {per_model:.3f} (min {min(r['ef'][ef]['recall10'] for r in results.values()):.3f}, "
            f"near-tie {np.mean([r['ef'][ef]['tie10'] for r in results.values()]):.3f}), "
            f"fused listings {np.mean(fused_rec):.3f}"
        )
        if best is None and per_model >= 0.95:
            best = (ef, pct(total, 50))
    if best is None:
        best = (args.ef[-1], pct(np.sum([r["ef"][args.ef[-1]]["times"] for r in results.values()], axis=0), 50))
    exact_p50 = pct(flat_sum, 50) + pct(fuse_s, 50)
    print(f"\nratio exact/HNSW ensemble p50 latency at ef={best[0]}: {exact_p50 / best[1]:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
