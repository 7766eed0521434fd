"""The FAISS store: one in-memory index per model, mirrored to `embeddings/` by atomic file replace.

Files (readers rely on these):
- `{name}.faiss`: IndexIDMap2(IndexFlatIP(dim)); ids are `image_status.gid`, so an id means the same
  image in every model's index even though the models progress at different rates.
- `clip_vitb32_text.faiss`, `clip_vitl14_text.faiss`: the same kind of index keyed by listing_id.
- `image_index.json`: a list, position = gid -> [listing_id, image_id], null where no index has the gid.
- `manifest.json`: {"models": {name: {dim, count, updated_at, standin, source}}, "text": {...}, "version": n}.

A flush writes, in this order, so that every file on disk is always consistent with the ones written
before it: text indexes, `image_index.json`, image indexes, `manifest.json`. Hence at every instant an id
in an image index has its `image_index.json` entry, and its listing has its text vector. Each file is
written to `<home>/.tmp`, fsynced and renamed over the old one; a `kill -9` leaves the old file whole.
The done flags are set by the stage only after `flush()` returns (see stage.py).

Several embed processes may run (one per model); each model's index has one writer, enforced by an
exclusive lock file. The shared files (`image_index.json`, `manifest.json`) are merged under a second
lock: a gid's [listing_id, image_id] never changes, so merging is a union.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from imageselector.fsutil import atomic_write_text, atomic_writer, file_lock

log = logging.getLogger(__name__)

IMAGE_INDEX = "image_index.json"
MANIFEST = "manifest.json"
TEXT_SUFFIX = "_text"
BLAS_THRESHOLD = 20


def configure_faiss() -> None:
    """Small query batches must not take FAISS's BLAS path (measured 10x slower here): see ENVIRONMENT_NOTES."""
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD


def new_index(dim: int) -> faiss.IndexIDMap2:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(int(dim)))


# IO_FLAG_MMAP_IFC maps the vectors of flat-code indexes straight from the file; plain IO_FLAG_MMAP still
# copies them into memory in faiss 1.15 (measured by the search tests).
MMAP_FLAGS = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY


def read_index(path: str | os.PathLike[str], mmap: bool = False) -> faiss.Index:
    """Read one `.faiss` file (optionally memory-mapped); sets the FAISS search tuning as a side effect."""
    configure_faiss()
    flags = MMAP_FLAGS if mmap else 0
    return faiss.read_index(str(path), flags) if flags else faiss.read_index(str(path))


def index_ids(index: faiss.Index) -> np.ndarray:
    """The ids held by an IndexIDMap/IndexIDMap2, as int64, in storage order."""
    return faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)


def write_index(index: faiss.Index, path: Path, tmp_dir: Path) -> None:
    """Durable atomic replace: serialise into a temp file in `tmp_dir`, fsync, rename, fsync the folder."""
    with atomic_writer(Path(path), tmp_dir) as f:
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))


def read_image_index(path: str | os.PathLike[str]) -> list[list[int] | None]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    return data if isinstance(data, list) else []


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {"models": {}, "text": {}, "version": 0}
    data.setdefault("models", {})
    data.setdefault("text", {})
    data.setdefault("version", 0)
    return data


class VectorIndex:
    """One index (image vectors keyed by gid, or text vectors keyed by listing_id) and its file."""

    def __init__(self, path: Path, dim: int) -> None:
        self.path = Path(path)
        self.dim = int(dim)
        if self.path.exists():
            self.index = read_index(self.path)
            if self.index.d != self.dim:
                raise ValueError(f"{self.path} holds {self.index.d}-dim vectors, the model gives {self.dim}")
        else:
            self.index = new_index(self.dim)
        self.ids: set[int] = set(index_ids(self.index).tolist())
        self.dirty = False

    def __contains__(self, key: int) -> bool:
        return int(key) in self.ids

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, keys: Sequence[int], vecs: np.ndarray) -> int:
        """Append vectors under new ids; a key already present is replaced (never duplicated)."""
        keys = [int(k) for k in keys]
        if not keys:
            return 0
        present = [k for k in keys if k in self.ids]
        if present:
            log.warning(
                "%s: replacing %d vector(s) already present (ids %s...)", self.path.name, len(present), present[:3]
            )
            self.remove(present)
        vecs = np.ascontiguousarray(vecs, dtype=np.float32).reshape(len(keys), self.dim)
        self.index.add_with_ids(vecs, np.asarray(keys, dtype=np.int64))
        self.ids.update(keys)
        self.dirty = True
        return len(keys)

    def remove(self, keys: Iterable[int]) -> int:
        keys = [int(k) for k in keys if int(k) in self.ids]
        if not keys:
            return 0
        n = int(self.index.remove_ids(np.asarray(keys, dtype=np.int64)))
        self.ids.difference_update(keys)
        self.dirty = True
        return n

    def vector(self, key: int) -> np.ndarray:
        return self.index.reconstruct(int(key))

    def write(self, tmp_dir: Path) -> float:
        """Write the file if changed; returns the seconds it took (0 if nothing to do)."""
        if not self.dirty and self.path.exists():
            return 0.0
        t0 = time.monotonic()
        write_index(self.index, self.path, tmp_dir)
        self.dirty = False
        return time.monotonic() - t0


