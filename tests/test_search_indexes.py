"""Index choice (exact vs compressed IVF-PQ + re-rank), the stamp, the exact tail of new vectors, rebuilds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np
import pytest

from imageselector.fsutil import atomic_write_bytes
from imageselector.search import ivfpq
from imageselector.search.indexes import IndexPolicy, IndexSet, cache_dir, update_index
from imageselector.vectorstore.store import StoreWriter

DIM = 32


def clustered(n: int, seed: int = 0, dim: int = DIM, centres: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(99).normal(size=(centres, dim)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + 0.35 * rng.normal(size=(n, dim)).astype(np.float32)
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
    atomic_write_bytes(d / "manifest.json", json.dumps({"models": {name: rec}, "version": version}).encode())


def exact_top(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    return ids[flat.search(q, k)[1]]


def recall(got: np.ndarray, want: np.ndarray) -> float:
    k = want.shape[1]
    return float(np.mean([len(set(a[:k]) & set(b)) / k for a, b in zip(got, want, strict=True)]))


POLICY = IndexPolicy(index_min=1000, nlist=32, pq_m=8, nprobe=8, rerank=100, train_sample=4000, tail_merge=500)


def built(tmp_path: Path, n: int = 3000) -> tuple[IndexSet, np.ndarray]:
    x = clustered(n)
    write_store(tmp_path, x, np.arange(n))
    s = IndexSet(tmp_path, POLICY)
    s.refresh(force=True)
    assert s.build_caches() == {"dinov2_base": n}
    return s, x


def test_small_store_is_searched_exactly(tmp_path: Path) -> None:
    x = clustered(300)
    write_store(tmp_path, x, np.arange(300) * 3)
    s = IndexSet(tmp_path, POLICY)
    assert s.refresh(force=True) == ["dinov2_base"]
    m = s.get("dinov2_base")
    assert m.kind == "exact" and not m.needs_build and m.count == 300
    scores, ids = m.search(x[7], 5)
    assert ids[0, 0] == 21 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert s.get("clip_vitb32") is None  # absent models are simply not there


def test_big_store_is_scanned_exactly_until_its_compressed_index_is_built(tmp_path: Path) -> None:
    x = clustered(3000)
    ids = np.arange(3000) + 10
    write_store(tmp_path, x, ids)
    s = IndexSet(tmp_path, POLICY)
    s.refresh(force=True)
    m = s.get("dinov2_base")
    assert m.kind == "scan" and s.needing_build() == ["dinov2_base"]
    q = clustered(60, seed=9)
    want = exact_top(x, ids, q, 10)
    assert (m.search(q, 10)[1] == want).all()  # the scan is exact
    assert s.build_caches() == {"dinov2_base": 3000}
    m = s.get("dinov2_base")
    assert m.kind == "ivfpq" and not m.needs_build and m.count == 3000
    scores, got = m.search(q, 10)
    assert recall(got, want) >= 0.95
    flat = faiss.IndexFlatIP(DIM)
    flat.add(x)
    exact_scores = flat.search(q, 10)[0]
    assert np.allclose(scores[:, 0], exact_scores[:, 0], atol=2e-3)  # re-ranked: exact (fp16) scores
    stamp = ivfpq.read_stamp(cache_dir(tmp_path), "dinov2_base")
    assert stamp["source"] == "hf:a" and stamp["generation"] == 1 and stamp["rows"] == 3000
    assert update_index("dinov2_base", tmp_path, POLICY) == 0  # current: nothing to do


def test_a_freshly_flushed_vector_is_found_without_a_rebuild(tmp_path: Path) -> None:
    s, x = built(tmp_path)
    stamp_before = ivfpq.read_stamp(cache_dir(tmp_path), "dinov2_base")
    new = clustered(150, seed=5)
    write_store(tmp_path, np.vstack([x, new]), np.arange(3150), version=2)  # embed.py flushed 150 more
    assert s.refresh(check_s=0) == ["dinov2_base"]
    m = s.get("dinov2_base")
    assert m.kind == "ivfpq" and m.describe()["tail"] == 150 and m.count == 3150 and not m.needs_build
    _, ids = m.search(new[42], 3)
    assert ids[0, 0] == 3042  # found, from the exact tail
    # the ensemble's exact head scores by gid in the index (fp16 on disk) and in the tail (fp32 in memory)
    got = m.exact_by_gid(new[42], np.array([3042, 7, 99_999], dtype=np.int64))
    np.testing.assert_allclose(got[0], float(new[42] @ new[42]), rtol=1e-6)
    np.testing.assert_allclose(got[1], float(x[7].astype(np.float16).astype(np.float32) @ new[42]), rtol=1e-5)
    assert np.isnan(got[2])
    assert ivfpq.read_stamp(cache_dir(tmp_path), "dinov2_base") == stamp_before  # no rebuild happened


def test_a_big_tail_is_folded_into_the_index_without_retraining(tmp_path: Path) -> None:
    s, x = built(tmp_path)
    new = clustered(600, seed=6)
    write_store(tmp_path, np.vstack([x, new]), np.arange(3600), version=2)
    s.refresh(check_s=0)
    assert s.needing_build() == ["dinov2_base"]  # 600 >= tail_merge
    assert s.build_caches() == {"dinov2_base": 600}
    m = s.get("dinov2_base")
    stamp = ivfpq.read_stamp(cache_dir(tmp_path), "dinov2_base")
    assert m.describe()["tail"] == 0 and m.count == 3600 and stamp["version"] == 2 and stamp["generation"] == 2
    q = clustered(40, seed=11)
    assert recall(m.search(q, 10)[1], exact_top(np.vstack([x, new]), np.arange(3600), q, 10)) >= 0.95
    assert m.search(new[7], 1)[1][0, 0] == 3007
    # exact scores by gid reach rows of both the build and the append, and say NaN for a gid not held
    probe = np.array([3007, 5, 10**9], dtype=np.int64)
    got = m.exact_by_gid(new[7], probe)
    ref = np.vstack([new[7], x[5]]).astype(np.float16).astype(np.float32) @ new[7]
    np.testing.assert_allclose(got[:2], ref, rtol=1e-5)
    assert np.isnan(got[2])
    names = {p.name for p in (cache_dir(tmp_path) / stamp["dir"]).iterdir()}
    assert names == {
        "ivf.2.faiss",
        "sorted.2.npy",
        "order.2.npy",
        "refine.npy",
        "refine.bin",
        "vec16.bin",
        "gids.bin",
    }  # old collected


def test_index_built_from_another_models_vectors_is_not_used(tmp_path: Path) -> None:
    """Re-embedding with other weights keeps every id but changes every vector: the source stamp catches it."""
    ids = np.arange(3000)
    s, _ = built(tmp_path)
    new = clustered(3000, seed=2)
    write_store(tmp_path, new, ids, version=2, source="hf:new-weights")
    s.refresh(check_s=0)
    m = s.get("dinov2_base")
    assert m.kind == "scan" and m.needs_build and "another model" in m.note
    assert m.search(new[:5], 1)[1][:, 0].tolist() == [0, 1, 2, 3, 4]  # the scan answers from the new vectors
    assert s.build_caches() == {"dinov2_base": 3000}
    m = s.get("dinov2_base")
    assert m.kind == "ivfpq" and ivfpq.read_stamp(cache_dir(tmp_path), "dinov2_base")["source"] == "hf:new-weights"
    assert np.mean(m.search(new[:50], 1)[1][:, 0] == ids[:50]) >= 0.95


def test_vectors_removed_from_the_store_trigger_a_rebuild(tmp_path: Path) -> None:
    s, x = built(tmp_path)
    write_store(tmp_path, x[100:], np.arange(100, 3000), version=2)  # ids 0..99 gone
    s.refresh(check_s=0)
    m = s.get("dinov2_base")
    assert m.needs_build and "left the store" in m.note
    assert s.build_caches() == {"dinov2_base": 2900}
    m = s.get("dinov2_base")
    assert m.count == 2900 and not m.needs_build
    assert m.search(x[5], 1)[1][0, 0] >= 100


def test_interrupted_builds_and_appends_leave_the_committed_index_whole(tmp_path: Path) -> None:
    s, x = built(tmp_path)
    cdir = cache_dir(tmp_path)
    stamp = ivfpq.read_stamp(cdir, "dinov2_base")
    # a builder killed mid-way left its work directory; an append killed before its stamp left extra rows
    dead = cdir / ".dinov2_base.building-999999-abcdef"
    dead.mkdir()
    with open(cdir / stamp["dir"] / "vec16.bin", "ab") as f:
        f.write(b"\0" * DIM * 2 * 7)
    with open(cdir / stamp["dir"] / "refine.bin", "ab") as f:
        f.write(b"\7" * stamp["refine_m"] * 7)
    s2 = IndexSet(tmp_path, POLICY)
    s2.refresh(force=True)
    m = s2.get("dinov2_base")
    assert m.kind == "ivfpq" and m.count == 3000 and m.search(x[3], 1)[1][0, 0] == 3
    new = clustered(600, seed=8)
    write_store(tmp_path, np.vstack([x, new]), np.arange(3600), version=2)
    s2.refresh(check_s=0)
    assert s2.build_caches() == {"dinov2_base": 600}
    assert not dead.exists()
    assert os.path.getsize(cdir / stamp["dir"] / "vec16.bin") == 3600 * DIM * 2  # the stray rows were cut
    assert os.path.getsize(cdir / stamp["dir"] / "refine.bin") == 3600 * stamp["refine_m"]
    assert s2.get("dinov2_base").search(new[9], 1)[1][0, 0] == 3009


def test_refresh_is_cheap_and_a_corrupt_file_keeps_the_old_index(tmp_path: Path) -> None:
    x = clustered(200)
    write_store(tmp_path, x, np.arange(200))
    s = IndexSet(tmp_path, POLICY)
    s.refresh(force=True)
    assert s.refresh(check_s=0) == []  # nothing changed
    atomic_write_bytes(tmp_path / "dinov2_base.faiss", b"not a faiss file")
    write_store(tmp_path / "other", x[:1], np.arange(1))  # a manifest for 'count': the file must be read
    atomic_write_bytes(tmp_path / "manifest.json", json.dumps({"models": {}, "version": 2}).encode())
    assert s.refresh(check_s=0) == []
    assert "cannot read dinov2_base.faiss" in s.errors["dinov2_base"]
    assert s.get("dinov2_base").count == 200
    write_store(tmp_path, x[:50], np.arange(50), version=3)
    assert s.refresh(check_s=0) == ["dinov2_base"] and s.get("dinov2_base").count == 50
    assert not s.errors and s.manifest["version"] == 3


def test_an_index_of_the_earlier_format_is_scanned_and_rebuilt(tmp_path: Path) -> None:
    """An ivfpq-rerank-1 index (no refinement codes) from the previous version reads as absent."""
    s, x = built(tmp_path)
    cdir = cache_dir(tmp_path)
    stamp = ivfpq.read_stamp(cdir, "dinov2_base")
    old = {**stamp, "format": "ivfpq-rerank-1"}
    del old["refine_m"]
    ivfpq.stamp_path(cdir, "dinov2_base").write_text(json.dumps(old))
    s2 = IndexSet(tmp_path, POLICY)
    s2.refresh(force=True)
    m = s2.get("dinov2_base")
    assert m.kind == "scan" and s2.needing_build() == ["dinov2_base"] and m.search(x[5], 1)[1][0, 0] == 5
    assert s2.build_caches() == {"dinov2_base": 3000} and s2.get("dinov2_base").kind == "ivfpq"


def topics_and_subspace(n: int, dim: int = 1024, topics: int = 800, rank: int = 64, seed: int = 0) -> np.ndarray:
    """bench/search.py's catalogue in small: topics spread over every dimension, each photo's variation in one
    shared low-rank subspace (so the top principal components hold the variation, not the topic)."""
    rng = np.random.default_rng(seed)
    t = rng.standard_normal((topics, dim)).astype(np.float32)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    basis = rng.standard_normal((rank, dim)).astype(np.float32) / np.sqrt(dim)
    z = rng.standard_normal((n, rank)).astype(np.float32) / np.sqrt(rank)
    iso = 0.15 * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    x = t[rng.integers(0, topics, n)] + z @ basis + iso
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_every_vector_sits_in_its_exact_nearest_list(tmp_path: Path) -> None:
    """1024-d vectors in >= 1024 lists, on the data where the PCA-128 shortlist that chose lists until
    2026-11-30 misplaced 6% of them (a query then never probes their list)."""
    n, nlist = 16_000, 1024
    x = topics_and_subspace(n)
    params = ivfpq.BuildParams(nlist=nlist, m=16, refine_m=16, train_sample=n, kmeans_iters=2)
    stamp = ivfpq.build(_ArraySnapshot(x), "wide", tmp_path, params, tmp_path)
    assert stamp is not None and stamp["assign"] == "exact" and stamp["nlist"] == nlist
    index = faiss.read_index(str(tmp_path / stamp["dir"] / stamp["ivf"]))  # owns what extract_index_ivf returns
    ivf = faiss.extract_index_ivf(index)
    centroids = ivf.quantizer.reconstruct_n(0, nlist)
    list_of = np.full(n, -1, np.int64)
    for lst in range(nlist):
        size = ivf.invlists.list_size(lst)
        if size:
            list_of[faiss.rev_swig_ptr(ivf.invlists.get_ids(lst), size).copy()] = lst
    assert np.array_equal(list_of, np.argmax(x @ centroids.T, axis=1))


def test_lists_grow_with_the_catalogue_and_probes_with_the_lists(tmp_path: Path) -> None:
    """The documented sizes: 2*sqrt(n) lists up to ~1M vectors, ~n/512 beyond (16384 at 10M); 256 probes,
    1/16 of the lists beyond 4096. An index opened with nprobe 0 probes its own lists' share."""
    assert [ivfpq.auto_nlist(n) for n in (3000, 200_000, 1_000_000, 1_200_000, 4_000_000, 10_000_000)] == [
        76,  # at most n/39 lists: faiss wants 39 training points per list
        1024,
        2048,
        2048,
        8192,
        16384,
    ]
    assert ivfpq.auto_nlist(10**9) == ivfpq.NLIST_MAX
    assert [ivfpq.auto_nprobe(k) for k in (64, 2048, 8192, 16384)] == [64, 256, 512, 1024]
    s, _ = built(tmp_path)
    stamp = ivfpq.read_stamp(cache_dir(tmp_path), "dinov2_base")
    assert [ivfpq.auto_candidates(p) for p in (256, 1024)] == [2000, 3072]
    opened = ivfpq.CompressedIndex(cache_dir(tmp_path), stamp, 0, 10)
    assert opened.nprobe == min(stamp["nlist"], 256) and opened.n_candidates == 2000


