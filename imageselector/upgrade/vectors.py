"""The vectors step: the original row-order FAISS indexes into the store, keyed by gid, without re-embedding.

The original pipeline wrote `embeddings/{model}.faiss` in row order: row i of every model is the image
`image_index.json[i] = [listing_id, image_id]` (IMAC_OPERATIONS.md §8), and `clip_*_text.faiss` beside
them. Those names are today's store's names too, so the legacy files are first moved aside into
`embeddings/legacy/` (renames; once all are moved the marker says so), then each model is adopted:

- any index whose stored vectors decode exactly is accepted: IndexFlat (IP, L2), IndexIDMap/IDMap2
  around one (its ids are the row numbers), IndexHNSWFlat, IndexScalarQuantizer fp16/bf16. Lossy codes
  (PQ, SQ8/SQ4, IVF-PQ, ...) are refused with one line: that model's rows are queued to embed again;
- it is read memory-mapped, `reconstruct_n` a chunk at a time, and written through store_adapter: the
  vector of row i goes in under the gid of image_index.json[i], bit for bit;
- reconciled and reported: rows beyond image_index.json or naming no database row (kept only in the
  legacy file), a second row for one image (the first wins), a vector for a row that is not
  background-removed (not adopted: the embed stage would drop it), a flag of 1 without a vector (set to
  0: queued again), a vector whose flag was 0 (flag set);
- a text index is adopted when its rows map to listings: one row per image row (the listing of
  image_index.json[i]), every copy of a listing's vector identical, or an IDMap keyed by listing_id.
  Otherwise it is left in legacy/ and the embed stage encodes listing texts again at its next start.

Per model, files first (store_adapter), then one transaction: its flags and the marker's "done" list.
A kill between the two redoes that model (same bytes) on the rerun.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from imageselector import db
from imageselector.fsutil import fsync_dir
from imageselector.upgrade.rows import MISSING, Rows
from imageselector.upgrade.state import write_marker
from imageselector.upgrade.store_adapter import adopt_vectors_into_store, write_id_entries
from imageselector.vectorstore.store import IMAGE_INDEX, TEXT_SUFFIX

LEGACY_DIR = "legacy"
TEXT_MODELS = ("clip_vitb32", "clip_vitl14")
CHUNK_BYTES = 32 << 20
DUPLICATE = -3
_EXACT_SQ = {int(faiss.ScalarQuantizer.QT_fp16), int(faiss.ScalarQuantizer.QT_bf16)}
MMAP_FLAGS = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY


class Refused(Exception):
    """A legacy index whose vectors cannot be recovered bit for bit (or do not fit the model)."""


def legacy_names() -> list[str]:
    return [f"{m}.faiss" for m in db.EMBED_MODELS] + [f"{m}{TEXT_SUFFIX}.faiss" for m in TEXT_MODELS] + [IMAGE_INDEX]


@dataclass
class TextReport:
    vectors: int = 0
    adopted: int = 0
    outcome: str = "none"  # none | adopted | re-encode: <why>


@dataclass
class ModelReport:
    model: str
    kind: str = "missing"
    dim: int = 0
    vectors: int = 0
    adopted: int = 0
    unmapped: int = 0
    duplicates: int = 0
    not_ready: int = 0
    flag_set: int = 0
    requeued: int = 0
    refused: str | None = None
    text: TextReport = field(default_factory=TextReport)


class LegacyIndex:
    """One legacy .faiss file, memory-mapped; `rows[k]` is the row number of stored vector k."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._raw = faiss.read_index(str(path), MMAP_FLAGS)
        except RuntimeError:
            self._raw = faiss.read_index(str(path))
        top = faiss.downcast_index(self._raw)
        self._top = top
        self.kind = type(top).__name__
        self.dim = int(top.d)
        self.ntotal = int(top.ntotal)
        ids = None
        store = top
        if isinstance(top, faiss.IndexIDMap | faiss.IndexIDMap2):
            store = faiss.downcast_index(top.index)
            self.kind = f"{self.kind}({type(store).__name__})"
            ids = faiss.vector_to_array(top.id_map).astype(np.int64)
        self._store = store
        self._check(store)
        self.rows = ids if ids is not None else np.arange(self.ntotal, dtype=np.int64)

    def _check(self, store: Any) -> None:
        if isinstance(store, faiss.IndexFlat):
            return
        if isinstance(store, faiss.IndexHNSWFlat) and isinstance(faiss.downcast_index(store.storage), faiss.IndexFlat):
            return
        if isinstance(store, faiss.IndexScalarQuantizer) and int(store.sq.qtype) in _EXACT_SQ:
            return
        raise Refused(f"{self.path.name} is {self.kind}: its stored codes are lossy, the vectors cannot be recovered")

    def read(self, start: int, n: int) -> np.ndarray:
        return np.ascontiguousarray(self._store.reconstruct_n(start, n), dtype=np.float32)

    def get(self, positions: np.ndarray) -> np.ndarray:
        return np.stack([self._store.reconstruct(int(p)) for p in positions]).astype(np.float32, copy=False)

    def chunk(self) -> int:
        return max(1, CHUNK_BYTES // (4 * max(1, self.dim)))


def open_legacy(path: Path) -> LegacyIndex:
    try:
        return LegacyIndex(path)
    except Refused:
        raise
    except Exception as exc:  # noqa: BLE001 - faiss raises RuntimeError with C++ text for a bad file
        raise Refused(f"{path.name} is not a readable FAISS index: {str(exc).splitlines()[0][:200]}") from None


# --------------------------------------------------------------------------------------------------
# Moving the legacy files aside, and the row map
# --------------------------------------------------------------------------------------------------


def legacy_dir(embeddings_dir: Path) -> Path:
    return Path(embeddings_dir) / LEGACY_DIR


def move_aside(embeddings_dir: Path, tick: Callable[[], None]) -> list[str]:
    """Rename the original files into embeddings/legacy/ (skipping ones already there). Returns names moved."""
    src_dir = Path(embeddings_dir)
    dst_dir = legacy_dir(src_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    fsync_dir(src_dir)
    moved = []
    for name in legacy_names():
        src, dst = src_dir / name, dst_dir / name
        if dst.exists() or not src.exists():
            continue
        os.rename(src, dst)
        moved.append(name)
        tick()
    fsync_dir(dst_dir)
    fsync_dir(src_dir)
    return moved


def legacy_file(embeddings_dir: Path, name: str, moved: bool) -> Path:
    """Where a legacy file is: in legacy/ once moved aside (or during the move), else still in place."""
    aside = legacy_dir(embeddings_dir) / name
    return aside if moved or aside.exists() else Path(embeddings_dir) / name


@dataclass
class RowMap:
    """Legacy row number -> row position in image_status (or MISSING / AMBIGUOUS / DUPLICATE)."""

    pos: np.ndarray
    entries: int
    bad_entries: int

    def of(self, rows: np.ndarray) -> np.ndarray:
        out = np.full(len(rows), MISSING, dtype=np.int64)
        ok = (rows >= 0) & (rows < len(self.pos))
        out[ok] = self.pos[rows[ok]]
        return out


def load_row_map(path: Path, table: Rows) -> RowMap:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return RowMap(np.zeros(0, dtype=np.int64), 0, 0)
    if not isinstance(data, list):
        raise Refused(f"{path} is not a JSON list of [listing_id, image_id]")
    lids = np.full(len(data), -1, dtype=np.int64)
    iids = np.full(len(data), -1, dtype=np.int64)
    bad = 0
    for i, e in enumerate(data):
        if isinstance(e, list | tuple) and len(e) == 2 and all(isinstance(v, int) for v in e):
            lids[i], iids[i] = e
        else:
            bad += 1
    del data
    pos = table.find(lids, iids)
    pos[iids == -1] = MISSING
    # a second row naming the same image: the first one wins
    valid = np.nonzero(pos >= 0)[0]
    _, first = np.unique(pos[valid], return_index=True)
    dup = np.ones(len(valid), dtype=bool)
    dup[first] = False
    pos[valid[dup]] = DUPLICATE
    return RowMap(pos, len(lids), bad)


# --------------------------------------------------------------------------------------------------
# One model
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelPlan:
    report: ModelReport
    index: LegacyIndex | None = None
    take: np.ndarray | None = None  # storage positions adopted, in storage order
    gids: np.ndarray | None = None
    adopted_gids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    text: LegacyIndex | None = None
    text_take: np.ndarray | None = None
    text_keys: np.ndarray | None = None


def plan_model(
    model: str, dim: int | None, path: Path, text_path: Path | None, rowmap: RowMap, table: Rows
) -> ModelPlan:
    """Everything about one model's adoption that can be known before writing (used by --dry-run too)."""
    rep = ModelReport(model)
    plan = ModelPlan(rep)
    col = f"embed_{model}"
    flags = table.flags[col]
    if path.exists():
        try:
            ix = open_legacy(path)
            rep.kind, rep.dim, rep.vectors = ix.kind, ix.dim, ix.ntotal
            if dim is not None and ix.dim != dim:
                raise Refused(f"{path.name} holds {ix.dim}-dim vectors, the registry's {model} gives {dim}")
            plan.index = ix
        except Refused as exc:
            rep.refused = str(exc)
    if plan.index is not None:
        ix = plan.index
        pos = rowmap.of(ix.rows)
        rep.duplicates = int((pos == DUPLICATE).sum())
        rep.unmapped = int(((pos < 0) & (pos != DUPLICATE)).sum())
        mapped = pos >= 0
        ready = np.zeros(len(pos), dtype=bool)
        p = pos[mapped]
        ready[mapped] = (table.flags["bg_removed"][p] == 1) & (table.parked[col][p] == 0)
        rep.not_ready = int((mapped & ~ready).sum())
        plan.take = np.nonzero(ready)[0]
        plan.gids = table.gid[pos[plan.take]]
        plan.adopted_gids = plan.gids
        adopted_pos = pos[plan.take]
        rep.adopted = len(plan.take)
        has = np.zeros(len(table), dtype=bool)
        has[adopted_pos] = True
        rep.flag_set = int((has & (flags == 0)).sum())
        rep.requeued = int(((flags == 1) & ~has).sum())
    else:
        rep.requeued = int((flags == 1).sum())
    if text_path is not None and text_path.exists():
        _plan_text(plan, text_path, rowmap, table, dim)
    return plan


def _plan_text(plan: ModelPlan, path: Path, rowmap: RowMap, table: Rows, dim: int | None) -> None:
    tr = plan.report.text
    try:
        tx = open_legacy(path)
    except Refused as exc:
        tr.outcome = f"re-encode: {exc}"
        return
    tr.vectors = tx.ntotal
    if dim is not None and tx.dim != dim:
        tr.outcome = f"re-encode: {path.name} holds {tx.dim}-dim vectors, not {dim}"
        return
    listing_ids = set(table.lid.tolist()) if tx.kind.startswith("IndexIDMap") else set()
    if tx.kind.startswith("IndexIDMap") and len(tx.rows) and all(int(r) in listing_ids for r in tx.rows[:1000]):
        keys = tx.rows
        known = np.isin(keys, np.fromiter(listing_ids, dtype=np.int64))
        _, first = np.unique(keys, return_index=True)
        take = np.intersect1d(np.nonzero(known)[0], first)
        plan.text, plan.text_take, plan.text_keys = tx, take, keys[take]
        tr.adopted, tr.outcome = len(take), "adopted (ids are listing ids)"
        return
    if tx.ntotal != rowmap.entries or tx.kind.startswith("IndexIDMap"):
        tr.outcome = (
            f"re-encode: {tx.ntotal:,} text rows for {rowmap.entries:,} image_index.json entries: rows cannot be "
            "mapped to listings"
        )
        return
    pos = rowmap.of(tx.rows)
    lids = np.where(pos >= 0, table.lid[np.maximum(pos, 0)], -1)
    valid = np.nonzero(lids >= 0)[0]
    uniq, first_idx = np.unique(lids[valid], return_index=True)
    first_of = dict(zip(uniq.tolist(), valid[first_idx].tolist(), strict=True))
    # every other row of a listing must hold the very same vector, else rows are not per image
    step = tx.chunk()
    for start in range(0, tx.ntotal, step):
        n = min(step, tx.ntotal - start)
        block = tx.read(start, n)
        idx = np.arange(start, start + n)
        others = [
            (k, first_of[int(lids[i])]) for k, i in enumerate(idx) if lids[i] >= 0 and first_of[int(lids[i])] != i
        ]
        if others:
            firsts = tx.get(np.asarray([f for _, f in others]))
            if not np.array_equal(block[[k for k, _ in others]], firsts):
                tr.outcome = "re-encode: rows of one listing hold different vectors: rows are not one per image"
                return
    take = np.sort(valid[first_idx])
    plan.text, plan.text_take, plan.text_keys = tx, take, lids[take]
    tr.adopted, tr.outcome = len(take), "adopted (row i = listing of image_index.json[i])"


def _chunks(ix: LegacyIndex, take: np.ndarray, keys: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Read the adopted vectors in storage order, one memory-mapped chunk at a time."""
    step = ix.chunk()
    j = 0
    for start in range(0, ix.ntotal, step):
        n = min(step, ix.ntotal - start)
        k = j
        while k < len(take) and take[k] < start + n:
            k += 1
        if k > j:
            block = ix.read(start, n)
            yield keys[j:k], block[take[j:k] - start]
        j = k


def adopt_model(
    plan: ModelPlan, embeddings_dir: Path, tmp_dir: Path, meta: dict[str, Any], tick: Callable[[], None]
) -> None:
    """Write the model's vectors (and text vectors) into the store."""
    rep = plan.report
    dim = rep.dim
    if plan.index is None or plan.take is None or plan.gids is None:
        return

    def ticking(it: Iterator[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for item in it:
            yield item
            tick()

    text = None
    if plan.text is not None and plan.text_take is not None and plan.text_keys is not None:
        text = (len(plan.text_take), ticking(_chunks(plan.text, plan.text_take, plan.text_keys)))
    images = (len(plan.take), ticking(_chunks(plan.index, plan.take, plan.gids)))
    adopt_vectors_into_store(embeddings_dir, tmp_dir, rep.model, dim, meta, images, text)


def write_entries(embeddings_dir: Path, tmp_dir: Path, plans: list[ModelPlan], table: Rows) -> int:
    """image_index.json entries for every adopted gid (before any index file names them)."""
    gids = np.unique(np.concatenate([p.adopted_gids for p in plans])) if plans else np.zeros(0, dtype=np.int64)
    if not len(gids):
        return 0
    pos = table.pos_of_gid(gids)
    pairs = np.stack([table.lid[pos], table.iid[pos]], axis=1)
    write_id_entries(embeddings_dir, tmp_dir, gids, pairs)
    return len(gids)


@db.retry_on_lock
def apply_flags(conn: sqlite3.Connection, model: str, gids: np.ndarray, marker: dict[str, Any]) -> tuple[int, int]:
    """One transaction: flag exactly the adopted rows for this model, re-queue the rest, record it done.

    Returns (flags set, flags reset)."""
    st = db.stage(f"embed_{model}")
    with db.Transaction(conn):
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS _adopted(gid INTEGER PRIMARY KEY)")
        conn.execute("DELETE FROM _adopted")
        conn.executemany("INSERT OR IGNORE INTO _adopted(gid) VALUES (?)", ((int(g),) for g in gids))
        set_n = conn.execute(
            f"UPDATE image_status SET {st.done_col}=1, {st.claim_col}=NULL, {st.not_before_col}=0,"
            f" {st.error_col}=NULL WHERE {st.done_col}=0 AND gid IN (SELECT gid FROM _adopted)"
        ).rowcount
        reset_n = conn.execute(
            f"UPDATE image_status SET {st.done_col}=0, {st.claim_col}=NULL, {st.not_before_col}=0,"
            f" {st.attempts_col}=0, {st.error_col}=NULL, {st.parked_col}=0"
            f" WHERE {st.done_col}=1 AND gid NOT IN (SELECT gid FROM _adopted)"
        ).rowcount
        conn.execute("DELETE FROM _adopted")
        done = list(marker.get("models_done", []))
        if model not in done:
            done.append(model)
        marker["models_done"] = done
        write_marker(conn, marker)
    return set_n, reset_n


def close_plan(plan: ModelPlan) -> None:
    with contextlib.suppress(Exception):
        plan.index = None
        plan.text = None
