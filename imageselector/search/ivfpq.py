"""The compressed search index of one model: IVF-PQ fast-scan codes and 8-bit PQ refinement codes in memory,
exact re-ranking of the very best from fp16 vectors read from disk.

Why this shape (issue 15: 10M images x 5 models on a 16-32 GB Mac), in three stages per query:
1. Candidates: FAISS IndexIVFPQFastScan (inner product, `m` bytes = 2m four-bit sub-quantizers, 8-byte row id
   per vector in its inverted list), `nprobe` lists probed, the best `candidates` (default 2000) kept. 4-bit
   codes scanned with SIMD were measured 3.5-17x faster than plain IVFPQ, so a query can probe many lists.
2. Refinement in memory: the candidates are re-scored with a finer product quantizer (`refine_m` bytes, 8 bits
   per sub-quantizer: 128 B at every dimension): FAISS's IndexRefine with an IndexPQ as the refining index,
   whose table lookups run in C++ (numpy's took 21 ms for 4000 candidates at 1024-d, this 9 ms). Measured at
   500k x 1024-d: taking the refined top 100 of 1000 candidates loses none of the exact top-10 that the
   candidates held, where the 4-bit scores alone need all 1000.
3. Exact re-ranking of the refined best `rerank` (default 100) against the fp16 vectors in `vec16.bin`, read
   with pread (DiskANN's full-precision vectors on SSD): 100 reads of 2 KB per model per query, where the
   previous layout read 1000 through a memory map, which cost page faults and put the touched pages in the
   process's RSS. Results past `rerank` keep their refined scores (close to exact), ranked with the exact ones.
Memory per vector: m + 8 + refine_m (64 + 8 + 128 = 200 B at the defaults) plus the row -> gid map on disk.

Training is k-means on a sample (2 cores: numpy's BLAS is ~4x faster than faiss's bundled one here), so a
build costs two passes over the snapshot. Each vector goes to its exact nearest centroid (one BLAS product
per chunk: about 400 s for 10M x 4096 lists x 1024-d here). Until 2026-11-30 a PCA-128 shortlist of 8
centroids chose it, which put many vectors in the wrong list wherever the lists differ in directions the top
128 components do not hold (topics spread over all 1024 dims): a query then never probed their list, and at
1M vectors probing 3% of the lists found 0.835 of the exact top-10 instead of 0.956. A stamp without
`"assign": "exact"` is such an index: it still serves, and is rebuilt in the background (`needs_rebuild`).

Files, all under `search_cache/`: `{name}.ivf.json` (the stamp: source + generation + rows + which files),
and the directory it names, `{name}.<token>/` with `ivf.<v>.faiss`, `refine.npy` (the refining PQ's
codebook), `refine.bin` (its codes, row order), `vec16.bin`, `gids.bin` (row -> gid), `sorted.<v>.npy` (the
gids sorted, for membership tests) and `order.<v>.npy` (the row of each sorted gid, for exact scores by gid;
an index written before it existed computes it in memory). A build writes a fresh hidden directory, renames
it into place, then replaces the stamp: the stamp is the commit, so a kill -9 at any instant leaves the old index or the new one.
An incremental update appends rows to `refine.bin`/`vec16.bin`/`gids.bin` (beyond the stamp's `rows`, which
readers never look past), writes a new `ivf.<v+1>`/`sorted.<v+1>`/`order.<v+1>`, then the stamp. An index of an earlier
format (`ivfpq-rerank-1`, no refinement codes) reads as absent: the model is scanned exactly meanwhile and
the index rebuilt in the background.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from imageselector.fsutil import atomic_write_text

log = logging.getLogger(__name__)

FORMAT = "ivfpq-refine-2"
ROW_FILES = ("refine.bin", "vec16.bin", "gids.bin")  # appended in row order, truncated to the stamp
ASSIGN_CHUNK = 8192
ASSIGN = "exact"  # the stamp's "assign": how vectors were put in lists (older stamps: a PCA-128 shortlist)
PQ_TRAIN = 32768
REFINE_TRAIN = 16384  # 64 points per code of the 8-bit refinement PQ
NBITS = 4  # PQ fast-scan: 16 centroids per sub-quantizer, scanned with SIMD lookups


@dataclass(frozen=True)
class BuildParams:
    """How to build. nlist 0: chosen from the size (`auto_nlist`); the k-means sample grows to
    KMEANS_PER_LIST points per list when `train_sample` is smaller."""

    nlist: int = 0
    m: int = 64  # PQ bytes per vector (2 x m four-bit sub-quantizers)
    refine_m: int = 128  # refinement PQ bytes per vector (8-bit sub-quantizers)
    train_sample: int = 131_072
    kmeans_iters: int = 8
    seed: int = 1234


NLIST_MAX = 16384
NPROBE_MIN = 256
CANDIDATES_MIN = 2000
KMEANS_PER_LIST = 20  # training points per list at least (faiss warns under 39; 20 measured enough here)


def auto_nlist(n: int) -> int:
    """Lists for n vectors: a power of two near max(2*sqrt(n), n/512), 16..16384.

    Up to ~1M vectors this is the former 2*sqrt(n). Beyond it lists keep ~500-600 vectors each, since what
    limits recall at 10M is the partition: on bench/search.py's catalogue at 1M with 10M's vectors per
    topic, probing 6.25 % of the lists found 0.879 of the exact top-10 with ~2,400 vectors a list (10M in
    4096 lists, the former cap), 0.971 with ~600 and 0.991 with ~300, for about the same codes scanned."""
    target = max(2.0 * np.sqrt(max(n, 1)), n / 512)
    nlist = int(2 ** round(np.log2(max(target, 16))))
    return int(max(16, min(NLIST_MAX, nlist, max(16, n // 39))))


def auto_candidates(nprobe: int) -> int:
    """Fast-scan candidates kept when not set: 2000, or 3 per probed list beyond (3072 at nprobe 1024).

    More lists probed means more codes competing for the same places: at 10M (1024 of 16384 lists, ~625k
    codes) 2000 candidates found 0.949 of the exact top-10, 3000 0.955, for about 1 ms more."""
    return int(max(CANDIDATES_MIN, 3 * nprobe))


def auto_nprobe(nlist: int) -> int:
    """Lists probed when not set: 256, or 1/16 of the lists beyond 4096 (1024 of 16384 at 10M vectors)."""
    return int(min(nlist, max(NPROBE_MIN, nlist // 16)))


def pq_m(dim: int, wanted: int) -> int:
    """The largest even sub-quantizer count <= wanted that divides dim (fast-scan packs them in pairs)."""
    for m in range(min(wanted, dim) // 2 * 2, 0, -2):
        if dim % m == 0:
            return m
    raise ValueError(f"no even number of sub-quantizers divides dim {dim}")


def refine_m(dim: int, wanted: int) -> int:
    """The largest sub-quantizer count <= wanted that divides dim (the refinement PQ: one byte each)."""
    return next(m for m in range(min(wanted, dim), 0, -1) if dim % m == 0)


class Refiner:
    """The 8-bit refinement PQ: codebook (m, 256, dim/m); encodes with FAISS (the search scores with an IndexPQ
    over the same codebook)."""

    def __init__(self, codebook: np.ndarray) -> None:
        self.codebook = np.ascontiguousarray(codebook, dtype=np.float32)
        self.m, self.ksub, self.dsub = self.codebook.shape
        self.pq = faiss.ProductQuantizer(self.m * self.dsub, self.m, 8)
        faiss.copy_array_to_vector(self.codebook.ravel(), self.pq.centroids)

    @classmethod
    def train(cls, sample: np.ndarray, m: int) -> Refiner:
        pq = faiss.ProductQuantizer(sample.shape[1], m, 8)
        pq.verbose = False
        pq.cp.niter = 10  # measured: 16k points x 10 iterations trains in 8 s at 1024-d, 32k x 25 in 37 s
        pq.train(np.ascontiguousarray(sample[:REFINE_TRAIN], dtype=np.float32))
        return cls(faiss.vector_to_array(pq.centroids).reshape(m, pq.ksub, pq.dsub))

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self.pq.compute_codes(np.ascontiguousarray(x, dtype=np.float32))


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def spherical_kmeans(x: np.ndarray, k: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Unit centroids maximising inner product (numpy matmul; empty clusters re-seeded from random points)."""
    c = _unit(x[rng.choice(len(x), k, replace=False)].astype(np.float32))
    for _ in range(iters):
        a = _argmax_dot(x, c)
        order = np.argsort(a, kind="stable")
        counts = np.bincount(a, minlength=k)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        nonempty = counts > 0
        sums = np.zeros_like(c)
        sums[nonempty] = np.add.reduceat(x[order], starts[nonempty], axis=0)
        empty = np.flatnonzero(~nonempty)
        if len(empty):
            sums[empty] = x[rng.choice(len(x), len(empty), replace=False)]
        c = _unit(sums)
    return c


