"""The search side of the embedding store: one index per model, exact when small, compressed when big.

- Vectors are read through the store's READ contract (`snapshots.open_snapshot`: generation, source,
  `iter_chunks`), never by opening the store's files directly, so the store can change underneath.
- Under `SEARCH_INDEX_MIN` vectors (default 50,000) a model is searched EXACTLY from an in-memory copy.
- Above it, through a compressed index DERIVED from a snapshot (ivfpq.py: IVF-PQ and refinement codes in memory, exact
  re-ranking of the best candidates from fp16 vectors on disk), built by `search.py --build-index` or by
  the web server in the background, stored in `embeddings/search_cache/` and stamped with the source and
  generation of the snapshot it was built from.
- Vectors flushed since the index's generation (the snapshot has them, the index does not) form an exact
  in-memory "tail" searched beside it: a flushed vector is searchable at the next refresh (<= 1 s after the
  flush is seen), without any rebuild. When the tail reaches `SEARCH_TAIL_MERGE` vectors, the builder folds
  it into the index's lists (no retraining). A re-embed with other weights (the source changes) or vectors
  removed from the store make the index stale: it is rebuilt whole; meanwhile the model is searched by an
  exact scan of the snapshot (slow but right, memory-bounded), never from other vectors.
- `IndexSet.refresh()` reopens what changed; swaps are whole ModelIndex objects, so a concurrent query sees
  the old or the new state, never half.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import faiss
import numpy as np

from imageselector.db import EMBED_MODELS
from imageselector.search import ivfpq, snapshots
from imageselector.vectorstore.store import MMAP_FLAGS, TEXT_INDEXES, index_ids

log = logging.getLogger(__name__)

ALL_INDEXES: tuple[str, ...] = (*EMBED_MODELS, *TEXT_INDEXES)
CACHE_DIR = "search_cache"
CHUNK = 65536

# Single queries never reach BLAS; batched ones (tail, bench ground truth) are far faster with it low.
faiss.cvar.distance_compute_blas_threshold = 20

__all__ = ["ALL_INDEXES", "TEXT_INDEXES", "IndexPolicy", "IndexSet", "ModelIndex", "index_ids", "read_index"]


@dataclass(frozen=True)
class IndexPolicy:
    """When to build a compressed index and how to build/search it. Defaults measured by bench/search.py."""

    index_min: int = 50_000
    nlist: int = 0  # 0: chosen from the size (ivfpq.auto_nlist: 2048 at 1M vectors, 16384 at 10M)
    pq_m: int = 64  # PQ bytes per vector
    nprobe: int = 0  # 0: ivfpq.auto_nprobe (256; 1/16 of the lists beyond 4096). Fast-scan makes many cheap
    candidates: int = 0  # fast-scan candidates re-scored by the refinement PQ; 0: ivfpq.auto_candidates (2000+)
    rerank: int = 100  # refined best re-scored exactly from the fp16 vectors on disk
    complete: int = 60  # the ensemble's head: listings whose every photo is re-scored exactly in every model
    refine_m: int = 128  # refinement PQ bytes per vector
    train_sample: int = 131_072
    tail_merge: int = 20_000

    @classmethod
    def from_settings(cls, settings) -> IndexPolicy:  # type: ignore[no-untyped-def]
        return cls(
            index_min=settings.get_int("SEARCH_INDEX_MIN", settings.get_int("SEARCH_HNSW_MIN", cls.index_min)),
            nlist=settings.get_int("SEARCH_IVF_NLIST", cls.nlist),
            pq_m=settings.get_int("SEARCH_PQ_M", cls.pq_m),
            nprobe=settings.get_int("SEARCH_NPROBE", cls.nprobe),
            candidates=settings.get_int("SEARCH_CANDIDATES", cls.candidates),
            rerank=settings.get_int("SEARCH_RERANK", cls.rerank),
            complete=settings.get_int("SEARCH_COMPLETE", cls.complete),
            refine_m=settings.get_int("SEARCH_REFINE_M", cls.refine_m),
            train_sample=settings.get_int("SEARCH_TRAIN_SAMPLE", cls.train_sample),
            tail_merge=settings.get_int("SEARCH_TAIL_MERGE", cls.tail_merge),
        )

    def build_params(self) -> ivfpq.BuildParams:
        return ivfpq.BuildParams(nlist=self.nlist, m=self.pq_m, refine_m=self.refine_m, train_sample=self.train_sample)

    def open_compressed(self, cdir: Path, stamp: dict) -> ivfpq.CompressedIndex:
        return ivfpq.CompressedIndex(cdir, stamp, self.nprobe, self.rerank, self.candidates)


# ------------------------------------------------------------------------------------ helpers kept for readers
def file_sig(path: Path) -> tuple[int, int, int] | None:
    """Identity of a file version: a rename-replaced file gets a new inode/mtime."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def read_index(path: Path, mmap: bool = True) -> faiss.Index:
    """Read a FAISS file, memory-mapped where the index type allows it."""
    if mmap:
        try:
            return faiss.read_index(str(path), MMAP_FLAGS)
        except RuntimeError as exc:  # index types without mmap support
            log.debug("mmap read of %s failed (%s); reading into memory", path, exc)
    return faiss.read_index(str(path))


