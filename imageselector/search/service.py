"""One search service for the CLI and the web page: encode the query, search each index, fuse, describe.

Query by image: each chosen image model (default all five) embeds the image and searches its own
index for the top `per_model_k` images; hits collapse to listings (max score per listing per model);
listings are ranked by weighted reciprocal-rank fusion (ensemble.py).
Query by text: each CLIP text tower embeds the text and searches both its model's IMAGE index
(text-to-image) and its listing-TEXT index (`{model}_text`, keyed by listing id); the up-to-four
rankings are fused the same way.
"""

from __future__ import annotations

import io
import json
import logging
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from imageselector import db
from imageselector.config import HomeError, Settings
from imageselector.db import EMBED_MODELS
from imageselector.fusion import DEFAULT_RRF_K, Fused, aggregate_max, load_weights, rrf_fuse, weight_for
from imageselector.imagecheck import check_image
from imageselector.search import copies
from imageselector.search import listings as catalog
from imageselector.search.completion import complete_head
from imageselector.search.detail import listing_detail
from imageselector.search.files import read_image_file
from imageselector.search.indexes import TEXT_INDEXES, IndexPolicy, IndexSet
from imageselector.search.market import Converter, market_view, parse_rates
from imageselector.search.stored import stored_vectors
from imageselector.search.uploads import UploadCache

log = logging.getLogger(__name__)

TEXT_MODELS: tuple[str, ...] = tuple(t.removesuffix("_text") for t in TEXT_INDEXES)
STANDIN_WARNING = "stand-in models with random weights: results are only structural, not semantic"
MAX_K = 200
DECODE_SIDE = 1024  # a decoded query is reduced to this many px on its longer side
MAX_ID = 2**63 - 1
MAX_WEIGHT = 100.0
COPY_CANDIDATES = 60  # per model: images the copy test looks at (nearest by the stored vectors)


class SearchError(Exception):
    """A problem the user can act on; its message is shown as is (HTTP status in `.status`)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_text_chars: int = 500

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_upload_bytes=settings.get_int("SEARCH_MAX_UPLOAD_MB", 20) * 1024 * 1024,
            max_pixels=settings.get_int("SEARCH_MAX_PIXELS", cls.max_pixels),
        )


def open_query_image(data: bytes, limits: Limits) -> Image.Image:
    """Bytes -> a decoded RGB image, refusing oversized, non-image and bomb uploads with a plain message."""
    if not data:
        raise SearchError("the upload is empty")
    if len(data) > limits.max_upload_bytes:
        raise SearchError(
            f"the file is {len(data) / 1e6:.1f} MB; the limit is {limits.max_upload_bytes / 1e6:.0f} MB", 413
        )
    verdict = check_image(data, max_pixels=limits.max_pixels)
    if verdict.kind == "too_big":
        raise SearchError(f"the image is too large ({verdict.detail})", 413)
    if not verdict.ok:
        raise SearchError(f"not a readable image ({verdict.kind.replace('_', ' ')}: {verdict.detail})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format == "JPEG":  # DCT scaling: decode at 1/2..1/8 size, the models see 224-518 px anyway
                img.draft("RGB", (DECODE_SIDE, DECODE_SIDE))
            img.load()
            if max(img.size) > DECODE_SIDE:  # drop the big buffer now, before any mode conversion copies it
                img.thumbnail((DECODE_SIDE, DECODE_SIDE), Image.BILINEAR, reducing_gap=2.0)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SearchError(f"not a readable image: {exc}") from None
    from imageselector.models.encoders import to_rgb

    return to_rgb(img)


def parse_weights(raw: str | dict | None) -> dict[str, float]:
    """`clip_vitb32:1.5,dinov2_base:0` (or a dict) -> per-index weights overriding the fusion weights."""
    if not raw:
        return {}
    items = raw.items() if isinstance(raw, dict) else (p.partition(":")[::2] for p in raw.split(",") if p.strip())
    out: dict[str, float] = {}
    for name, value in items:
        name = str(name).strip()
        try:
            w = float(value)
        except (TypeError, ValueError):
            raise SearchError(f"weight for {name!r} must be a number") from None
        if name not in (*EMBED_MODELS, *TEXT_INDEXES) or not 0 <= w <= MAX_WEIGHT:
            raise SearchError(f"weights: {name}:{value} (a model name and a number from 0 to {MAX_WEIGHT:g})")
        out[name] = w
    return out


def parse_image_ref(raw: str) -> tuple[int, int]:
    """`LISTING_ID:IMAGE_ID` -> the pair; ids outside SQLite's integer range are refused as unknown (404)."""
    a, sep, b = (raw or "").strip().partition(":")
    if not sep or not a.isdigit() or not b.isdigit():
        raise SearchError("name the image as LISTING_ID:IMAGE_ID (two whole numbers)")
    lid, iid = int(a), int(b)
    if lid > MAX_ID or iid > MAX_ID:
        raise SearchError(f"no image {raw} in the catalogue", 404)
    return lid, iid


