"""Invariant checks shared by the embed tests: index ids == flagged rows, no duplicates, texts present."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np

from imageselector.embedding.store import index_ids, read_index


def ids_in(path: Path) -> np.ndarray:
    return index_ids(read_index(path)) if path.exists() else np.zeros(0, np.int64)


def flagged(conn: sqlite3.Connection, model: str) -> set[int]:
    return {int(r[0]) for r in conn.execute(f"SELECT gid FROM image_status WHERE embed_{model}=1")}


def check_no_lies(conn: sqlite3.Connection, emb: Path, models, *, exact: bool) -> dict[str, int]:
    """Every flag of 1 has its vector in the durable file; no id twice; with `exact`, ids == flags."""
    counts = {}
    for m in models:
        ids = ids_in(emb / f"{m}.faiss")
        assert len(ids) == len(set(ids.tolist())), f"{m}: duplicate ids in the index"
        f = flagged(conn, m)
        assert f <= set(ids.tolist()), f"{m}: {len(f - set(ids.tolist()))} flag(s) of 1 without a vector"
        if exact:
            assert set(ids.tolist()) == f, f"{m}: index ids != flagged rows"
        counts[m] = len(f)
    return counts


def check_texts(conn: sqlite3.Connection, emb: Path, models) -> None:
    for m in models:
        listings = {int(r[0]) for r in conn.execute(f"SELECT DISTINCT listing_id FROM image_status WHERE embed_{m}=1")}
        ids = ids_in(emb / f"{m}_text.faiss")
        assert len(ids) == len(set(ids.tolist()))
        assert listings <= set(ids.tolist()), f"{m}: listings without a text vector"


def check_image_index(conn: sqlite3.Connection, emb: Path, models) -> None:
    entries = json.loads((emb / "image_index.json").read_text())
    for m in models:
        for g in ids_in(emb / f"{m}.faiss").tolist():
            row = conn.execute("SELECT listing_id, image_id FROM image_status WHERE gid=?", (g,)).fetchone()
            assert entries[g] == [row[0], row[1]]
