"""Invariant checks shared by the embed tests: store keys == flagged rows, no duplicates, texts present."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from imageselector.vectorstore.store import open_snapshot


def ids_in(emb: Path, name: str) -> np.ndarray:
    """Every key a fresh snapshot yields, in iteration order (duplicates kept, so a check can see them)."""
    snap = open_snapshot(emb, name)
    if snap is None:
        return np.zeros(0, np.int64)
    keys = [k for k, _ in snap.iter_chunks(chunk=7)]
    out = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    assert len(out) == snap.count, f"{name}: snapshot yields {len(out)} keys, its manifest says {snap.count}"
    return out


def vector_of(emb: Path, name: str, key: int) -> np.ndarray:
    snap = open_snapshot(emb, name)
    assert snap is not None, f"{name}: no vectors"
    found, vecs = snap.get(np.array([key], np.int64))
    assert found.tolist() == [key], f"{name}: {key} not stored"
    return vecs[0]


def flagged(conn: sqlite3.Connection, model: str) -> set[int]:
    return {int(r[0]) for r in conn.execute(f"SELECT gid FROM image_status WHERE embed_{model}=1")}


def check_no_lies(conn: sqlite3.Connection, emb: Path, models, *, exact: bool) -> dict[str, int]:
    """Every flag of 1 has its vector in the durable store; no id twice; with `exact`, ids == flags."""
    counts = {}
    for m in models:
        ids = ids_in(emb, m)
        assert len(ids) == len(set(ids.tolist())), f"{m}: duplicate ids in the store"
        f = flagged(conn, m)
        assert f <= set(ids.tolist()), f"{m}: {len(f - set(ids.tolist()))} flag(s) of 1 without a vector"
        if exact:
            assert set(ids.tolist()) == f, f"{m}: store ids != flagged rows"
        counts[m] = len(f)
    return counts


def check_texts(conn: sqlite3.Connection, emb: Path, models) -> None:
    for m in models:
        listings = {int(r[0]) for r in conn.execute(f"SELECT DISTINCT listing_id FROM image_status WHERE embed_{m}=1")}
        ids = ids_in(emb, f"{m}_text")
        assert len(ids) == len(set(ids.tolist()))
        assert listings <= set(ids.tolist()), f"{m}: listings without a text vector"


def check_store_files(emb: Path, models) -> None:
    """Every segment a manifest names exists; no old-format file or image_index.json is left behind."""
    from imageselector.vectorstore.store import read_store_manifest

    for m in models:
        doc = read_store_manifest(emb, m)
        assert doc is not None, f"{m}: no store manifest"
        for seg in doc["segments"]:
            assert (emb / m / seg["file"]).is_file(), f"{m}: {seg['file']} named but missing"
        assert not (emb / f"{m}.faiss").exists()
    assert not (emb / "image_index.json").exists()