class Store:
    """The in-memory side of `embeddings/` for the models this process owns."""

    def __init__(self, embeddings_dir: Path, tmp_dir: Path) -> None:
        self.dir = Path(embeddings_dir)
        self.tmp_dir = Path(tmp_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.images: dict[str, VectorIndex] = {}
        self.texts: dict[str, VectorIndex] = {}
        self.meta: dict[str, dict[str, Any]] = {}
        # gid -> (listing_id, image_id) not yet merged into image_index.json (ids we added or re-checked)
        self.new_entries: dict[int, tuple[int, int]] = {}
        self._ii_cache: list[list[int] | None] | None = None
        self._ii_stamp: tuple[int, int] | None = None
        self._locks: list[contextlib.ExitStack] = []
        self.last_write_s = 0.0

    # ---- ownership -----------------------------------------------------------------------------
    def lock_path(self, name: str) -> Path:
        return self.dir / f".{name}.lock"

    def open_model(self, name: str, dim: int, *, text: bool, source: str, standin: bool) -> None:
        """Take the model's writer lock and load its index (and text index). Raises RuntimeError if busy."""
        stack = contextlib.ExitStack()
        if not stack.enter_context(file_lock(self.lock_path(name), blocking=False)):
            stack.close()
            raise RuntimeError(f"another process is embedding {name} (lock {self.lock_path(name)})")
        self._locks.append(stack)
        self.images[name] = VectorIndex(self.dir / f"{name}.faiss", dim)
        if text:
            self.texts[name] = VectorIndex(self.dir / f"{name}{TEXT_SUFFIX}.faiss", dim)
        self.meta[name] = {"dim": dim, "source": source, "standin": standin}

    def close(self) -> None:
        for stack in self._locks:
            stack.close()
        self._locks.clear()

    # ---- writing -------------------------------------------------------------------------------
    def total_vectors(self) -> int:
        return sum(len(ix) for ix in self.images.values())

    def dirty(self) -> bool:
        return any(ix.dirty for ix in (*self.images.values(), *self.texts.values()))

    def flush(self, on_durable: Callable[[str], None] | None = None, *, force_meta: bool = False) -> float:
        """Make everything added so far durable, in the order the module docstring argues for.

        `on_durable(name)` runs right after model `name`'s index file is durable (the stage sets its
        done flags there), so a failure writing one model never delays or fakes another's flags.
        """
        if not self.dirty() and not force_meta and not self.new_entries:
            return 0.0
        t0 = time.monotonic()
        for ix in self.texts.values():
            ix.write(self.tmp_dir)
        with file_lock(self.dir / ".shared.lock"):
            self._write_image_index()
        for name, ix in self.images.items():
            ix.write(self.tmp_dir)
            if on_durable is not None:
                on_durable(name)
        with file_lock(self.dir / ".shared.lock"):
            self._write_manifest()
        self.last_write_s = time.monotonic() - t0
        return self.last_write_s

    def _write_image_index(self) -> None:
        """Merge the entries added since the last write into the file (re-read only if someone else wrote it)."""
        path = self.dir / IMAGE_INDEX
        try:
            st = os.stat(path)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp is None or stamp != self._ii_stamp or self._ii_cache is None:
            self._ii_cache = read_image_index(path)
        merged = self._ii_cache
        top = max(self.new_entries, default=-1)
        changed = stamp is None
        if top >= len(merged):
            merged.extend([None] * (top + 1 - len(merged)))
            changed = True
        for g, (lid, iid) in self.new_entries.items():
            if merged[g] != [lid, iid]:
                merged[g] = [lid, iid]
                changed = True
        if changed:
            try:
                atomic_write_text(path, json.dumps(merged, separators=(",", ":")), self.tmp_dir)
            except BaseException:
                self._ii_cache = None  # the cache now differs from the file: re-read next time
                raise
            st = os.stat(path)
            self._ii_stamp = (st.st_mtime_ns, st.st_size)
        self.new_entries.clear()

    def _write_manifest(self) -> None:
        path = self.dir / MANIFEST
        doc = read_manifest(path)
        now = time.time()
        for name, ix in self.images.items():
            doc["models"][name] = {**self.meta[name], "count": len(ix), "updated_at": now}
        for name, ix in self.texts.items():
            doc["text"][name] = {"dim": ix.dim, "count": len(ix), "updated_at": now, "key": "listing_id"}
        doc["version"] = int(doc.get("version", 0)) + 1
        atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=True), self.tmp_dir)

    def recorded(self, name: str) -> dict[str, Any] | None:
        """What the manifest on disk says about a model (source, dim, count), or None."""
        return read_manifest(self.dir / MANIFEST)["models"].get(name)
