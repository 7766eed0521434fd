"""The search side of the FAISS store: open each index once, pick exact or HNSW by size, reload on change.

- The canonical vectors are the embedding store (embeddings/{name}/, segments + manifest, written by
  embed.py), read through `store.open_snapshot`: the segments are memory-mapped, so a million vectors
  cost page cache, not private memory, and exact search runs on the mappings. The HNSW caches are mapped
  (their fp16 vectors; the graph links are read into memory).
- Under `SEARCH_HNSW_MIN` vectors an index is searched exactly (flat). Above it, an HNSW graph with fp16
  vector storage (IndexHNSWSQ, QT_fp16) is DERIVED from the canonical file into
  `embeddings/search_cache/{name}.hnsw.faiss` (`search.py --build-index`, or the web server in the
  background). The canonical file stays the truth; the cache is disposable.
- Vectors embedded after the cache was built (ids in the canonical file but not in the cache) form a
  small exact "tail" searched beside the graph, so results are complete before the cache catches up.
  A cache holding ids the canonical file no longer has is stale: it is ignored (exact search) until rebuilt.
  So is one built from another model's vectors: beside each cache, `{name}.hnsw.json` records the manifest's
  `source` of the vectors it was built from; when a model is re-embedded with other weights (same ids, new
  vectors), the manifest's source changes and the cache is rebuilt, which the ids alone could not tell.
- A snapshot stays readable while embed.py commits and compacts (store.py); `IndexSet.refresh()` notices a
  new store manifest and reopens what changed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from imageselector.db import EMBED_MODELS
from imageselector.fsutil import atomic_write_text
from imageselector.vectorstore.store import MANIFEST, MMAP_FLAGS, TEXT_SUFFIX, index_ids, open_snapshot, write_index

log = logging.getLogger(__name__)

TEXT_INDEXES: tuple[str, ...] = ("clip_vitb32_text", "clip_vitl14_text")
ALL_INDEXES: tuple[str, ...] = (*EMBED_MODELS, *TEXT_INDEXES)
CACHE_DIR = "search_cache"
# One definition of the mmap flags (see store.MMAP_FLAGS): they also map IndexScalarQuantizer inside HNSWSQ.
ADD_CHUNK = 20_000

# Single queries never reach BLAS; batched ones (tail, bench ground truth) are far faster with it low.
faiss.cvar.distance_compute_blas_threshold = 20


@dataclass(frozen=True)
class IndexPolicy:
    """When to use HNSW and how to build/search it. Defaults measured by bench/search.py."""

    hnsw_min: int = 50_000
    m: int = 48
    ef_construction: int = 160
    ef_search: int = 256
    fp16: bool = True

    @classmethod
    def from_settings(cls, settings) -> IndexPolicy:  # type: ignore[no-untyped-def]
        return cls(
            hnsw_min=settings.get_int("SEARCH_HNSW_MIN", cls.hnsw_min),
            m=settings.get_int("SEARCH_HNSW_M", cls.m),
            ef_construction=settings.get_int("SEARCH_HNSW_EF_CONSTRUCTION", cls.ef_construction),
            ef_search=settings.get_int("SEARCH_HNSW_EF_SEARCH", cls.ef_search),
            fp16=(settings.get("SEARCH_HNSW_FP16", "1") or "1") not in ("0", "false", "no"),
        )


def file_sig(path: Path) -> tuple[int, int, int] | None:
    """Identity of a file version: a rename-replaced file gets a new inode/mtime."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def store_sig(embeddings_dir: Path, name: str) -> tuple[int, int, int] | None:
    """Identity of a store's current version: its manifest (or, not yet migrated, its old .faiss file)."""
    return file_sig(Path(embeddings_dir) / name / MANIFEST) or file_sig(Path(embeddings_dir) / f"{name}.faiss")


class SnapshotIndex:
    """A store snapshot with the faiss surface the search side uses (d, ntotal, search; ids via keys/get)."""

    def __init__(self, snap) -> None:  # type: ignore[no-untyped-def]
        self.snap = snap
        self.d = int(snap.dim)
        self.ntotal = int(snap.count)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.snap.search(queries, k)

    def vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.snap.get(ids)


class NoVectors(RuntimeError):
    """The store exists but holds no vectors (yet, or any more)."""


def open_canonical(embeddings_dir: Path, name: str) -> SnapshotIndex:
    snap = open_snapshot(Path(embeddings_dir), name)
    if snap is None:
        raise NoVectors(f"{name}: no vectors")
    return SnapshotIndex(snap)


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


