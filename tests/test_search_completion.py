"""Exact re-scoring of the fused head (search/completion.py): lost terms come back, wrong ones go."""

from __future__ import annotations

import numpy as np

from imageselector.fusion import ListingHit, rrf_fuse
from imageselector.search.completion import complete_head

# listing -> its photos (gids); each gid's exact score per model
PHOTOS = {1: [10, 11], 2: [20, 21], 3: [30, 31], 4: [40]}
EXACT = {
    "a": {10: 0.90, 11: 0.50, 20: 0.80, 21: 0.10, 30: 0.70, 31: 0.20, 40: 0.30},
    "b": {10: 0.84, 11: 0.20, 20: 0.85, 21: 0.30, 30: 0.40, 31: 0.86, 40: 0.10},
}


def scorer(model: str):
    return lambda gids: np.array([EXACT[model].get(int(g), np.nan) for g in gids], dtype=np.float32)


def photos_of(listing_ids):
    return {lid: PHOTOS[lid] for lid in listing_ids if lid in PHOTOS}


def lists() -> dict[str, list[ListingHit]]:
    # model b's compressed list lost listing 3's best photo (gid 31, exact 0.86: its first place)
    return {
        "a": [ListingHit(1, 0.90, 10), ListingHit(2, 0.80, 20), ListingHit(3, 0.70, 30)],
        "b": [ListingHit(2, 0.85, 20), ListingHit(1, 0.84, 10)],
    }


def test_a_lost_best_photo_is_restored_and_reorders_the_fusion() -> None:
    per_model = lists()
    before = rrf_fuse(per_model)
    assert [f.listing_id for f in before][:3] == [1, 2, 3]
    floors = {"a": float(np.float32(0.70)), "b": float(np.float32(0.84))}  # the lists' last scores, as float32
    fused, used = complete_head(before, per_model, floors, {"a": scorer("a"), "b": scorer("b")}, photos_of, 3, None, 60)
    assert [h.listing_id for h in used["b"]] == [3, 2, 1]
    assert used["b"][0] == ListingHit(3, np.float32(0.86), 31)  # the photo that matched is the exact best one
    three = next(f for f in fused if f.listing_id == 3)
    assert three.ranks == {"a": 3, "b": 1} and three.keys["b"] == 31
    # what exact lists would have given
    exact = rrf_fuse(
        {
            "a": [ListingHit(1, 0.9, 10), ListingHit(2, 0.8, 20), ListingHit(3, 0.7, 30)],
            "b": [ListingHit(3, 0.86, 31), ListingHit(2, 0.85, 20), ListingHit(1, 0.84, 10)],
        }
    )
    assert [f.listing_id for f in fused] == [f.listing_id for f in exact]


def test_a_listing_below_the_floor_leaves_that_models_list() -> None:
    per_model = {"a": [ListingHit(4, 0.95, 40), ListingHit(1, 0.90, 10)], "b": lists()["b"]}
    fused, used = complete_head(
        rrf_fuse(per_model),
        per_model,
        {"a": 0.85, "b": float(np.float32(0.84))},
        {"a": scorer("a")},
        photos_of,
        4,
        None,
        60,
    )
    assert [h.listing_id for h in used["a"]] == [1]  # listing 4's refined 0.95 was 0.30 exactly
    assert 4 not in {f.listing_id for f in fused}
    assert used["b"] == per_model["b"]  # no scorer for b: left as it came


def test_exact_models_and_an_empty_head_change_nothing() -> None:
    per_model = lists()
    before = rrf_fuse(per_model)
    exact_already = {"a": lambda gids: None, "b": lambda gids: None}
    fused, used = complete_head(before, per_model, {}, exact_already, photos_of, 3, None, 60)
    assert fused is before and used == per_model
    fused, _ = complete_head(before, per_model, {}, {"a": scorer("a")}, photos_of, 0, None, 60)
    assert fused is before
