"""Running the evaluation on the catalogue: open each index once, sample queries, search, score, fit weights.

Every store is opened exactly once (one snapshot, its segments memory-mapped: store.py). Query vectors are
read from that same snapshot (never re-embedded, never a second copy of the vectors), then all queries of a
model are searched in one batch (exact search over the mapped segments). gid -> listing comes from the status database (the truth for every gid).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imageselector import db
from imageselector.config import Settings
from imageselector.db import EMBED_MODELS
from imageselector.evaluation import metrics
from imageselector.fsutil import atomic_write_text
from imageselector.fusion import DEFAULT_RRF_K, WEIGHTS_FILE, load_weights
from imageselector.layout import locate_image
from imageselector.vectorstore.store import TEXT_INDEXES, open_snapshot, read_manifest

log = logging.getLogger(__name__)

TEXT_OF = {t.removesuffix("_text"): t for t in TEXT_INDEXES}


@dataclass
class LoadedIndex:
    """One store, opened once (a snapshot: `index.search` is exact search), with its sorted keys."""

    name: str
    index: Any
    ids: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0, dtype=np.int64))

    @classmethod
    def open(cls, name: str, embeddings_dir: Path) -> LoadedIndex | None:
        """None when the store has no vectors."""
        snap = open_snapshot(Path(embeddings_dir), name)
        return None if snap is None else cls(name, snap, snap.keys())

    @property
    def count(self) -> int:
        return int(self.index.count)

    @property
    def dim(self) -> int:
        return int(self.index.dim)

    def vectors(self, keys: Sequence[int]) -> np.ndarray:
        """Stored vectors of `keys`, in that order (KeyError if one is not in the store)."""
        k = np.asarray(keys, dtype=np.int64)
        found, vecs = self.index.get(k)
        if len(found) != len(k):
            raise KeyError(f"{self.name}: some keys are not in the index")
        return vecs

    def sample_vectors(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        positions = np.sort(rng.choice(self.count, min(n, self.count), replace=False))
        return self.vectors(self.ids[positions])


def load_indexes(embeddings_dir: Path, models: Sequence[str], with_text: bool) -> dict[str, LoadedIndex]:
    """Open each model's store (and the CLIP models' `_text` stores) once; empty or missing ones are skipped."""
    out: dict[str, LoadedIndex] = {}
    names = list(models) + ([TEXT_OF[m] for m in models if m in TEXT_OF] if with_text else [])
    for name in names:
        li = LoadedIndex.open(name, Path(embeddings_dir))
        if li is None:
            if name in models:
                log.warning("%s: no vectors in %s; skipped", name, embeddings_dir)
            continue
        out[name] = li
        log.info("%s: %d vectors of dim %d", name, li.count, li.dim)
    return out


def gid_listings(conn: sqlite3.Connection) -> np.ndarray:
    """listing_of[gid] (-1 where the gid is unknown)."""
    top = conn.execute("SELECT COALESCE(MAX(gid), -1) FROM image_status").fetchone()[0]
    out = np.full(int(top) + 1, -1, dtype=np.int64)
    for gid, listing in conn.execute("SELECT gid, listing_id FROM image_status"):
        out[int(gid)] = int(listing)
    return out


def eligible_groups(image_indexes: Mapping[str, LoadedIndex], listing_of: np.ndarray) -> dict[int, np.ndarray]:
    """Listing -> its gids present in EVERY image index, for listings with two or more such images.

    The same queries and relevant sets for every model make the models (and their fusions) comparable.
    """
    common: np.ndarray | None = None
    for li in image_indexes.values():
        common = li.ids if common is None else np.intersect1d(common, li.ids)
    if common is None or common.size == 0:
        return {}
    common = np.unique(common[(common >= 0) & (common < len(listing_of))])
    listings = listing_of[common]
    keep = listings >= 0
    common, listings = common[keep], listings[keep]
    order = np.argsort(listings, kind="stable")
    common, listings = common[order], listings[order]
    uniq, starts, counts = np.unique(listings, return_index=True, return_counts=True)
    return {int(lid): common[s : s + c] for lid, s, c in zip(uniq, starts, counts, strict=True) if c >= 2}


def sample_queries(groups: Mapping[int, np.ndarray], n: int | None, seed: int) -> list[metrics.Query]:
    """Up to n listings at random (seeded; all when n is None), one random image of each as the query."""
    rng = np.random.default_rng(seed)
    listings = sorted(groups)
    if n is not None and n < len(listings):
        listings = sorted(rng.choice(listings, n, replace=False).tolist())
    rng.shuffle(listings)
    out = []
    for lid in listings:
        gids = [int(g) for g in groups[lid]]
        q = gids[int(rng.integers(len(gids)))]
        out.append(metrics.Query(q, int(lid), frozenset(g for g in gids if g != q)))
    return out


def search_all(
    indexes: Mapping[str, LoadedIndex],
    queries: Sequence[metrics.Query],
    listing_of: np.ndarray,
    depth: int,
    timing_queries: int = 20,
) -> tuple[list[metrics.QueryHits], dict[str, dict[str, float]]]:
    """Search every index with every query (one batch per index). Returns hits and per-index timings.

    An image index is queried with its own stored vector of the query image; a CLIP text index with the
    CLIP image vector of the query (image -> listing text). Timings: the batch's time per query, and the
    mean latency of single queries (what one search on the page pays per model).
    """
    hits = [metrics.QueryHits(q) for q in queries]
    timings: dict[str, dict[str, float]] = {}
    gids = [q.gid for q in queries]

    def listing_fn(gid: int) -> int | None:
        return int(listing_of[gid]) if 0 <= gid < len(listing_of) and listing_of[gid] >= 0 else None

    for name, li in indexes.items():
        source = indexes.get(name.removesuffix("_text")) if name.endswith("_text") else li
        if source is None:
            continue
        q = source.vectors(gids)
        k = min(depth + 1, li.count)
        t0 = time.perf_counter()
        scores, ids = li.index.search(q, k)
        batch_s = time.perf_counter() - t0
        n_single = min(timing_queries, len(q))
        li.index.search(q[:1], k)  # warm-up: the first single query pays one-off costs
        t0 = time.perf_counter()
        for i in range(n_single):
            li.index.search(q[i : i + 1], k)
        single_s = (time.perf_counter() - t0) / max(1, n_single)
        timings[name] = {"batch_ms_per_query": 1000 * batch_s / max(1, len(q)), "single_ms": 1000 * single_s}
        for qh, row_ids, row_scores in zip(hits, ids, scores, strict=True):
            if name.endswith("_text"):  # keyed by listing id; the query image is not in it
                qh.listings[name] = metrics.aggregate_max(row_ids[:depth], row_scores[:depth], lambda key: key)
            else:
                qh.images[name], qh.listings[name] = metrics.hits_from_search(
                    row_ids, row_scores, qh.query.gid, listing_fn, depth
                )
    return hits, timings


# --------------------------------------------------------------------------------------------------
# Costs: embedding seconds per image
# --------------------------------------------------------------------------------------------------


def costs_from_db(settings: Settings, models: Sequence[str]) -> dict[str, float]:
    """Seconds of model time per image per model, as the embed stage recorded them (kv `embed_cost`)."""
    conn = db.connect(settings.db_path, readonly=True)
    try:
        return {m: sec for m, sec in db.embed_costs(conn).items() if m in models}
    finally:
        conn.close()


def measure_costs(
    settings: Settings, models: Sequence[str], image_paths: Sequence[Path], *, device: str = "auto", batch: int = 8
) -> dict[str, float]:
    """Seconds per image per model, measured here: load each encoder, warm up, time `image_paths`."""
    from PIL import Image

    from imageselector.models.encoders import load_encoder
    from imageselector.models.registry import load_registry

    specs = load_registry(settings=settings)
    images = [Image.open(p).convert("RGB") for p in image_paths]
    if not images:
        return {}
    out: dict[str, float] = {}
    for m in models:
        if m not in specs:
            continue
        enc = load_encoder(specs[m], device=device)
        enc.encode_images(images[: min(2, len(images))])  # warm-up (lazy init, kernels)
        t0 = time.perf_counter()
        for i in range(0, len(images), batch):
            enc.encode_images(images[i : i + batch])
        out[m] = (time.perf_counter() - t0) / len(images)
        del enc
    return out


# --------------------------------------------------------------------------------------------------
# The whole evaluation
# --------------------------------------------------------------------------------------------------


@dataclass
class Options:
    sample: int | None = 500
    seed: int = 0
    depth: int = 100
    fit_frac: float = 0.3
    n_boot: int = 1000
    with_text: bool = True
    models: Sequence[str] = EMBED_MODELS
    rrf_k: float = DEFAULT_RRF_K
    timing_queries: int = 20
    measure_cost: bool = False
    cost_images: int = 16


def _method(name: str, kind: str, values: dict[str, np.ndarray], n_boot: int, seed: int, **extra: Any) -> dict:
    summaries = {}
    for m in metrics.METRICS:
        v = values[m]
        summaries[m] = None if np.isnan(v).all() else metrics.summarize(v, n_boot=n_boot, seed=seed).to_dict()
    return {"name": name, "kind": kind, "metrics": summaries, **extra}


def _fusion_ms(hits: Sequence[metrics.QueryHits], models: Sequence[str], method: str, weights, calib, rrf_k) -> float:  # type: ignore[no-untyped-def]
    sample = hits[: min(50, len(hits))]
    if not sample:
        return 0.0
    t0 = time.perf_counter()
    for qh in sample:
        metrics.fuse(method, {m: qh.listings[m] for m in models if m in qh.listings}, weights, calib, rrf_k)
    return 1000 * (time.perf_counter() - t0) / len(sample)


def run(settings: Settings, conn: sqlite3.Connection, opts: Options) -> dict[str, Any]:
    """Evaluate models and fusions; return the JSON-able results (see docs/evaluation.md)."""
    t_start = time.time()
    indexes = load_indexes(settings.embeddings_dir, opts.models, opts.with_text)
    image_models = [m for m in opts.models if m in indexes]
    if not image_models:
        raise ValueError(f"no image index found in {settings.embeddings_dir}: run image_search_v2/embed.py first")
    listing_of = gid_listings(conn)
    groups = eligible_groups({m: indexes[m] for m in image_models}, listing_of)
    queries = sample_queries(groups, opts.sample, opts.seed)
    if len(queries) < 2:
        raise ValueError(
            f"only {len(queries)} listing(s) have two or more images embedded by every model "
            f"({', '.join(image_models)}): embed more, or evaluate fewer models with --models"
        )
    n_fit = int(round(len(queries) * opts.fit_frac)) if opts.fit_frac > 0 else 0
    n_fit = min(max(n_fit, 1 if opts.fit_frac > 0 else 0), len(queries) - 1)
    log.info(
        "%d eligible listings; %d sampled: %d to fit weights, %d to evaluate",
        len(groups),
        len(queries),
        n_fit,
        len(queries) - n_fit,
    )
    hits, timings = search_all(indexes, queries, listing_of, opts.depth, opts.timing_queries)
    fit_hits, eval_hits = hits[:n_fit], hits[n_fit:]
    calib = {m: metrics.calibrate(indexes[m].sample_vectors(1000, opts.seed)) for m in image_models}
    text_names = [n for n in indexes if n.endswith("_text")]

    methods: list[dict] = []
    per_query: dict[str, dict[str, np.ndarray]] = {}
    seed = opts.seed
    for m in [*image_models, *text_names]:
        vals = metrics.evaluate_single(eval_hits, m)
        per_query[m] = vals
        kind = "text" if m.endswith("_text") else "model"
        methods.append(_method(m, kind, vals, opts.n_boot, seed, query_ms=timings[m]["single_ms"]))

    weights: dict[str, dict[str, float]] = {}
    fitted_score: dict[str, float] = {}
    for method in ("max", "rrf"):
        if n_fit and len(image_models) > 1:
            weights[method], fitted_score[method] = metrics.fit_weights(
                fit_hits, image_models, method, calib, opts.rrf_k
            )
        else:
            weights[method] = {m: 1.0 for m in image_models}
    in_force, in_force_src = load_weights(settings.embeddings_dir)
    variants: list[tuple[str, str, Sequence[str], Mapping[str, float] | None]] = [
        ("max", "max", image_models, None),
        ("max (weighted)", "max", image_models, weights["max"]),
        ("rrf", "rrf", image_models, None),
        ("rrf (weighted)", "rrf", image_models, weights["rrf"]),
    ]
    if in_force:
        variants.append(
            ("rrf (weights in force)", "rrf", image_models, {m: in_force.get(m, 1.0) for m in image_models})
        )
    if text_names:
        variants.append(("rrf + text", "rrf", [*image_models, *text_names], None))
    for name, method, members, w in variants:
        vals = metrics.evaluate_fusion(eval_hits, members, method, w, calib, opts.rrf_k)
        per_query[name] = vals
        ms = sum(timings[m]["single_ms"] for m in members) + _fusion_ms(
            eval_hits, members, method, w, calib, opts.rrf_k
        )
        methods.append(_method(name, "fusion", vals, opts.n_boot, seed, query_ms=ms, weights=dict(w) if w else None))

    ablation = []
    if len(image_models) > 1:
        full = per_query["rrf"]
        for m in image_models:
            rest = [x for x in image_models if x != m]
            vals = metrics.evaluate_fusion(eval_hits, rest, "rrf", None, calib, opts.rrf_k, listing_only=True)
            ablation.append(
                {
                    "model": m,
                    "delta": {
                        k: metrics.summarize(full[k] - vals[k], n_boot=opts.n_boot, seed=seed).to_dict()
                        for k in metrics.LISTING_METRICS
                    },
                    "query_ms_saved": timings[m]["single_ms"],
                }
            )

    costs = _costs(settings, image_models, queries, opts)
    manifest = read_manifest(settings.embeddings_dir)
    return {
        "generated_at": t_start,
        "elapsed_s": time.time() - t_start,
        "home": str(settings.home),
        "options": {
            "sample": opts.sample,
            "seed": opts.seed,
            "depth": opts.depth,
            "fit_frac": opts.fit_frac,
            "n_boot": opts.n_boot,
            "rrf_k": opts.rrf_k,
        },
        "eligible_listings": len(groups),
        "queries": {"sampled": len(queries), "fit": n_fit, "eval": len(eval_hits)},
        "models": {
            m: {
                "count": indexes[m].count,
                "dim": indexes[m].dim,
                "standin": bool(manifest.get("models", {}).get(m, {}).get("standin", False)),
            }
            for m in image_models
        },
        "text_indexes": text_names,
        "methods": methods,
        "weights": {
            "fitted": weights,
            "fitted_on": n_fit,
            "fit_metric": "listing_map10",
            "fit_score": fitted_score,
            "in_force": in_force,
            "in_force_source": in_force_src,
        },
        "ablation": ablation,
        "costs": costs,
        "calibration": {m: {"mu": c.mu, "sigma": c.sigma} for m, c in calib.items()},
        "timings": timings,
    }


def _costs(
    settings: Settings, models: Sequence[str], queries: Sequence[metrics.Query], opts: Options
) -> dict[str, dict]:
    out: dict[str, dict] = {}
    logged = costs_from_db(settings, models)
    for m, sec in logged.items():
        out[m] = {"sec_per_image": sec, "source": "recorded by embed.py"}
    if opts.measure_cost:
        conn = db.connect(settings.db_path, readonly=True)
        try:
            paths = []
            for q in queries:
                row = conn.execute("SELECT listing_id, image_id FROM image_status WHERE gid=?", (q.gid,)).fetchone()
                p = locate_image(settings, row, conn) if row is not None else None
                if p is not None:
                    paths.append(p)
                if len(paths) >= opts.cost_images:
                    break
        finally:
            conn.close()
        for m, sec in measure_costs(settings, models, paths).items():
            out[m] = {"sec_per_image": sec, "source": f"measured on {len(paths)} images"}
    for m in models:
        c = out.get(m)
        if c is not None:
            c["hours_per_million"] = c["sec_per_image"] * 1e6 / 3600
    return out


def write_weights(settings: Settings, results: Mapping[str, Any], method: str = "rrf") -> Path:
    """Write `<home>/embeddings/fusion_weights.json`, the file the search reads (fusion.py)."""

    fitted_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    n = results["weights"]["fitted_on"]
    doc = {
        # the search page shows "method" as where its weights come from, so it says so in words
        "method": f"fitted by evaluate.py for {method} on {n} listings, {fitted_at[:10]}",
        "fusion": method,
        "weights": results["weights"]["fitted"][method],
        "fitted_at": fitted_at,
        "source": "image_search_v2/evaluate.py --fit-weights",
        "metric": "listing mAP@10",
        "fit_queries": n,
        "fit_score": results["weights"]["fit_score"].get(method),
        "seed": results["options"]["seed"],
    }
    path = settings.embeddings_dir / WEIGHTS_FILE
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n", settings.tmp_dir)
    return path


def weights_blocker(results: Mapping[str, Any], min_fit: int) -> str | None:
    """Why the fitted RRF weights should not be written (too few held-out listings, or they lose), or None."""
    n = results["weights"]["fitted_on"]
    if n < min_fit:
        return f"fitted on only {n} held-out listings (need --min-fit {min_fit}; raise --sample or --fit-frac)"
    by_name = {m["name"]: m["metrics"]["listing_map10"] for m in results["methods"]}
    equal, fitted = by_name.get("rrf"), by_name.get("rrf (weighted)")
    if equal and fitted and fitted["mean"] < equal["mean"]:
        return (
            f"the fitted weights did worse than equal weights on the evaluation listings "
            f"(listing mAP@10 {fitted['mean']:.3f} < {equal['mean']:.3f})"
        )
    return None
