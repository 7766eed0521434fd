"""Ranking and aggregation on hand-made vectors: max per listing, consensus over single-model outliers."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from imageselector.fusion import ListingHit, aggregate_max, load_weights, rrf_fuse, weight_for


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_aggregate_keeps_the_best_image_of_each_listing():
    listing_of = {10: 1, 11: 1, 12: 1, 20: 2, 30: 3}.get
    hits = aggregate_max([11, 20, 10, 12, 30, -1, 99], [0.5, 0.7, 0.9, 0.1, 0.7, 0.0, 0.99], listing_of)
    assert [(h.listing_id, h.score, h.key) for h in hits] == [(1, pytest.approx(0.9), 10), (2, 0.7, 20), (3, 0.7, 30)]


def test_aggregate_from_a_real_flat_index():
    """Listing 1 has three images; the query is nearest to its second one, so listing 1 scores that image."""
    rng = np.random.default_rng(0)
    vecs = np.stack([_unit(rng.normal(size=8)) for _ in range(6)])
    listing_of = {0: 1, 1: 1, 2: 1, 3: 2, 4: 2, 5: 3}
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(8))
    index.add_with_ids(vecs, np.arange(6, dtype=np.int64))
    q = _unit(vecs[1] + 0.05 * rng.normal(size=8))[None]
    scores, ids = index.search(q, 6)
    hits = aggregate_max(ids[0], scores[0], listing_of.get)
    assert hits[0].listing_id == 1 and hits[0].key == 1
    assert len(hits) == 3  # one entry per listing, not per image
    assert hits[0].score == pytest.approx(float(vecs[1] @ q[0]), abs=1e-5)


def test_consensus_beats_a_single_model_outlier():
    """Listing 7 is first for one model only; listing 5 is found by all three at rank 2-3: 5 must win."""
    per_model = {
        "a": [ListingHit(7, 0.99, 70), ListingHit(5, 0.8, 50), ListingHit(6, 0.7, 60)],
        "b": [ListingHit(4, 0.9, 40), ListingHit(5, 0.85, 51), ListingHit(6, 0.5, 61)],
        "c": [ListingHit(3, 0.9, 30), ListingHit(6, 0.8, 62), ListingHit(5, 0.7, 52)],
    }
    fused = rrf_fuse(per_model)
    assert fused[0].listing_id == 5 and fused[0].n_models == 3
    assert fused[1].listing_id == 6
    assert [f.listing_id for f in fused].index(7) > 1
    assert fused[0].ranks == {"a": 2, "b": 2, "c": 3}
    assert fused[0].scores["a"] == pytest.approx(0.8)
    assert fused[0].fused == pytest.approx(1 / 62 + 1 / 62 + 1 / 63)


def test_weights_change_the_vote():
    per_model = {
        "a": [ListingHit(1, 0.9, 1), ListingHit(2, 0.8, 2)],
        "b": [ListingHit(2, 0.9, 2), ListingHit(1, 0.8, 1)],
    }
    assert rrf_fuse(per_model, {"a": 1.0, "b": 1.0})[0].n_models == 2
    assert rrf_fuse(per_model, {"a": 2.0, "b": 1.0})[0].listing_id == 1
    assert rrf_fuse(per_model, {"a": 0.0, "b": 1.0})[0].listing_id == 2


def test_ties_break_on_model_count_then_mean_score():
    per_model = {
        "a": [ListingHit(1, 0.9, 1), ListingHit(2, 0.95, 2)],
        "b": [ListingHit(2, 0.6, 2), ListingHit(1, 0.5, 1)],
    }
    fused = rrf_fuse(per_model)  # equal fused scores: 1/61 + 1/62 each
    assert fused[0].fused == pytest.approx(fused[1].fused)
    assert fused[0].listing_id == 2  # higher mean similarity


def test_weights_file(tmp_path):
    assert load_weights(tmp_path) == ({}, "equal weights")
    (tmp_path / "fusion_weights.json").write_text(
        json.dumps({"method": "grid search on held-out queries", "weights": {"clip_vitb32": 0.5, "dinov2_base": "x"}})
    )
    weights, method = load_weights(tmp_path)
    assert weights == {"clip_vitb32": 0.5} and method == "grid search on held-out queries"
    assert weight_for(weights, "clip_vitb32_text") == 0.5
    assert weight_for(weights, "dinov3_base") == 1.0
    (tmp_path / "fusion_weights.json").write_text("{not json")
    assert load_weights(tmp_path)[0] == {}
