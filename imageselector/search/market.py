"""Market figures for a set of look-alike listings, read from the crawl's snapshots (read-only).

Why: the user collects `listings_dynamic` and `shops_dynamic` over time to see what sells that looks like
their product. For the top-N look-alikes of a query this module says what they cost (median and
quartiles in ONE currency), which shops hold most of them, how many favorers and views they have, and
which gained the most favorers between their first and latest snapshot (the best proxy for sales the
API gives: Etsy publishes no per-listing sales).

Money: the API sends `{"amount": 1500, "divisor": 100, "currency_code": "USD"}`; the crawl stores
amount / divisor (etsy/store.py `money()`), in the listing's own currency. Prices are converted here
with a small fixed table (`FX_PER_USD`, units of each currency per US dollar, rounded reference rates
of 2025); `SEARCH_CURRENCY` picks the currency shown (default USD) and `SEARCH_FX_RATES`
(`EUR=0.92,GBP=0.79`) overrides or adds rates. A price in a currency the table lacks is left out of the
distribution and counted under `unconverted`. The figures are for comparing listings, not accounting.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence

import numpy as np

from imageselector.money import money

# Units of each currency per 1 USD (rounded reference rates, 2025). Edit with SEARCH_FX_RATES, not here.
FX_PER_USD: dict[str, float] = {
    "USD": 1.0,
    "EUR": 0.92,
    "GBP": 0.79,
    "CAD": 1.37,
    "AUD": 1.52,
    "JPY": 150.0,
    "INR": 84.0,
    "PLN": 3.95,
    "CHF": 0.88,
    "SEK": 10.5,
    "DKK": 6.85,
    "NOK": 10.7,
    "NZD": 1.66,
    "MXN": 18.5,
    "HKD": 7.8,
    "SGD": 1.34,
    "ILS": 3.7,
    "TRY": 34.0,
    "BRL": 5.5,
}
TOP_SHOPS = 5
TOP_GAINERS = 5


def parse_rates(raw: str | None) -> dict[str, float]:
    """`EUR=0.92,GBP=0.79` -> {"EUR": 0.92, "GBP": 0.79}; malformed parts raise ValueError with the part."""
    out: dict[str, float] = {}
    for part in (raw or "").split(","):
        part = part.strip()
        if not part:
            continue
        code, sep, value = part.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = -1.0
        if not sep or len(code.strip()) != 3 or rate <= 0:
            raise ValueError(f"SEARCH_FX_RATES: {part!r} is not CODE=units-per-USD")
        out[code.strip().upper()] = rate
    return out


class Converter:
    """Converts an amount in one currency to the display currency through USD."""

    def __init__(self, currency: str = "USD", overrides: Mapping[str, float] | None = None) -> None:
        self.rates = {**FX_PER_USD, **(overrides or {})}
        self.currency = currency.upper()
        if self.currency not in self.rates:
            raise ValueError(f"SEARCH_CURRENCY: no rate for {self.currency}; add it to SEARCH_FX_RATES")

    def convert(self, value: float | None, currency: str | None) -> float | None:
        if value is None or not currency or currency.upper() not in self.rates:
            return None
        return round(float(value) / self.rates[currency.upper()] * self.rates[self.currency], 2)

    def from_money(self, m: Mapping) -> float | None:
        """An API Money object (amount/divisor/currency_code) in the display currency."""
        return self.convert(money(m), m.get("currency_code"))

    def describe(self) -> dict:
        return {"currency": self.currency, "rates_per_usd": "built-in table (market.py) + SEARCH_FX_RATES"}


def _quartiles(values: list[float]) -> dict | None:
    if not values:
        return None
    q = np.percentile(np.asarray(values, dtype=np.float64), [0, 25, 50, 75, 100])
    return {k: round(float(v), 2) for k, v in zip(("min", "q1", "median", "q3", "max"), q, strict=True)}


def _chunks(values: list[int], n: int = 500) -> list[list[int]]:
    return [values[i : i + n] for i in range(0, len(values), n)]


def snapshots_of(conn: sqlite3.Connection, listing_ids: Sequence[int]) -> dict[int, list[sqlite3.Row | tuple]]:
    """listing_id -> its snapshots (ts, price, num_favorers, views, quantity, state), oldest first."""
    out: dict[int, list] = {int(i): [] for i in listing_ids}
    for part in _chunks(list(out)):
        marks = ",".join("?" * len(part))
        for r in conn.execute(
            "SELECT listing_id, snapshot_timestamp, price, num_favorers, views, quantity, state FROM listings_dynamic"
            f" WHERE listing_id IN ({marks}) ORDER BY listing_id, snapshot_timestamp",
            part,
        ):
            out[int(r[0])].append(tuple(r[1:]))
    return out


def market_view(conn: sqlite3.Connection, listing_ids: Sequence[int], converter: Converter) -> dict:
    """Price distribution, shops holding most, favorers/views and top favorer gainers over `listing_ids`."""
    ids = list(dict.fromkeys(int(i) for i in listing_ids))
    meta: dict[int, tuple[int | None, str | None]] = {}
    names: dict[int, str] = {}
    for part in _chunks(ids):
        marks = ",".join("?" * len(part))
        for r in conn.execute(
            "SELECT l.listing_id, l.shop_id, COALESCE(l.currency_code, s.currency_code), s.shop_name FROM listings l"
            f" LEFT JOIN shops s ON s.shop_id = l.shop_id WHERE l.listing_id IN ({marks})",
            part,
        ):
            meta[int(r[0])] = (r[1], r[2])
            if r[1] is not None and r[3]:
                names[int(r[1])] = r[3]
    snaps = snapshots_of(conn, ids)
    prices, unconverted, favs, views, gainers = [], 0, [], [], []
    shops: dict[int, int] = {}
    for lid in ids:
        shop_id, currency = meta.get(lid, (None, None))
        if shop_id is not None:
            shops[int(shop_id)] = shops.get(int(shop_id), 0) + 1
        rows = snaps.get(lid) or []
        last_price = next((r[1] for r in reversed(rows) if r[1] is not None), None)
        if last_price is not None:
            p = converter.convert(last_price, currency)
            if p is None:
                unconverted += 1
            else:
                prices.append(p)
        fav_rows = [(r[0], r[2]) for r in rows if r[2] is not None]
        if fav_rows:
            favs.append(int(fav_rows[-1][1]))
        view_rows = [r[3] for r in rows if r[3] is not None]
        if view_rows:
            views.append(int(view_rows[-1]))
        if len(fav_rows) >= 2 and fav_rows[-1][0] > fav_rows[0][0]:
            (t0, f0), (t1, f1) = fav_rows[0], fav_rows[-1]
            days = (t1 - t0) / 86400.0
            gainers.append(
                {
                    "listing_id": lid,
                    "favorers_gained": int(f1) - int(f0),
                    "days": round(days, 1),
                    "per_day": round((int(f1) - int(f0)) / days, 2) if days > 0 else None,
                    "favorers": int(f1),
                }
            )
    if not all(s in names for s in shops):
        missing = [s for s in shops if s not in names]
        marks = ",".join("?" * len(missing))
        names.update(dict(conn.execute(f"SELECT shop_id, shop_name FROM shops WHERE shop_id IN ({marks})", missing)))
    top_shops = sorted(shops.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_SHOPS]
    shop_rows = []
    for sid, n in top_shops:
        latest = conn.execute(
            "SELECT num_favorers, transaction_sold_count, review_average, review_count FROM shops_dynamic"
            " WHERE shop_id=? ORDER BY snapshot_timestamp DESC LIMIT 1",
            (sid,),
        ).fetchone()
        shop_rows.append(
            {
                "shop_id": sid,
                "shop_name": names.get(sid),
                "listings": n,
                "share": round(n / len(ids), 3) if ids else 0.0,
                "num_favorers": latest[0] if latest else None,
                "transaction_sold_count": latest[1] if latest else None,
                "review_average": latest[2] if latest else None,
                "review_count": latest[3] if latest else None,
            }
        )
    gainers.sort(key=lambda g: (-g["favorers_gained"], g["listing_id"]))
    return {
        "listings": len(ids),
        "currency": converter.currency,
        "conversion": "amount / divisor in the listing's currency, converted through USD with the built-in table"
        " (SEARCH_FX_RATES overrides)",
        "price": _quartiles(prices),
        "priced": len(prices),
        "unconverted": unconverted,
        "favorers": {"total": int(sum(favs)), "median": float(np.median(favs)) if favs else None, "known": len(favs)},
        "views": {"total": int(sum(views)), "median": float(np.median(views)) if views else None, "known": len(views)},
        "shops": shop_rows,
        "distinct_shops": len(shops),
        "top_gainers": [g for g in gainers if g["favorers_gained"] > 0][:TOP_GAINERS],
    }