def new_hnsw(dim: int, policy: IndexPolicy) -> faiss.Index:
    """An empty ID-mapped HNSW index (fp16 storage unless policy.fp16 is off)."""
    if policy.fp16:
        graph = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, policy.m, faiss.METRIC_INNER_PRODUCT)
    else:
        graph = faiss.IndexHNSWFlat(dim, policy.m, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = policy.ef_construction
    return faiss.IndexIDMap(graph)


def set_ef_search(index: faiss.Index, ef: int) -> None:
    graph = inner(index)
    if hasattr(graph, "hnsw"):
        graph.hnsw.efSearch = ef


def cache_path(embeddings_dir: Path, name: str) -> Path:
    return Path(embeddings_dir) / CACHE_DIR / f"{name}.hnsw.faiss"


def cache_meta_path(embeddings_dir: Path, name: str) -> Path:
    return Path(embeddings_dir) / CACHE_DIR / f"{name}.hnsw.json"


def canonical_source(embeddings_dir: Path, name: str) -> str | None:
    """The manifest's `source` of an index's vectors (a text index shares its CLIP model's)."""
    model = name.removesuffix(TEXT_SUFFIX)
    rec = (read_manifest(embeddings_dir).get("models") or {}).get(model)
    return rec.get("source") if isinstance(rec, dict) else None


def cache_source(embeddings_dir: Path, name: str) -> str | None:
    """The source the HNSW cache was built from (None: unknown, e.g. no stamp yet)."""
    try:
        doc = json.loads(cache_meta_path(embeddings_dir, name).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError, OSError):
        return None
    return doc.get("source") if isinstance(doc, dict) else None


@dataclass
class ModelIndex:
    """One opened index: the main structure (flat canonical or HNSW cache) plus an exact tail."""

    name: str
    path: Path
    sig: tuple[int, int, int] | None
    kind: str  # "flat" | "hnsw"
    main: faiss.Index
    tail: faiss.Index | None = None
    needs_build: bool = False
    note: str = ""

    @property
    def dim(self) -> int:
        return int(self.main.d)

    @property
    def count(self) -> int:
        return int(self.main.ntotal) + (int(self.tail.ntotal) if self.tail is not None else 0)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query row; ids are -1 where fewer than k exist."""
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = max(1, int(k))
        scores, ids = self.main.search(q, k)
        if self.tail is None or self.tail.ntotal == 0:
            return scores, ids
        ts, ti = self.tail.search(q, k)
        s = np.concatenate([scores, ts], axis=1)
        i = np.concatenate([ids, ti], axis=1)
        s = np.where(i < 0, -np.inf, s)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "count": self.count,
            "dim": self.dim,
            "tail": int(self.tail.ntotal) if self.tail is not None else 0,
            "needs_build": self.needs_build,
            "note": self.note,
        }


def _tail_index(canonical: SnapshotIndex, ids: np.ndarray) -> faiss.Index:
    tail = faiss.IndexIDMap(faiss.IndexFlatIP(canonical.d))
    if len(ids):
        found, vecs = canonical.vectors(ids)
        tail.add_with_ids(vecs, found)
    return tail


def open_model(name: str, path: Path, policy: IndexPolicy, embeddings_dir: Path) -> ModelIndex:
    """Open one store, choosing exact search or the HNSW cache (+ tail) by size."""
    sig = store_sig(embeddings_dir, name)
    canonical = open_canonical(embeddings_dir, name)
    n = int(canonical.ntotal)
    if n < policy.hnsw_min:
        return ModelIndex(name, path, sig, "flat", canonical, note=f"exact search ({n} < {policy.hnsw_min})")
    cpath = cache_path(embeddings_dir, name)
    if not cpath.exists():
        return ModelIndex(name, path, sig, "flat", canonical, needs_build=True, note="exact search; HNSW not built")
    cache = read_index(cpath)
    if cache.d != canonical.d:
        return ModelIndex(name, path, sig, "flat", canonical, needs_build=True, note="HNSW cache has another dim")
    if cache_source(embeddings_dir, name) != canonical_source(embeddings_dir, name):
        note = "HNSW cache built from another model's vectors; exact search"
        return ModelIndex(name, path, sig, "flat", canonical, needs_build=True, note=note)
    canon_ids, cache_ids = canonical.snap.keys(), index_ids(cache)
    if not np.isin(cache_ids, canon_ids).all():
        return ModelIndex(name, path, sig, "flat", canonical, needs_build=True, note="HNSW cache stale; exact search")
    set_ef_search(cache, policy.ef_search)
    missing = canon_ids[~np.isin(canon_ids, cache_ids)]
    tail = _tail_index(canonical, missing)
    note = f"HNSW M={policy.m} ef={policy.ef_search} {'fp16' if policy.fp16 else 'fp32'}"
    if len(missing):
        note += f" + {len(missing)} exact (not yet in the graph)"
    return ModelIndex(name, path, sig, "hnsw", cache, tail=tail, needs_build=len(missing) > 0, note=note)


def update_cache(
    name: str,
    embeddings_dir: Path,
    policy: IndexPolicy,
    tmp_dir: Path | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> int:
    """Bring the HNSW cache of one index up to its canonical file. Returns vectors added (-1: stopped).

    Adds only the ids the cache lacks (embed.py appends); rebuilds from scratch when the cache holds ids
    the canonical file dropped, was built from another source's vectors or with another dim/policy.
    """
    source = canonical_source(embeddings_dir, name)  # read before the vectors: a later change only makes it stale
    canonical = open_canonical(embeddings_dir, name)
    canon_ids = canonical.snap.keys()
    cpath = cache_path(embeddings_dir, name)
    cache = None
    if cpath.exists():
        cache = read_index(cpath, mmap=False)
        same_kind = isinstance(inner(cache), faiss.IndexHNSWSQ) == policy.fp16
        same_source = cache_source(embeddings_dir, name) == source
        if cache.d != canonical.d or not same_kind or not same_source or not np.isin(index_ids(cache), canon_ids).all():
            log.info("%s: HNSW cache does not match the canonical index; rebuilding it", name)
            cache = None
    if cache is None:
        cache = new_hnsw(canonical.d, policy)
        missing = canon_ids
    else:
        missing = canon_ids[~np.isin(canon_ids, index_ids(cache))]
    if len(missing) == 0:
        return 0
    log.info("%s: adding %d vectors to the HNSW graph (%d there)", name, len(missing), cache.ntotal)
    t0 = time.monotonic()
    for start in range(0, len(missing), ADD_CHUNK):
        if should_stop():
            return -1
        found, vecs = canonical.vectors(missing[start : start + ADD_CHUNK])
        cache.add_with_ids(vecs, found)
    tmp = tmp_dir or Path(embeddings_dir).parent / ".tmp"  # the data home's .tmp
    write_index(cache, cpath, tmp)
    # The stamp goes second: a crash between the two leaves an old or missing stamp, i.e. a rebuild, never a lie.
    atomic_write_text(cache_meta_path(embeddings_dir, name), json.dumps({"source": source, "dim": cache.d}), tmp)
    log.info("%s: HNSW cache has %d vectors (%.1f s)", name, cache.ntotal, time.monotonic() - t0)
    return len(missing)


def read_manifest(embeddings_dir: Path) -> dict:
    try:
        doc = json.loads((Path(embeddings_dir) / "manifest.json").read_text(encoding="utf-8"))
        return doc if isinstance(doc, dict) else {}
    except (FileNotFoundError, ValueError, OSError):
        return {}


class IndexSet:
    """Every index of the store, opened once and reopened when embed.py replaces a file.

    `refresh()` is cheap (a stat of manifest.json and of each file, at most every `check_s`) and runs
    before each query.
    Swaps are whole ModelIndex objects, so a concurrent query sees the old or the new index, never half.
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
        self._manifest_sig: tuple | None = ("never",)  # type: ignore[assignment]
        self._checked = 0.0
        self._lock = threading.Lock()
        self.version = 0  # bumps whenever something was reopened

    def refresh(self, force: bool = False, check_s: float = 1.0) -> list[str]:
        """Reopen indexes whose files changed. Returns the names reopened (or dropped)."""
        now = time.monotonic()
        if not force and now - self._checked < check_s:
            return []
        with self._lock:
            self._checked = now
            msig = file_sig(self.dir / "manifest.json")
            if force or msig != self._manifest_sig:
                self._manifest_sig = msig
                self.manifest = read_manifest(self.dir)
            changed = []
            for name in self.names:
                path = self.dir / name
                sig = store_sig(self.dir, name)
                cur = self.models.get(name)
                if sig is None:
                    if cur is not None:
                        del self.models[name]
                        changed.append(name)
                    continue
                if cur is not None and cur.sig == sig and not force:
                    continue
                try:
                    self.models[name] = open_model(name, path, self.policy, self.dir)
                    self.errors.pop(name, None)
                    changed.append(name)
                except NoVectors:
                    if self.models.pop(name, None) is not None:
                        changed.append(name)
                except (RuntimeError, ValueError) as exc:  # a corrupt/partial store: keep the old one, say why
                    what = name if (self.dir / name / MANIFEST).exists() else f"{name}.faiss"
                    self.errors[name] = f"cannot read {what}: {str(exc).splitlines()[0][:200]}"
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
            if store_sig(self.dir, name) is not None:
                self.models[name] = open_model(name, self.dir / name, self.policy, self.dir)
                self.version += 1

    def needing_build(self) -> list[str]:
        return [n for n, m in self.models.items() if m.needs_build]

    def build_caches(
        self,
        names: Iterable[str] | None = None,
        tmp_dir: Path | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> dict[str, int]:
        """Build/update the HNSW caches of big indexes, then reopen them. Returns vectors added per index."""
        done: dict[str, int] = {}
        for name in names if names is not None else self.needing_build():
            snap = open_snapshot(self.dir, name)
            if snap is None:
                continue
            n = int(snap.count)
            if n < self.policy.hnsw_min:
                continue
            done[name] = update_cache(name, self.dir, self.policy, tmp_dir, should_stop)
            if done[name] < 0:
                break
            self.reopen(name)
        return done
