"""Index choice (flat vs HNSW fp16), the derived HNSW cache with its exact tail, and reloading on change."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from imageselector.fsutil import atomic_write_bytes
from imageselector.search.indexes import IndexPolicy, IndexSet, cache_path, index_ids, update_cache

DIM = 16


def clustered(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, dim)).astype(np.float32)
    x = centres[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_store(
    d: Path, vecs: np.ndarray, ids: np.ndarray, name: str = "dinov2_base", version: int = 1, source: str = "hf:a"
) -> None:
    """The store format of embed.py: IndexIDMap2(IndexFlatIP) + manifest.json, replaced atomically."""
    d.mkdir(parents=True, exist_ok=True)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vecs.shape[1]))
    index.add_with_ids(vecs, ids.astype(np.int64))
    atomic_write_bytes(d / f"{name}.faiss", faiss.serialize_index(index).tobytes())
    rec = {"dim": vecs.shape[1], "count": len(ids), "standin": False, "source": source}
    manifest = {"models": {name: rec}, "version": version}
    atomic_write_bytes(d / "manifest.json", json.dumps(manifest).encode())


def recall_at_10(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x[:10]) & set(y[:10])) / 10 for x, y in zip(a, b, strict=True)]))


POLICY = IndexPolicy(hnsw_min=1000, m=16, ef_construction=40, ef_search=64)


def test_small_index_is_exact_and_memory_mapped(tmp_path: Path) -> None:
    x = clustered(300)
    write_store(tmp_path, x, np.arange(300) * 3)
    s = IndexSet(tmp_path, POLICY)
    assert s.refresh(force=True) == ["dinov2_base"]
    m = s.get("dinov2_base")
    assert m.kind == "flat" and not m.needs_build and m.count == 300
    scores, ids = m.search(x[7], 5)
    assert ids[0, 0] == 21 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert s.get("clip_vitb32") is None  # absent files are simply not there


def test_big_index_gets_an_hnsw_cache_with_high_recall(tmp_path: Path) -> None:
    x = clustered(3000)
    ids = np.arange(3000) + 10
    write_store(tmp_path, x, ids)
    s = IndexSet(tmp_path, POLICY)
    s.refresh(force=True)
    assert s.get("dinov2_base").kind == "flat" and s.needing_build() == ["dinov2_base"]
    assert s.build_caches() == {"dinov2_base": 3000}
    m = s.get("dinov2_base")
    assert m.kind == "hnsw" and not m.needs_build and cache_path(tmp_path, "dinov2_base").exists()
    assert isinstance(faiss.downcast_index(m.main.index), faiss.IndexHNSWSQ)  # fp16 storage
    q = clustered(50, seed=9)
    exact = faiss.IndexFlatIP(DIM)
    exact.add(x)
    _, gt = exact.search(q, 10)
    _, got = m.search(q, 10)
    assert recall_at_10(got, ids[gt]) >= 0.9
    assert update_cache("dinov2_base", tmp_path, POLICY) == 0  # nothing new: no rewrite


def test_new_vectors_are_searched_exactly_until_the_graph_catches_up(tmp_path: Path) -> None:
    x = clustered(2000)
    write_store(tmp_path, x, np.arange(2000))
    s = IndexSet(tmp_path, POLICY)
    s.refresh(force=True)
    s.build_caches()
    new = clustered(150, seed=5)
    write_store(tmp_path, np.vstack([x, new]), np.arange(2150), version=2)  # embed.py appended
    assert s.refresh(force=True) == ["dinov2_base"]
    m = s.get("dinov2_base")
    assert m.kind == "hnsw" and m.describe()["tail"] == 150 and m.needs_build and m.count == 2150
    _, ids = m.search(new[42], 3)
    assert ids[0, 0] == 2042  # found in the exact tail
    assert s.build_caches() == {"dinov2_base": 150}
    assert s.get("dinov2_base").describe()["tail"] == 0


def test_cache_with_dropped_ids_is_not_trusted(tmp_path: Path) -> None:
    x = clustered(1500)
    write_store(tmp_path, x, np.arange(1500))
    update_cache("dinov2_base", tmp_path, POLICY)
    write_store(tmp_path, x[100:], np.arange(100, 1500), version=2)  # ids 0..99 gone
    s = IndexSet(tmp_path, POLICY)
    s.refresh(force=True)
    m = s.get("dinov2_base")
    assert m.kind == "flat" and m.needs_build and "stale" in m.note
    s.build_caches()
    cache = faiss.read_index(str(cache_path(tmp_path, "dinov2_base")))
    assert sorted(index_ids(cache).tolist()) == list(range(100, 1500))


def test_cache_built_from_another_models_vectors_is_rebuilt(tmp_path: Path) -> None:
    """Re-embedding with other weights keeps every id but changes every vector: the source stamp catches it."""
    ids = np.arange(1500)
    old, new = clustered(1500, seed=1), clustered(1500, seed=2)
    write_store(tmp_path, old, ids, source="hf:old-weights")
    update_cache("dinov2_base", tmp_path, POLICY)
    write_store(tmp_path, new, ids, version=2, source="hf:new-weights")  # same ids, other vectors
    s = IndexSet(tmp_path, POLICY)
    s.refresh(force=True)
    m = s.get("dinov2_base")
    assert m.kind == "flat" and m.needs_build and "another model" in m.note
    assert s.build_caches() == {"dinov2_base": 1500}  # rebuilt whole, not "nothing new"
    m = s.get("dinov2_base")
    assert m.kind == "hnsw" and m.describe()["tail"] == 0
    _, got = m.search(new[:20], 1)
    assert np.mean(got[:, 0] == ids[:20]) >= 0.9  # answers from the new vectors
    write_store(tmp_path, new, ids, version=3, source="hf:new-weights")
    assert update_cache("dinov2_base", tmp_path, POLICY) == 0  # same source again: nothing to do


def test_refresh_is_cheap_and_a_corrupt_file_keeps_the_old_index(tmp_path: Path) -> None:
    x = clustered(200)
    write_store(tmp_path, x, np.arange(200))
    s = IndexSet(tmp_path, POLICY)
    s.refresh(force=True)
    assert s.refresh(check_s=0) == []  # nothing changed
    atomic_write_bytes(tmp_path / "dinov2_base.faiss", b"not a faiss file")
    assert s.refresh(check_s=0) == []
    assert "cannot read dinov2_base.faiss" in s.errors["dinov2_base"]
    assert s.get("dinov2_base").count == 200
    write_store(tmp_path, x[:50], np.arange(50), version=3)
    assert s.refresh(check_s=0) == ["dinov2_base"] and s.get("dinov2_base").count == 50
    assert not s.errors and s.manifest["version"] == 3


def _rss_anon_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def test_vectors_are_memory_mapped_not_copied(tmp_path: Path) -> None:
    if _rss_anon_mb() is None:
        pytest.skip("needs /proc/self/status (Linux) to tell mapped from private memory")
    x = clustered(8000, dim=1024)  # 32 MB of vectors
    write_store(tmp_path, x, np.arange(8000))
    before = _rss_anon_mb()
    s = IndexSet(tmp_path, POLICY)
    s.refresh(force=True)
    s.get("dinov2_base").search(x[:1], 5)
    assert _rss_anon_mb() - before < 16  # a copy would add 32 MB of private memory