def inner(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index.index) if hasattr(index, "id_map") else index


def reconstruct_positions(index: faiss.Index, positions: np.ndarray) -> np.ndarray:
    """Vectors at storage positions of an (ID-mapped) index, read in contiguous runs."""
    base = inner(index)
    out = np.empty((len(positions), index.d), dtype=np.float32)
    if len(positions) == 0:
        return out
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    start = 0
    for run in np.split(positions, breaks):
        out[start : start + len(run)] = base.reconstruct_n(int(run[0]), len(run))
        start += len(run)
    return out


def read_manifest(embeddings_dir: Path) -> dict:
    try:
        doc = json.loads((Path(embeddings_dir) / "manifest.json").read_text(encoding="utf-8"))
        return doc if isinstance(doc, dict) else {}
    except (FileNotFoundError, ValueError, OSError):
        return {}


def cache_dir(embeddings_dir: Path) -> Path:
    return Path(embeddings_dir) / CACHE_DIR


def remove_index(embeddings_dir: Path, name: str) -> None:
    """Forget a model's compressed index (search.py --build-index --rebuild)."""
    ivfpq.remove(cache_dir(embeddings_dir), name)


# ------------------------------------------------------------------------------------ one model
def _flat(dim: int) -> faiss.Index:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def _merge(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    s = np.concatenate([a[0], b[0]], axis=1)
    i = np.concatenate([a[1], b[1]], axis=1)
    s = np.where(i < 0, -np.inf, s)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


@dataclass
class ModelIndex:
    """One model as searched now: exact (in memory), ivfpq (+ exact tail) or scan (exact, streamed)."""

    name: str
    kind: str  # "exact" | "ivfpq" | "scan"
    dim: int
    key: tuple  # (generation, source, count, stamp) this state was opened at
    main: faiss.Index | ivfpq.CompressedIndex | None = None
    tail: faiss.Index | None = None
    snapshot: object | None = None  # searched exactly ("exact" from the store, "scan")
    needs_build: bool = False
    rebuild: bool = False  # stale: build afresh rather than append the tail
    note: str = ""

    @property
    def count(self) -> int:
        if self.snapshot is not None:
            return int(self.snapshot.count)  # type: ignore[attr-defined]
        main = int(self.main.rows if isinstance(self.main, ivfpq.CompressedIndex) else self.main.ntotal)  # type: ignore[union-attr]
        return main + self.tail_count

    @property
    def tail_count(self) -> int:
        return int(self.tail.ntotal) if self.tail is not None else 0

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query row; ids are -1 where fewer than k exist."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = max(1, int(k))
        if self.snapshot is not None:  # exact, by the store (in place) or streamed
            if hasattr(self.snapshot, "search"):
                return self.snapshot.search(q, k)
            return _scan(self.snapshot, q, k)
        res = self.main.search(q, k)  # type: ignore[union-attr]
        if self.tail is None or self.tail.ntotal == 0:
            return res
        return _merge(res, self.tail.search(q, k), k)

    def exact_by_gid(self, query: np.ndarray, gids: np.ndarray) -> np.ndarray | None:
        """Exact scores of one query with these gids' vectors (NaN where not held), for the ensemble's exact
        re-scoring of its head (completion.py). None where the search is exact already (nothing to correct)."""
        if self.kind != "ivfpq" or not isinstance(self.main, ivfpq.CompressedIndex):
            return None
        q = np.ascontiguousarray(query, dtype=np.float32).reshape(-1)
        out = self.main.exact_by_gid(q, gids)
        if self.tail is not None and self.tail.ntotal:
            for i in np.flatnonzero(np.isnan(out)):
                try:
                    out[i] = float(self.tail.reconstruct(int(gids[i])) @ q)
                except RuntimeError:  # not in the tail either
                    continue
        return out

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "count": self.count,
            "dim": self.dim,
            "tail": self.tail_count,
            "needs_build": self.needs_build,
            "note": self.note,
        }


def _scan(snap, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    best = (np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64))
    for gids, x in snap.iter_chunks(CHUNK):
        s = q @ np.asarray(x, dtype=np.float32).T
        kk = min(k, s.shape[1])
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        best = _merge(best, (np.take_along_axis(s, top, 1), np.asarray(gids)[top]), k)
    return best