class _ArraySnapshot:
    """The read contract of snapshots.py over an array in memory (gid = row)."""

    def __init__(self, x: np.ndarray) -> None:
        self.x, self.dim, self.count, self.generation, self.source = x, x.shape[1], len(x), 1, "test:array"

    def iter_chunks(self, chunk: int = 65536, since_generation: int | None = None):  # type: ignore[no-untyped-def]
        for s in range(0, self.count, chunk):
            yield np.arange(s, min(s + chunk, self.count), dtype=np.int64), self.x[s : s + chunk]


def test_an_index_with_shortlisted_lists_serves_while_it_is_rebuilt(tmp_path: Path) -> None:
    """A stamp without "assign": "exact" (lists chosen by the old PCA shortlist) is still searched, is rebuilt
    whole rather than appended to, and the rebuilt stamp says exact."""
    s, x = built(tmp_path)
    cdir = cache_dir(tmp_path)
    stamp = ivfpq.read_stamp(cdir, "dinov2_base")
    old = {k: v for k, v in stamp.items() if k != "assign"}
    ivfpq.stamp_path(cdir, "dinov2_base").write_text(json.dumps(old))
    new = clustered(10, seed=12)  # a small tail: alone it would be appended
    write_store(tmp_path, np.vstack([x, new]), np.arange(3010), version=2)
    s2 = IndexSet(tmp_path, POLICY)
    s2.refresh(force=True)
    m = s2.get("dinov2_base")
    assert m.kind == "ivfpq" and m.needs_build and m.rebuild and "PCA shortlist" in m.note
    assert m.search(x[5], 1)[1][0, 0] == 5 and m.search(new[3], 1)[1][0, 0] == 3003
    assert s2.build_caches() == {"dinov2_base": 3010}  # every row built afresh, not 10 appended
    rebuilt = ivfpq.read_stamp(cdir, "dinov2_base")
    assert rebuilt["assign"] == "exact" and rebuilt["version"] == 1 and rebuilt["dir"] != stamp["dir"]
    assert not s2.get("dinov2_base").needs_build
    assert update_index("dinov2_base", tmp_path, POLICY) == 0  # current now: nothing to do


