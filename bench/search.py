#!/usr/bin/env python3
"""Search at catalogue scale, measured for real: 1M x 5 models through the search service, and 10M x 1.

(a) 1M x 5: one synthetic catalogue, a few thousand topics sized by Zipf's law -> listings (4 photos each,
    close to the listing's centre: near-duplicate neighbours) -> photos, variation mostly in a 64-dim
    subspace plus isotropic noise, in a 256-d latent space; each of the five models sees it through its own
    random projection to its real dimension (512, 768, 768, 1024, 768) plus its own noise (ModelView). The compressed indexes are built by the real build code (indexes.update_index) from a
    snapshot of that data, then a SEPARATE search process opens them through SearchService (the code the
    page and the CLI use, with a real status database of 1M images) and answers ensemble queries (new photos
    of existing listings) with `_rank` (search 5 indexes + gid->listing lookups + fusion + cards).
    Reported: p50/p95 ms per ensemble query, fused recall@10 (the top-10 listings against reciprocal-rank
    fusion of EXACT per-model top-200s), and the search process's memory from /proc (VmRSS, VmHWM, and
    RssAnon/RssFile: file pages are libraries and the mapped gid maps; the fp16 vectors are read with pread).
(b) 10M x 1 (dinov2_large, 1024-d): generated chunk by chunk (deterministic per chunk, so never held whole),
    exact ground truth by streaming, index built the same way; p50 per query (k=200, what the service asks),
    recall@10, index memory per vector (the RssAnon growth of opening it / n), and a projection for 10M x 5.

The store is synthetic (a snapshot object regenerating each chunk), the index and search code is the real
one. Generated data and indexes live under --work and are deleted at the end (--keep keeps them).

    venv/bin/python bench/search.py                          # both parts (about an hour on 2 busy cores)
    venv/bin/python bench/search.py --n 200000 --big-n 0     # a quick check of part (a) only
    venv/bin/python bench/search.py --big-n 0 --keep --work W                 # build once and keep it, then
    venv/bin/python bench/search.py --big-n 0 --keep --work W --reuse \
        --sweep 256:1000:100:0,256:2000:100:60        # search it at other NPROBE:CANDIDATES:RERANK[:HEAD]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imageselector import db  # noqa: E402
from imageselector.fusion import aggregate_max, rrf_fuse  # noqa: E402
from imageselector.search import snapshots  # noqa: E402
from imageselector.search.indexes import IndexPolicy, update_index  # noqa: E402

DIMS = {"clip_vitb32": 512, "clip_vitl14": 768, "dinov2_base": 768, "dinov2_large": 1024, "dinov3_base": 768}
PER_LISTING = 4
CHUNK = 65536  # multiple of PER_LISTING
GT_K = 200
RANK = int(os.environ.get("BENCH_RANK", 64))
LISTING_SPREAD = float(os.environ.get("BENCH_LISTING_SPREAD", 1.0))  # cos(listing, topic) ~ 0.7
LATENT = int(os.environ.get("BENCH_LATENT", 256))  # part (a): dimension of the catalogue the five models share
MODEL_NOISE = float(os.environ.get("BENCH_MODEL_NOISE", 0.3))  # part (a): how much each model's view differs
ZIPF_S = float(os.environ.get("BENCH_ZIPF_S", 1.0))  # topic r holds ~1/r^s of the catalogue
PHOTO_SPREAD = float(os.environ.get("BENCH_PHOTO_SPREAD", 0.6))  # cos(photo, listing) ~ 0.86


def _unit(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


class _Chunks:
    """The read contract of snapshots.py over a `chunk(c)` that regenerates chunk c on demand."""

    count: int
    generation: int
    observer = None  # called with (gids, x) for each chunk of a full pass (ground truth)

    def chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def iter_chunks(self, chunk: int = CHUNK, since_generation: int | None = None) -> Iterator:
        if since_generation is not None and since_generation >= self.generation:
            return
        for c in range((self.count + CHUNK - 1) // CHUNK):
            gids, x = self.chunk(c)
            if self.observer is not None:
                self.observer(gids, x)
            yield gids, x

    def get(self, gids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError("not used by the search")


class SyntheticSnapshot(_Chunks):
    """A store snapshot (the read contract of snapshots.py) whose chunks are regenerated on demand."""

    def __init__(self, model: str, dim: int, n: int, seed: int, generation: int = 1) -> None:
        self.model, self.dim, self.count, self.seed = model, dim, n, seed
        self.generation, self.source = generation, f"bench:{model}:{seed}"
        rng = np.random.default_rng([seed, 0])
        n_topics = int(min(8000, max(10, n // 250)))
        self.topics = _unit(rng.standard_normal((n_topics, dim), dtype=np.float32))
        # Topic sizes follow Zipf's rank-frequency law (the r-th topic ~ 1/r^s: many mugs, few anvils). Not iid
        # draws from a Zipf distribution: with s=1.3 those have an infinite mean, and one draw took 99.97% of
        # 1M vectors (one 64-d Gaussian blob, unlike any catalogue) until 2026-11-30.
        p = 1.0 / np.arange(1, n_topics + 1, dtype=np.float64) ** ZIPF_S
        self.p = p / p.sum()
        self.basis = rng.standard_normal((RANK, dim), dtype=np.float32) / np.float32(np.sqrt(dim))

    def _noise(self, rng: np.random.Generator, m: int, radius: float) -> np.ndarray:
        z = rng.standard_normal((m, RANK), dtype=np.float32) * np.float32(radius / np.sqrt(RANK))
        iso = rng.standard_normal((m, self.dim), dtype=np.float32) * np.float32(0.15 * radius / np.sqrt(self.dim))
        return z @ self.basis + iso

    def _centres(self, c: int, rng: np.random.Generator) -> np.ndarray:
        m = (min(self.count, (c + 1) * CHUNK) - c * CHUNK + PER_LISTING - 1) // PER_LISTING
        topic_of = rng.choice(len(self.topics), m, p=self.p)
        return _unit(self.topics[topic_of] + self._noise(rng, m, LISTING_SPREAD))

    def chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, c + 1])
        centres = self._centres(c, rng)
        s, e = c * CHUNK, min(self.count, (c + 1) * CHUNK)
        x = _unit(centres[(np.arange(s, e) - s) // PER_LISTING] + self._noise(rng, e - s, PHOTO_SPREAD))
        return np.arange(s, e, dtype=np.int64), x

    def queries(self, listings: np.ndarray, seed: int) -> np.ndarray:
        """New photos of these listings (listing l holds gids 4l..4l+3)."""
        out = np.empty((len(listings), self.dim), np.float32)
        per = CHUNK // PER_LISTING
        for c in np.unique(listings // per):
            centres = self._centres(int(c), np.random.default_rng([self.seed, int(c) + 1]))
            sel = np.flatnonzero(listings // per == c)
            out[sel] = centres[listings[sel] - c * per]
        return _unit(out + self._noise(np.random.default_rng(seed), len(listings), PHOTO_SPREAD))


class ModelView(_Chunks):
    """One model's embedding of a shared catalogue: the five models see the SAME photos, so they agree on
    near-duplicates and disagree in the tail. The catalogue is a LATENT-dim SyntheticSnapshot (topics ->
    listings -> photos); a model maps it with its own random projection to its dimension and adds its own
    isotropic noise (cos ~0.96 to the projection at MODEL_NOISE 0.3). Until 2026-11-30 every model drew an
    independent catalogue, so the five rankings were unrelated and the fused top-10 consisted of listings
    that two models had put at chance ranks 50-200: a figure about chance, not about the index."""

    def __init__(self, catalogue: SyntheticSnapshot, model: str, dim: int, seed: int) -> None:
        self.base, self.model, self.dim, self.seed = catalogue, model, dim, seed
        self.count, self.generation, self.source = catalogue.count, 1, f"bench:{model}:{seed}"
        rng = np.random.default_rng([seed, 0])
        self.proj = rng.standard_normal((catalogue.dim, dim), dtype=np.float32) / np.float32(np.sqrt(catalogue.dim))

    def _view(self, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        noise = rng.standard_normal((len(z), self.dim), dtype=np.float32) * np.float32(MODEL_NOISE / np.sqrt(self.dim))
        return _unit(z @ self.proj + noise)

    def chunk(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        gids, z = self.base.chunk(c)
        return gids, self._view(z, np.random.default_rng([self.seed, c + 1]))

    def queries(self, listings: np.ndarray, seed: int) -> np.ndarray:
        return self._view(self.base.queries(listings, seed), np.random.default_rng([self.seed, seed, 999]))


def synthetic(spec: dict, model: str) -> SyntheticSnapshot | ModelView:
    """Part (a)'s models view one catalogue (spec 'catalogue'); part (b)'s model is a catalogue of its own."""
    if "catalogue" in spec:
        return ModelView(
            SyntheticSnapshot("catalogue", LATENT, spec["n"], spec["catalogue"]), model, spec["dim"], spec["seed"]
        )
    return SyntheticSnapshot(model, spec["dim"], spec["n"], spec["seed"])


class TopK:
    """Exact top-k inner products of a few queries, streamed over chunks."""

    def __init__(self, q: np.ndarray, k: int) -> None:
        self.q, self.k = q, k
        self.s = np.full((len(q), k), -np.inf, np.float32)
        self.i = np.full((len(q), k), -1, np.int64)
        self.seen: set[int] = set()

    def __call__(self, gids: np.ndarray, x: np.ndarray) -> None:
        if int(gids[0]) in self.seen:  # a second pass over the same data
            return
        self.seen.add(int(gids[0]))
        s = self.q @ x.T
        top = np.argpartition(-s, self.k - 1, axis=1)[:, : self.k]
        s2 = np.concatenate([self.s, np.take_along_axis(s, top, 1)], axis=1)
        i2 = np.concatenate([self.i, gids[top]], axis=1)
        o = np.argsort(-s2, axis=1, kind="stable")[:, : self.k]
        self.s, self.i = np.take_along_axis(s2, o, 1), np.take_along_axis(i2, o, 1)


def status_kb() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1])
    return out


def install_snapshots(specs: dict[str, dict]) -> None:
    """Make the search read the synthetic store: the one swap point, snapshots.open_snapshot."""
    snaps = {m: synthetic(s, m) for m, s in specs.items()}
    snapshots.open_snapshot = lambda _dir, model: snaps.get(model)  # type: ignore[assignment]


def policy_from(args: argparse.Namespace) -> IndexPolicy:
    return IndexPolicy(
        index_min=1000,
        nlist=args.nlist,
        pq_m=args.m,
        nprobe=args.nprobe,
        candidates=args.candidates,
        rerank=args.rerank,
        complete=args.complete,
        train_sample=args.train_sample,
    )


def build(
    specs: dict[str, dict], home: Path, policy: IndexPolicy, q_of: dict[str, np.ndarray], reuse: bool = False
) -> dict:
    """Build each model's index with the real code; the first (sampling) pass also computes the exact top-k.
    `reuse`: an index already built for this very spec (a kept --work) is searched as it is, and the exact
    top-k is computed by one streaming pass instead."""
    install_snapshots(specs)
    truth = {}
    for model, spec in specs.items():
        snap = snapshots.open_snapshot(home / "embeddings", model)
        gt = TopK(q_of[model], GT_K)
        stamp_file = home / "embeddings/search_cache" / f"{model}.ivf.json"
        t0 = time.perf_counter()
        kept = json.loads(stamp_file.read_text()) if reuse and stamp_file.exists() else {}
        if kept.get("source") == snap.source and kept.get("rows") == spec["n"]:
            for gids, x in snap.iter_chunks():
                gt(gids, x)
            truth[model] = (gt.s, gt.i)
            print(
                f"  {model:13s} reused the kept index; exact top-{GT_K} in {time.perf_counter() - t0:.0f} s", flush=True
            )
            continue
        snap.observer = gt  # type: ignore[union-attr]
        assert update_index(model, home / "embeddings", policy, home / ".tmp") == spec["n"]
        stamp = json.loads(stamp_file.read_text())
        truth[model] = (gt.s, gt.i)
        print(
            f"  {model:13s} d={spec['dim']:4d} n={spec['n']:,}: built in {time.perf_counter() - t0:.0f} s "
            f"(k-means {stamp['train_s']:.0f} s; nlist {stamp['nlist']}, PQ {stamp['m']} x {stamp['nbits']} bits); "
            f"load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    return truth


def make_db(path: Path, n: int) -> None:
    conn = db.connect(path)
    with conn:
        for s in range(0, n, 200_000):
            e = min(n, s + 200_000)
            conn.executemany(
                "INSERT INTO image_status (listing_id, image_id, gid, to_download, download_done) VALUES (?,?,?,0,1)",
                ((g // PER_LISTING + 1, g, g) for g in range(s, e)),
            )
    conn.close()


def fuse_exact(truth: dict[str, tuple[np.ndarray, np.ndarray]], j: int, k: int = 10) -> list[int]:
    lists = {m: aggregate_max(i[j], s[j], lambda g: int(g) // PER_LISTING + 1) for m, (s, i) in truth.items()}
    return [f.listing_id for f in rrf_fuse(lists)[:k]]


# ------------------------------------------------------------------------------------------ search processes
def serve_ensemble(spec_path: Path) -> int:
    """The search process of part (a): SearchService over the built home, ensemble queries, /proc figures."""
    job = json.loads(spec_path.read_text())
    install_snapshots(job["specs"])
    faiss.omp_set_num_threads(1)
    os.environ["IMAGESELECTOR_HOME"] = job["home"]
    from imageselector.config import load_settings
    from imageselector.search.service import SearchService

    data = np.load(job["queries"])
    base = status_kb()
    service = SearchService(load_settings(job["home"]), policy=IndexPolicy(**job["policy"]))
    service.refresh()
    assert all(service.indexes.get(m).kind == "ivfpq" for m in job["specs"]), service.indexes.errors
    opened = status_kb()
    times, tops = [], []
    nq = data[next(iter(job["specs"]))].shape[0]
    for j in [0, 1, 2, *range(nq)]:  # 3 warm-up queries, not counted
        vecs = {m: data[m][j : j + 1] for m in job["specs"]}
        t = time.perf_counter()
        with service._lock:
            res = service._rank(vecs, 20, {"type": "image"}, 0.0, [])
        times.append(time.perf_counter() - t)
        tops.append([r["listing_id"] for r in res["results"][:10]])
    end = status_kb()
    per_model = {  # diagnostics after the timed queries: each model's own top-10 gids
        m: service.indexes.get(m).search(data[m], 10)[1].tolist() for m in job["specs"]
    }
    out = {"times": times[3:], "tops": tops[3:], "base": base, "opened": opened, "end": end, "per_model": per_model}
    Path(job["out"]).write_text(json.dumps(out))
    return 0


def serve_single(spec_path: Path) -> int:
    """The search process of part (b): one model's index, k=200 per query (what the service asks)."""
    job = json.loads(spec_path.read_text())
    install_snapshots(job["specs"])
    faiss.omp_set_num_threads(1)
    from imageselector.search.indexes import IndexSet

    (model,) = job["specs"]
    q = np.load(job["queries"])[model]
    base = status_kb()
    s = IndexSet(Path(job["home"]) / "embeddings", IndexPolicy(**job["policy"]), names=[model])
    s.refresh(force=True)
    m = s.get(model)
    assert m.kind == "ivfpq", m.note
    opened = status_kb()
    times, ids = [], []
    for j in [0, 1, 2, *range(len(q))]:
        t = time.perf_counter()
        _, i = m.search(q[j : j + 1], GT_K)
        times.append(time.perf_counter() - t)
        ids.append(i[0, :10].tolist())
    out = {"times": times[3:], "ids": ids[3:], "base": base, "opened": opened, "end": status_kb()}
    Path(job["out"]).write_text(json.dumps(out))
    return 0


