"""The evaluation's metrics and fusions on data made by hand, where every answer is known."""

from __future__ import annotations

import math
import random

import faiss
import numpy as np
import pytest

from imageselector.evaluation import metrics
from imageselector.evaluation import stage as evaluation
from imageselector.fusion import ListingHit


def test_recall_and_ap_by_hand():
    ranked, relevant = [5, 3, 7, 9], {3, 9}
    assert metrics.recall_at_k(ranked, relevant, 1) == 0.0
    assert metrics.recall_at_k(ranked, relevant, 2) == 1.0
    assert metrics.recall_at_k(ranked, relevant, 10) == 1.0
    assert metrics.average_precision_at_k(ranked, relevant, 10) == pytest.approx((1 / 2 + 2 / 4) / 2)
    # a relevant item beyond k counts for nothing
    assert metrics.average_precision_at_k(ranked, relevant, 3) == pytest.approx((1 / 2) / 2)
    # more relevant items than k: normalised by k, so a perfect top k scores 1
    assert metrics.average_precision_at_k(list(range(20)), set(range(12)), 10) == 1.0
    # one relevant item: AP = reciprocal rank
    assert metrics.average_precision_at_k([11, 42, 13], {42}, 10) == 0.5
    assert metrics.average_precision_at_k([11, 42, 13], {99}, 10) == 0.0
    assert metrics.average_precision_at_k([1, 2], set(), 10) == 0.0


def test_query_metrics_listing_and_image_level():
    q = metrics.Query(gid=0, listing_id=100, relevant=frozenset({1, 2}))
    got = metrics.query_metrics([1, 3, 5, 2, 4], [100, 200, 300], q)
    assert got == {
        "listing_r1": 1.0,
        "listing_r10": 1.0,
        "listing_map10": 1.0,
        "image_r1": 1.0,
        "image_r10": 1.0,
        "image_map10": pytest.approx(0.75),
    }
    text_only = metrics.query_metrics(None, [200, 300, 100], q)
    assert text_only["listing_map10"] == pytest.approx(1 / 3) and math.isnan(text_only["image_r1"])


def test_bootstrap_ci():
    assert metrics.bootstrap_ci([0.4] * 30) == (0.4, 0.4)
    values = [1.0] * 60 + [0.0] * 140  # mean 0.3
    lo, hi = metrics.bootstrap_ci(values, n_boot=2000, seed=3)
    assert lo < 0.3 < hi
    assert 0.08 < hi - lo < 0.18  # about 2 x 1.96 x sqrt(0.21 / 200) = 0.127
    assert metrics.bootstrap_ci(values, n_boot=2000, seed=3) == (lo, hi)  # reproducible
    s = metrics.summarize(values, n_boot=500)
    assert s.mean == pytest.approx(0.3) and s.n == 200 and s.lo <= s.mean <= s.hi


def _angle_vectors(degrees: list[float]) -> np.ndarray:
    r = np.radians(degrees)
    return np.stack([np.cos(r), np.sin(r)], axis=1).astype(np.float32)


def test_hand_made_vectors_through_the_index(tmp_path):
    """Six 2-D unit vectors in three listings; every figure worked out by hand (see comments)."""
    # gid:      0    1     2     3     4     5
    angles = [0.0, 10.0, 80.0, 20.0, 85.0, 50.0]
    listing_of = np.array([100, 100, 100, 200, 200, 300])
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(2))
    index.add_with_ids(_angle_vectors(angles), np.arange(6, dtype=np.int64))
    faiss.write_index(index, str(tmp_path / "m.faiss"))
    li = evaluation.LoadedIndex.open("m", tmp_path)
    assert np.allclose(li.vectors([3, 0]), _angle_vectors([20.0, 0.0]), atol=1e-6)

    groups = evaluation.eligible_groups({"m": li}, listing_of)
    assert {k: v.tolist() for k, v in groups.items()} == {100: [0, 1, 2], 200: [3, 4]}  # 300 has one image

    queries = [metrics.Query(0, 100, frozenset({1, 2})), metrics.Query(3, 200, frozenset({4}))]
    hits, timings = evaluation.search_all({"m": li}, queries, listing_of, depth=10)
    # query 0 (0 deg): 1 (10), 3 (20), 5 (50), 2 (80), 4 (85); listings 100, 200, 300
    assert [h.key for h in hits[0].images["m"]] == [1, 3, 5, 2, 4]
    assert [h.listing_id for h in hits[0].listings["m"]] == [100, 200, 300]
    # query 3 (20 deg): 1 (10), 0 (0), 5 (50), 2 (80), 4 (85); listings 100, 300, 200
    assert [h.key for h in hits[1].images["m"]] == [1, 0, 5, 2, 4]
    assert [h.listing_id for h in hits[1].listings["m"]] == [100, 300, 200]
    vals = metrics.evaluate_single(hits, "m")
    # image AP: q0 (1/1 + 2/4) / 2 = 0.75; q3 relevant 4 at rank 5 -> 1/5.  listing AP: q0 1, q3 1/3
    expect = {
        "image_r1": [1.0, 0.0],
        "image_r10": [1.0, 1.0],
        "image_map10": [0.75, 0.2],
        "listing_r1": [1.0, 0.0],
        "listing_r10": [1.0, 1.0],
        "listing_map10": [1.0, 1 / 3],
    }
    for m, v in expect.items():
        assert vals[m].tolist() == pytest.approx(v), m
    assert timings["m"]["single_ms"] >= 0

    sampled = evaluation.sample_queries(groups, None, seed=1)
    assert sorted(q.listing_id for q in sampled) == [100, 200]
    for q in sampled:
        assert q.gid in groups[q.listing_id] and q.gid not in q.relevant
        assert q.relevant | {q.gid} == set(groups[q.listing_id].tolist())
    assert evaluation.sample_queries(groups, 1, seed=5) == evaluation.sample_queries(groups, 1, seed=5)