def _argmax_dot(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The nearest centroid of each row, in chunks whose score matrix stays under 128 MB (16384 lists: 2048 rows)."""
    out = np.empty(len(x), np.int64)
    step = max(256, min(ASSIGN_CHUNK, (1 << 25) // max(1, len(c))))
    for s in range(0, len(x), step):
        out[s : s + step] = np.argmax(x[s : s + step] @ c.T, axis=1)
    return out


# ------------------------------------------------------------------------------------------------ stamp / files
def needs_rebuild(stamp: dict) -> str | None:
    """Why a readable index should be rebuilt whole (it serves meanwhile), or None."""
    if stamp.get("assign") != ASSIGN:
        return "its lists were assigned through a PCA shortlist (found fewer neighbours): rebuilding"
    return None


def stamp_path(cache_dir: Path, name: str) -> Path:
    return Path(cache_dir) / f"{name}.ivf.json"


def read_stamp(cache_dir: Path, name: str) -> dict | None:
    try:
        doc = json.loads(stamp_path(cache_dir, name).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError, OSError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return None
    return doc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_faiss(index: faiss.Index, path: Path) -> None:
    with open(path, "wb") as f:
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))
        f.flush()
        os.fsync(f.fileno())


def _write_npy(arr: np.ndarray, path: Path) -> None:
    with open(path, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())


def _commit_stamp(cache_dir: Path, name: str, stamp: dict, tmp_dir: Path) -> None:
    atomic_write_text(stamp_path(cache_dir, name), json.dumps(stamp, indent=1), tmp_dir)


def collect_garbage(cache_dir: Path, name: str) -> None:
    """Remove this index's directories and file versions the stamp does not name (open readers keep theirs)."""
    stamp = read_stamp(cache_dir, name)
    keep = stamp["dir"] if stamp else None
    for p in Path(cache_dir).glob(f"{name}.*"):
        if p.is_dir() and p.name != keep and (p.name.startswith(f"{name}.") and p.suffix != ".json"):
            shutil.rmtree(p, ignore_errors=True)
    for p in Path(cache_dir).glob(f".{name}.building-*"):
        if not _alive(p.name.rsplit("-", 2)[-2]):  # another live builder's work is not garbage
            shutil.rmtree(p, ignore_errors=True)
    for legacy in (f"{name}.hnsw.faiss", f"{name}.hnsw.json"):  # the HNSW caches this index replaces
        (Path(cache_dir) / legacy).unlink(missing_ok=True)
    if stamp:
        live = {stamp["ivf"], stamp["sorted"], stamp.get("order"), "refine.npy", *ROW_FILES}
        for p in (Path(cache_dir) / keep).iterdir():
            if p.name not in live:
                p.unlink(missing_ok=True)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def remove(cache_dir: Path, name: str) -> None:
    """Forget this index (the stamp first, so no reader opens a half-removed one)."""
    stamp_path(cache_dir, name).unlink(missing_ok=True)
    collect_garbage(cache_dir, name)


# ------------------------------------------------------------------------------------------------ build
def _sample(snap, want: int, rng: np.random.Generator, chunk: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    p = min(1.0, want / max(1, snap.count))
    parts = []
    for _, x in snap.iter_chunks(chunk):
        keep = rng.random(len(x)) < p
        parts.append(np.ascontiguousarray(x[keep], dtype=np.float32))
    return np.concatenate(parts) if parts else np.empty((0, snap.dim), np.float32)


def build(
    snap,  # type: ignore[no-untyped-def]  # a Snapshot (see snapshots.py)
    name: str,
    cache_dir: Path,
    params: BuildParams,
    tmp_dir: Path,
    should_stop: Callable[[], bool] = lambda: False,
    chunk: int = 65536,
) -> dict | None:
    """Build the whole index from a snapshot and commit it. Returns the new stamp (None: stopped)."""
    t0 = time.monotonic()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(params.seed)
    d, n = int(snap.dim), int(snap.count)
    generation, source = int(snap.generation), snap.source
    nlist = params.nlist or auto_nlist(n)
    sample = _sample(snap, max(params.train_sample, KMEANS_PER_LIST * nlist), rng, chunk)
    if should_stop():
        return None
    nlist = max(1, min(nlist, len(sample)))
    centroids = spherical_kmeans(sample, nlist, params.kmeans_iters, rng)
    t_km = time.monotonic() - t0
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(centroids)
    sub = pq_m(d, 2 * params.m)  # 4-bit sub-quantizers: two per byte
    index = faiss.IndexIVFPQ(quantizer, d, nlist, sub, NBITS, faiss.METRIC_INNER_PRODUCT)
    index.cp.verbose = False
    index.do_polysemous_training = False  # polysemous codes are not used; their training costs minutes
    # The quantizer is trained already: this trains the PQ on residuals. faiss keeps at most 256 points per
    # code (16 x 256 for 4 bits), so a 32k slice loses nothing and spares assigning the whole sample again.
    index.train(sample[:PQ_TRAIN])
    refiner = Refiner.train(sample[:PQ_TRAIN], refine_m(d, params.refine_m))
    del sample
    work = cache_dir / f".{name}.building-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    work.mkdir()
    rows = 0
    gid_parts: list[np.ndarray] = []
    np.save(work / "refine.npy", refiner.codebook)
    with (
        open(work / "refine.bin", "wb") as fr,
        open(work / "vec16.bin", "wb") as fv,
        open(work / "gids.bin", "wb") as fg,
    ):
        for gids, x in snap.iter_chunks(chunk):
            if should_stop():
                shutil.rmtree(work, ignore_errors=True)
                return None
            x = np.ascontiguousarray(x, dtype=np.float32)
            gids = np.ascontiguousarray(gids, dtype=np.int64)
            _add(index, centroids, x, rows)
            fr.write(refiner.encode(x).tobytes())
            fv.write(x.astype(np.float16).tobytes())
            fg.write(gids.tobytes())
            gid_parts.append(gids)
            rows += len(x)
        for f in (fr, fv, fg):
            f.flush()
            os.fsync(f.fileno())
    all_gids = np.concatenate(gid_parts) if gid_parts else np.empty(0, np.int64)
    index = faiss.IndexIVFPQFastScan(index)  # same codes, laid out for SIMD scanning (~5x faster here)
    _write_faiss(index, work / "ivf.1.faiss")
    order = np.argsort(all_gids, kind="stable")
    _write_npy(all_gids[order], work / "sorted.1.npy")
    _write_npy(order.astype(np.int64), work / "order.1.npy")
    _fsync_dir(work)
    final = cache_dir / f"{name}.{uuid.uuid4().hex[:12]}"
    os.rename(work, final)
    _fsync_dir(cache_dir)
    stamp = {
        "format": FORMAT,
        "name": name,
        "source": source,
        "generation": generation,
        "dim": d,
        "rows": rows,
        "nlist": nlist,
        "m": sub * NBITS // 8,
        "sub": sub,
        "refine_m": refiner.m,
        "nbits": NBITS,
        "assign": ASSIGN,
        "dir": final.name,
        "ivf": "ivf.1.faiss",
        "sorted": "sorted.1.npy",
        "order": "order.1.npy",
        "version": 1,
        "built_at": time.time(),
        "build_s": round(time.monotonic() - t0, 1),
        "train_s": round(t_km, 1),
    }
    _commit_stamp(cache_dir, name, stamp, tmp_dir)
    collect_garbage(cache_dir, name)
    log.info(
        "%s: IVF-PQ index of %d vectors built in %.0f s (nlist %d, %d x 4 bits, refined by %d x 8 bits)",
        name,
        rows,
        stamp["build_s"],
        nlist,
        sub,
        refiner.m,
    )
    return stamp


def _add(index: faiss.IndexIVFPQ, centroids: np.ndarray, x: np.ndarray, first_row: int) -> None:
    """Put rows in their exact nearest list (the same choice faiss's flat quantizer makes when appending)."""
    a = np.ascontiguousarray(_argmax_dot(x, centroids), dtype=np.int64)
    ids = np.arange(first_row, first_row + len(x), dtype=np.int64)
    index.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(a))


def append(cache_dir: Path, name: str, gids: np.ndarray, vecs: np.ndarray, generation: int, tmp_dir: Path) -> dict:
    """Add vectors to the committed index without retraining (the tail folded into the lists)."""
    stamp = read_stamp(cache_dir, name)
    if stamp is None:
        raise FileNotFoundError(f"{name}: no index to append to")
    d = Path(cache_dir) / stamp["dir"]
    index = faiss.read_index(str(d / stamp["ivf"]))
    x = np.ascontiguousarray(vecs, dtype=np.float32)
    gids = np.ascontiguousarray(gids, dtype=np.int64)
    rows = int(stamp["rows"])
    # a tail is small: faiss assigns it to the trained centroids and encodes it, no retraining
    index.add_with_ids(x, np.arange(rows, rows + len(x), dtype=np.int64))
    refiner = Refiner(np.load(d / "refine.npy"))
    for fname, data, width in (
        ("refine.bin", refiner.encode(x), refiner.m),
        ("vec16.bin", x.astype(np.float16), 2 * index.d),
        ("gids.bin", gids, 8),
    ):
        with open(d / fname, "r+b") as f:
            f.truncate(rows * width)  # drop rows an interrupted append left beyond the stamp
            f.seek(rows * width)
            f.write(data.tobytes())
            f.flush()
            os.fsync(f.fileno())
    v = int(stamp["version"]) + 1
    all_gids = np.fromfile(d / "gids.bin", dtype=np.int64, count=rows + len(x))
    order = np.argsort(all_gids, kind="stable")
    _write_faiss(index, d / f"ivf.{v}.faiss")
    _write_npy(all_gids[order], d / f"sorted.{v}.npy")
    _write_npy(order.astype(np.int64), d / f"order.{v}.npy")
    _fsync_dir(d)
    new = {**stamp, "rows": rows + len(x), "version": v, "ivf": f"ivf.{v}.faiss", "sorted": f"sorted.{v}.npy"}
    new["order"] = f"order.{v}.npy"
    new["generation"] = int(generation)
    _commit_stamp(cache_dir, name, new, tmp_dir)
    collect_garbage(cache_dir, name)
    return new


# ------------------------------------------------------------------------------------------------ search
def _pread_rows(fd: int, rows: np.ndarray, width: int) -> np.ndarray:
    """Rows (sorted) of a fixed-width file, by pread: nothing mapped, so the process owns none of the file's
    pages (the page cache keeps the hot ones, reclaimable). Adjacent rows are read in one call."""
    out = bytearray(len(rows) * width)
    if len(rows):
        firsts = np.concatenate([[0], np.flatnonzero(np.diff(rows) != 1) + 1])
        lengths = np.diff(np.append(firsts, len(rows)))
        for at, row, n in zip(firsts.tolist(), rows[firsts].tolist(), lengths.tolist(), strict=True):
            got = os.pread(fd, n * width, row * width)  # os.pread: every Unix (preadv is missing on some macOS)
            if len(got) != n * width:
                raise OSError(f"short read at row {row}: {len(got)} of {n * width} bytes")
            out[at * width : (at + n) * width] = got
    return np.frombuffer(out, dtype=np.uint8).reshape(len(rows), width)


def _compact_quantizer(index: faiss.Index) -> faiss.Index:
    """Rank the lists with 8-bit centroids instead of float32 ones (swapped in at open; the file keeps float32).

    Every query reads all centroids: 64 MB at 16384 lists x 1024-d, 7.9 ms a query here, memory-bound, half
    of part (b)'s whole search at 10M. 8-bit codes read a quarter of that. They order the lists to probe and
    give each list's offset (query . centroid) to its 4-bit candidate scores; the refinement and the exact
    re-rank do not use them, and appends still assign with the file's float32 centroids. Measured at 10M:
    the same recall@10 (0.949), p50 19.3 -> 14.4 ms. Returns the new quantizer, which the caller keeps
    alive (the IVF no longer owns it)."""
    ivf = faiss.extract_index_ivf(index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    sq = faiss.IndexScalarQuantizer(ivf.d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    sq.train(centroids)
    sq.add(centroids)
    old = ivf.quantizer
    old.thisown = ivf.own_fields  # Python frees the float32 centroids once the IVF lets go of them
    ivf.own_fields = False
    ivf.quantizer = sq
    return sq


class HeldGids:
    """Which gids a committed index holds, and their rows: the memory-mapped `gids.bin`, `sorted.<v>.npy` and
    `order.<v>.npy` (an index written before `order` existed sorts the gids in memory on first use). The
    builder checks membership with this alone, without loading the codes a search needs."""

    def __init__(self, cache_dir: Path, stamp: dict) -> None:
        d = Path(cache_dir) / stamp["dir"]
        self.rows = int(stamp["rows"])
        self.gids = np.memmap(d / "gids.bin", dtype=np.int64, mode="r", shape=(self.rows,))
        self.sorted = np.load(d / stamp["sorted"], mmap_mode="r")
        self._order = np.load(d / stamp["order"], mmap_mode="r") if stamp.get("order") else None

    def _positions(self, gids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.minimum(np.searchsorted(self.sorted, gids), self.rows - 1)
        return pos, np.asarray(self.sorted[pos]) == gids

    def contains(self, gids: np.ndarray) -> np.ndarray:
        """Which of these gids the index holds (binary search in the sorted gids)."""
        gids = np.asarray(gids, dtype=np.int64)
        if self.rows == 0 or len(gids) == 0:
            return np.zeros(len(gids), bool)
        return self._positions(gids)[1]

    def rows_of(self, gids: np.ndarray) -> np.ndarray:
        """The row of each gid, -1 where the index does not hold it."""
        gids = np.asarray(gids, dtype=np.int64)
        if self.rows == 0 or len(gids) == 0:
            return np.full(len(gids), -1, np.int64)
        if self._order is None:
            self._order = np.argsort(np.asarray(self.gids), kind="stable")
        pos, hit = self._positions(gids)
        return np.where(hit, np.asarray(self._order[pos]), -1)


class CompressedIndex:
    """An opened index: search returns (scores, gids); the best `rerank` carry exact inner products."""

    def __init__(self, cache_dir: Path, stamp: dict, nprobe: int, rerank: int, candidates: int = 0) -> None:
        d = Path(cache_dir) / stamp["dir"]
        self.stamp = stamp
        self.dim = int(stamp["dim"])
        self.rows = int(stamp["rows"])
        self.ivf = faiss.read_index(str(d / stamp["ivf"]))
        if int(self.ivf.ntotal) != self.rows:
            raise RuntimeError(f"{d / stamp['ivf']} holds {self.ivf.ntotal} vectors, the stamp says {self.rows}")
        self._coarse = _compact_quantizer(self.ivf)
        self.refiner = Refiner(np.load(d / "refine.npy"))
        self.codes_index = self._load_codes(d / "refine.bin")
        # stages 1 and 2 in C++: FAISS's IndexRefine asks the fast-scan index for k * k_factor candidates and
        # re-scores them with the 8-bit PQ (measured 2.4x faster than numpy's table lookups at 4000 candidates)
        self.refined = faiss.IndexRefine(self.ivf, self.codes_index)
        self._vec_file = open(d / "vec16.bin", "rb")  # noqa: SIM115 - held for the life of the index
        if os.fstat(self._vec_file.fileno()).st_size < self.rows * 2 * self.dim:
            raise RuntimeError(f"{d / 'vec16.bin'} is shorter than the stamp's {self.rows} rows")
        self.held = HeldGids(cache_dir, stamp)
        self.gids = self.held.gids
        self.nprobe = int(nprobe) or auto_nprobe(int(stamp["nlist"]))  # 0: chosen from the lists
        self.rerank = max(1, int(rerank))
        self.n_candidates = int(candidates) or auto_candidates(self.nprobe)  # 0: chosen from the probes

    def _load_codes(self, path: Path) -> faiss.IndexPQ:
        """The refinement codes, read straight into an IndexPQ's own storage (one copy in memory)."""
        m = self.refiner.m
        index = faiss.IndexPQ(self.dim, m, 8, faiss.METRIC_INNER_PRODUCT)
        faiss.copy_array_to_vector(self.refiner.codebook.ravel(), index.pq.centroids)
        index.is_trained = True
        index.codes.resize(self.rows * m)
        if self.rows:
            view = faiss.rev_swig_ptr(index.codes.data(), self.rows * m)
            with open(path, "rb") as f:
                got = f.readinto(memoryview(view))
            if got != self.rows * m:
                raise RuntimeError(f"{path} is shorter than the stamp's {self.rows} rows")
        index.ntotal = self.rows
        return index

    def close(self) -> None:
        self._vec_file.close()

    def __del__(self) -> None:  # a replaced index is dropped, not closed, by IndexSet
        if hasattr(self, "_vec_file"):  # __init__ may have failed before opening it
            self.close()

    def contains(self, gids: np.ndarray) -> np.ndarray:
        return self.held.contains(gids)

    def exact_by_gid(self, q: np.ndarray, gids: np.ndarray) -> np.ndarray:
        """Exact inner products of one query with these gids' vectors; NaN where the index lacks a gid."""
        rows = self.held.rows_of(gids)
        out = np.full(len(rows), np.nan, np.float32)
        held = np.flatnonzero(rows >= 0)
        if len(held):
            order = np.argsort(rows[held], kind="stable")
            got = self.exact(np.asarray(q, np.float32).reshape(-1), rows[held][order])
            out[held[order]] = got
        return out

    def refine(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Stages 1-2: (refined scores, rows) of the best k of `candidates` fast-scan candidates, per query."""
        k = min(max(1, int(k)), max(1, self.rows))
        params = faiss.IndexRefineSearchParameters(
            k_factor=max(1.0, self.n_candidates / k),
            base_index_params=faiss.SearchParametersIVF(nprobe=min(self.nprobe, int(self.ivf.nlist))),
        )
        return self.refined.search(q, k, params=params)

    def exact(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Exact inner products of one query with these rows (sorted), read from vec16.bin."""
        raw = _pread_rows(self._vec_file.fileno(), rows, 2 * self.dim)
        return raw.view(np.float16).astype(np.float32) @ q

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = max(1, int(k))
        scores = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        if self.rows == 0:
            return scores, ids
        ref_s, ref_r = self.refine(q, max(k, self.rerank))
        for i in range(len(q)):
            ok = ref_r[i] >= 0
            refined, rows = ref_s[i][ok], ref_r[i][ok]
            if len(rows) == 0:
                continue
            top = np.sort(rows[: self.rerank])  # sorted: the reads go forward through the file
            exact = self.exact(q[i], top)
            # past the exact ones: refined scores (close to exact), ranked with them
            s = np.concatenate([exact, refined[self.rerank :]]).astype(np.float32)
            r = np.concatenate([top, rows[self.rerank :]])
            best = np.argsort(-s, kind="stable")[:k]
            s, r = s[best], r[best]
            scores[i, : len(s)] = s
            ids[i, : len(r)] = self.gids[r]
        return scores, ids
