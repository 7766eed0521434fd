"""Exports for a user's own scripts: a plain FAISS index of every vector by key, and image_index.json.

`export_faiss` writes exactly the bytes `faiss.write_index(IndexIDMap2(IndexFlatIP(d)))` would, but
streamed from a snapshot (vectors first, the id map after them, spooled through a temp file), so an
export of ten million vectors never holds them in memory. `faiss.read_index(OUT)` then gives an index
whose ids are gids (or listing_ids for a `_text` store): `index.search(q, k)` returns gids,
`index.reconstruct(gid)` a vector.
"""

from __future__ import annotations

import shutil
import sqlite3
import struct
import tempfile
from pathlib import Path

import numpy as np

from imageselector.fsutil import atomic_writer
from imageselector.vectorstore.store import open_snapshot

_DUMMY = 1 << 20
METRIC_INNER_PRODUCT = 0


def _header(fourcc: bytes, d: int, n: int) -> bytes:
    """faiss's write_index_header: d, ntotal, two dummies, is_trained, metric_type (IP: no metric_arg)."""
    return fourcc + struct.pack("<iqqq?i", d, n, _DUMMY, _DUMMY, True, METRIC_INNER_PRODUCT)


def export_faiss(embeddings_dir: Path, name: str, out: Path, tmp_dir: Path) -> int:
    """Write `out` (atomic: temp file, fsync, rename). Returns the number of vectors. KeyError: no vectors."""
    snap = open_snapshot(Path(embeddings_dir), name)
    if snap is None:
        raise KeyError(f"{name}: no vectors in {embeddings_dir}")
    n, d = int(snap.count), int(snap.dim)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    with atomic_writer(Path(out), tmp_dir) as f, tempfile.TemporaryFile(dir=tmp_dir) as ids:
        f.write(_header(b"IxM2", d, n))
        f.write(_header(b"IxFI", d, n))
        f.write(struct.pack("<Q", n * d))
        seen = 0
        for keys, vecs in snap.iter_chunks():
            f.write(np.ascontiguousarray(vecs, dtype="<f4").tobytes())
            ids.write(np.ascontiguousarray(keys, dtype="<i8").tobytes())
            seen += len(keys)
        if seen != n:
            raise RuntimeError(f"{name}: the snapshot yielded {seen} vectors, its manifest says {n}")
        f.write(struct.pack("<Q", n))
        ids.seek(0)
        shutil.copyfileobj(ids, f, 1 << 20)
    return n


def export_image_index(conn: sqlite3.Connection, out: Path, tmp_dir: Path) -> int:
    """image_index.json as the guide describes it: position gid -> [listing_id, image_id] (null for gaps).

    Written from the database (the truth for gids), streamed in gid order. Returns the entries written.
    """
    n = 0
    with atomic_writer(Path(out), tmp_dir) as f:
        f.write(b"[")
        nxt = 0
        for gid, lid, iid in conn.execute("SELECT gid, listing_id, image_id FROM image_status ORDER BY gid"):
            gid = int(gid)
            if gid < nxt:
                continue
            parts = ["null"] * (gid - nxt) + [f"[{int(lid)},{int(iid)}]"]
            f.write(((", " if nxt else "") + ", ".join(parts)).encode())
            nxt = gid + 1
            n += 1
        f.write(b"]")
    return n