def _load_tail(snap, since: int | None, held: Callable[[np.ndarray], np.ndarray]) -> faiss.Index:  # type: ignore[no-untyped-def]
    """An exact in-memory index of the snapshot's vectors that `held` says the index lacks."""
    tail = _flat(int(snap.dim))
    for gids, x in snap.iter_chunks(CHUNK, since_generation=since):
        gids = np.asarray(gids, dtype=np.int64)
        new = ~held(gids)
        if new.any():
            tail.add_with_ids(np.ascontiguousarray(np.asarray(x, dtype=np.float32)[new]), gids[new])
    return tail


def open_model(name: str, embeddings_dir: Path, policy: IndexPolicy, snap=None) -> ModelIndex | None:  # type: ignore[no-untyped-def]
    """Open one model's current state: exact when small, the compressed index + tail when big and current."""
    snap = snap if snap is not None else snapshots.open_snapshot(embeddings_dir, name)
    if snap is None:
        return None
    cdir = cache_dir(embeddings_dir)
    stamp = ivfpq.read_stamp(cdir, name)
    stamp_key = json.dumps(stamp, sort_keys=True) if stamp else None
    key = (snap.generation, snap.source, snap.count, stamp_key, getattr(snap, "version", None))
    if snap.count < policy.index_min:
        note = f"exact ({snap.count} < {policy.index_min})"
        if hasattr(snap, "search"):  # the store searches its own mappings: nothing copied
            return ModelIndex(name, "exact", int(snap.dim), key, snapshot=snap, note=note)
        main = _load_tail(snap, None, lambda g: np.zeros(len(g), bool))
        return ModelIndex(name, "exact", int(snap.dim), key, main, note=note)
    why_scan = (
        "compressed index not built yet"
        if stamp is None
        else "the index was built from another model's vectors, rebuilding"
        if stamp.get("source") != snap.source or int(stamp.get("dim", -1)) != int(snap.dim)
        else None
    )
    if why_scan is not None:
        note = f"exact scan (slow); {why_scan}"
        return ModelIndex(name, "scan", int(snap.dim), key, snapshot=snap, needs_build=True, rebuild=True, note=note)
    main = policy.open_compressed(cdir, stamp)
    return _with_tail(ModelIndex(name, "ivfpq", main.dim, key, main), snap, stamp, policy)


def _with_tail(m: ModelIndex, snap, stamp: dict, policy: IndexPolicy) -> ModelIndex:  # type: ignore[no-untyped-def]
    main: ivfpq.CompressedIndex = m.main  # type: ignore[assignment]
    tail = _load_tail(snap, int(stamp["generation"]), main.contains)
    removed = _removed(snap, int(stamp["generation"]), main.rows + int(tail.ntotal))
    outdated = ivfpq.needs_rebuild(stamp)
    note = (
        f"IVF-PQ nlist={stamp['nlist']} m={stamp['m']} refine_m={stamp.get('refine_m')} nprobe={main.nprobe} "
        f"candidates={main.n_candidates} rerank={policy.rerank}"
    )
    if tail.ntotal:
        note += f" + {tail.ntotal} exact (not yet in the index)"
    if removed > 0:
        note += f"; {removed} vectors left the store since the build: rebuilding"
    if outdated:
        note += f"; {outdated}"
    return replace(
        m,
        tail=tail,
        needs_build=removed > 0 or bool(outdated) or tail.ntotal >= policy.tail_merge,
        rebuild=removed > 0 or bool(outdated),
        note=note,
        key=(snap.generation, snap.source, snap.count, m.key[3], getattr(snap, "version", None)),
    )


def _removed(snap, generation: int, held: int) -> int:  # type: ignore[no-untyped-def]
    """How many indexed vectors the store no longer has: its tombstones when it knows, else by count."""
    gone = snap.removed_since(generation) if hasattr(snap, "removed_since") else None
    by_count = held - int(snap.count)
    return max(len(gone), by_count) if gone is not None else by_count


