"""The simulator's deterministic ground truth: shops, listings, images and reviews drawn from a seed.

Listings are held column-wise in numpy arrays (a few bytes each), so 100k listings build in well under a second;
JSON objects are composed on demand. Tests compare what a crawler stored against this object.
"""

from __future__ import annotations

import colorsys
import hashlib
import re
from collections import OrderedDict
from functools import lru_cache
from threading import Lock

import numpy as np

from imageselector import cdn
from imageselector.etsy.simulator import vocab

SIM_NOW = 1795000000  # 2026-11-18: the catalogue's fixed "now", so two instances with one seed agree
STATES = ("active", "sold_out", "inactive", "expired", "draft")
STATE_P = (0.9, 0.04, 0.02, 0.03, 0.01)
FULL_DIMS = ((1500, 1200), (1200, 1200), (1200, 1500), (1000, 800), (1588, 1191), (2000, 2000))
CURRENCY = {"US": "USD", "GB": "GBP", "CA": "CAD", "AU": "AUD", "JP": "JPY", "IN": "INR", "PL": "PLN", "UA": "USD"}
COUNTRY_NAMES = {
    "united states": "US",
    "usa": "US",
    "united kingdom": "GB",
    "uk": "GB",
    "germany": "DE",
    "canada": "CA",
    "france": "FR",
    "australia": "AU",
    "netherlands": "NL",
    "italy": "IT",
    "spain": "ES",
    "poland": "PL",
    "ukraine": "UA",
    "india": "IN",
    "japan": "JP",
}
_B36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def stable_hash(*parts: object) -> int:
    """A 64-bit hash independent of PYTHONHASHSEED (Python's hash() is salted per process)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big")


def _b36(v: int, width: int) -> str:
    out = []
    for _ in range(width):
        v, r = divmod(v, 36)
        out.append(_B36[r])
    return "".join(reversed(out))


class Catalogue:
    """Shops, listings, images and reviews for `n_listings` listings, identical for identical (n, seed)."""

    def __init__(self, n_listings: int = 200, seed: int = 1, now: int = SIM_NOW, when_made_drift: float = 0.0):
        if n_listings < 1:
            raise ValueError("need at least one listing")
        self.n, self.seed, self.now = int(n_listings), int(seed), int(now)
        rng = np.random.default_rng([self.seed, self.n])
        n, P = self.n, len(vocab.PRODUCTS)
        ns = self.n_shops = max(1, n // 20)
        # shops
        self.shop_ids = 10_000_000 + np.cumsum(rng.integers(1, 4000, ns))
        self.shop_country = rng.integers(0, len(vocab.COUNTRIES), ns)
        self.shop_prod = rng.integers(0, P, ns)
        self.shop_created = rng.integers(self.now - 12 * 365 * 86400, self.now - 400 * 86400, ns)
        self.shop_favorers = (rng.pareto(1.2, ns) * 40).astype(np.int64)
        weights = 1.0 / (np.arange(ns) + 3.0) ** 0.9
        weights = rng.permutation(weights / weights.sum())
        # listings (ids and creation times both ascend with the index, as on Etsy)
        self.listing_ids = 1_000_000_000 + np.cumsum(rng.integers(1, 2000, n))
        self.shop_of = rng.choice(ns, n, p=weights)
        self.created = np.sort(rng.integers(self.now - 8 * 365 * 86400, self.now - 3600, n))
        self.created = np.maximum(self.created, self.shop_created[self.shop_of] + 86400)
        self.updated = self.created + (rng.random(n) * (self.now - self.created)).astype(np.int64)
        self.prod = np.where(rng.random(n) < 0.75, self.shop_prod[self.shop_of], rng.integers(0, P, n))
        self.noun_i = rng.integers(0, 6, n)
        self.adj_i = rng.integers(0, len(vocab.ADJECTIVES), n)
        self.color_i = rng.integers(0, len(vocab.COLORS), n)
        self.style_i = rng.integers(0, len(vocab.STYLES), n)
        self.occ_i = rng.integers(0, len(vocab.OCCASIONS), n)
        self.mat_i = rng.integers(0, 8, n)
        lo = np.array([p.price_cents[0] for p in vocab.PRODUCTS])[self.prod]
        hi = np.array([p.price_cents[1] for p in vocab.PRODUCTS])[self.prod]
        self.price = (lo + rng.random(n) * (hi - lo)).astype(np.int64) // 100 * 100 + 99
        self.state = rng.choice(len(STATES), n, p=STATE_P)
        self.quantity = np.where(self.state == 1, 0, rng.integers(1, 40, n))
        self.favorers = (rng.pareto(1.5, n) * 8).astype(np.int64)
        self.views = self.favorers * rng.integers(5, 40, n) + rng.integers(0, 30, n)
        self.when_i = rng.integers(0, len(vocab.WHEN_MADE), n)
        # when_made outside the OAS copy's (2025) enum, as the real API sends after its yearly change
        self.when_2026 = rng.random(n) < when_made_drift
        self.who_i = rng.integers(0, 3, n)
        self.taxonomy = np.array([p.taxonomy_id for p in vocab.PRODUCTS])[self.prod]
        self.score_bias = self.listing_ids % 97
        self.active = self.state == 0
        # images: 1..5 per listing, ids ascending with the listing index
        self.n_images = rng.integers(1, 6, n)
        self.img_start = np.concatenate([[0], np.cumsum(self.n_images)])
        total = int(self.img_start[-1])
        self.image_ids = 1_600_000_000 + np.cumsum(rng.integers(1, 800, total))
        self.img_hex = rng.integers(0, 1 << 24, total)
        self.img_suffix = rng.integers(0, 36**4, total)
        self.img_dims = rng.integers(0, len(FULL_DIMS), total)
        # per-shop listing index, for findAllActiveListingsByShop
        order = np.argsort(self.shop_of, kind="stable")
        self._shop_order = order
        self._shop_bounds = np.searchsorted(self.shop_of[order], np.arange(ns + 1))
        self._mask_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._query_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._lock = Lock()
        self.generation = 0  # days passed by tick()
        self._shop_cache: dict[tuple[int, int], dict] = {}

    def tick(self, days: int = 1) -> None:
        """Let `days` pass for the dynamic metrics (favorers, views, quantity, shop favorers), deterministically.

        Lets re-snapshot passes see changed numbers; the set of listings, their states and images stay fixed.
        """
        with self._lock:
            self.generation += days
            rng = np.random.default_rng([self.seed, self.n, self.generation])
            n = self.n
            self.favorers = self.favorers + rng.poisson(0.3 * days, n)
            self.views = self.views + rng.poisson(4.0 * days, n)
            sold = np.minimum(np.maximum(self.quantity - 1, 0), rng.poisson(0.05 * days, n))
            self.quantity = self.quantity - np.where(self.state == 0, sold, 0)
            self.shop_favorers = self.shop_favorers + rng.poisson(0.5 * days, self.n_shops)
            self._query_cache.clear()  # score order depends on favorers

    # ---- lookups -------------------------------------------------------------------------------------------------
    def listing_index(self, listing_id: int) -> int | None:
        i = int(np.searchsorted(self.listing_ids, listing_id))
        return i if i < self.n and int(self.listing_ids[i]) == int(listing_id) else None

    def shop_index(self, shop_id: int) -> int | None:
        i = int(np.searchsorted(self.shop_ids, shop_id))
        return i if i < self.n_shops and int(self.shop_ids[i]) == int(shop_id) else None

    def image_index(self, image_id: int) -> int | None:
        j = int(np.searchsorted(self.image_ids, image_id))
        return j if j < len(self.image_ids) and int(self.image_ids[j]) == int(image_id) else None

    def listing_of_image(self, j: int) -> int:
        return int(np.searchsorted(self.img_start, j, side="right")) - 1

    def image_hex(self, j: int) -> str:
        return f"{int(self.img_hex[j]):06x}"

    def image_suffix(self, j: int) -> str:
        return _b36(int(self.img_suffix[j]), 4)

    def image_full_dims(self, j: int) -> tuple[int, int]:
        return FULL_DIMS[int(self.img_dims[j])]

    def shop_listing_indices(self, s: int) -> np.ndarray:
        return self._shop_order[self._shop_bounds[s] : self._shop_bounds[s + 1]]

    def active_listing_ids(self) -> list[int]:
        """Every listing the active-listing endpoints can return: what a complete crawl must store."""
        return [int(x) for x in self.listing_ids[self.active]]

    def views_known(self, i: int) -> bool:
        """`views` is tabulated daily and optional: about one listing in ten has none yet."""
        return stable_hash(self.seed, "views", int(self.listing_ids[i])) % 10 != 0

    def shops_with_active_listings(self) -> list[int]:
        return [int(x) for x in np.unique(self.shop_ids[self.shop_of[self.active]])]

    # ---- text ----------------------------------------------------------------------------------------------------
    def _words(self, i: int) -> dict[str, str]:
        p = vocab.PRODUCTS[int(self.prod[i])]
        return {
            "noun": p.nouns[int(self.noun_i[i]) % len(p.nouns)],
            "adj": vocab.ADJECTIVES[int(self.adj_i[i])],
            "color": vocab.COLORS[int(self.color_i[i])][0],
            "material": p.materials[int(self.mat_i[i]) % len(p.materials)],
            "style": vocab.STYLES[int(self.style_i[i])],
            "occasion": vocab.OCCASIONS[int(self.occ_i[i])],
        }

    def title(self, i: int) -> str:
        w = self._words(i)
        return f"{w['adj']} {w['color']} {w['material']} {w['noun']}, {w['style']} {w['occasion']} gift".title()

    def tags(self, i: int) -> list[str]:
        w = self._words(i)
        base = list(vocab.PRODUCTS[int(self.prod[i])].tags)
        return base + [w["color"], w["adj"], w["style"], f"{w['occasion']} gift"]

    def materials(self, i: int) -> list[str]:
        return [self._words(i)["material"]]

    def when_made(self, i: int) -> str:
        if self.when_2026[i]:
            return vocab.WHEN_MADE_2026[int(self.when_i[i]) % len(vocab.WHEN_MADE_2026)]
        return vocab.WHEN_MADE[int(self.when_i[i])]

    def currency(self, s: int) -> str:
        c = vocab.COUNTRIES[int(self.shop_country[s])]
        return CURRENCY.get(c, "EUR")

    def shop_name(self, s: int) -> str:
        h = stable_hash(self.seed, "shopname", s)
        noun = vocab.PRODUCTS[int(self.shop_prod[s])].nouns[0].split()[-1].title()
        pre = vocab.SHOP_PREFIX[h % len(vocab.SHOP_PREFIX)]
        suf = vocab.SHOP_WORDS[(h >> 8) % len(vocab.SHOP_WORDS)]
        return f"{pre}{noun}{suf}{_b36(s, 3).upper() if s >= 100 else ''}"

    # ---- search --------------------------------------------------------------------------------------------------
    def _token_mask(self, tok: str) -> np.ndarray:
        """Listings whose title, tags or materials contain the word `tok`."""
        with self._lock:
            m = self._mask_cache.get(tok)
            if m is not None:
                self._mask_cache.move_to_end(tok)
                return m
        n, mask = self.n, np.zeros(self.n, dtype=bool)

        def ids(words) -> list[int]:
            return [k for k, w in enumerate(words) if tok in tokens(w)]

        mask |= np.isin(self.adj_i, ids(vocab.ADJECTIVES))
        mask |= np.isin(self.color_i, ids([c[0] for c in vocab.COLORS]))
        mask |= np.isin(self.style_i, ids(vocab.STYLES))
        mask |= np.isin(self.occ_i, ids([f"{o} gift" for o in vocab.OCCASIONS]))
        for pi, p in enumerate(vocab.PRODUCTS):
            in_p = self.prod == pi
            if any(tok in tokens(t) for t in p.tags):
                mask |= in_p
                continue
            nouns = ids(p.nouns)
            if nouns:
                mask |= in_p & np.isin(self.noun_i % len(p.nouns), nouns)
            mats = ids(p.materials)
            if mats:
                mask |= in_p & np.isin(self.mat_i % len(p.materials), mats)
        mask.setflags(write=False)
        assert len(mask) == n
        with self._lock:
            self._mask_cache[tok] = mask
            while len(self._mask_cache) > 256:
                self._mask_cache.popitem(last=False)
        return mask

    def search(
        self,
        keywords: str | None = None,
        min_price: float | None = None,
        max_price: float | None = None,
        taxonomy_id: int | None = None,
        shop_location: str | None = None,
        sort_on: str = "created",
        sort_order: str = "desc",
        shop_index: int | None = None,
    ) -> np.ndarray:
        """Indices of the active listings matching the filters, in the API's order (ties broken by listing id)."""
        key = (keywords, min_price, max_price, taxonomy_id, shop_location, sort_on, sort_order, shop_index)
        with self._lock:
            hit = self._query_cache.get(key)
            if hit is not None:
                self._query_cache.move_to_end(key)
                return hit
        if shop_index is not None:
            idx = self.shop_listing_indices(shop_index)
            idx = idx[self.active[idx]]
            mask = None
        else:
            mask = self.active.copy()
        if keywords:
            toks = tokens(keywords)
            sub = np.ones(self.n, dtype=bool)
            for t in toks:
                sub &= self._token_mask(t)
            mask = sub if mask is None else mask & sub
        if min_price is not None:
            mask = (
                (self.price >= round(min_price * 100))
                if mask is None
                else mask & (self.price >= round(min_price * 100))
            )
        if max_price is not None:
            mask = (
                (self.price <= round(max_price * 100))
                if mask is None
                else mask & (self.price <= round(max_price * 100))
            )
        if taxonomy_id is not None:
            mask = (self.taxonomy == taxonomy_id) if mask is None else mask & (self.taxonomy == taxonomy_id)
        if shop_location:
            loc = shop_location.strip()
            code = COUNTRY_NAMES.get(loc.lower(), loc.upper())
            cidx = [k for k, c in enumerate(vocab.COUNTRIES) if c == code]
            m = np.isin(self.shop_country[self.shop_of], cidx)
            mask = m if mask is None else mask & m
        if shop_index is not None:
            if mask is not None:
                idx = idx[mask[idx]]
        else:
            idx = np.nonzero(mask)[0]
        col = {
            "created": self.created,
            "price": self.price,
            "updated": self.updated,
            "score": self.favorers * 3 + self.score_bias,
        }[sort_on]
        desc = sort_on == "score" or sort_order in ("desc", "descending", "down")
        order = np.lexsort((self.listing_ids[idx], col[idx]))
        idx = idx[order[::-1]] if desc else idx[order]
        idx.setflags(write=False)
        with self._lock:
            self._query_cache[key] = idx
            while len(self._query_cache) > 64:
                self._query_cache.popitem(last=False)
        return idx

    # ---- reviews -------------------------------------------------------------------------------------------------
    @lru_cache(maxsize=4096)  # noqa: B019 - one catalogue per simulator; the cache dies with it
    def reviews(self, s: int) -> tuple[dict, ...]:
        """A shop's reviews, newest first (drawn with numpy: big shops have hundreds)."""
        own = self.shop_listing_indices(s)
        if len(own) == 0:
            return ()
        rng = np.random.default_rng([self.seed, 7, s])
        k = min(999, int(len(own) * rng.uniform(0.0, 3.0)))
        shop_id = int(self.shop_ids[s])
        which = own[rng.integers(0, len(own), k)]
        lo = self.created[which]
        ts = lo + (rng.random(k) * (self.now - 60 - lo)).astype(np.int64)
        ratings = rng.choice([5, 4, 3, 2, 1], k, p=[0.70, 0.18, 0.06, 0.03, 0.03])
        anon = rng.random(k) < 0.15
        buyers = rng.integers(10_000, 900_000_000, k)
        texts = rng.integers(0, len(vocab.REVIEW_TEXTS), k)
        lids = self.listing_ids[which]
        out = [
            {
                "shop_id": shop_id,
                "listing_id": int(lids[t]),
                "transaction_id": 3_000_000_000 + s * 1000 + t,
                "buyer_user_id": None if anon[t] else int(buyers[t]),
                "rating": int(ratings[t]),
                "review": vocab.REVIEW_TEXTS[int(texts[t])],
                "language": "en",
                "image_url_fullxfull": None,
                "create_timestamp": int(ts[t]),
                "created_timestamp": int(ts[t]),
                "update_timestamp": int(ts[t]),
                "updated_timestamp": int(ts[t]),
            }
            for t in range(k)
        ]
        out.sort(key=lambda d: (-d["created_timestamp"], -d["transaction_id"]))
        return tuple(out)

    # ---- JSON objects --------------------------------------------------------------------------------------------
    def image_json(self, j: int, cdn_base: str) -> dict:
        i = self.listing_of_image(j)
        s = int(self.shop_of[i])
        shop_id, image_id = int(self.shop_ids[s]), int(self.image_ids[j])
        hx, suf = self.image_hex(j), self.image_suffix(j)
        fw, fh = self.image_full_dims(j)
        word, hue, sat = vocab.COLORS[int(self.color_i[i])]
        h = stable_hash(self.seed, "imgcolor", image_id)
        # the dominant colour follows the listing's colour word (its photos are tinted that way)
        s_ = 0.0 if word in ("black", "white") else min(1.0, 0.25 + 0.3 * sat)
        v_ = 0.2 if word == "black" else 0.92 if word == "white" else 0.45 + (h % 40) / 100
        rgb = [round(c * 255) for c in colorsys.hsv_to_rgb((hue % 360) / 360, s_, v_)]
        urls = {f"url_{sz}": cdn.build_image_url(cdn_base, shop_id, hx, image_id, suf, sz) for sz in cdn.API_SIZES}
        ts = int(self.created[i]) + (j - int(self.img_start[i])) * 60
        return {
            "listing_id": int(self.listing_ids[i]),
            "listing_image_id": image_id,
            "hex_code": "{:02X}{:02X}{:02X}".format(*rgb),
            "red": rgb[0],
            "green": rgb[1],
            "blue": rgb[2],
            "hue": int(hue) % 360,
            "saturation": round(s_ * 100),
            "brightness": round(v_ * 100),
            "is_black_and_white": sat == 0.0,
            "creation_tsz": ts,
            "created_timestamp": ts,
            "rank": j - int(self.img_start[i]) + 1,
            **urls,
            "full_height": fh,
            "full_width": fw,
            "alt_text": None if h % 3 else self.title(i),
        }

    def images_json(self, i: int, cdn_base: str) -> list[dict]:
        return [self.image_json(j, cdn_base) for j in range(int(self.img_start[i]), int(self.img_start[i + 1]))]

    def listing_json(self, i: int) -> dict:
        s = int(self.shop_of[i])
        lid, created, updated = int(self.listing_ids[i]), int(self.created[i]), int(self.updated[i])
        h = stable_hash(self.seed, "listing", lid)
        title = self.title(i)
        slug = "-".join(tokens(title))[:60]
        w = self._words(i)
        pmin = 1 + h % 5
        return {
            "listing_id": lid,
            "user_id": 50_000_000 + s,
            "shop_id": int(self.shop_ids[s]),
            "title": title,
            "description": (
                f"This {w['adj']} {w['noun']} is made of {w['material']} in a {w['color']} finish.\n"
                f"A lovely {w['occasion']} gift in {w['style']} style. Ships in {pmin}-{pmin + 3} days."
            ),
            "state": STATES[int(self.state[i])],
            "creation_timestamp": created,
            "created_timestamp": created,
            "ending_timestamp": updated + 120 * 86400,
            "original_creation_timestamp": created,
            "last_modified_timestamp": updated,
            "updated_timestamp": updated,
            "state_timestamp": updated,
            "quantity": int(self.quantity[i]),
            "shop_section_id": None if h % 4 == 0 else 30_000_000 + s * 10 + (h >> 4) % 5,
            "featured_rank": -1 if h % 7 else (h >> 3) % 10,
            "url": f"https://www.etsy.com/listing/{lid}/{slug}",
            "num_favorers": int(self.favorers[i]),
            "non_taxable": False,
            "is_taxable": True,
            "is_customizable": bool(h & 1),
            "is_personalizable": bool(h & 2),
            "personalization_is_required": False,
            "personalization_char_count_max": 256 if h & 2 else None,
            "personalization_instructions": "Enter the name to engrave" if h & 2 else None,
            "listing_type": "physical",
            "tags": self.tags(i),
            "materials": self.materials(i),
            "shipping_profile_id": 100_000_000 + s,
            "return_policy_id": None if h % 5 == 0 else 1_000_000 + s,
            "processing_min": pmin,
            "processing_max": pmin + 3,
            "who_made": ("i_did", "someone_else", "collective")[int(self.who_i[i])],
            "when_made": self.when_made(i),
            "is_supply": False,
            "item_weight": None,
            "item_weight_unit": None,
            "item_length": None,
            "item_width": None,
            "item_height": None,
            "item_dimensions_unit": None,
            "is_private": False,
            "style": [w["style"]],
            "file_data": "",
            "has_variations": bool(h & 4),
            "should_auto_renew": True,
            "language": vocab.LANGUAGES.get(vocab.COUNTRIES[int(self.shop_country[s])], "en-US"),
            "price": {"amount": int(self.price[i]), "divisor": 100, "currency_code": self.currency(s)},
            "taxonomy_id": int(self.taxonomy[i]),
            "readiness_state_id": 1_200_000_000 + s,
            "suggested_title": None,
        }

    def shop_json(self, s: int) -> dict:
        """The Shop object (a fresh copy; cached per shop until tick())."""
        key = (s, self.generation)
        hit = self._shop_cache.get(key)
        if hit is None:
            hit = self._shop_cache[key] = self._shop_json(s)
            if len(self._shop_cache) > 8192:
                self._shop_cache.clear()
        return dict(hit)

    def _shop_json(self, s: int) -> dict:
        shop_id = int(self.shop_ids[s])
        name = self.shop_name(s)
        country = vocab.COUNTRIES[int(self.shop_country[s])]
        own = self.shop_listing_indices(s)
        created = int(self.shop_created[s])
        updated = int(self.updated[own].max()) if len(own) else created
        year_ago = self.now - 365 * 86400
        recent = [r["rating"] for r in self.reviews(s) if r["created_timestamp"] >= year_ago]
        h = stable_hash(self.seed, "shop", shop_id)
        return {
            "shop_id": shop_id,
            "user_id": 50_000_000 + s,
            "shop_name": name,
            "create_date": created,
            "created_timestamp": created,
            "title": None if h % 6 == 0 else f"{name}: {vocab.PRODUCTS[int(self.shop_prod[s])].nouns[0]}s and more",
            "announcement": None if h % 3 else "Welcome! Custom orders are open.",
            "currency_code": self.currency(s),
            "is_vacation": h % 50 == 0,
            "vacation_message": None,
            "sale_message": None,
            "digital_sale_message": None,
            "update_date": updated,
            "updated_timestamp": updated,
            "listing_active_count": int(self.active[own].sum()),
            "digital_listing_count": 0,
            "login_name": name.lower(),
            "accepts_custom_requests": bool(h & 1),
            "policy_welcome": None,
            "policy_payment": None,
            "policy_shipping": None,
            "policy_refunds": None,
            "policy_additional": None,
            "policy_seller_info": None,
            "policy_update_date": created,
            "policy_has_private_receipt_info": False,
            "has_unstructured_policies": False,
            "policy_privacy": None,
            "vacation_autoreply": None,
            "url": f"https://www.etsy.com/shop/{name}",
            "image_url_760x100": None,
            "num_favorers": int(self.shop_favorers[s]),
            "languages": [vocab.LANGUAGES.get(country, "en-US")],
            "icon_url_fullxfull": None,
            "is_using_structured_policies": True,
            "has_onboarded_structured_policies": True,
            "include_dispute_form_link": False,
            "is_direct_checkout_onboarded": True,
            "is_etsy_payments_onboarded": True,
            "is_calculated_eligible": True,
            "is_opted_in_to_buyer_promise": True,
            "is_shop_us_based": country == "US",
            "transaction_sold_count": len(self.reviews(s)) * 3 + int(h % 50),
            "shipping_from_country_iso": country,
            "shop_location_country_iso": None if h % 20 == 0 else country,
            "review_count": len(recent) or None,
            "review_average": round(sum(recent) / len(recent), 4) if recent else None,
        }