def _rss_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_anon_mb() -> float | None:
    kb = _rss_kb("RssAnon")
    return None if kb is None else kb / 1024


def test_full_vectors_stay_on_disk_only_the_codes_are_in_memory(tmp_path: Path) -> None:
    if _rss_anon_mb() is None:
        pytest.skip("needs /proc/self/status (Linux) to tell mapped from private memory")
    x = clustered(12000, dim=1024)  # 48 MB fp32, 24 MB fp16 on disk
    write_store(tmp_path, x, np.arange(12000))
    policy = IndexPolicy(index_min=1000, nlist=64, pq_m=32, nprobe=8, rerank=100, train_sample=3000)
    assert update_index("dinov2_base", tmp_path, policy) == 12000
    before = _rss_anon_mb()
    s = IndexSet(tmp_path, policy)
    s.refresh(force=True)
    m = s.get("dinov2_base")
    assert m.kind == "ivfpq" and m.search(x[:20], 5)[1][:, 0].tolist() == list(range(20))
    assert _rss_anon_mb() - before < 10  # codes ~2 MB; a copy of the vectors would add 24-48 MB
    file_before = _rss_kb("RssFile")
    assert m.search(x[1000:1200], 10)[1][:, 0].tolist() == list(range(1000, 1200))
    # 200 queries x 100 exact re-rank rows: read with pread, not mapped (a memory map would fault in ~20 MB)
    assert (_rss_kb("RssFile") - file_before) / 1024 < 5