def _clamp_k(k: int) -> int:
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise SearchError("k must be a whole number") from None
    if not 1 <= k <= MAX_K:
        raise SearchError(f"k must be between 1 and {MAX_K}")
    return k


class SearchService:
    """Holds the opened indexes, the lazily loaded encoders and a read-only database connection per thread."""

    def __init__(
        self,
        settings: Settings,
        *,
        models_file: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        policy: IndexPolicy | None = None,
    ) -> None:
        self.settings = settings
        self.models_file = models_file
        self.device, self.dtype = device, dtype
        self.indexes = IndexSet(settings.embeddings_dir, policy or IndexPolicy.from_settings(settings))
        self.limits = Limits.from_settings(settings)
        self.rrf_k = settings.get_float("SEARCH_RRF_K", DEFAULT_RRF_K)
        self._registry: dict | None = None
        self._encoders: dict[str, object] = {}
        self._encoder_errors: dict[str, str] = {}
        self._lock = threading.Lock()  # one query at a time: 2 cores, and torch models are not re-entrant
        self._local = threading.local()
        try:
            self.converter = Converter(
                settings.get("SEARCH_CURRENCY", "USD") or "USD", parse_rates(settings.get("SEARCH_FX_RATES"))
            )
        except ValueError as exc:
            raise SearchError(str(exc)) from None
        self.uploads = UploadCache.from_settings(settings)
        self.copy_threshold = settings.get_float("SEARCH_COPY_THRESHOLD", copies.THRESHOLD)
        self._thumbs: dict[tuple[int, int], copies.Thumb | None] = {}  # catalogued photos' copy-test thumbnails

    # ---------------------------------------------------------------- resources
    def conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            try:
                c = self._local.conn = catalog.connect_readonly(self.settings.db_path)
            except (FileNotFoundError, sqlite3.Error, HomeError) as exc:
                raise SearchError(f"database unreadable: {exc}", 503) from None
        return c

    def registry(self) -> dict:
        if self._registry is None:
            from imageselector.models.registry import RegistryError, load_registry

            try:
                self._registry = load_registry(self.models_file, self.settings)
            except RegistryError as exc:
                raise SearchError(f"model registry: {exc}", 500) from None
        return self._registry

    def encoder(self, name: str):  # type: ignore[no-untyped-def]
        enc = self._encoders.get(name)
        if enc is None:
            spec = self.registry().get(name)
            if spec is None:
                raise SearchError(f"model {name} is not in the model registry", 500)
            from imageselector.models.encoders import load_encoder

            t0 = time.monotonic()
            enc = self._encoders[name] = load_encoder(spec, self.device, self.dtype)
            log.info("loaded query encoder %s in %.1f s", name, time.monotonic() - t0)
        return enc

    def _mismatch(self, name: str, enc) -> str | None:  # type: ignore[no-untyped-def]
        """Vectors from another model than the one that built the index would be compared as if alike: refuse."""
        rec = (self.indexes.manifest.get("models") or {}).get(name) or {}
        built, now = rec.get("source"), enc.spec.describe()
        if built and built != now:
            return f"{name}: skipped, its index was built with {built} but the query model is {now}"
        return None

    def _embed(self, model: str, query: Image.Image | str, warns: list[str]) -> np.ndarray | None:
        """Embed the query with one model; a model that cannot becomes a warning, not a failed search."""
        try:
            enc = self.encoder(model)
            if (why := self._mismatch(model, enc)) is not None:
                warns.append(why)
                return None
            return enc.encode_texts([query]) if isinstance(query, str) else enc.encode_images([query])
        except Exception as exc:  # noqa: BLE001 - one broken model must not sink the query
            log.exception("%s: cannot embed the query", model)
            warns.append(
                str(exc)
                if isinstance(exc, SearchError)
                else f"{model}: cannot embed the query ({type(exc).__name__}: {exc})"
            )
            return None

    def warm_up(self) -> None:
        """Load the query encoders of every indexed model now, so the first query does not wait for them."""
        with self._lock:
            self.refresh()
            for name in [n for n in EMBED_MODELS if self.indexes.get(n) is not None]:
                try:
                    self.encoder(name)
                except Exception as exc:  # noqa: BLE001 - the query will report it properly
                    log.warning("%s: cannot load the query encoder yet: %s", name, exc)

    def refresh(self) -> list[str]:
        return self.indexes.refresh()

    # ---------------------------------------------------------------- queries
    def search_image(
        self,
        image: Image.Image,
        k: int = 20,
        models: Sequence[str] | None = None,
        weights: str | dict | None = None,
        query: dict | None = None,
    ) -> dict:
        k = _clamp_k(k)
        overrides = parse_weights(weights)
        with self._lock:
            self.refresh()
            names = self._choose(models, EMBED_MODELS, "image")
            t0 = time.monotonic()
            vectors, warns = {}, []
            for name in names:
                if (vec := self._embed(name, image, warns)) is not None:
                    vectors[name] = vec
            if not vectors:
                raise SearchError("no model could embed the query image: " + "; ".join(warns), 500)
            t_enc = time.monotonic() - t0
            return self._rank(vectors, k, {"type": "image", **(query or {})}, t_enc, warns, overrides)

    def search_similar(
        self,
        listing_id: int,
        image_id: int,
        k: int = 20,
        models: Sequence[str] | None = None,
        weights: str | dict | None = None,
    ) -> dict:
        """More like this catalogued photo: search with its STORED vectors (no re-embedding).

        The photo itself comes first in every model (its own vector scores highest; it is pinned there
        even when an approximate index would miss it).
        """
        k = _clamp_k(k)
        overrides = parse_weights(weights)
        with self._lock:
            self.refresh()
            gid = self._gid_of(listing_id, image_id)
            names = self._choose(models, EMBED_MODELS, "image")
            vectors, warns = {}, []
            for name in names:
                found, vecs = stored_vectors(self.settings.embeddings_dir, name, np.array([gid]))
                if len(found):
                    vectors[name] = vecs[:1]
                else:
                    warns.append(f"{name}: this photo has no stored vector yet (not embedded); model skipped")
            if not vectors:
                raise SearchError(f"photo {listing_id}:{image_id} has no stored vectors yet: run embed.py first", 404)
            query = {"type": "similar", "listing_id": int(listing_id), "image_id": int(image_id), "gid": gid}
            return self._rank(vectors, k, query, 0.0, warns, overrides, pin_gid=gid)

    def _gid_of(self, listing_id: int, image_id: int) -> int:
        if not (0 <= int(listing_id) <= MAX_ID and 0 <= int(image_id) <= MAX_ID):
            raise SearchError(f"no image {listing_id}:{image_id} in the catalogue", 404)
        row = (
            self.conn()
            .execute("SELECT gid FROM image_status WHERE listing_id=? AND image_id=?", (int(listing_id), int(image_id)))
            .fetchone()
        )
        if row is None:
            raise SearchError(f"no image {listing_id}:{image_id} in the catalogue", 404)
        return int(row[0])

    def search_text(
        self, text: str, k: int = 20, models: Sequence[str] | None = None, weights: str | dict | None = None
    ) -> dict:
        k = _clamp_k(k)
        overrides = parse_weights(weights)
        text = (text or "").strip()
        if not text:
            raise SearchError("type something to search for")
        if len(text) > self.limits.max_text_chars:
            raise SearchError(f"the text is longer than {self.limits.max_text_chars} characters")
        with self._lock:
            self.refresh()
            targets = self._text_targets(models)
            t0 = time.monotonic()
            vectors: dict[str, np.ndarray | None] = {}
            queries, warns = {}, []
            for index_name, model in targets:
                if model not in vectors:
                    vectors[model] = self._embed(model, text, warns)
                if (vec := vectors[model]) is not None:
                    queries[index_name] = vec
            if not queries:
                raise SearchError("no CLIP model could embed the text: " + "; ".join(warns), 500)
            t_enc = time.monotonic() - t0
            return self._rank(queries, k, {"type": "text", "text": text}, t_enc, warns, overrides)

    def _choose(self, models: Sequence[str] | None, allowed: Iterable[str], what: str) -> list[str]:
        allowed = list(allowed)
        wanted = list(models) if models else allowed
        bad = [m for m in wanted if m not in allowed]
        if bad:
            raise SearchError(f"unknown {what} model(s) {', '.join(bad)}; choose from {', '.join(allowed)}")
        have = [m for m in allowed if m in wanted and self.indexes.get(m) is not None]
        if not have:
            raise SearchError(
                f"no index for {', '.join(wanted)} in {self.settings.embeddings_dir}: run image_search_v2/embed.py first",
                404,
            )
        return have

    def _text_targets(self, models: Sequence[str] | None) -> list[tuple[str, str]]:
        """(index name, CLIP model) pairs: each CLIP model against its image index and its listing-text index."""
        allowed = [*TEXT_MODELS, *TEXT_INDEXES]
        wanted = list(models) if models else list(TEXT_MODELS)
        bad = [m for m in wanted if m not in allowed]
        if bad:
            raise SearchError(f"text search uses the CLIP models only ({', '.join(allowed)}); not {', '.join(bad)}")
        pairs: list[tuple[str, str]] = []
        for m in wanted:
            names = [m] if m.endswith("_text") else [m, f"{m}_text"]
            pairs += [(n, n.removesuffix("_text")) for n in names if self.indexes.get(n) is not None]
        if not pairs:
            raise SearchError(
                f"no CLIP index in {self.settings.embeddings_dir}: run image_search_v2/embed.py first", 404
            )
        return list(dict.fromkeys(pairs))

    def _rank(
        self,
        queries: dict[str, np.ndarray],
        k: int,
        query: dict,
        t_enc: float,
        warns: list[str],
        overrides: dict[str, float] | None = None,
        pin_gid: int | None = None,
    ) -> dict:
        t0 = time.monotonic()
        per_model_k = min(max(100, 10 * k), 2000)
        raw: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for index_name, vec in queries.items():
            idx = self.indexes.get(index_name)
            if idx is None:
                continue
            if vec.shape[-1] != idx.dim:
                warns.append(
                    f"{index_name}: the query model gives {vec.shape[-1]} dims, the index has {idx.dim}; skipped"
                )
                continue
            scores, ids = idx.search(vec, per_model_k)
            sc, ii = scores[0], ids[0]
            if pin_gid is not None and not index_name.endswith("_text"):
                sc, ii = _pin_first(sc, ii, pin_gid, float(np.dot(vec.reshape(-1), vec.reshape(-1))))
            raw[index_name] = (sc, ii)
        t_search = time.monotonic() - t0
        conn = self.conn()
        gids = [int(i) for n, (_, ids) in raw.items() if not n.endswith("_text") for i in ids if i >= 0]
        where = catalog.locate_gids(conn, gids)
        per_model = {}
        for name, (scores, ids) in raw.items():
            if name.endswith("_text"):  # listing-text indexes are keyed by listing id
                per_model[name] = aggregate_max(ids, scores, lambda key: key)
            else:
                per_model[name] = aggregate_max(ids, scores, lambda gid: where.get(gid, (None,))[0])
        weights_raw, method = load_weights(self.settings.embeddings_dir)
        if overrides:
            weights_raw = {**weights_raw, **overrides}
            method = f"{method}, overridden by the request"
        weights = {name: weight_for(weights_raw, name) for name in per_model}
        if all(w == 0 for w in weights.values()):
            raise SearchError("every chosen model has weight 0: give at least one a positive weight")
        fused = rrf_fuse(per_model, weights, self.rrf_k)
        head = self.indexes.policy.complete
        if head > 0:
            fused = self._complete_head(fused, per_model, raw, queries, weights, where, conn, per_model_k, head)
        fused = fused[:k]
        cards = catalog.listing_cards(conn, [f.listing_id for f in fused])
        results = []
        for rank, f in enumerate(fused, start=1):
            card = cards[f.listing_id]
            matched = {
                n: (key if n.endswith("_text") else where.get(key, (None, None))[1]) for n, key in f.keys.items()
            }
            best = _best_match(f, matched, weights, self.rrf_k)
            if best is None:  # found by listing text only: the primary photo stands in
                best = card.primary_image_id
            results.append(
                {
                    "rank": rank,
                    **card.to_dict(),
                    "image_url": (
                        f"/image/{f.listing_id}/{card.primary_image_id}" if card.primary_image_id is not None else None
                    ),
                    "fused_score": round(f.fused, 6),
                    "n_models": f.n_models,
                    "scores": {n: round(s, 4) for n, s in f.scores.items()},
                    "ranks": f.ranks,
                    "matched_image_ids": {n: v for n, v in matched.items() if not n.endswith("_text")},
                    "matched_image_id": best,
                    "matched_image_url": f"/image/{f.listing_id}/{best}" if best is not None else None,
                    "primary_image_url": (
                        f"/image/{f.listing_id}/{card.primary_image_id}" if card.primary_image_id is not None else None
                    ),
                    "detail_url": f"/api/listing/{f.listing_id}",
                }
            )
        return {
            "query": {**query, "k": k, "per_model_k": per_model_k},
            "models": list(raw),
            "fusion": {
                "method": f"weighted reciprocal-rank fusion (k={self.rrf_k:g})",
                "weights": weights,
                "weights_source": method,
            },
            "warnings": list(dict.fromkeys(self.warnings() + warns)),
            "indexes": {n: self.indexes.get(n).describe() for n in raw},  # type: ignore[union-attr]
            "results": results,
            "market": market_view(conn, [r["listing_id"] for r in results], self.converter),
            "timing_ms": {
                "encode": round(t_enc * 1000, 1),
                "search": round(t_search * 1000, 1),
                "total": round((t_enc + time.monotonic() - t0) * 1000, 1),
            },
        }

    def _complete_head(
        self,
        fused: list[Fused],
        per_model: dict,
        raw: dict[str, tuple[np.ndarray, np.ndarray]],
        queries: dict[str, np.ndarray],
        weights: dict[str, float],
        where: dict[int, tuple[int, int]],
        conn: sqlite3.Connection,
        per_model_k: int,
        head: int,
    ) -> list[Fused]:
        """completion.py: the fused head re-scored exactly in every compressed model (`where` learns the gids of
        the photos it reads, so the cards can name the photo that matched)."""
        exact, floors = {}, {}
        for name, (scores, ids) in raw.items():
            idx = self.indexes.get(name)
            if name.endswith("_text") or idx is None or idx.kind != "ivfpq":
                continue
            vec = queries[name]
            exact[name] = lambda gids, idx=idx, vec=vec: idx.exact_by_gid(vec, gids)
            held = scores[ids >= 0]
            floors[name] = float(held[-1]) if len(held) >= per_model_k else -np.inf

        def photos_of(listing_ids: Sequence[int]) -> dict[int, list[int]]:
            found = catalog.listing_photos(conn, listing_ids)
            for lid, photos in found.items():
                for gid, image_id in photos:
                    where[gid] = (lid, image_id)
            return {lid: [gid for gid, _ in photos] for lid, photos in found.items()}

        if not exact:
            return fused
        fused, _ = complete_head(fused, per_model, floors, exact, photos_of, head, weights, self.rrf_k)
        return fused

    # ---------------------------------------------------------------- uploads, detail, copies
    def upload(self, data: bytes) -> tuple[str, Image.Image]:
        """Check and decode an upload, keep it under its content hash; returns (hash, image)."""
        image = open_query_image(data, self.limits)
        return self.uploads.put(data), image

    def uploaded(self, digest: str) -> Image.Image:
        data = self.uploads.get(digest)
        if data is None:
            raise SearchError("this uploaded photo is no longer kept on the server: upload it again", 404)
        return open_query_image(data, self.limits)

    def listing(self, listing_id: int) -> dict:
        if not 0 <= int(listing_id) <= MAX_ID:
            raise SearchError("no such listing", 404)
        try:
            got = listing_detail(self.conn(), int(listing_id), self.converter)
        except sqlite3.Error as exc:
            raise SearchError(f"database error: {exc}", 503) from None
        if got is None:
            raise SearchError("no such listing", 404)
        return got

    def find_copies(
        self,
        *,
        image: Image.Image | None = None,
        ref: tuple[int, int] | None = None,
        k: int = 20,
        models: Sequence[str] | None = None,
        query: dict | None = None,
    ) -> dict:
        """Catalogued photos that are copies of the query photo (cropped, resized, re-encoded, bg removed).

        The nearest `COPY_CANDIDATES` images per model (by the query's vectors: stored ones for a catalogued
        photo) are checked with the handcrafted copy test (copies.py); those at or above the threshold are
        returned, best first, one row per listing with the copied photo.
        """
        k = _clamp_k(k)
        with self._lock:
            self.refresh()
            t0 = time.monotonic()
            names = self._choose(models, EMBED_MODELS, "image")
            warns: list[str] = []
            conn = self.conn()
            own_gid = None
            if ref is not None:
                own_gid = self._gid_of(*ref)
                data = read_image_file(self.settings, conn, *ref)
                if data is None:
                    raise SearchError(f"photo {ref[0]}:{ref[1]} is not on this disk", 404)
                q_thumb = copies.thumb_of_bytes(data)
                vectors = {}
                for name in names:
                    found, vecs = stored_vectors(self.settings.embeddings_dir, name, np.array([own_gid]))
                    if len(found):
                        vectors[name] = vecs[:1]
                query = {"type": "copies", "listing_id": ref[0], "image_id": ref[1], **(query or {})}
            else:
                assert image is not None
                q_thumb = copies.thumb_of(image)
                vectors = {n: v for n in names if (v := self._embed(n, image, warns)) is not None}
                query = {"type": "copies", **(query or {})}
            if not vectors:
                raise SearchError("no model could give the query's vectors: " + "; ".join(warns), 500)
            candidates: list[int] = []
            for name, vec in vectors.items():
                idx = self.indexes.get(name)
                if idx is None or vec.shape[-1] != idx.dim:
                    continue
                _, ids = idx.search(vec, COPY_CANDIDATES)
                candidates += [int(g) for g in ids[0] if g >= 0 and g != own_gid]
            candidates = list(dict.fromkeys(candidates))
            where = catalog.locate_gids(conn, candidates)
            hits: dict[int, tuple[float, int]] = {}
            checked = 0
            for gid in candidates:
                if gid not in where:
                    continue
                lid, iid = where[gid]
                thumb = self._thumb(lid, iid)
                if thumb is None:
                    continue
                checked += 1
                score = copies.copy_score(q_thumb, thumb)
                if score >= self.copy_threshold and score > hits.get(lid, (-2.0, 0))[0]:
                    hits[lid] = (score, iid)
            ranked = sorted(hits.items(), key=lambda kv: (-kv[1][0], kv[0]))[:k]
            cards = catalog.listing_cards(conn, [lid for lid, _ in ranked])
            results = []
            for rank, (lid, (score, iid)) in enumerate(ranked, start=1):
                card = cards[lid]
                results.append(
                    {
                        "rank": rank,
                        **card.to_dict(),
                        "image_url": f"/image/{lid}/{card.primary_image_id}" if card.primary_image_id else None,
                        "primary_image_url": f"/image/{lid}/{card.primary_image_id}" if card.primary_image_id else None,
                        "copy_score": round(score, 4),
                        "matched_image_id": iid,
                        "matched_image_url": f"/image/{lid}/{iid}",
                        "detail_url": f"/api/listing/{lid}",
                        "fused_score": round(score, 4),
                        "n_models": 0,
                        "scores": {},
                        "ranks": {},
                        "matched_image_ids": {},
                    }
                )
            return {
                "query": {**query, "k": k, "candidates_per_model": COPY_CANDIDATES},
                "mode": "copies",
                "models": list(vectors),
                "copy_test": {
                    "method": "masked normalised cross-correlation over scale and shift (search/copies.py)",
                    "threshold": self.copy_threshold,
                    "checked": checked,
                },
                "warnings": list(dict.fromkeys(self.warnings() + warns)),
                "results": results,
                "market": market_view(conn, [r["listing_id"] for r in results], self.converter),
                "timing_ms": {"total": round((time.monotonic() - t0) * 1000, 1)},
            }

    def _thumb(self, listing_id: int, image_id: int) -> copies.Thumb | None:
        cache = self._thumbs
        key = (listing_id, image_id)
        if key in cache:
            return cache[key]
        data = read_image_file(self.settings, self.conn(), listing_id, image_id)
        try:
            thumb = copies.thumb_of_bytes(data) if data is not None else None
        except (OSError, ValueError, Image.DecompressionBombError):
            thumb = None
        if len(cache) >= 2000:  # ~30 KB each at 48 px
            cache.pop(next(iter(cache)))
        cache[key] = thumb
        return thumb

    # ---------------------------------------------------------------- status
    def warnings(self) -> list[str]:
        out: list[str] = []
        manifest_models = self.indexes.manifest.get("models") or {}
        standins = sorted(n for n, m in manifest_models.items() if isinstance(m, dict) and m.get("standin"))
        if standins:
            out.append(f"{STANDIN_WARNING} ({', '.join(standins)})")
        try:
            sw = db.kv_get(self.conn(), db.KV_STATUS_WARNING)
        except (SearchError, sqlite3.Error) as exc:
            sw = None
            out.append(str(exc) if isinstance(exc, SearchError) else f"database unreadable: {exc}")
        if sw and not (standins and "stand-in" in sw):  # embed.py's own stand-in note says the same thing
            out.append(sw)
        out += [e for e in self.indexes.errors.values()]
        return list(dict.fromkeys(out))

    def status(self) -> dict:
        """What the page shows above the results: models, index kinds, weights in force, warnings."""
        self.refresh()  # IndexSet has its own lock; a running query need not finish first
        weights_raw, method = load_weights(self.settings.embeddings_dir)
        names = [n for n in (*EMBED_MODELS, *TEXT_INDEXES) if self.indexes.get(n) is not None]
        return {
            "image_models": [n for n in EMBED_MODELS if self.indexes.get(n) is not None],
            "text_query_indexes": [n for n in names if n in TEXT_INDEXES or n in TEXT_MODELS],
            "indexes": {n: self.indexes.get(n).describe() for n in names},  # type: ignore[union-attr]
            "fusion": {
                "method": f"weighted reciprocal-rank fusion (k={self.rrf_k:g})",
                "weights": {n: weight_for(weights_raw, n) for n in names},
                "weights_source": method,
            },
            "warnings": self.warnings(),
            "manifest_version": self.indexes.manifest.get("version"),
            "limits": {
                "max_upload_mb": self.limits.max_upload_bytes // (1024 * 1024),
                "max_pixels": self.limits.max_pixels,
            },
        }