def search_job(specs: dict, home: Path, work: Path, part: str, queries: dict, policy: IndexPolicy) -> dict:
    """What a search process of part `part` needs: the queries saved beside its spec, where to write."""
    np.savez(work / f"q{part}.npz", **queries)
    return {
        "specs": specs,
        "home": str(home),
        "queries": str(work / f"q{part}.npz"),
        "out": str(work / f"{part}_out.json"),
        "policy": policy.__dict__,
    }


def run_search_process(mode: str, job: dict, work: Path) -> dict:
    spec = work / f"{mode}.json"
    spec.write_text(json.dumps(job))
    subprocess.run([sys.executable, __file__, f"--{mode}", str(spec)], check=True)
    return json.loads(Path(job["out"]).read_text())


def _own_recall(got: list[list[int]], truth_ids: np.ndarray) -> float:
    """One model's recall@10 against its exact top-10."""
    return float(np.mean([len(set(a) & set(b.tolist())) / 10 for a, b in zip(got, truth_ids[:, :10], strict=True)]))


def sweep_points(args: argparse.Namespace) -> list[tuple[int, int, int, int]]:
    """--nprobe-sweep N,... and --sweep NPROBE:CANDIDATES:RERANK[:COMPLETE],... as (nprobe, candidates,
    rerank, complete)."""
    points = [(int(v), args.candidates, args.rerank, args.complete) for v in args.nprobe_sweep.split(",") if v]
    for item in (v for v in args.sweep.split(",") if v):
        vals = [int(x) for x in item.split(":")]
        points.append((vals[0], vals[1], vals[2], vals[3] if len(vals) > 3 else args.complete))
    return points


