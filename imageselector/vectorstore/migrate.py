"""Move today's single-file indexes (`embeddings/{name}.faiss` + image_index.json) into the segment store.

`migrate_legacy_store(embeddings_dir, tmp_dir)` is the one entry point (embed.py calls it at start; the
upgrade command of issue 14 calls it too). Per index, under the model's writer lock:

1. the old file is memory-mapped (only its id map, 8 bytes a vector, is read into memory) and streamed
   in ascending key order into segments of at most `SEGMENT_ROWS` rows, each committed with a manifest
   that records how far the migration got (`migration.done_rows`) and the old file's signature;
2. a kill -9 leaves a manifest marked "migrating": readers keep reading the old file (it is untouched),
   and the next run resumes after the last committed segment (orphans of a half-written one are removed
   when the store opens);
3. the last commit marks the migration done; only then is the old file deleted.

`image_index.json` is deleted once no old index is left: gid -> (listing_id, image_id) is the database's
(`image_status`); `embed.py --export-image-index` writes that file again for a script that wants it.
Migrated segments get the top level, so compaction never rewrites them (the migration writes each
vector once).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from imageselector.fsutil import fsync_dir
from imageselector.vectorstore.legacy import (
    IMAGE_INDEX,
    flat_vectors,
    index_ids,
    legacy_path,
    legacy_record,
    read_index,
)
from imageselector.vectorstore.store import TEXT_SUFFIX, StoreWriter, read_store_manifest

log = logging.getLogger(__name__)

SEGMENT_ROWS = 262_144
COPY_ROWS = 8192
UNKNOWN_SOURCE = "unknown (migrated)"  # an old index without a manifest record: embed.py stamps its own


def legacy_names(embeddings_dir: Path) -> list[str]:
    """Old-format indexes present in `embeddings_dir` (search caches live in a subfolder, not matched)."""
    d = Path(embeddings_dir)
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.faiss") if not p.name.startswith("."))


def _sig(path: Path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _order(ids: np.ndarray) -> np.ndarray:
    """Positions in ascending key order; of a key stored twice, the later copy (what search returned last)."""
    pos = np.arange(len(ids))
    order = np.lexsort((-pos, ids))
    keep = np.ones(len(order), bool)
    keep[1:] = ids[order][1:] != ids[order][:-1]
    return order[keep]


def migrate_index(embeddings_dir: Path, tmp_dir: Path, name: str, writer: StoreWriter | None = None) -> dict[str, Any]:
    """Migrate one old index. With `writer`, it must already hold the model's lock (embed.py's case)."""
    embeddings_dir = Path(embeddings_dir)
    path = legacy_path(embeddings_dir, name)
    doc = read_store_manifest(embeddings_dir, name)
    mig = (doc or {}).get("migration") or {}
    if not path.exists():
        return {"status": "nothing"}
    if doc is not None and mig.get("done"):
        path.unlink(missing_ok=True)  # killed after the last commit, before the delete
        fsync_dir(embeddings_dir)
        return {"status": "finished", "vectors": int(doc["count"])}
    if doc is not None and not mig:
        raise RuntimeError(
            f"{name}: both {path.name} (old format) and the segment store {name}/ exist; move one away "
            f"(the store is newer unless you restored {path.name} from a backup)"
        )
    own = writer is None
    w = writer or StoreWriter(embeddings_dir, tmp_dir, background=False)
    try:
        return _migrate(embeddings_dir, name, path, w, mig)
    finally:
        if own:
            w.close()


def _migrate(embeddings_dir: Path, name: str, path: Path, w: StoreWriter, mig: dict[str, Any]) -> dict[str, Any]:
    sig = _sig(path)
    if mig and mig.get("legacy_sig") != sig:
        raise RuntimeError(f"{name}: {path.name} changed during its migration; restore it or remove {name}/")
    index = read_index(path, mmap=True)
    rec = legacy_record(embeddings_dir, name)
    text = name.endswith(TEXT_SUFFIX)
    w.open_store(
        name,
        int(index.d),
        source=str(rec.get("source") or UNKNOWN_SOURCE),
        standin=bool(rec.get("standin", False)),
        key="listing_id" if text else "gid",
    )
    ids = index_ids(index)
    vecs = flat_vectors(index)
    order = _order(ids)
    done = int(mig.get("done_rows", 0))
    status = "resumed" if done else "migrated"
    base = {"from": path.name, "legacy_sig": sig, "rows": len(order)}
    if done == 0:
        w.update_doc(name, {"migration": {**base, "done_rows": 0, "done": False}})
    level = w.policy.max_level
    while done < len(order):
        part = order[done : done + SEGMENT_ROWS]

        def chunks(p: np.ndarray = part, v: np.ndarray = vecs) -> Iterator[np.ndarray]:
            for s in range(0, len(p), COPY_ROWS):
                yield np.array(v[p[s : s + COPY_ROWS]], dtype=np.float32)

        end = done + len(part)
        extra = {"migration": {**base, "done_rows": end, "done": end == len(order)}}
        w.commit_segment(name, ids[part], chunks(), level=level, extra=extra)
        done = end
        log.info("%s: migrated %d of %d vectors", name, done, len(order))
    if not len(order):
        w.update_doc(name, {"migration": {**base, "done_rows": 0, "done": True}})
    w.write_summary([name])
    del vecs, index
    path.unlink()
    fsync_dir(embeddings_dir)
    return {"status": status, "vectors": len(order)}


def migrate_legacy_store(embeddings_dir: Path, tmp_dir: Path) -> dict[str, Any]:
    """Migrate every old-format index of `embeddings_dir`; resumable, safe to rerun and under kill -9.

    Returns {name: {"status": "migrated" | "resumed" | "finished" | "busy" | "error", ...}}; "busy" means
    an embed.py holding that model's lock (it migrates its own models when it starts).
    """
    out: dict[str, Any] = {}
    for name in legacy_names(embeddings_dir):
        try:
            out[name] = migrate_index(embeddings_dir, tmp_dir, name)
        except RuntimeError as exc:
            busy = "another process" in str(exc)
            out[name] = {"status": "busy" if busy else "error", "message": str(exc)}
            log.log(logging.INFO if busy else logging.ERROR, "%s: not migrated: %s", name, exc)
    drop_image_index(embeddings_dir)
    return out


def drop_image_index(embeddings_dir: Path) -> bool:
    """Delete the old image_index.json once no old index needs it (the database holds the mapping)."""
    p = Path(embeddings_dir) / IMAGE_INDEX
    if legacy_names(embeddings_dir) or not p.exists():
        return False
    p.unlink()
    fsync_dir(Path(embeddings_dir))
    return True