def _pin_first(scores: np.ndarray, ids: np.ndarray, gid: int, self_score: float) -> tuple[np.ndarray, np.ndarray]:
    """Put the query photo's own gid first (an approximate index may rank it lower or miss it)."""
    keep = ids != gid
    return (
        np.concatenate([[max(self_score, float(scores[0]) if len(scores) else self_score)], scores[keep]]),
        np.concatenate([[gid], ids[keep]]).astype(np.int64),
    )


def _best_match(f: Fused, matched: dict[str, int | None], weights: dict[str, float], rrf_k: float) -> int | None:
    """The listing's photo that matched: the one the image models' votes (their RRF terms) favour most."""
    votes: dict[int, float] = {}
    for name, image_id in matched.items():
        if name.endswith("_text") or image_id is None:
            continue
        votes[image_id] = votes.get(image_id, 0.0) + weights.get(name, 1.0) / (rrf_k + f.ranks[name]) + 1e-9
    if not votes:
        return None
    return max(votes.items(), key=lambda kv: (kv[1], -kv[0]))[0]


def dump(result: dict) -> str:
    return json.dumps(result, indent=2, ensure_ascii=False)


def read_path_image(path: str | Path, limits: Limits) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise SearchError(f"no such file: {p}")
    if p.stat().st_size > limits.max_upload_bytes:
        raise SearchError(f"{p} is larger than {limits.max_upload_bytes // (1024 * 1024)} MB")
    return open_query_image(p.read_bytes(), limits)
