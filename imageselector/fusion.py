"""Ensemble ranking: per-model hits -> one score per listing per model -> one consensus ranking.

Why this shape:
- A listing has several images, and each index holds images (gid keys). A listing is as close to
  the query as its closest image, so per model we keep the MAXIMUM similarity over its images.
- Cosine scores of different models are not comparable (a DINO 0.6 is not a CLIP 0.6), so models are
  combined by RANK, not by score: weighted reciprocal-rank fusion (Cormack, Clarke & Buettcher 2009),

      fused(listing) = sum over models m that found it of  w_m / (rrf_k + rank_m(listing))

  with rank_m starting at 1 and rrf_k = 60 by default. Each model that finds a listing adds a term, so
  a listing found by several models outranks one that a single model puts first: with rrf_k = 60,
  rank 1 in one model is worth 1/61 = 0.0164, rank 30 in two models 2/90 = 0.022. Ties are broken
  by how many models found the listing, then by its mean similarity.
- Weights default to 1; `<home>/embeddings/fusion_weights.json` ({"method": ..., "weights": {name: w}},
  written by the evaluation) overrides them per index name. A weight of 0 removes a model's vote.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_RRF_K = 60.0
WEIGHTS_FILE = "fusion_weights.json"


class ListingHit(NamedTuple):
    """One listing as one model saw it: its best similarity and which key (gid/listing id) gave it.
    (A NamedTuple: a frozen dataclass's __init__ cost ~3 us a hit, hundreds per model per query.)"""

    listing_id: int
    score: float
    key: int


@dataclass
class Fused:
    """One listing in the consensus ranking."""

    listing_id: int
    fused: float
    scores: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    keys: dict[str, int] = field(default_factory=dict)

    @property
    def n_models(self) -> int:
        return len(self.scores)

    @property
    def mean_score(self) -> float:
        # plain Python: called once per fused listing in the sort key, where np.mean's ~20 us a call added up
        # to ~5 ms a query (bench/search.py profile)
        return sum(self.scores.values()) / len(self.scores) if self.scores else 0.0


def aggregate_max(
    ids: Iterable[int], scores: Iterable[float], listing_of: Callable[[int], int | None]
) -> list[ListingHit]:
    """Collapse one model's image hits to listings, keeping each listing's maximum score.

    `listing_of(key)` maps a hit key to its listing (None drops the hit: an id unknown to the catalogue).
    Returns listings best first (ties by listing id, so the order is deterministic).
    """
    best: dict[int, tuple[float, int]] = {}
    # plain Python values (tolist): numpy scalars made this loop ~1.8 ms per model per query (bench/search.py)
    ids = ids.tolist() if isinstance(ids, np.ndarray) else ids
    scores = scores.tolist() if isinstance(scores, np.ndarray) else scores
    for key, s in zip(ids, scores, strict=True):
        key = int(key)
        if key < 0:  # faiss pads short result lists with -1
            continue
        listing = listing_of(key)
        if listing is None:
            continue
        s = float(s)
        cur = best.get(listing)
        if cur is None or s > cur[0]:
            best[listing] = (s, key)
    hits = [ListingHit(listing, s, key) for listing, (s, key) in best.items()]
    hits.sort(key=lambda h: (-h.score, h.listing_id))
    return hits


def rrf_fuse(
    per_model: Mapping[str, list[ListingHit]],
    weights: Mapping[str, float] | None = None,
    rrf_k: float = DEFAULT_RRF_K,
) -> list[Fused]:
    """Weighted reciprocal-rank fusion of per-model listing rankings (each list best first)."""
    out: dict[int, Fused] = {}
    for model, hits in per_model.items():
        w = 1.0 if weights is None else float(weights.get(model, 1.0))
        for rank, hit in enumerate(hits, start=1):
            f = out.get(hit.listing_id)
            if f is None:
                f = out[hit.listing_id] = Fused(hit.listing_id, 0.0)
            f.fused += w / (rrf_k + rank)
            f.scores[model] = hit.score
            f.ranks[model] = rank
            f.keys[model] = hit.key
    return sorted(out.values(), key=lambda f: (-f.fused, -f.n_models, -f.mean_score, f.listing_id))


def load_weights(embeddings_dir: Path) -> tuple[dict[str, float], str]:
    """Per-index weights from `fusion_weights.json` (missing file -> all 1.0). Returns (weights, method)."""
    path = Path(embeddings_dir) / WEIGHTS_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, "equal weights"
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return {}, "equal weights (fusion_weights.json unreadable)"
    raw = doc.get("weights") if isinstance(doc, dict) else None
    if not isinstance(raw, dict):
        log.warning("ignoring %s: no 'weights' object", path)
        return {}, "equal weights (fusion_weights.json malformed)"
    weights: dict[str, float] = {}
    for name, w in raw.items():
        try:
            value = float(w)
        except (TypeError, ValueError):
            continue
        if value >= 0 and np.isfinite(value):
            weights[str(name)] = value
    return weights, str(doc.get("method") or "fusion_weights.json")


def weight_for(weights: Mapping[str, float], index_name: str) -> float:
    """A text index (`clip_vitb32_text`) falls back to its model's weight, then to 1."""
    if index_name in weights:
        return weights[index_name]
    base = index_name.removesuffix("_text")
    return weights.get(base, 1.0)
