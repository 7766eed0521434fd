"""Retrieval quality on the user's own catalogue: the metrics, the fusions and the weight fitting (pure code).

Ground truth comes free: the photos of one Etsy listing show the same product. A query is one image of
a listing with two or more embedded images; the query image itself is removed from the results; the
listing's OTHER images are the relevant set. Two levels:

- image level: the ranked images. recall@k = 1 if any relevant image is in the top k (the "Recall@K" of
  product-image retrieval benchmarks such as Stanford Online Products, which is this very setup), else 0;
  AP@10 = sum over ranks i <= 10 holding a relevant image of precision@i, divided by min(|relevant|, 10).
- listing level: images collapse to listings (max score per listing, `search.ensemble.aggregate_max`, as
  the search page does). The one relevant listing is the query's own, so recall@k = 1 if it is in the
  top k, and AP@10 is its reciprocal rank (0 beyond rank 10).

Each figure is the mean over query listings, with a 95% bootstrap confidence interval over those listings.
Fusions reuse the search's own code: weighted reciprocal-rank fusion (`rrf_fuse`); max-score fusion
ranks by each listing's best weighted z-score across models (raw cosines of different models are not
comparable, so each model's scores are standardised against its similarity between random images).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from imageselector.fusion import DEFAULT_RRF_K, Fused, ListingHit, aggregate_max, rrf_fuse

AP_K = 10
METRICS: tuple[str, ...] = ("listing_r1", "listing_r10", "listing_map10", "image_r1", "image_r10", "image_map10")
LISTING_METRICS = METRICS[:3]
METRIC_LABELS = {
    "listing_r1": "L R@1",
    "listing_r10": "L R@10",
    "listing_map10": "L mAP@10",
    "image_r1": "I R@1",
    "image_r10": "I R@10",
    "image_map10": "I mAP@10",
}
WEIGHT_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


# --------------------------------------------------------------------------------------------------
# Metrics (pure)
# --------------------------------------------------------------------------------------------------


def recall_at_k(ranked: Sequence[int], relevant: set[int] | frozenset[int], k: int) -> float:
    """1.0 if any relevant item is among the first k, else 0.0."""
    return 1.0 if any(r in relevant for r in ranked[:k]) else 0.0


def average_precision_at_k(ranked: Sequence[int], relevant: set[int] | frozenset[int], k: int = AP_K) -> float:
    """AP@k: mean of precision@i over the ranks i <= k that hold a relevant item, over min(|relevant|, k)."""
    if not relevant:
        return 0.0
    hits = 0
    total = 0.0
    for i, r in enumerate(ranked[:k], start=1):
        if r in relevant:
            hits += 1
            total += hits / i
    return total / min(len(relevant), k)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (resampling the queries, i.e. the query listings)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return (math.nan, math.nan)
    if v.size == 1 or np.all(v == v[0]):
        return (float(v[0]), float(v[0]))
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    step = max(1, 2_000_000 // v.size)  # bound the index matrix's memory
    for start in range(0, n_boot, step):
        stop = min(n_boot, start + step)
        means[start:stop] = v[rng.integers(0, v.size, size=(stop - start, v.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Stat:
    """A mean with its bootstrap interval, over n queries."""

    mean: float
    lo: float
    hi: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "n": self.n}


def summarize(values: Sequence[float] | np.ndarray, *, n_boot: int = 1000, seed: int = 0) -> Stat:
    v = np.asarray(values, dtype=np.float64)
    lo, hi = bootstrap_ci(v, n_boot=n_boot, seed=seed)
    return Stat(float(v.mean()) if v.size else math.nan, lo, hi, int(v.size))


@dataclass(frozen=True)
class Query:
    """One query: an image of a listing, and that listing's other images (the relevant set)."""

    gid: int
    listing_id: int
    relevant: frozenset[int]


def query_metrics(image_ranking: Sequence[int] | None, listing_ranking: Sequence[int], q: Query) -> dict[str, float]:
    """The six figures for one query. `image_ranking` None (a listing-keyed index) leaves image metrics NaN."""
    own = {q.listing_id}
    out = {
        "listing_r1": recall_at_k(listing_ranking, own, 1),
        "listing_r10": recall_at_k(listing_ranking, own, 10),
        "listing_map10": average_precision_at_k(listing_ranking, own, AP_K),
    }
    if image_ranking is None:
        out.update(image_r1=math.nan, image_r10=math.nan, image_map10=math.nan)
    else:
        out.update(
            image_r1=recall_at_k(image_ranking, q.relevant, 1),
            image_r10=recall_at_k(image_ranking, q.relevant, 10),
            image_map10=average_precision_at_k(image_ranking, q.relevant, AP_K),
        )
    return out


# --------------------------------------------------------------------------------------------------
# Fusion
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """A model's similarity between unrelated images: mean and spread, to turn cosines into z-scores."""

    mu: float
    sigma: float

    def z(self, score: float) -> float:
        return (score - self.mu) / self.sigma


def calibrate(vectors: np.ndarray, *, max_n: int = 1000, seed: int = 0) -> Calibration:
    """Mean/std of cosine similarity over pairs of distinct stored vectors (random images)."""
    v = np.asarray(vectors, dtype=np.float32)
    if len(v) > max_n:
        v = v[np.random.default_rng(seed).choice(len(v), max_n, replace=False)]
    if len(v) < 2:
        return Calibration(0.0, 1.0)
    sims = v @ v.T
    iu = np.triu_indices(len(v), k=1)
    s = sims[iu].astype(np.float64)
    return Calibration(float(s.mean()), float(max(s.std(), 1e-6)))


