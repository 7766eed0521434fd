"""Market figures, money conversion, the upload cache, stored vectors and the copy test, without a server."""

from __future__ import annotations

import io
import os
import sqlite3
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image, ImageChops

from imageselector.config import load_settings
from imageselector.etsy.simulator import images as sim_images
from imageselector.etsy.simulator.catalogue import Catalogue
from imageselector.search import copies
from imageselector.search.market import Converter, market_view, parse_rates
from imageselector.search.stored import stored_vectors
from imageselector.search.uploads import UploadCache
from imageselector.vectorstore.store import open_snapshot
from tests.helpers.embed_fixtures import standin_registry  # noqa: F401 - session fixture
from tests.helpers.search_home import SearchHome, search_home  # noqa: F401


def test_money_uses_the_divisor_and_converts_through_usd() -> None:
    c = Converter("EUR", parse_rates("EUR=0.5,XYZ=4"))
    assert c.from_money({"amount": 1500, "divisor": 100, "currency_code": "USD"}) == 7.5
    assert c.from_money({"amount": 1999, "divisor": 1, "currency_code": "XYZ"}) == round(1999 / 4 * 0.5, 2)
    assert c.convert(10.0, "EUR") == 10.0 and c.convert(10.0, "QQQ") is None and c.convert(None, "USD") is None
    with pytest.raises(ValueError, match="CODE=units-per-USD"):
        parse_rates("EUR:0.9")
    with pytest.raises(ValueError, match="no rate for QQQ"):
        Converter("QQQ")


def test_market_view_over_the_snapshots(search_home: SearchHome) -> None:  # noqa: F811
    conn = sqlite3.connect(search_home.home / "etsy_data.db")
    ids = sorted(search_home.images)
    conv = Converter("USD")
    m = market_view(conn, ids, conv)
    latest = {}
    for lid, ts, price, fav in conn.execute(
        "SELECT listing_id, snapshot_timestamp, price, num_favorers FROM listings_dynamic ORDER BY snapshot_timestamp"
    ):
        latest.setdefault(lid, []).append((ts, price, fav))
    cur = dict(conn.execute("SELECT listing_id, currency_code FROM listings"))
    prices = sorted(conv.convert(v[-1][1], cur[lid]) for lid, v in latest.items())
    assert m["listings"] == len(ids) and m["priced"] == len(prices) and m["unconverted"] == 0
    assert m["price"]["median"] == pytest.approx(float(np.median(prices)), abs=0.01)
    assert m["price"]["min"] == prices[0] and m["price"]["max"] == prices[-1]
    assert m["price"]["q1"] <= m["price"]["median"] <= m["price"]["q3"]
    assert m["favorers"]["total"] == sum(v[-1][2] for v in latest.values())
    gains = sorted(((v[-1][2] - v[0][2]), lid) for lid, v in latest.items())
    top = m["top_gainers"][0]
    assert top["favorers_gained"] == gains[-1][0] > 0 and top["days"] == 14.0
    assert [g["favorers_gained"] for g in m["top_gainers"]] == sorted(
        (g["favorers_gained"] for g in m["top_gainers"]), reverse=True
    )
    assert sum(s["listings"] for s in m["shops"]) <= len(ids) and m["shops"][0]["shop_name"]
    # a currency without a rate is counted, not guessed
    only_usd = Converter("USD", {})
    only_usd.rates = {"USD": 1.0}
    m2 = market_view(conn, ids, only_usd)
    assert m2["priced"] + m2["unconverted"] == len(ids) and m2["unconverted"] == sum(
        1 for c in cur.values() if c != "USD"
    )


def test_upload_cache_keeps_by_hash_and_evicts_least_recently_used(tmp_path: Path) -> None:
    cache = UploadCache(tmp_path / "up", tmp_path / "tmp", max_bytes=3000, max_files=3, max_age_s=3600)
    (tmp_path / "tmp").mkdir()
    a, b, c, d = (bytes([i]) * 900 for i in range(4))
    ha = cache.put(a)
    assert cache.put(a) == ha and len(ha) == 64 and cache.get(ha) == a
    hb, hc = cache.put(b), cache.put(c)
    old = time.time() - 100
    for h in (ha, hb, hc):
        os.utime(cache.root / h, (old, old))
    assert cache.get(ha) == a  # a is used again: b is now the least recently used
    hd = cache.put(d)  # 4 files > 3: b goes
    assert cache.get(hb) is None and cache.get(ha) == a and cache.get(hc) == c and cache.get(hd) == d
    os.utime(cache.root / hc, (time.time() - 7200,) * 2)
    cache.put(b"fresh")
    assert cache.get(hc) is None  # older than max_age_s
    assert cache.get("../../etc/passwd") is None and cache.get("0" * 64) is None


def test_stored_vectors_match_the_index_and_omit_missing(search_home: SearchHome) -> None:  # noqa: F811
    emb = load_settings(search_home.home).embeddings_dir
    ids, all_vecs = next(open_snapshot(emb, "dinov2_base").iter_chunks())
    want = np.array([ids[3], 10**12, ids[0]], dtype=np.int64)
    found, vecs = stored_vectors(emb, "dinov2_base", want)
    assert found.tolist() == [ids[3], ids[0]]
    assert np.array_equal(vecs[0], all_vecs[3]) and np.array_equal(vecs[1], all_vecs[0])
    assert stored_vectors(emb, "no_such_model", want)[0].size == 0