def _perfect_and_random(n_queries: int = 60, n_listings: int = 80, seed: int = 0) -> list[metrics.QueryHits]:
    """Model P always puts the query's listing first; model R ranks listings at random."""
    rng = random.Random(seed)
    out = []
    for i in range(n_queries):
        own = i + 1
        others = [x for x in range(1, n_listings + 1) if x != own]
        rng.shuffle(others)
        p_order = [own, *others[:29]]
        r_order = rng.sample(range(1, n_listings + 1), 30)
        qh = metrics.QueryHits(metrics.Query(-1, own, frozenset({own * 10})))
        for name, order in (("P", p_order), ("R", r_order)):
            scored = [(x, 0.9 - 0.01 * r if name == "P" else rng.random()) for r, x in enumerate(order)]
            scored.sort(key=lambda t: -t[1])
            qh.listings[name] = [ListingHit(x, s, x) for x, s in scored]
            qh.images[name] = [ListingHit(x * 10, s, x * 10) for x, s in scored]
        out.append(qh)
    return out


@pytest.mark.parametrize("method", ["rrf", "max"])
def test_weighted_fusion_favouring_the_perfect_model_beats_each_alone(method):
    fit, test = _perfect_and_random(60, seed=1), _perfect_and_random(60, seed=2)
    calib = {"P": metrics.Calibration(0.3, 0.2), "R": metrics.Calibration(0.5, 0.1)}  # R sometimes looks surer
    p_alone = metrics.evaluate_single(test, "P")["listing_map10"].mean()
    r_alone = metrics.evaluate_single(test, "R")["listing_map10"].mean()
    equal = metrics.evaluate_fusion(test, ["P", "R"], method, None, calib)["listing_map10"].mean()
    weights, fit_score = metrics.fit_weights(fit, ["P", "R"], method, calib)
    assert weights["P"] == 1.0 and weights["R"] < weights["P"]
    weighted = metrics.evaluate_fusion(test, ["P", "R"], method, weights, calib)
    assert p_alone == 1.0 and r_alone < 0.5
    assert equal < 1.0  # the random model's votes hurt when it counts as much
    assert weighted["listing_map10"].mean() >= p_alone and weighted["listing_map10"].mean() > r_alone
    assert weighted["listing_map10"].mean() > equal
    assert weighted["image_map10"].mean() == 1.0 and fit_score == 1.0


def test_fusion_of_complementary_models_beats_each_alone():
    """A is right on even queries, B on odd ones, both random otherwise: fused, right far more often."""
    rng = random.Random(4)
    hits = []
    for i in range(80):
        own = i + 1
        qh = metrics.QueryHits(metrics.Query(-1, own, frozenset({own})))
        for name, good in (("A", i % 2 == 0), ("B", i % 2 == 1)):
            others = rng.sample([x for x in range(1, 200) if x != own], 30)
            order = [own, *others] if good else others[:15] + [own] + others[15:]
            qh.listings[name] = [ListingHit(x, 1.0 - 0.01 * r, x) for r, x in enumerate(order)]
            qh.images[name] = list(qh.listings[name])
        hits.append(qh)
    a = metrics.evaluate_single(hits, "A")["listing_r10"].mean()
    b = metrics.evaluate_single(hits, "B")["listing_r10"].mean()
    fused = metrics.evaluate_fusion(hits, ["A", "B"], "rrf")["listing_r10"].mean()
    assert a == b == 0.5
    assert fused > max(a, b)


def test_max_score_fusion_uses_calibrated_scores():
    # model X scores everything high (0.9 / 0.85), model Y low (0.3 / 0.1); raw max would always pick X's top
    per = {"X": [ListingHit(1, 0.90, 1), ListingHit(2, 0.85, 2)], "Y": [ListingHit(2, 0.30, 2), ListingHit(1, 0.10, 1)]}
    calib = {"X": metrics.Calibration(0.88, 0.05), "Y": metrics.Calibration(0.0, 0.05)}
    assert metrics.fuse("max", per) == [1, 2]
    assert metrics.fuse("max", per, calib=calib) == [2, 1]  # Y's 0.30 is 6 sigma above its random level
    assert metrics.fuse("max", per, {"X": 1.0, "Y": 0.0}, calib) == [1, 2]  # weight 0: Y does not vote
    assert metrics.fuse("rrf", per, {"X": 0.0, "Y": 1.0}) == [2, 1]
    with pytest.raises(ValueError):
        metrics.fuse("borda", per)


def test_calibrate_random_pairs():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(400, 64)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    c = metrics.calibrate(v)
    assert abs(c.mu) < 0.02 and 0.09 < c.sigma < 0.16  # random 64-d unit vectors: sd 1/sqrt(64) = 0.125


def test_weights_are_written_only_when_fitted_on_enough_listings_and_not_worse():
    def results(n_fit: int, equal: float, fitted: float) -> dict:
        stat = lambda m: {"listing_map10": {"mean": m, "lo": m, "hi": m, "n": 100}}  # noqa: E731
        return {
            "weights": {"fitted_on": n_fit},
            "methods": [{"name": "rrf", "metrics": stat(equal)}, {"name": "rrf (weighted)", "metrics": stat(fitted)}],
        }

    assert evaluation.weights_blocker(results(100, 0.5, 0.6), min_fit=50) is None
    assert evaluation.weights_blocker(results(100, 0.5, 0.5), min_fit=50) is None
    assert "only 10 held-out" in evaluation.weights_blocker(results(10, 0.5, 0.6), min_fit=50)
    assert "did worse" in evaluation.weights_blocker(results(100, 0.6, 0.5), min_fit=50)