def max_score_fuse(
    per_model: Mapping[str, list[ListingHit]],
    weights: Mapping[str, float] | None = None,
    calib: Mapping[str, Calibration] | None = None,
) -> list[Fused]:
    """Rank by the best weighted (z-)score any model gives a listing: the guide's "max score per listing".

    A model with weight 0 does not vote. Ties: more models, then listing id.
    """
    out: dict[int, Fused] = {}
    for model, hits in per_model.items():
        w = 1.0 if weights is None else float(weights.get(model, 1.0))
        if w <= 0:
            continue
        cal = calib.get(model) if calib else None
        for rank, hit in enumerate(hits, start=1):
            s = w * (cal.z(hit.score) if cal is not None else hit.score)
            f = out.get(hit.listing_id)
            if f is None:
                f = out[hit.listing_id] = Fused(hit.listing_id, -math.inf)
            f.fused = max(f.fused, s)
            f.scores[model] = hit.score
            f.ranks[model] = rank
            f.keys[model] = hit.key
    return sorted(out.values(), key=lambda f: (-f.fused, -f.n_models, f.listing_id))


def fuse(
    method: str,
    per_model: Mapping[str, list[ListingHit]],
    weights: Mapping[str, float] | None = None,
    calib: Mapping[str, Calibration] | None = None,
    rrf_k: float = DEFAULT_RRF_K,
) -> list[int]:
    """Fused ranking of keys (listing ids, or gids at image level) by `rrf` or `max`."""
    if method == "rrf":
        if weights is not None:
            per_model = {m: h for m, h in per_model.items() if weights.get(m, 1.0) > 0}
        return [f.listing_id for f in rrf_fuse(per_model, weights, rrf_k)]
    if method == "max":
        return [f.listing_id for f in max_score_fuse(per_model, weights, calib)]
    raise ValueError(f"unknown fusion method {method!r} (rrf, max)")


# --------------------------------------------------------------------------------------------------
# Per-query results and their evaluation
# --------------------------------------------------------------------------------------------------


@dataclass
class QueryHits:
    """What each index returned for one query (query image already removed), best first."""

    query: Query
    images: dict[str, list[ListingHit]] = field(default_factory=dict)  # model -> gid-keyed hits
    listings: dict[str, list[ListingHit]] = field(default_factory=dict)  # model (and *_text) -> listing hits


def hits_from_search(
    ids: Sequence[int], scores: Sequence[float], exclude: int, listing_of: Callable[[int], int | None], depth: int
) -> tuple[list[ListingHit], list[ListingHit]]:
    """(image hits keyed by gid, listing hits) for one model's raw FAISS answer, without the query image."""
    keep = [(int(i), float(s)) for i, s in zip(ids, scores, strict=True) if int(i) >= 0 and int(i) != exclude][:depth]
    gids = [i for i, _ in keep]
    sc = [s for _, s in keep]
    return aggregate_max(gids, sc, lambda g: g), aggregate_max(gids, sc, listing_of)


def evaluate_single(hits: Sequence[QueryHits], model: str) -> dict[str, np.ndarray]:
    """Per-query figures of one index alone (a `*_text` index has listing level only)."""
    rows = []
    for qh in hits:
        image = qh.images.get(model)
        rows.append(
            query_metrics(
                None if image is None else [h.key for h in image],
                [h.listing_id for h in qh.listings.get(model, [])],
                qh.query,
            )
        )
    return {m: np.array([r[m] for r in rows]) for m in METRICS}


def evaluate_fusion(
    hits: Sequence[QueryHits],
    models: Sequence[str],
    method: str,
    weights: Mapping[str, float] | None = None,
    calib: Mapping[str, Calibration] | None = None,
    rrf_k: float = DEFAULT_RRF_K,
    listing_only: bool = False,
) -> dict[str, np.ndarray]:
    """Per-query figures of a fusion of `models` (image level fuses the models' image rankings the same way)."""
    rows = []
    for qh in hits:
        per_listing = {m: qh.listings[m] for m in models if m in qh.listings}
        listing_rank = fuse(method, per_listing, weights, calib, rrf_k)
        image_rank = None
        if not listing_only:
            per_image = {m: qh.images[m] for m in models if m in qh.images}
            image_rank = fuse(method, per_image, weights, calib, rrf_k)
        rows.append(query_metrics(image_rank, listing_rank, qh.query))
    return {m: np.array([r[m] for r in rows]) for m in METRICS}


def fit_weights(
    hits: Sequence[QueryHits],
    models: Sequence[str],
    method: str,
    calib: Mapping[str, Calibration] | None = None,
    rrf_k: float = DEFAULT_RRF_K,
    grid: Sequence[float] = WEIGHT_GRID,
    sweeps: int = 2,
    metric: str = "listing_map10",
) -> tuple[dict[str, float], float]:
    """Per-model weights maximising the fused `metric` on `hits` (coordinate ascent over `grid`).

    Starts from equal weights and keeps a change only if it strictly improves the mean, so equal weights
    are returned when nothing helps. Returns (weights, the metric they reach).
    """
    weights = {m: 1.0 for m in models}

    def score(w: Mapping[str, float]) -> float:
        return float(np.mean(evaluate_fusion(hits, models, method, w, calib, rrf_k, listing_only=True)[metric]))

    best = score(weights)
    for _ in range(sweeps):
        improved = False
        for m in models:
            for g in grid:
                if g == weights[m]:
                    continue
                trial = {**weights, m: g}
                if not any(v > 0 for v in trial.values()):
                    continue
                s = score(trial)
                if s > best + 1e-12:
                    best, weights, improved = s, trial, True
        if not improved:
            break
    top = max(weights.values())
    return {m: round(w / top, 4) for m, w in weights.items()}, best
