"""Today's (pre-segment) store format, read-only: `embeddings/{name}.faiss` = IndexIDMap2(IndexFlatIP) by key.

Used for two things only: reading a model that has not been migrated yet (`LegacySnapshot`, same read
contract as a segment snapshot) and streaming the file into segments (migrate.py). The vectors are
memory-mapped (IO_FLAG_MMAP_IFC maps the flat codes; plain IO_FLAG_MMAP copies them in faiss 1.15);
only the id map (8 bytes per vector) is read into memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

BLAS_THRESHOLD = 20
MMAP_FLAGS = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
SUMMARY = "manifest.json"
IMAGE_INDEX = "image_index.json"  # the old gid -> [listing_id, image_id] list (the database holds it now)


def configure_faiss() -> None:
    """Small query batches must not take FAISS's BLAS path (measured 10x slower here): see ENVIRONMENT_NOTES."""
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD


def legacy_path(embeddings_dir: Path, name: str) -> Path:
    return Path(embeddings_dir) / f"{name}.faiss"


def read_index(path: str | os.PathLike[str], mmap: bool = False) -> faiss.Index:
    """Read one `.faiss` file (optionally memory-mapped); sets the FAISS search tuning as a side effect."""
    configure_faiss()
    return faiss.read_index(str(path), MMAP_FLAGS) if mmap else faiss.read_index(str(path))


def index_ids(index: faiss.Index) -> np.ndarray:
    """The ids held by an IndexIDMap/IndexIDMap2, as int64, in storage order."""
    return faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)


def flat_vectors(index: faiss.Index) -> np.ndarray:
    """A [ntotal, d] float32 view of an ID-mapped flat index's vectors (mapped, not copied, when mmap'd)."""
    flat = faiss.downcast_index(index.index)
    n, d = int(flat.ntotal), int(flat.d)
    if n == 0:
        return np.zeros((0, d), np.float32)
    return faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)


def read_image_index(path: str | os.PathLike[str]) -> list[list[int] | None]:
    """The old image_index.json ([] when absent or unreadable)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return []
    return data if isinstance(data, list) else []


def read_summary(embeddings_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((Path(embeddings_dir) / SUMMARY).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError, OSError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    data.setdefault("models", {})
    data.setdefault("text", {})
    data.setdefault("version", 0)
    return data


def legacy_record(embeddings_dir: Path, name: str) -> dict[str, Any]:
    """What the old manifest.json says about an index (a text index shares its model's source)."""
    doc = read_summary(embeddings_dir)
    if name.endswith("_text"):
        base = name.removesuffix("_text")
        rec = dict(doc["models"].get(base) or {})
        rec.update({k: v for k, v in (doc["text"].get(base) or {}).items() if k in ("dim", "count")})
        return rec
    return dict(doc["models"].get(name) or {})


class LegacySnapshot:
    """The read contract over a legacy `.faiss` file (before or during its migration)."""

    def __init__(self, embeddings_dir: Path, name: str) -> None:
        path = legacy_path(embeddings_dir, name)
        self.path = path
        self.index = read_index(path, mmap=True)
        self.ids = index_ids(self.index)
        self._vecs = flat_vectors(self.index)
        self._order = np.argsort(self.ids, kind="stable")
        rec = legacy_record(embeddings_dir, name)
        self.model = name
        self.dim = int(self.index.d)
        self.count = len(self.ids)
        self.generation = int(read_summary(embeddings_dir).get("version", 0))
        self.source = rec.get("source")
        self.standin = bool(rec.get("standin", False))
        self.key = "listing_id" if name.endswith("_text") else "gid"

    def iter_chunks(
        self, chunk: int = 65536, since_generation: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if since_generation is not None and since_generation >= self.generation:
            return
        for s in range(0, self.count, max(1, int(chunk))):
            yield self.ids[s : s + chunk].copy(), np.array(self._vecs[s : s + chunk], dtype=np.float32)

    def get(self, gids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.asarray(gids, dtype=np.int64).ravel()
        sorted_ids = self.ids[self._order]
        if not len(sorted_ids) or not len(q):
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        at = np.minimum(np.searchsorted(sorted_ids, q), len(sorted_ids) - 1)
        found = sorted_ids[at] == q
        pos = self._order[at[found]]
        return q[found], np.array(self._vecs[pos], dtype=np.float32).reshape(-1, self.dim)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        return self.index.search(q, max(1, int(k)))

    def keys(self) -> np.ndarray:
        return np.unique(self.ids)

    def removed_since(self, generation: int) -> np.ndarray | None:
        return None if generation < self.generation else np.zeros(0, np.int64)

    def close(self) -> None:
        self.index = None  # type: ignore[assignment]
