"""Writing adopted vectors into the embedding store: the one module that knows the store's file format.

Today's store (vectorstore/store.py): `{model}.faiss` = IndexIDMap2(IndexFlatIP) keyed by gid,
`{model}_text.faiss` the same keyed by listing_id, `image_index.json` (gid -> [listing_id, image_id]) and
`manifest.json`. The index files are written here by streaming FAISS's own serialisation (two headers,
the float32 codes, the ids) chunk by chunk, so adopting a model never holds its whole index in memory;
the header bytes come from faiss itself (an empty index serialised) and the result is what
`faiss.read_index` reads back. When the segment store (issue 15) lands, `adopt_vectors_into_store`
becomes StoreWriter.append per chunk + commit, and `write_id_entries` goes away.

Write order, as the store's flush: text index, image index, manifest; `image_index.json` before all of
them (written once per upgrade). Every file: temp in .tmp, fsync, rename, fsync folder.
"""

from __future__ import annotations

import contextlib
import json
import struct
import time
from collections.abc import Iterable
from pathlib import Path

import faiss
import numpy as np

from imageselector.fsutil import atomic_write_text, atomic_writer, file_lock
from imageselector.vectorstore.store import IMAGE_INDEX, MANIFEST, TEXT_SUFFIX, read_image_index, read_manifest

Chunks = Iterable[tuple[np.ndarray, np.ndarray]]  # (int64 keys, float32 [n, dim])

_HEADER = 37  # fourcc, d, ntotal, 2 dummies, is_trained, metric_type (see faiss/impl/index_write.cpp)


def _template(dim: int) -> bytes:
    """An empty IndexIDMap2(IndexFlatIP(dim)) as faiss writes it; checked so a format change fails loudly."""
    raw = faiss.serialize_index(faiss.IndexIDMap2(faiss.IndexFlatIP(int(dim)))).tobytes()
    if len(raw) != 2 * _HEADER + 16 or raw[:4] != b"IxM2" or raw[_HEADER : _HEADER + 4] != b"IxFI":
        raise RuntimeError(f"unexpected faiss serialisation ({len(raw)} bytes): cannot stream-write the index")
    return raw


def write_flat_idmap(path: Path, tmp_dir: Path, dim: int, count: int, chunks: Chunks) -> int:
    """Stream `count` vectors and their ids into an IndexIDMap2(IndexFlatIP) file, atomically."""
    tpl = bytearray(_template(dim))
    struct.pack_into("<q", tpl, 8, count)
    struct.pack_into("<q", tpl, _HEADER + 8, count)
    ids: list[np.ndarray] = []
    written = 0
    with atomic_writer(Path(path), tmp_dir) as f:
        f.write(bytes(tpl[: 2 * _HEADER]))
        f.write(struct.pack("<Q", count * dim))
        for keys, vecs in chunks:
            vecs = np.ascontiguousarray(vecs, dtype=np.float32)
            if vecs.shape != (len(keys), dim):
                raise ValueError(f"chunk of shape {vecs.shape}, expected ({len(keys)}, {dim})")
            f.write(vecs.tobytes())
            ids.append(np.asarray(keys, dtype="<i8"))
            written += len(keys)
        if written != count:
            raise RuntimeError(f"{path.name}: {written} vectors streamed, {count} announced")
        f.write(struct.pack("<Q", count))
        for a in ids:
            f.write(a.tobytes())
    return written


def write_id_entries(embeddings_dir: Path, tmp_dir: Path, gids: np.ndarray, pairs: np.ndarray) -> None:
    """Merge gid -> [listing_id, image_id] entries into image_index.json (under the store's shared lock)."""
    path = Path(embeddings_dir) / IMAGE_INDEX
    with file_lock(Path(embeddings_dir) / ".shared.lock"):
        merged = read_image_index(path)
        top = int(gids.max()) + 1 if len(gids) else 0
        if top > len(merged):
            merged.extend([None] * (top - len(merged)))
        for g, (lid, iid) in zip(gids.tolist(), pairs.tolist(), strict=True):
            merged[g] = [lid, iid]
        atomic_write_text(path, json.dumps(merged, separators=(",", ":")), tmp_dir)


def adopt_vectors_into_store(
    embeddings_dir: Path,
    tmp_dir: Path,
    model: str,
    dim: int,
    meta: dict[str, object],
    images: tuple[int, Chunks],
    text: tuple[int, Chunks] | None = None,
) -> None:
    """Make `model`'s vectors in the store exactly the ones given (keys: gids; text keys: listing_ids).

    `images`/`text` are (count, chunks). Holds the model's writer lock, as an embed process would.
    """
    d = Path(embeddings_dir)
    with contextlib.ExitStack() as stack:
        if not stack.enter_context(file_lock(d / f".{model}.lock", blocking=False)):
            raise RuntimeError(f"another process is writing {model}'s index (lock {d / f'.{model}.lock'})")
        if text is not None:
            write_flat_idmap(d / f"{model}{TEXT_SUFFIX}.faiss", tmp_dir, dim, text[0], text[1])
        write_flat_idmap(d / f"{model}.faiss", tmp_dir, dim, images[0], images[1])
        with file_lock(d / ".shared.lock"):
            doc = read_manifest(d / MANIFEST)
            now = time.time()
            doc["models"][model] = {**meta, "dim": dim, "count": images[0], "updated_at": now}
            if text is not None:
                doc["text"][model] = {"dim": dim, "count": text[0], "updated_at": now, "key": "listing_id"}
            else:
                doc["text"].pop(model, None)
            doc["version"] = int(doc.get("version", 0)) + 1
            atomic_write_text(d / MANIFEST, json.dumps(doc, indent=1, sort_keys=True), tmp_dir)
