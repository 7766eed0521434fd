"""An image's stored vectors, read back from the embedding store (no re-embedding).

`stored_vectors()` is the ONE place the search reads vectors by gid. It uses the store's read contract
(`imageselector.vectorstore.store.open_snapshot(dir, model).get(gids)`, issue 15) when the store has it,
and otherwise an adapter over today's format: `embeddings/{model}.faiss`, an IndexIDMap2 keyed by gid,
whose vectors are reconstructed at the gids' storage positions. The integrator can drop the adapter
once the segment store lands.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imageselector.search.indexes import file_sig, read_index, reconstruct_positions
from imageselector.vectorstore import store as _store

_open_snapshot = getattr(_store, "open_snapshot", None)
_cache: dict[Path, tuple[tuple | None, object, np.ndarray, np.ndarray]] = {}


def _positions(path: Path) -> tuple[object, np.ndarray, np.ndarray] | None:
    """(index, sorted gids, their storage positions) of today's file, cached per file version (mmap)."""
    sig = file_sig(path)
    if sig is None:
        return None
    hit = _cache.get(path)
    if hit is not None and hit[0] == sig:
        return hit[1], hit[2], hit[3]
    index = read_index(path)
    ids = _store.index_ids(index).astype(np.int64)
    order = np.argsort(ids, kind="stable")
    _cache[path] = (sig, index, ids[order], order.astype(np.int64))
    return index, ids[order], order.astype(np.int64)


def stored_vectors(embeddings_dir: Path, model: str, gids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found gids int64, vectors float32 [n, dim]) of `gids` in `model`'s store; missing gids are omitted."""
    gids = np.asarray(gids, dtype=np.int64).reshape(-1)
    if _open_snapshot is not None:
        snap = _open_snapshot(Path(embeddings_dir), model)
        if snap is None:
            return np.empty(0, np.int64), np.empty((0, 0), np.float32)
        return snap.get(gids)
    got = _positions(Path(embeddings_dir) / f"{model}.faiss")
    if got is None:
        return np.empty(0, np.int64), np.empty((0, 0), np.float32)
    index, sorted_ids, positions = got
    where = np.clip(np.searchsorted(sorted_ids, gids), 0, max(len(sorted_ids) - 1, 0))
    hit = (sorted_ids[where] == gids) if len(sorted_ids) else np.zeros(len(gids), bool)
    found = gids[hit]
    if not len(found):
        return found, np.empty((0, int(index.d)), np.float32)  # type: ignore[attr-defined]
    at = positions[where[hit]]
    order = np.argsort(at, kind="stable")
    vecs = np.empty((len(found), int(index.d)), np.float32)  # type: ignore[attr-defined]
    vecs[order] = reconstruct_positions(index, at[order])  # type: ignore[arg-type]
    return found, vecs
