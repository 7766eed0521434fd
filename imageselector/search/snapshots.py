"""How the search reads the embedding store: the READ contract of issue 15, and an adapter over today's files.

The store (imageselector/embedding/store.py) is being rebuilt as immutable segments with a manifest; it will
expose `open_snapshot(embeddings_dir, model) -> Snapshot | None` with `.model .dim .count .generation .source`,
`.iter_chunks(chunk, since_generation)` and `.get(gids)`. The search codes against exactly that, through
`open_snapshot` below: it uses the store's own function when the store has one, else `LegacySnapshot`, a
read-only view of today's `embeddings/{model}.faiss` (IndexIDMap2 over IndexFlatIP, memory-mapped).

Limits of the adapter (gone with the segment store): today's file keeps no per-vector generation, so
`iter_chunks(since_generation=g)` yields EVERY vector unless g is the current generation (a superset; the
caller filters by what its index already holds); `generation` is the manifest's global `version`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

from imageselector.embedding import store as _store

TEXT_SUFFIX = "_text"


class Snapshot(Protocol):
    """The read contract (issue 15): one model's vectors at one committed generation."""

    model: str
    dim: int
    count: int
    generation: int
    source: str | None

    def iter_chunks(
        self, chunk: int = 65536, since_generation: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...

    def get(self, gids: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def _manifest(embeddings_dir: Path) -> dict:
    try:
        doc = json.loads((Path(embeddings_dir) / "manifest.json").read_text(encoding="utf-8"))
        return doc if isinstance(doc, dict) else {}
    except (FileNotFoundError, ValueError, OSError):
        return {}


class LegacySnapshot:
    """Today's `{model}.faiss` seen through the read contract.

    Opening is cheap (the manifest's count/dim/version: the search opens a snapshot every second to notice
    flushes); the file is mapped on first use of the vectors, after which the view is stable even when
    embed.py replaces the file (rename keeps our inode alive). A flush writes the index before the manifest,
    so the mapped file may hold more than the manifest said: `count` is then corrected to the file's.
    """

    def __init__(self, embeddings_dir: Path, model: str) -> None:
        self.path = Path(embeddings_dir) / f"{model}.faiss"
        doc = _manifest(embeddings_dir)
        section = "text" if model.endswith(TEXT_SUFFIX) else "models"
        rec = (doc.get(section) or {}).get(model) or {}
        base = (doc.get("models") or {}).get(model.removesuffix(TEXT_SUFFIX)) or {}
        self.model = model
        self.generation = int(doc.get("version") or 0)
        self.source = base.get("source") if isinstance(base, dict) else None
        self._index: faiss.Index | None = None
        self._pos: dict[int, int] | None = None
        if isinstance(rec, dict) and "count" in rec and "dim" in rec:
            self.dim, self.count = int(rec["dim"]), int(rec["count"])
        else:  # no manifest entry (an old or hand-made store): ask the file
            self._map()

    def _map(self) -> faiss.Index:
        if self._index is None:
            self._index = _store.read_index(self.path, mmap=True)
            self._ids = _store.index_ids(self._index)
            self._flat = faiss.downcast_index(self._index.index)
            self.dim, self.count = int(self._index.d), int(self._index.ntotal)
        return self._index

    def iter_chunks(
        self, chunk: int = 65536, since_generation: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if since_generation is not None and since_generation >= self.generation:
            return
        self._map()
        for start in range(0, self.count, chunk):
            n = min(chunk, self.count - start)
            yield self._ids[start : start + n].copy(), self._flat.reconstruct_n(start, n)

    def get(self, gids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._map()
        if self._pos is None:
            self._pos = {int(g): i for i, g in enumerate(self._ids.tolist())}
        found = [(int(g), self._pos[int(g)]) for g in np.asarray(gids).ravel() if int(g) in self._pos]
        out = np.empty((len(found), self.dim), np.float32)
        for j, (_, p) in enumerate(found):
            out[j] = self._flat.reconstruct(p)
        return np.array([g for g, _ in found], dtype=np.int64), out


def open_snapshot(embeddings_dir: Path, model: str) -> Snapshot | None:
    """The store's snapshot of one model (None: no vectors). The one place to swap the store implementation."""
    native = getattr(_store, "open_snapshot", None)
    if native is not None:
        return native(Path(embeddings_dir), model)
    if not (Path(embeddings_dir) / f"{model}.faiss").exists():
        return None
    snap = LegacySnapshot(Path(embeddings_dir), model)
    return snap if snap.count > 0 else None