def pct(a: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(a) * 1000, q))


# ------------------------------------------------------------------------------------------ the two parts
def part_a(args: argparse.Namespace, work: Path) -> tuple[str, dict]:
    models = [m for m in args.models.split(",") if m]
    home = work / "a"
    (home / "embeddings").mkdir(parents=True, exist_ok=True)
    specs = {m: {"dim": DIMS[m], "n": args.n, "seed": 1000 + i, "catalogue": 500} for i, m in enumerate(models)}
    rng = np.random.default_rng(12345)
    listings = rng.choice(args.n // PER_LISTING, args.queries, replace=False)
    q_of = {m: synthetic(s, m).queries(listings, 7) for m, s in specs.items()}  # the same new photos, 5 views
    policy = policy_from(args)
    print(f"(a) {len(models)} models x {args.n:,} vectors, {args.queries} queries; {policy}", flush=True)
    t0 = time.perf_counter()
    truth = build(specs, home, policy, q_of, args.reuse)
    if not (args.reuse and (home / "etsy_data.db").exists()):
        make_db(home / "etsy_data.db", args.n)
    print(f"  built all in {time.perf_counter() - t0:.0f} s", flush=True)
    job = search_job(specs, home, work, "a", q_of, policy)
    exact = [fuse_exact(truth, j) for j in range(args.queries)]
    for nprobe, cand, rerank, head in sweep_points(args):  # the same indexes, searched with other settings
        other = {**policy.__dict__, "nprobe": nprobe, "candidates": cand, "rerank": rerank, "complete": head}
        swept = run_search_process("serve-ensemble", {**job, "policy": other}, work)
        per = [_own_recall(got, truth[m][1]) for m, got in swept["per_model"].items()]
        fused = np.mean([len(set(t) & set(e)) / 10 for t, e in zip(swept["tops"], exact, strict=True)])
        print(
            f"  nprobe {nprobe}, candidates {cand}, rerank {rerank}, exact head {head}: ensemble p50 {pct(swept['times'], 50):.1f} ms, p95 {pct(swept['times'], 95):.1f} ms, "
            f"fused recall@10 {fused:.3f}; each model's recall@10 {min(per):.3f}-{max(per):.3f}; "
            f"load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    r = run_search_process("serve-ensemble", job, work)
    fused = float(np.mean([len(set(t) & set(e)) / 10 for t, e in zip(r["tops"], exact, strict=True)]))
    for m, got in r["per_model"].items():
        want = truth[m][1][:, :10]
        rec = _own_recall(got, truth[m][1])
        top3 = np.mean([a[:3] == b[:3].tolist() for a, b in zip(got, want, strict=True)])
        print(f"  {m:13s} recall@10 {rec:.3f}, top-3 in exact order {top3:.3f}", flush=True)
    gb = r["end"]["VmRSS"] / 1024**2
    print(
        f"  search process: VmRSS {gb:.2f} GB (RssAnon {r['end']['RssAnon'] / 1024**2:.2f} GB, RssFile "
        f"{r['end']['RssFile'] / 1024**2:.2f} GB = libraries + mapped gid maps), VmHWM "
        f"{r['end']['VmHWM'] / 1024**2:.2f} GB; before opening the indexes {r['base']['VmRSS'] / 1024**2:.2f} GB, "
        f"after {r['opened']['VmRSS'] / 1024**2:.2f} GB; load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    line = (
        f"1M x 5: p50 {pct(r['times'], 50):.1f} ms, p95 {pct(r['times'], 95):.1f} ms, fused recall@10 {fused:.3f}, "
        f"search RSS {gb:.2f} GB"
    )
    if args.n != 1_000_000 or len(models) != 5:
        line += f" (measured at {args.n:,} x {len(models)})"
    return line, {"anon_kb": r["end"]["RssAnon"] - r["base"]["RssAnon"], "base_kb": r["base"]["VmRSS"]}


def part_b(args: argparse.Namespace, work: Path) -> tuple[str, float, float]:
    model, n = "dinov2_large", args.big_n
    home = work / "b"
    (home / "embeddings").mkdir(parents=True, exist_ok=True)
    specs = {model: {"dim": DIMS[model], "n": n, "seed": 77}}
    rng = np.random.default_rng(54321)
    listings = rng.choice(n // PER_LISTING, args.big_queries, replace=False)
    q = {model: SyntheticSnapshot(model, DIMS[model], n, 77).queries(listings, 3)}
    policy = policy_from(args)
    print(f"(b) {model} x {n:,} vectors, {args.big_queries} queries; {policy}", flush=True)
    t0 = time.perf_counter()
    truth = build(specs, home, policy, q, args.reuse)
    print(f"  built in {time.perf_counter() - t0:.0f} s", flush=True)
    job = search_job(specs, home, work, "b", q, policy)
    gt = truth[model][1][:, :10]
    for nprobe, cand, rerank, _ in sweep_points(args):  # the same index, searched with other settings
        other = {**policy.__dict__, "nprobe": nprobe, "candidates": cand, "rerank": rerank}
        swept = run_search_process("serve-single", {**job, "policy": other}, work)
        print(
            f"  nprobe {nprobe}, candidates {cand}, rerank {rerank}: p50 {pct(swept['times'], 50):.1f} ms, "
            f"p95 {pct(swept['times'], 95):.1f} ms, recall@10 {_own_recall(swept['ids'], gt):.3f}; "
            f"load {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    r = run_search_process("serve-single", job, work)
    rec = _own_recall(r["ids"], gt)
    bpv = (r["opened"]["RssAnon"] - r["base"]["RssAnon"]) * 1024 / n
    stamp = json.loads((home / "embeddings/search_cache" / f"{model}.ivf.json").read_text())
    files = home / "embeddings/search_cache" / stamp["dir"]
    print(
        f"  index in memory: {bpv:.1f} B/vector (RssAnon growth on opening; ivf file "
        f"{(files / stamp['ivf']).stat().st_size / n:.1f} B/vector); on disk fp16 re-rank vectors "
        f"{(files / 'vec16.bin').stat().st_size / 1e9:.1f} GB; process VmRSS {r['end']['VmRSS'] / 1024**2:.2f} GB "
        f"(RssFile {r['end']['RssFile'] / 1024**2:.2f} GB), p95 {pct(r['times'], 95):.1f} ms; load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    return f"p50 {pct(r['times'], 50):.1f} ms, recall@10 {rec:.3f}, {bpv:.0f} bytes/vector", bpv, r["base"]["VmRSS"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="part (a): vectors per model (0 skips it)")
    ap.add_argument("--models", default=",".join(DIMS), help="part (a): comma-separated subset of the five")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--big-n", type=int, default=10_000_000, help="part (b): dinov2_large vectors (0 skips it)")
    ap.add_argument("--big-queries", type=int, default=150)
    d = IndexPolicy()
    ap.add_argument("--nlist", type=int, default=d.nlist, help="IVF lists (0: auto)")
    ap.add_argument("--m", type=int, default=d.pq_m, help="PQ bytes per vector")
    ap.add_argument("--nprobe", type=int, default=d.nprobe, help="lists probed (0: auto, ivfpq.auto_nprobe)")
    ap.add_argument(
        "--nprobe-sweep", default="", help="also search the built indexes at these nprobe (comma-separated)"
    )
    ap.add_argument(
        "--sweep",
        default="",
        help="also search the built indexes at NPROBE:CANDIDATES:RERANK[:COMPLETE],... settings (part (b) ignores COMPLETE)",
    )
    ap.add_argument("--candidates", type=int, default=d.candidates, help="fast-scan candidates refined in memory")
    ap.add_argument("--rerank", type=int, default=d.rerank, help="refined best re-scored exactly from disk")
    ap.add_argument(
        "--complete", type=int, default=d.complete, help="fused head re-scored exactly in every model (0: off)"
    )
    ap.add_argument("--train-sample", type=int, default=d.train_sample)
    ap.add_argument("--threads", type=int, default=2, help="build threads (search runs single-threaded)")
    ap.add_argument("--work", default=str(ROOT / ".bench_search"), help="scratch directory (deleted at the end)")
    ap.add_argument("--keep", action="store_true", help="keep --work")
    ap.add_argument(
        "--reuse", action="store_true", help="search the indexes a kept --work already holds for the same data"
    )
    ap.add_argument("--serve-ensemble", help=argparse.SUPPRESS)
    ap.add_argument("--serve-single", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_ensemble:
        return serve_ensemble(Path(args.serve_ensemble))
    if args.serve_single:
        return serve_single(Path(args.serve_single))
    faiss.omp_set_num_threads(args.threads)
    work = Path(args.work)
    if not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    print(f"bench/search.py: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    try:
        line_a, a = part_a(args, work) if args.n else (None, None)
        if args.big_n:
            shutil.rmtree(work / "a", ignore_errors=True)
            body, bpv, base_kb = part_b(args, work)
            # 10M x 5: PQ + refinement codes + ids cost the same bytes per vector at every dim (only the centroids grow
            # with it), so dinov2_large's measured figure (the widest model) is used for all five, plus a full
            # exact tail per model (tail_merge x dim x 4 bytes) and the search process's own baseline once.
            tail = sum(IndexPolicy().tail_merge * dim * 4 for dim in DIMS.values())
            total = len(DIMS) * bpv * 10_000_000 + tail + base_kb * 1024
            line_b = f"10M x 1 (dinov2_large): {body}; projected 10M x 5: {total / 1e9:.1f} GB resident"
            if args.big_n != 10_000_000:
                line_b += f" (measured at {args.big_n:,}, not 10M)"
        else:
            line_b = None
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    if line_a:
        print(line_a)
    if line_b:
        print(line_b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