def _jpeg(img: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_copy_test_holds_through_crop_resize_reencode_and_background_removal() -> None:
    cat = Catalogue(40, seed=11)
    first = [int(cat.img_start[i]) for i in range(cat.n)]
    src = sim_images.render(cat, first[0], "570xN")
    w, h = src.size
    crop = src.crop((w // 8, h // 10, w - w // 6, h - h // 12))
    cropped = _jpeg(crop.resize((round(crop.width * 0.7), round(crop.height * 0.7))), 45)
    white = Image.new("RGB", src.size, "white")
    mask = Image.new("L", src.size, 0)
    mask.paste(255, (w // 5, h // 6, w - w // 5, h - h // 6))  # the object's box kept, the rest filled white
    cut = _jpeg(Image.composite(src, white, mask).resize((400, round(400 * h / w))), 70)
    t_src = copies.thumb_of(src)
    assert copies.copy_score(copies.thumb_of(cropped), t_src) >= copies.THRESHOLD
    assert copies.copy_score(copies.thumb_of(cut), t_src) >= copies.THRESHOLD
    # the primary photos of other listings, including ones made from the same photograph in another colour
    same_photo = [j for i, j in enumerate(first[1:], 1) if cat.prod[i] == cat.prod[0]][:2]
    others = same_photo + [j for i, j in enumerate(first[1:], 1) if cat.prod[i] != cat.prod[0]][:2]
    for j in others:
        assert copies.copy_score(copies.thumb_of(sim_images.render(cat, j, "570xN")), t_src) < copies.THRESHOLD


def test_a_colour_cast_separates_a_recoloured_photo_from_a_copy() -> None:
    """JPEG and resizing noise averages out of the mean colours; a hue turn of a few degrees does not."""
    cat = Catalogue(40, seed=11)
    src = sim_images.render(cat, 0, "570xN")
    w, h = src.size
    copy = _jpeg(src.crop((w // 10, h // 10, w - w // 10, h - h // 10)).resize((300, round(300 * h / w))), 40)
    turned = _jpeg(src.convert("RGB", sim_images._colour_matrix(25.0, 1.0, 1.0)), 90)  # the jitter spans 24 deg
    t_src = copies.thumb_of(src)
    plain, recoloured = (
        copies.copy_parts(copies.thumb_of(copy), t_src),
        copies.copy_parts(copies.thumb_of(turned), t_src),
    )
    assert plain[4] < 0.011 < recoloured[4]  # the cast: measured <= 0.011 on the bench's copies
    assert plain[0] >= copies.THRESHOLD and plain[0] > recoloured[0]


def _object_mask(cat: Catalogue, j: int) -> Image.Image:
    """The renderer's own object mask: the photo on a black and on a white backdrop differs off the object."""
    shots = []
    for rgb in ((0, 0, 0), (255, 255, 255)):
        with mock.patch.object(
            sim_images, "_backdrop", lambda look, view, w, h, rgb=rgb: Image.new("RGB", (w, h), rgb)
        ):
            shots.append(sim_images.render(cat, j, "570xN"))
    return ImageChops.difference(*shots).convert("L").point(lambda v: 255 if v < 60 else 0)


def test_copy_test_finds_a_cropped_reencoded_cutout_and_rejects_a_recoloured_variant() -> None:
    """A seller's 'same photo': a bg-removed, cropped, shrunk, JPEG-30 copy is one; the same photograph
    tinted for another listing (another colour word) is not, nor is another product's photo."""
    cat = Catalogue(40, seed=11)
    first = [int(cat.img_start[i]) for i in range(cat.n)]
    i0 = next(
        i
        for i in range(cat.n)
        if any(cat.prod[k] == cat.prod[i] and cat.color_i[k] != cat.color_i[i] for k in range(cat.n))
    )
    src = sim_images.render(cat, first[i0], "570xN")
    cut = Image.composite(src, Image.new("RGB", src.size, "white"), _object_mask(cat, first[i0]))
    w, h = cut.size
    crop = cut.crop((w // 10, h // 20, w - w // 12, h - h // 8))
    copy = _jpeg(crop.resize((round(crop.width * 0.55), round(crop.height * 0.55))), 30)
    t_src, t_copy = copies.thumb_of(src), copies.thumb_of(copy)
    assert copies.copy_score(t_copy, t_src) >= copies.THRESHOLD
    recoloured = next(
        first[k] for k in range(cat.n) if cat.prod[k] == cat.prod[i0] and cat.color_i[k] != cat.color_i[i0]
    )
    other = next(first[k] for k in range(cat.n) if cat.prod[k] != cat.prod[i0])
    for j in (recoloured, other):
        assert copies.copy_score(t_copy, copies.thumb_of(sim_images.render(cat, j, "570xN"))) < copies.THRESHOLD
