"""The embedding store: per model, immutable segment files plus a manifest, merged in the background.

Layout (one folder per store; a CLIP model owns two stores, `{m}` keyed by gid and `{m}_text` keyed by
listing_id):

    embeddings/{name}/manifest.json      the truth: live segments (oldest first), generation, count, source
    embeddings/{name}/g0000000042-ab12cd34.seg   one flush          (segments.py has the file format)
    embeddings/{name}/m0000000001-0000000016-....seg   a merge of several
    embeddings/manifest.json             summary of every store for humans and the search page (may lag)
    embeddings/.{model}.lock             the writer lock (one writer per model, held by embed.py)

Write path (`StoreWriter`, one per process, for the models whose locks it holds):
- `append`/`remove` buffer in memory (one flush worth); `commit` writes ONE new small segment per dirty
  store (temp file, fsync, rename), then the store's manifest (same, generation + 1), and only then calls
  `on_durable(name)` (the stage sets its flags there). Old files are never rewritten.
- A key is in a snapshot at most once: the newest segment holding a key wins, a deletion ("tombstone",
  a key listed in `del_keys`) hides older copies. Each segment records whether it `shadows` anything
  older (computed at commit from the live set); a reader checks only those, so normally it checks none.
- Memory does not grow with the catalogue: nothing is kept per vector. "Do I already hold key k" is a
  binary search in the segments' sorted key arrays, memory-mapped (a few pages per lookup).
- Compaction (a background thread, `CompactionPolicy`): a flush is level 0; when `fanout` segments of
  level L (< `max_level`) sit side by side they are merged, streamed through bounded buffers, into one
  segment of level L+1 placed where they were (so the newest-wins order holds). Each row is rewritten
  at most `max_level` times: bytes written over a whole build <= (1 + max_level) x the final size (3x
  with the default max_level 2). Tombstones are dropped only by a merge that includes the oldest segment.
  The merged file is made durable, then a manifest naming it instead of its inputs, and only then are
  the inputs deleted. Files no manifest names (a crash between) are removed when the writer next opens.

Read path (`open_snapshot`): read one manifest, then open (memory-map) every segment it names. POSIX
keeps an open or mapped file readable after its unlink, so a snapshot stays whole however long it is
read, with no grace period and no pins; if a segment is already gone between the manifest read and its
open (a compaction just finished), the snapshot is retried on the newer manifest. A model not yet
migrated from the old single-file format is read through `legacy.LegacySnapshot`, same contract.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from imageselector.fsutil import atomic_write_text, atomic_writer, file_lock, fsync_dir
from imageselector.vectorstore.legacy import (
    IMAGE_INDEX,
    MMAP_FLAGS,
    LegacySnapshot,
    configure_faiss,
    index_ids,
    legacy_path,
    read_image_index,
    read_index,
    read_summary,
)
from imageselector.vectorstore.segments import SegmentFile, SegmentReader, member, write_segment

log = logging.getLogger(__name__)

FORMAT = "imageselector-segments/1"
MANIFEST = "manifest.json"  # both the per-store manifest (in its folder) and the summary (in embeddings/)
TEXT_SUFFIX = "_text"
TEXT_INDEXES: tuple[str, ...] = ("clip_vitb32_text", "clip_vitl14_text")  # the CLIP listing-text stores
SHARED_LOCK = ".shared.lock"
READ_RETRIES = 50

__all__ = [
    "FORMAT",
    "IMAGE_INDEX",
    "MANIFEST",
    "MMAP_FLAGS",
    "TEXT_SUFFIX",
    "TEXT_INDEXES",
    "CompactionPolicy",
    "Snapshot",
    "StoreWriter",
    "configure_faiss",
    "index_ids",
    "new_index",
    "open_snapshot",
    "read_image_index",
    "read_index",
    "read_manifest",
    "read_store_manifest",
    "store_names",
    "write_index",
]


# --------------------------------------------------------------------------------------------------
# Files and manifests
# --------------------------------------------------------------------------------------------------


def store_dir(embeddings_dir: Path, name: str) -> Path:
    return Path(embeddings_dir) / name


def read_store_manifest(embeddings_dir: Path, name: str) -> dict[str, Any] | None:
    """A store's manifest, or None when the store does not exist (yet)."""
    try:
        doc = json.loads((store_dir(embeddings_dir, name) / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{store_dir(embeddings_dir, name) / MANIFEST}: not a {FORMAT} manifest")
    return doc


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The summary `embeddings/manifest.json` ({"models": {m: {dim, count, source, standin, ...}}, "text": ...})."""
    p = Path(path)
    return read_summary(p.parent if p.name == MANIFEST else p)


def store_names(embeddings_dir: Path) -> list[str]:
    """Every store (segment folder) present in `embeddings_dir`."""
    d = Path(embeddings_dir)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if (p / MANIFEST).is_file())


def new_index(dim: int) -> faiss.IndexIDMap2:
    """The plain FAISS index of the export (and of the old format): IndexIDMap2(IndexFlatIP)."""
    return faiss.IndexIDMap2(faiss.IndexFlatIP(int(dim)))


def write_index(index: faiss.Index, path: Path, tmp_dir: Path) -> None:
    """Durable atomic replace of a FAISS file (search caches, tests)."""
    with atomic_writer(Path(path), tmp_dir) as f:
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))


def _migrating(doc: dict[str, Any] | None) -> bool:
    return bool(doc and doc.get("migration") and not doc["migration"].get("done"))


# --------------------------------------------------------------------------------------------------
# Reading: snapshots
# --------------------------------------------------------------------------------------------------


def _resolve_live(parts: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Live keys from (keys, del_keys) per segment, oldest first: newest entry of a key wins."""
    ks, pri, dl = [], [], []
    for i, (k, d) in enumerate(parts):
        ks += [np.asarray(k, np.int64), np.asarray(d, np.int64)]
        pri += [np.full(len(k), i, np.int32), np.full(len(d), i, np.int32)]
        dl += [np.zeros(len(k), bool), np.ones(len(d), bool)]
    if not ks:
        return np.zeros(0, np.int64)
    K, P, D = np.concatenate(ks), np.concatenate(pri), np.concatenate(dl)
    order = np.lexsort((-P, K))
    K, D = K[order], D[order]
    first = np.ones(len(K), bool)
    first[1:] = K[1:] != K[:-1]
    return K[first & ~D]


class Snapshot:
    """One manifest's view of a store: every segment it names, mapped. Immutable; cheap to hold."""

    def __init__(self, embeddings_dir: Path, doc: dict[str, Any], readers: list[SegmentReader]) -> None:
        self.dir = Path(embeddings_dir)
        self.doc = doc
        self.segments: list[dict[str, Any]] = list(doc["segments"])
        self.readers = readers
        self.model: str = doc["model"]
        self.dim = int(doc["dim"])
        self.count = int(doc["count"])
        self.generation = int(doc["generation"])
        self.version = int(doc.get("version", 0))
        self.source: str | None = doc.get("source")
        self.standin = bool(doc.get("standin", False))
        self.key: str = doc.get("key", "gid")

    def _shadowers(self, i: int) -> list[int]:
        return [j for j in range(i + 1, len(self.segments)) if self.segments[j].get("shadows")]

    def _hidden(self, i: int, keys: np.ndarray) -> np.ndarray:
        """Which of segment i's `keys` a newer segment replaces or deletes."""
        hidden = np.zeros(len(keys), bool)
        if not len(keys):
            return hidden
        lo, hi = int(keys[0]), int(keys[-1])
        for j in self._shadowers(i):
            s = self.segments[j]
            if s.get("key_max") is not None and (s["key_max"] < lo or s["key_min"] > hi):
                continue
            rd = self.readers[j]
            hidden |= member(rd.keys, keys)[0] | member(rd.del_keys, keys)[0]
        return hidden

    def iter_chunks(
        self, chunk: int = 65536, since_generation: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(keys int64, vectors float32 [n, dim]) of every live row, at most `chunk` rows at a time.

        With `since_generation`, only rows committed after it (new or replaced); see `removed_since`.
        """
        chunk = max(1, int(chunk))
        for i, (seg, rd) in enumerate(zip(self.segments, self.readers, strict=True)):
            if since_generation is not None and int(seg["gen_hi"]) <= since_generation:
                continue
            for s in range(0, rd.layout.rows, chunk):
                keys = np.array(rd.keys[s : s + chunk])
                keep = ~self._hidden(i, keys)
                if since_generation is not None:
                    keep &= np.asarray(rd.gens[s : s + chunk]) > since_generation
                if not keep.any():
                    continue
                vecs = np.array(rd.vecs[s : s + chunk], dtype=np.float32)
                if keep.all():
                    yield keys, vecs
                else:
                    yield keys[keep], vecs[keep]

    def get(self, gids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found keys, their vectors), in the order asked; keys not in the snapshot are omitted."""
        q = np.asarray(gids, dtype=np.int64).ravel()
        status = np.zeros(len(q), np.int8)  # 0 unknown, 1 found, -1 deleted
        seg_of = np.full(len(q), -1, np.int64)
        row_of = np.zeros(len(q), np.int64)
        for j in range(len(self.segments) - 1, -1, -1):
            unk = np.flatnonzero(status == 0)
            if not len(unk):
                break
            rd = self.readers[j]
            f, at = member(rd.keys, q[unk])
            status[unk[f]], seg_of[unk[f]], row_of[unk[f]] = 1, j, at[f]
            rest = unk[~f]
            fd, _ = member(rd.del_keys, q[rest])
            status[rest[fd]] = -1
        hit = np.flatnonzero(status == 1)
        out = np.empty((len(hit), self.dim), np.float32)
        for j in np.unique(seg_of[hit]):
            sel = seg_of[hit] == j
            out[sel] = self.readers[int(j)].vecs[row_of[hit[sel]]]
        return q[hit], out

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner-product top-k over the mapped segments: (scores, keys), -1 keys where fewer exist.

        Each segment is searched in place (faiss.knn on the mapping, no copy); rows a newer segment
        hides are dropped from that segment's results (it is asked for that many more).
        """
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = max(1, int(k))
        all_s = [np.full((len(q), k), -np.inf, np.float32)]
        all_i = [np.full((len(q), k), -1, np.int64)]
        for i, rd in enumerate(self.readers):
            n = rd.layout.rows
            if not n:
                continue
            hidden = self._hidden(i, np.asarray(rd.keys)) if self._shadowers(i) else None
            extra = int(hidden.sum()) if hidden is not None else 0
            kk = min(n, k + extra)
            sc, pos = faiss.knn(q, rd.vecs, kk, metric=faiss.METRIC_INNER_PRODUCT)
            keys = np.where(pos >= 0, np.asarray(rd.keys)[np.maximum(pos, 0)], -1)
            if extra:
                drop = (pos >= 0) & hidden[np.maximum(pos, 0)]
                sc, keys = np.where(drop, -np.inf, sc), np.where(drop, -1, keys)
            all_s.append(sc.astype(np.float32))
            all_i.append(keys)
        s, ids = np.concatenate(all_s, axis=1), np.concatenate(all_i, axis=1)
        s = np.where(ids < 0, -np.inf, s)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(s, order, 1), np.take_along_axis(ids, order, 1)

    def keys(self) -> np.ndarray:
        """Every live key, ascending (8 bytes per vector, transient)."""
        if not any(s.get("shadows") for s in self.segments):
            if not self.readers:
                return np.zeros(0, np.int64)
            return np.sort(np.concatenate([np.asarray(r.keys) for r in self.readers]))
        return _resolve_live([(np.asarray(r.keys), np.asarray(r.del_keys)) for r in self.readers])

    def removed_since(self, generation: int) -> np.ndarray | None:
        """Keys deleted after `generation` (a replaced key comes back through iter_chunks instead).

        None when the answer is lost: the tombstones were merged away since; the reader must start over.
        """
        if int(self.doc.get("tombstones_dropped_gen", 0)) > generation:
            return None
        out = [np.asarray(r.del_keys)[np.asarray(r.del_gens) > generation] for r in self.readers]
        return np.unique(np.concatenate(out)) if out else np.zeros(0, np.int64)

    def close(self) -> None:
        self.readers = []


def _open_segments(embeddings_dir: Path, name: str) -> Snapshot | LegacySnapshot | None:
    last: Exception | None = None
    for _ in range(READ_RETRIES):
        doc = read_store_manifest(embeddings_dir, name)
        if doc is None or _migrating(doc):
            return LegacySnapshot(embeddings_dir, name) if legacy_path(embeddings_dir, name).exists() else None
        try:
            d = store_dir(embeddings_dir, name)
            readers = [SegmentReader(d / s["file"]) for s in doc["segments"]]
        except FileNotFoundError as exc:  # a compaction replaced the manifest meanwhile: read the new one
            last = exc
            time.sleep(0.01)
            continue
        return Snapshot(embeddings_dir, doc, readers)
    raise RuntimeError(f"{name}: the store kept changing while being opened ({last})")


def open_snapshot(embeddings_dir: Path, model: str) -> Snapshot | LegacySnapshot | None:
    """A consistent view of one store (`model` or `{model}_text`); None when it holds no vectors."""
    snap = _open_segments(Path(embeddings_dir), model)
    if snap is None or snap.count == 0:
        return None
    return snap


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompactionPolicy:
    """Merge `fanout` neighbouring segments of one level; rows are rewritten at most `max_level` times."""

    fanout: int = 16
    max_level: int = 2
    buffer_bytes: int = 32 << 20  # vectors held by a merge at once, all inputs together


class _Store:
    """The writer's state for one store: its manifest, its mapped segments, its uncommitted buffer."""

    def __init__(self, embeddings_dir: Path, name: str, dim: int, key: str, source: str, standin: bool) -> None:
        self.name = name
        self.dir = store_dir(embeddings_dir, name)
        self.dim = int(dim)
        self.key = key
        self.source = source
        self.standin = standin
        self.lock = threading.RLock()
        self.doc: dict[str, Any] = {}
        self.readers: dict[str, SegmentReader] = {}
        self.ops: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.pending: dict[int, bool] = {}  # key -> appended (True) / removed (False), this flush only

    @property
    def segments(self) -> list[dict[str, Any]]:
        return self.doc["segments"]

    def reader(self, seg: dict[str, Any]) -> SegmentReader:
        rd = self.readers.get(seg["file"])
        if rd is None:
            rd = self.readers[seg["file"]] = SegmentReader(self.dir / seg["file"])
        return rd

    def live_mask(self, keys: np.ndarray) -> np.ndarray:
        """Which of `keys` (any order) the committed store holds (newest segment first decides)."""
        status = np.zeros(len(keys), np.int8)
        for seg in reversed(self.segments):
            unk = np.flatnonzero(status == 0)
            if not len(unk):
                break
            q = keys[unk]
            if seg.get("key_max") is None or q.max() < seg["key_min"] or q.min() > seg["key_max"]:
                continue
            rd = self.reader(seg)
            f = member(rd.keys, q)[0]
            status[unk[f]] = 1
            rest = unk[~f]
            status[rest[member(rd.del_keys, keys[rest])[0]]] = -1
        return status == 1


def _new_doc(st: _Store) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model": st.name,
        "dim": st.dim,
        "key": st.key,
        "source": st.source,
        "standin": st.standin,
        "generation": 0,
        "version": 0,
        "count": 0,
        "tombstones_dropped_gen": 0,
        "segments": [],
    }


def _seg_info(
    file: str, size: int, keys: np.ndarray, dels: np.ndarray, gens_lo: int, gens_hi: int, level: int, shadows: bool
) -> dict[str, Any]:
    both = [a for a in (keys, dels) if len(a)]
    lo = min(int(a[0]) for a in both) if both else None
    hi = max(int(a[-1]) for a in both) if both else None
    return {
        "file": file,
        "rows": len(keys),
        "dels": len(dels),
        "bytes": size,
        "level": level,
        "gen_lo": gens_lo,
        "gen_hi": gens_hi,
        "key_min": lo,
        "key_max": hi,
        "shadows": shadows,
    }


class StoreWriter:
    """The write side of `embeddings/` for the stores this process owns (see the module docstring)."""

    def __init__(
        self,
        embeddings_dir: Path,
        tmp_dir: Path,
        *,
        policy: CompactionPolicy | None = None,
        background: bool = True,
    ) -> None:
        self.dir = Path(embeddings_dir)
        self.tmp_dir = Path(tmp_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.policy = policy or CompactionPolicy()
        self.stores: dict[str, _Store] = {}
        self._locks: list[contextlib.ExitStack] = []
        self._owner: dict[str, str] = {}  # store name -> model whose lock covers it
        self.bytes_written = 0  # segment + manifest bytes, for the bench
        self.segment_bytes_written = 0
        self.last_write_s = 0.0
        self.compactions = 0
        self.compaction_error: str | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._background = background

    # ---- ownership -----------------------------------------------------------------------------
    def lock_path(self, model: str) -> Path:
        return self.dir / f".{model}.lock"

    def lock_model(self, model: str) -> None:
        """Take the model's writer lock (non-blocking). Raises RuntimeError if another process holds it."""
        if model in self._owner.values():
            return
        stack = contextlib.ExitStack()
        if not stack.enter_context(file_lock(self.lock_path(model), blocking=False)):
            stack.close()
            raise RuntimeError(f"another process is embedding {model} (lock {self.lock_path(model)})")
        self._locks.append(stack)
        self._owner[f"\0{model}"] = model

    def open_store(
        self, name: str, dim: int, *, source: str, standin: bool, key: str = "gid", model: str | None = None
    ) -> None:
        """Open (or create) store `name` under the lock of `model` (default: name itself)."""
        model = model or name.removesuffix(TEXT_SUFFIX)
        self.lock_model(model)
        if name in self.stores:  # already open (e.g. just migrated): same object, so a running merge stays valid
            st = self.stores[name]
            if st.dim != int(dim):
                raise ValueError(f"{st.dir} holds {st.dim}-dim vectors, the model gives {int(dim)}")
            st.source, st.standin = source, standin
            return
        st = _Store(self.dir, name, dim, key, source, standin)
        doc = read_store_manifest(self.dir, name)
        if doc is not None and int(doc["dim"]) != st.dim:
            raise ValueError(f"{st.dir} holds {doc['dim']}-dim vectors, the model gives {st.dim}")
        st.doc = doc if doc is not None else _new_doc(st)
        st.dir.mkdir(parents=True, exist_ok=True)
        self._remove_orphans(st)
        self.stores[name] = st
        self._owner[name] = model
        if self._background and self._thread is None:
            self._thread = threading.Thread(target=self._compact_loop, name="store-compact", daemon=True)
            self._thread.start()
        self._wake.set()

    def open_model(self, name: str, dim: int, *, text: bool, source: str, standin: bool) -> None:
        """The image store of a model (keys: gid) and, for CLIP, its text store (keys: listing_id)."""
        self.open_store(name, dim, source=source, standin=standin)
        if text:
            self.open_store(f"{name}{TEXT_SUFFIX}", dim, source=source, standin=standin, key="listing_id", model=name)

    def _remove_orphans(self, st: _Store) -> None:
        """Segments no manifest names: a flush or merge killed before its manifest, or inputs not yet deleted."""
        named = {s["file"] for s in st.doc["segments"]}
        gone = 0
        for p in st.dir.glob("*.seg"):
            if p.name not in named:
                p.unlink(missing_ok=True)
                gone += 1
        if gone:
            fsync_dir(st.dir)
            log.info("%s: removed %d segment file(s) no manifest names (left by a crash)", st.name, gone)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for st in self.stores.values():
            st.readers.clear()
        for stack in self._locks:
            stack.close()
        self._locks.clear()
        self._owner.clear()

    # ---- queries -------------------------------------------------------------------------------
    def recorded(self, name: str) -> dict[str, Any] | None:
        """What a store's manifest on disk says (source, dim, count), or None."""
        return read_store_manifest(self.dir, name)

    def count(self, name: str) -> int:
        return int(self.stores[name].doc["count"])

    def total_vectors(self) -> int:
        return sum(self.count(n) for n in self.stores)

    def dirty(self) -> bool:
        return any(st.ops for st in self.stores.values())

    def contains(self, name: str, keys: np.ndarray) -> np.ndarray:
        """Which keys the store holds, counting this flush's appends/removes. Bounded memory."""
        st = self.stores[name]
        k = np.asarray(keys, dtype=np.int64).ravel()
        with st.lock:
            out = st.live_mask(k) if len(k) else np.zeros(0, bool)
        if st.pending:
            for i, key in enumerate(k.tolist()):
                if key in st.pending:
                    out[i] = st.pending[key]
        return out

    def live_keys(self, name: str) -> np.ndarray:
        """Every committed key, ascending (8 bytes per vector while the caller holds it)."""
        st = self.stores[name]
        with st.lock:
            return Snapshot(self.dir, st.doc, [st.reader(s) for s in st.segments]).keys()

    def snapshot(self, name: str) -> Snapshot:
        st = self.stores[name]
        with st.lock:
            return Snapshot(self.dir, dict(st.doc), [st.reader(s) for s in st.segments])

    # ---- writing -------------------------------------------------------------------------------
    def append(self, model: str, gids: np.ndarray, vecs: np.ndarray) -> None:
        """Buffer vectors under keys; a key already stored is replaced at commit (never duplicated)."""
        st = self.stores[model]
        k = np.asarray(gids, dtype=np.int64).ravel()
        if not len(k):
            return
        v = np.ascontiguousarray(vecs, dtype=np.float32).reshape(len(k), st.dim)
        st.ops.append((k.copy(), v.copy()))
        st.pending.update(dict.fromkeys(k.tolist(), True))

    def remove(self, model: str, gids: np.ndarray) -> None:
        """Buffer deletions (written as tombstones at commit when the keys are stored)."""
        st = self.stores[model]
        k = np.asarray(gids, dtype=np.int64).ravel()
        if not len(k):
            return
        st.ops.append((k.copy(), None))
        st.pending.update(dict.fromkeys(k.tolist(), False))

    def commit(self, on_durable: Callable[[str], None] | None = None) -> float:
        """Make every buffered change durable: per store a segment, then its manifest, then `on_durable(name)`.

        Text stores go first, so a listing's text vector is durable before its image's flag is set.
        `on_durable` runs for every open store, changed or not (the stage completes its batches there).
        Returns the seconds spent writing.
        """
        t0 = time.monotonic()
        order = sorted(self.stores, key=lambda n: (not n.endswith(TEXT_SUFFIX), n))
        changed: list[str] = []
        for name in order:
            if self._commit_store(self.stores[name]):
                changed.append(name)
            if on_durable is not None:
                on_durable(name)
        if changed:
            self.write_summary(changed)
            self._wake.set()
        self.last_write_s = time.monotonic() - t0 if changed else self.last_write_s
        return time.monotonic() - t0

    def _final_ops(self, st: _Store) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(data keys ascending, their vectors, deleted keys ascending): the last op on each key wins."""
        keys = np.concatenate([k for k, _ in st.ops])
        is_add = np.concatenate([np.full(len(k), v is not None) for k, v in st.ops])
        adds = [v for _, v in st.ops if v is not None]
        vecs = np.concatenate(adds) if adds else np.zeros((0, st.dim), np.float32)
        vec_row = np.full(len(keys), -1, np.int64)
        vec_row[is_add] = np.arange(int(is_add.sum()))
        rev = np.arange(len(keys))[::-1]
        _, first_rev = np.unique(keys[rev], return_index=True)  # last occurrence of each key, keys ascending
        last = rev[first_rev]
        add_last = last[is_add[last]]
        del_last = last[~is_add[last]]
        return keys[add_last], vecs[vec_row[add_last]], keys[del_last]

    def _commit_store(self, st: _Store) -> bool:
        if not st.ops:
            return False
        data_keys, data_vecs, del_keys = self._final_ops(st)
        with st.lock:
            was_data = st.live_mask(data_keys) if len(data_keys) else np.zeros(0, bool)
            was_del = st.live_mask(del_keys) if len(del_keys) else np.zeros(0, bool)
            del_keys = del_keys[was_del]  # deleting what is not stored needs no tombstone
            if not len(data_keys) and not len(del_keys):
                st.ops.clear()
                st.pending.clear()
                return False
            gen = int(st.doc["generation"]) + 1
            fname = f"g{gen:010d}-{uuid.uuid4().hex[:8]}.seg"
            size = write_segment(
                st.dir / fname,
                self.tmp_dir,
                st.dim,
                data_keys,
                np.full(len(data_keys), gen, np.int32),
                iter([data_vecs]),
                del_keys,
                np.full(len(del_keys), gen, np.int32),
            )
            self.bytes_written += size
            self.segment_bytes_written += size
            shadows = bool(was_data.any() or len(del_keys))
            info = _seg_info(fname, size, data_keys, del_keys, gen, gen, 0, shadows)
            doc = dict(st.doc)
            doc["segments"] = [*st.segments, info]
            doc["generation"] = gen
            doc["count"] = int(st.doc["count"]) + int((~was_data).sum()) - len(del_keys)
            self._write_doc(st, doc)
            if was_data.any():
                log.warning("%s: replaced %d vector(s) already stored", st.name, int(was_data.sum()))
        st.ops.clear()
        st.pending.clear()
        return True

    def commit_segment(
        self, name: str, keys: np.ndarray, vec_chunks: Iterator[np.ndarray], *, level: int, extra: dict[str, Any]
    ) -> None:
        """Append one big segment of new keys (ascending, none stored yet), streamed: the migration's path."""
        st = self.stores[name]
        with st.lock:
            gen = int(st.doc["generation"]) + 1
            fname = f"g{gen:010d}-{uuid.uuid4().hex[:8]}.seg"
            k = np.asarray(keys, np.int64)
            was = st.live_mask(k) if len(k) else np.zeros(0, bool)
            size = write_segment(
                st.dir / fname, self.tmp_dir, st.dim, k, np.full(len(k), gen, np.int32), vec_chunks,
                np.zeros(0, np.int64), np.zeros(0, np.int32),
            )  # fmt: skip
            self.bytes_written += size
            self.segment_bytes_written += size
            info = _seg_info(fname, size, k, np.zeros(0, np.int64), gen, gen, level, bool(was.any()))
            doc = {**st.doc, **extra}
            doc["segments"] = [*st.segments, info]
            doc["generation"] = gen
            doc["count"] = int(st.doc["count"]) + int((~was).sum())
            self._write_doc(st, doc)

    def update_doc(self, name: str, extra: dict[str, Any]) -> None:
        st = self.stores[name]
        with st.lock:
            self._write_doc(st, {**st.doc, **extra})

    def _write_doc(self, st: _Store, doc: dict[str, Any]) -> None:
        doc["version"] = int(doc.get("version", 0)) + 1
        doc["updated_at"] = time.time()
        doc["source"], doc["standin"] = st.source, st.standin
        text = json.dumps(doc, indent=1, sort_keys=True)
        atomic_write_text(st.dir / MANIFEST, text, self.tmp_dir)
        self.bytes_written += len(text)
        st.doc = doc

    def write_summary(self, names: list[str] | None = None) -> None:
        """Refresh `embeddings/manifest.json` (the search page and humans read it) for these stores."""
        with file_lock(self.dir / SHARED_LOCK):
            doc = read_summary(self.dir)
            now = time.time()
            for name in names if names is not None else list(self.stores):
                st = self.stores[name]
                rec = {"dim": st.dim, "count": int(st.doc["count"]), "updated_at": now}
                rec["generation"] = int(st.doc["generation"])
                if st.key == "listing_id":
                    doc["text"][name.removesuffix(TEXT_SUFFIX)] = {**rec, "key": "listing_id"}
                else:
                    doc["models"][name] = {**rec, "source": st.source, "standin": st.standin}
            doc["version"] = int(doc.get("version", 0)) + 1
            doc["store"] = FORMAT
            text = json.dumps(doc, indent=1, sort_keys=True)
            atomic_write_text(self.dir / MANIFEST, text, self.tmp_dir)
            self.bytes_written += len(text)

    # ---- compaction ----------------------------------------------------------------------------
    def _pick(self, st: _Store) -> tuple[int, int] | None:
        segs = st.segments
        f = max(2, self.policy.fanout)
        for level in range(self.policy.max_level):
            run = 0
            for i, s in enumerate(segs):
                run = run + 1 if int(s.get("level", 0)) == level else 0
                if run == f:
                    return i - f + 1, f
        return None

    def compact(self, name: str | None = None) -> int:
        """Run every merge the policy calls for now (synchronously). Returns how many were done."""
        done = 0
        for n in [name] if name else list(self.stores):
            st = self.stores[n]
            while not self._stop.is_set():
                with st.lock:
                    pick = self._pick(st)
                    inputs = [dict(s) for s in st.segments[pick[0] : pick[0] + pick[1]]] if pick else []
                if not pick:
                    break
                if not self._merge(st, pick[0], inputs):
                    break
                done += 1
        return done

    def _compact_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(5.0)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.compact()
            except Exception as exc:  # noqa: BLE001 - a failed merge loses nothing; say it, retry later
                self.compaction_error = f"{type(exc).__name__}: {exc}"
                log.error("compaction failed (the store is intact; retried later): %s", self.compaction_error)
                self._stop.wait(30.0)

    def _merge(self, st: _Store, start: int, inputs: list[dict[str, Any]]) -> bool:
        """Merge segments[start:start+len(inputs)] into one (see the module docstring). False if stopped."""
        files = [SegmentFile(st.dir / s["file"]) for s in inputs]
        try:
            plan = self._plan(files, drop_tombstones=start == 0)
            keys, src, row, gens, del_keys, del_gens = plan
            lo = min(int(s["gen_lo"]) for s in inputs)
            hi = max(int(s["gen_hi"]) for s in inputs)
            level = min(self.policy.max_level, max(int(s.get("level", 0)) for s in inputs) + 1)
            fname = f"m{lo:010d}-{hi:010d}-{uuid.uuid4().hex[:8]}.seg"
            per = max(64, self.policy.buffer_bytes // (4 * st.dim))
            stopped = threading.Event()

            def chunks() -> Iterator[np.ndarray]:
                for a in range(0, len(keys), per):
                    if self._stop.is_set():
                        stopped.set()
                        raise InterruptedError("stopping")
                    yield _gather(files, src[a : a + per], row[a : a + per], st.dim)

            try:
                size = write_segment(st.dir / fname, self.tmp_dir, st.dim, keys, gens, chunks(), del_keys, del_gens)
            except InterruptedError:
                return False
            self.bytes_written += size
            self.segment_bytes_written += size
            shadows = start > 0 and any(s.get("shadows") for s in inputs)
            info = _seg_info(fname, size, keys, del_keys, lo, hi, level, shadows)
            with st.lock:
                now = st.segments[start : start + len(inputs)]
                if [s["file"] for s in now] != [s["file"] for s in inputs]:  # cannot happen: one compactor
                    (st.dir / fname).unlink(missing_ok=True)
                    raise RuntimeError(f"{st.name}: segments changed under a merge")
                doc = dict(st.doc)
                doc["segments"] = [*st.segments[:start], info, *st.segments[start + len(inputs) :]]
                if start == 0:
                    dropped = [int(s["gen_hi"]) for s in inputs if int(s.get("dels", 0))]
                    doc["tombstones_dropped_gen"] = max([int(doc.get("tombstones_dropped_gen", 0)), *dropped])
                self._write_doc(st, doc)  # durable: only now may the inputs go
                for s in inputs:
                    st.readers.pop(s["file"], None)
            for s in inputs:
                (st.dir / s["file"]).unlink(missing_ok=True)
            fsync_dir(st.dir)
            self.compactions += 1
            return True
        finally:
            for f in files:
                f.close()

    @staticmethod
    def _plan(
        files: list[SegmentFile], drop_tombstones: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Which row of which input each output row is (newest input wins), and the tombstones kept.

        Holds the inputs' keys (12 bytes a row): a merge is at most fanout^max_level flushes, whatever
        the catalogue's size.
        """
        ks, pri, rows, gens, isdel = [], [], [], [], []
        for i, f in enumerate(files):
            k, dk = f.keys(), f.del_keys()
            ks += [k, dk]
            pri += [np.full(len(k), i, np.int32), np.full(len(dk), i, np.int32)]
            rows += [np.arange(len(k), dtype=np.int64), np.arange(len(dk), dtype=np.int64)]
            gens += [f.gens(), f.del_gens()]
            isdel += [np.zeros(len(k), bool), np.ones(len(dk), bool)]
        K, P, R, G, D = (np.concatenate(a) for a in (ks, pri, rows, gens, isdel))
        order = np.lexsort((-P, K))
        first = np.ones(len(order), bool)
        first[1:] = K[order][1:] != K[order][:-1]
        win = order[first]
        data = win[~D[win]]
        dels = win[D[win]] if not drop_tombstones else np.zeros(0, np.int64)
        return K[data], P[data].astype(np.int64), R[data], G[data], K[dels], G[dels]


def _gather(files: list[SegmentFile], src: np.ndarray, row: np.ndarray, dim: int) -> np.ndarray:
    """Vectors of (input, row) pairs, read as contiguous runs with pread."""
    out = np.empty((len(src), dim), np.float32)
    for i in np.unique(src):
        sel = np.flatnonzero(src == i)
        r = row[sel]
        breaks = np.flatnonzero(np.diff(r) != 1) + 1
        at = 0
        for run in np.split(r, breaks):
            out[sel[at : at + len(run)]] = files[int(i)].read_rows(int(run[0]), len(run))
            at += len(run)
    return out
