"""Exact re-scoring of the ensemble's head: the fused ranking's best listings, scored exactly in every model.

Why: reciprocal-rank fusion adds one term per model that ranks a listing, so the fused order of the best
listings depends on each model's rank of each of them. A compressed index (ivfpq.py) returns each model's
list with small errors: a listing whose best photo fell out of the candidates is missing from that model's
list (its term is lost) or carries a sibling photo's lower score (its rank drops). One model's top-10 can
be 95 % right while the fused top-10, which needs all five rankings right at once, is 85 % right (measured
on bench/search.py's 1M x 5 data). The head is small, so it can be made exact:

1. fuse the per-model lists as they came (rrf_fuse);
2. take the best `head` listings, read every photo of each from the database, and score each photo exactly
   in every model (`exact_by_gid`: the fp16 vectors on disk, a few hundred reads per model);
3. in each model's list, give each head listing its exact best score and best photo (adding it if its score
   clears the list's last photo score, the line its exact top-k would draw; removing it if it no longer
   does), re-rank, and fuse again.

Listings outside the head keep the scores the index gave them. With exact lists (a small home) nothing
changes, and those models are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from imageselector.fusion import Fused, ListingHit, rrf_fuse

ExactFn = Callable[[np.ndarray], np.ndarray | None]  # gids -> exact scores (NaN: not held), None: exact already


def complete_head(
    fused: list[Fused],
    per_model: Mapping[str, list[ListingHit]],
    floors: Mapping[str, float],
    exact: Mapping[str, ExactFn],
    photos_of: Callable[[Sequence[int]], dict[int, list[int]]],
    head: int,
    weights: Mapping[str, float] | None,
    rrf_k: float,
) -> tuple[list[Fused], dict[str, list[ListingHit]]]:
    """The fused ranking after exact re-scoring of its best `head` listings, and the per-model lists used.

    `floors[m]`: the lowest photo score in model m's list (a listing below it is outside m's top-k).
    `exact[m]`: model m's exact scorer by gid. `photos_of(listing ids)` -> {listing id: gids}."""
    listings = [f.listing_id for f in fused[: max(0, head)]]
    if not listings or not exact:
        return fused, dict(per_model)
    photos = photos_of(listings)
    gids = np.asarray([g for lid in listings for g in photos.get(lid, [])], dtype=np.int64)
    owner = np.asarray([lid for lid in listings for _ in photos.get(lid, [])], dtype=np.int64)
    if len(gids) == 0:
        return fused, dict(per_model)
    out = dict(per_model)
    changed = False
    for model, scorer in exact.items():
        scores = scorer(gids)
        if scores is None or model not in per_model:
            continue
        best: dict[int, tuple[float, int]] = {}
        for lid, gid, s in zip(owner.tolist(), gids.tolist(), scores.tolist(), strict=True):
            if s == s and (lid not in best or s > best[lid][0]):  # s == s: not NaN
                best[lid] = (s, gid)
        hits = {h.listing_id: h for h in per_model[model]}
        floor = floors.get(model, -np.inf)
        for lid, (s, gid) in best.items():
            if s >= floor:
                hits[lid] = ListingHit(lid, s, gid)
            else:
                hits.pop(lid, None)
        out[model] = sorted(hits.values(), key=lambda h: (-h.score, h.listing_id))
        changed = True
    if not changed:
        return fused, dict(per_model)
    return rrf_fuse(out, weights, rrf_k), out