def update_index(
    name: str,
    embeddings_dir: Path,
    policy: IndexPolicy,
    tmp_dir: Path | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    rebuild: bool = False,
) -> int:
    """Bring one model's compressed index up to its snapshot. Returns vectors added (-1: stopped, 0: current).

    Appends the vectors the index lacks (no retraining) when the index is current otherwise; builds afresh
    when there is none, it is stale (other source/dim, vectors removed) or `rebuild` is asked.
    """
    snap = snapshots.open_snapshot(embeddings_dir, name)
    if snap is None or snap.count < policy.index_min:
        return 0
    cdir = cache_dir(embeddings_dir)
    tmp = tmp_dir or Path(embeddings_dir).parent / ".tmp"  # the data home's .tmp
    tmp.mkdir(parents=True, exist_ok=True)
    stamp = ivfpq.read_stamp(cdir, name)
    current = stamp is not None and stamp.get("source") == snap.source and stamp["dim"] == snap.dim
    if not rebuild and current and not ivfpq.needs_rebuild(stamp):
        held = ivfpq.HeldGids(cdir, stamp)  # membership only: the codes a search needs are not loaded here
        tail = _load_tail(snap, int(stamp["generation"]), held.contains)
        if _removed(snap, int(stamp["generation"]), held.rows + int(tail.ntotal)) <= 0:  # fold the tail in
            if tail.ntotal == 0:
                return 0
            vecs = tail.index.reconstruct_n(0, tail.ntotal) if tail.ntotal else None
            ivfpq.append(cdir, name, index_ids(tail), vecs, snap.generation, tmp)
            log.info("%s: %d new vectors added to the compressed index", name, tail.ntotal)
            return int(tail.ntotal)
    log.info("%s: building the compressed index from %d vectors", name, snap.count)
    stamp = ivfpq.build(snap, name, cdir, policy.build_params(), tmp, should_stop)
    return -1 if stamp is None else int(stamp["rows"])


class IndexSet:
    """Every index of the store, opened once and brought up to date as the store's generation moves.

    `refresh()` is cheap when nothing changed (opening a snapshot reads the manifest; at most every `check_s`)
    and runs before each query.
    """

    def __init__(
        self, embeddings_dir: Path, policy: IndexPolicy | None = None, names: Iterable[str] = ALL_INDEXES
    ) -> None:
        self.dir = Path(embeddings_dir)
        self.policy = policy or IndexPolicy()
        self.names = tuple(names)
        self.models: dict[str, ModelIndex] = {}
        self.manifest: dict = {}
        self.errors: dict[str, str] = {}
        self._checked = 0.0
        self._lock = threading.RLock()
        self.version = 0  # bumps whenever something was reopened

    def _stamp_key(self, name: str) -> str | None:
        stamp = ivfpq.read_stamp(cache_dir(self.dir), name)
        return json.dumps(stamp, sort_keys=True) if stamp else None

    def _refresh_one(self, name: str, force: bool) -> bool:
        snap = snapshots.open_snapshot(self.dir, name)
        cur = self.models.get(name)
        if snap is None:
            if cur is not None:
                del self.models[name]
                return True
            return False
        stamp_key = self._stamp_key(name)
        key = (snap.generation, snap.source, snap.count, stamp_key, getattr(snap, "version", None))
        if cur is not None and cur.key == key and not force:
            return False
        if (
            cur is not None
            and not force
            and cur.kind == "ivfpq"
            and cur.key[1] == snap.source
            and cur.key[3] == stamp_key
            and snap.count >= self.policy.index_min
        ):  # only new vectors: extend the tail, keep the index
            stamp = json.loads(stamp_key) if stamp_key else {}
            self.models[name] = _with_tail(cur, snap, stamp, self.policy)
            return True
        m = open_model(name, self.dir, self.policy, snap)
        if m is None:
            self.models.pop(name, None)
        else:
            self.models[name] = m
        return True

    def refresh(self, force: bool = False, check_s: float = 1.0) -> list[str]:
        """Reopen or extend indexes whose snapshot or stamp changed. Returns the names changed (or dropped)."""
        now = time.monotonic()
        if not force and now - self._checked < check_s:
            return []
        with self._lock:
            self._checked = now
            self.manifest = read_manifest(self.dir)
            changed = []
            for name in self.names:
                try:
                    if self._refresh_one(name, force):
                        changed.append(name)
                    self.errors.pop(name, None)
                except (RuntimeError, OSError, ValueError) as exc:  # a corrupt/partial file: keep the old state
                    msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                    self.errors[name] = f"cannot read {name}.faiss: {msg}"
                    log.warning("%s", self.errors[name])
            if changed:
                self.version += 1
                log.info(
                    "indexes opened: %s", ", ".join(f"{n}={self.models[n].kind}" for n in changed if n in self.models)
                )
            return changed

    def get(self, name: str) -> ModelIndex | None:
        return self.models.get(name)

    def reopen(self, name: str) -> None:
        with self._lock:
            m = open_model(name, self.dir, self.policy)
            if m is None:
                self.models.pop(name, None)
            else:
                self.models[name] = m
            self.version += 1

    def needing_build(self) -> list[str]:
        return [n for n, m in self.models.items() if m.needs_build]

    def build_caches(
        self,
        names: Iterable[str] | None = None,
        tmp_dir: Path | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> dict[str, int]:
        """Build or update the compressed indexes of big models, then reopen them. Returns vectors added."""
        done: dict[str, int] = {}
        for name in names if names is not None else self.needing_build():
            cur = self.models.get(name)
            done[name] = update_index(
                name, self.dir, self.policy, tmp_dir, should_stop, rebuild=bool(cur and cur.rebuild)
            )
            if done[name] < 0:
                break
            self.reopen(name)
        return done