def test_segment_store_commit_is_searchable_at_once_and_folded_in_later(tmp_path: Path) -> None:
    """The same through the segment store's writer: since_generation yields only the new rows."""
    emb = tmp_path / "emb"
    w = StoreWriter(emb, tmp_path / ".tmp", background=False)
    w.open_model("dinov2_base", DIM, text=False, source="s", standin=False)
    x = clustered(3000)
    w.append("dinov2_base", np.arange(3000), x)
    w.commit()
    s = IndexSet(emb, POLICY)
    s.refresh(force=True)
    assert s.build_caches() == {"dinov2_base": 3000}
    new = clustered(40, seed=12)
    w.append("dinov2_base", np.arange(5000, 5040), new)
    w.commit()
    assert s.refresh(check_s=0) == ["dinov2_base"]
    m = s.get("dinov2_base")
    assert m.kind == "ivfpq" and m.describe()["tail"] == 40 and m.search(new[3], 1)[1][0, 0] == 5003
    w.remove("dinov2_base", np.arange(10))
    w.commit()
    s.refresh(check_s=0)
    assert s.get("dinov2_base").needs_build  # removals: a rebuild is queued
    assert s.build_caches() == {"dinov2_base": 3030}
    assert s.get("dinov2_base").describe()["tail"] == 0
    w.close()
