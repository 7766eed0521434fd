"""A home exactly as the original guide (../shared/IMAC_OPERATIONS.md) describes it, built from that text alone.

§7 schema (image_status with PRIMARY KEY (listing_id, image_id) and only the guide's columns; the other
tables with the columns the guide lists, plus an "etc." column today's schema lacks), WAL mode; §2 a flat
`images/` folder (bg removed in place, no marker) and a flat backup folder (§9); §8 row-order FAISS
indexes with `image_index.json` row -> [listing_id, image_id]. `.env` holds only ETSY_API_KEY (§1).

Deliberate inconsistencies, each recorded in `Expect` so a test can check how it was reconciled:
both file-name forms and every extension; unplaceable files (bad name, unknown ids, a second file for
one image); image_index.json naming a row that does not exist and naming one image twice; a vector for
a row whose flag is 0, flags of 1 without vectors, a vector for a row not yet background-removed;
a lossy (PQ) index; a text index in image-row order and one that cannot be mapped.
"""

from __future__ import annotations

import io
import json
import random
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from PIL import Image

MODELS = ("clip_vitb32", "clip_vitl14", "dinov2_base", "dinov2_large", "dinov3_base")
DIMS = {"clip_vitb32": 8, "clip_vitl14": 12, "dinov2_base": 16, "dinov2_large": 20, "dinov3_base": 16}
REAL_DIMS = {"clip_vitb32": 512, "clip_vitl14": 768, "dinov2_base": 768, "dinov2_large": 1024, "dinov3_base": 768}

GUIDE_SCHEMA = """
CREATE TABLE image_status (
    listing_id INTEGER,
    image_id INTEGER,
    shop_id INTEGER,
    hex TEXT,
    suffix TEXT,
    is_primary INTEGER,
    when_made TEXT,
    price REAL,
    to_download INTEGER DEFAULT 1,
    download_done INTEGER DEFAULT 0,
    bg_removed INTEGER DEFAULT 0,
    embed_clip_vitb32 INTEGER DEFAULT 0,
    embed_clip_vitl14 INTEGER DEFAULT 0,
    embed_dinov2_base INTEGER DEFAULT 0,
    embed_dinov2_large INTEGER DEFAULT 0,
    embed_dinov3_base INTEGER DEFAULT 0,
    PRIMARY KEY (listing_id, image_id)
);
CREATE TABLE listings (listing_id INTEGER PRIMARY KEY, shop_id INTEGER, title TEXT, description TEXT, url TEXT,
    tags TEXT, materials TEXT, when_made TEXT, state TEXT);
CREATE TABLE listings_dynamic (listing_id INTEGER, snapshot_timestamp INTEGER, state TEXT, quantity INTEGER,
    num_favorers INTEGER, views INTEGER, price REAL);
CREATE TABLE shops (shop_id INTEGER PRIMARY KEY, create_date INTEGER, url TEXT, shop_name TEXT);
CREATE TABLE shops_dynamic (shop_id INTEGER, snapshot_timestamp INTEGER, listing_active_count INTEGER,
    num_favorers INTEGER, review_count INTEGER);
CREATE TABLE reviews (shop_id INTEGER, listing_id INTEGER, buyer_user_id INTEGER, rating INTEGER, review TEXT,
    create_timestamp INTEGER);
CREATE INDEX idx_to_download ON image_status(to_download, download_done);
"""

COLUMNS = (
    "listing_id",
    "image_id",
    "shop_id",
    "hex",
    "suffix",
    "is_primary",
    "when_made",
    "price",
    "to_download",
    "download_done",
    "bg_removed",
    *(f"embed_{m}" for m in MODELS),
)


def tiny_image(seed: int, fmt: str = "JPEG", size: int = 8) -> bytes:
    rng = random.Random(seed)
    im = Image.new("RGB", (size, size), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@dataclass
class Expect:
    """What the home held, and what a correct upgrade makes of it."""

    rows: list[tuple] = field(default_factory=list)  # COLUMNS values in rowid order
    files: dict[tuple[int, int], bytes] = field(default_factory=dict)  # pair -> bytes (placed in images/)
    backup_files: dict[tuple[int, int], bytes] = field(default_factory=dict)
    unplaceable: dict[str, bytes] = field(default_factory=dict)  # path -> bytes, must stay untouched
    vectors: dict[str, dict[tuple[int, int], np.ndarray]] = field(default_factory=dict)  # model -> pair -> vec
    text: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)  # model -> listing -> vec
    refused: set[str] = field(default_factory=set)
    reencode_text: set[str] = field(default_factory=set)


def write_registry(path: Path, dims: dict[str, int]) -> Path:
    doc = {
        "version": 1,
        "models": {m: {"library": "transformers", "source": f"legacy-{m}", "dim": d} for m, d in dims.items()},
    }
    path.write_text(json.dumps(doc))
    return path


def build_legacy_home(home: Path, backup: Path, *, listings: int = 14, per_listing: int = 4, seed: int = 7) -> Expect:
    rng = random.Random(seed)
    nrs = np.random.default_rng(seed)
    home.mkdir(parents=True, exist_ok=True)
    backup.mkdir(parents=True, exist_ok=True)
    (home / ".env").write_text("ETSY_API_KEY=legacykeystring123\n")
    ex = Expect()
    n = listings * per_listing
    lids = [1_800_000_000 + 37 * i for i in range(listings)]
    pairs = []
    for li, lid in enumerate(lids):
        for k in range(per_listing):
            pairs.append((lid, 5_000_000_000 + 1009 * (li * per_listing + k)))
    rng.shuffle(pairs)  # rowid order is discovery order, not id order
    n_dl, n_bg = int(n * 0.85), int(n * 0.65)
    embed_order = list(range(n_bg))
    rng.shuffle(embed_order)  # the order images were embedded: image_index.json's row order
    counts = {
        "clip_vitb32": int(n_bg * 0.7),
        "clip_vitl14": int(n_bg * 0.45),
        "dinov2_base": int(n_bg * 0.55),
        "dinov2_large": 0,
        "dinov3_base": int(n_bg * 0.3),
    }
    flagged = {m: set(embed_order[: counts[m]]) for m in MODELS}
    flagged["clip_vitb32"].discard(embed_order[counts["clip_vitb32"] - 1])  # a vector whose flag is 0
    flagged["dinov2_base"].add(embed_order[counts["dinov2_base"]])  # a flag of 1 without a vector
    for i, (lid, iid) in enumerate(pairs):
        primary = int((iid // 1009) % per_listing == 0)
        row = [
            lid,
            iid,
            90_000 + lid % 5,
            f"{i:04x}",
            "abc",
            primary,
            "2020_2024",
            12.5 + i,
            1,
            int(i < n_dl),
            int(i < n_bg),
        ]
        row += [int(i in flagged[m]) for m in MODELS]
        ex.rows.append(tuple(row))

    con = sqlite3.connect(home / "etsy_data.db")
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(GUIDE_SCHEMA)
    con.executemany(f"INSERT INTO image_status ({','.join(COLUMNS)}) VALUES ({','.join('?' * len(COLUMNS))})", ex.rows)
    for li, lid in enumerate(lids):
        con.execute(
            "INSERT INTO listings VALUES (?,?,?,?,?,?,?,?,?)",
            (
                lid,
                90_000 + lid % 5,
                f"Vintage thing {li}",
                "desc",
                f"https://etsy.com/listing/{lid}",
                "vintage,brass",
                "brass",
                "2020_2024",
                "active",
            ),
        )
        con.execute(
            "INSERT INTO listings_dynamic VALUES (?,?,?,?,?,?,?)", (lid, 1_700_000_000 + li, "active", 1, 3, 10, 9.5)
        )
    for s in range(5):
        con.execute(
            "INSERT INTO shops VALUES (?,?,?,?)", (90_000 + s, 1_500_000_000, f"https://etsy.com/shop/s{s}", f"shop{s}")
        )
        con.execute("INSERT INTO shops_dynamic VALUES (?,?,?,?,?)", (90_000 + s, 1_700_000_100, 40, 5, 7))
        con.execute("INSERT INTO reviews VALUES (?,?,?,?,?,?)", (90_000 + s, lids[s], 1, 5, "great", 1_600_000_000 + s))
    con.commit()
    con.close()

    # ---- images: flat, both name forms, every extension ----
    forms = ["{lid}_{iid}.jpg", "{iid}.jpg", "{lid}_{iid}.png", "{iid}.jpeg", "{lid}_{iid}.webp", "{lid}_{iid}.JPG"]
    fmt_of = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "JPG": "JPEG"}
    images = home / "images"
    images.mkdir()
    (home / "images_nobg").mkdir()  # deprecated, not used: must be left alone
    moved_to_backup = []
    for i, row in enumerate(ex.rows):
        lid, iid = row[0], row[1]
        if not row[COLUMNS.index("download_done")]:
            continue
        all_embedded = all(row[COLUMNS.index(f"embed_{m}")] for m in MODELS)
        name = forms[i % len(forms)].format(lid=lid, iid=iid)
        data = tiny_image(i, fmt_of[name.rsplit(".", 1)[1]])
        if not row[COLUMNS.index("is_primary")] and all_embedded:
            moved_to_backup.append((lid, iid))
        if i % 9 == 4:  # the old cleanup moved some (the guide's criterion cannot hold with dinov2_large at 0)
            (backup / name).write_bytes(data)
            ex.backup_files[(lid, iid)] = data
            continue
        (images / name).write_bytes(data)
        ex.files[(lid, iid)] = data
    # unplaceable: not a photo name, ids that are no row, a second file for an image already there
    lid0, iid0 = next(p for p in ex.files if p[0] != -1)
    for name, data in (
        ("notes.txt", b"hello"),
        ("123_456.jpg", tiny_image(999)),
        (f"{iid0}.png", tiny_image(998, "PNG")),
        ("thumb_small.jpg", tiny_image(997)),
    ):
        (images / name).write_bytes(data)
        ex.unplaceable[str(images / name)] = data
    (backup / "999_1.jpg").write_bytes(tiny_image(996))
    ex.unplaceable[str(backup / "999_1.jpg")] = tiny_image(996)

    # ---- embeddings: row-order indexes over the rows in the order they were embedded ----
    emb = home / "embeddings"
    emb.mkdir()
    bg_rows = set(range(n_bg))
    index_pairs: list[list[int]] = [[ex.rows[i][0], ex.rows[i][1]] for i in embed_order[: counts["clip_vitb32"]]]
    index_pairs.append([ex.rows[n_bg][0], ex.rows[n_bg][1]])  # a vector for a row not bg-removed
    index_pairs.append([42, 43])  # a row that does not exist
    index_pairs.append(list(index_pairs[0]))  # the same image twice: the first row wins
    (emb / "image_index.json").write_text(json.dumps(index_pairs))
    row_of = {(r[0], r[1]): i for i, r in enumerate(ex.rows)}

    def vectors_for(m: str, count: int) -> np.ndarray:
        return nrs.standard_normal((count, DIMS[m])).astype(np.float32)

    for m in MODELS:
        ex.vectors[m] = {}
        if m == "dinov2_large":
            continue  # no vectors, no file: the guide's "Embedded dino2l: 0"
        # each index covers a prefix of image_index.json; clip_vitb32 covers all of it
        count = len(index_pairs) if m == "clip_vitb32" else counts[m]
        x = vectors_for(m, count)
        if m == "clip_vitb32":
            ix = faiss.IndexFlatIP(DIMS[m])
            ix.add(x)
        elif m == "dinov2_base":
            ix = faiss.IndexIDMap2(faiss.IndexFlatL2(DIMS[m]))
            ix.add_with_ids(x, np.arange(count, dtype=np.int64))
        elif m == "clip_vitl14":
            ix = faiss.IndexScalarQuantizer(DIMS[m], faiss.ScalarQuantizer.QT_fp16)
            ix.add(x)
            x = ix.reconstruct_n(0, count)  # what the file holds, decoded exactly
        else:  # dinov3_base: lossy codes, refused
            ix = faiss.IndexPQ(DIMS[m], 4, 2)
            ix.train(np.concatenate([x, vectors_for(m, 200)]))
            ix.add(x)
            ex.refused.add(m)
        faiss.write_index(ix, str(emb / f"{m}.faiss"))
        if m in ex.refused:
            continue
        for k in range(count):
            pair = tuple(index_pairs[k])
            ri = row_of.get(pair)
            if ri is None or pair in ex.vectors[m] or ri not in bg_rows:
                continue
            ex.vectors[m][pair] = x[k]
    # text: clip_vitb32 in image-row order (each listing's rows identical); clip_vitl14 one row per listing
    tx = {}
    for lid in lids:
        tx[lid] = nrs.standard_normal(DIMS["clip_vitb32"]).astype(np.float32)
    rows_t = np.stack(
        [tx[p[0]] if p[0] in tx else nrs.standard_normal(DIMS["clip_vitb32"]).astype(np.float32) for p in index_pairs]
    )
    t = faiss.IndexFlatIP(DIMS["clip_vitb32"])
    t.add(rows_t)
    faiss.write_index(t, str(emb / "clip_vitb32_text.faiss"))
    ex.text["clip_vitb32"] = {p[0]: tx[p[0]] for p in index_pairs if tuple(p) in row_of}
    t2 = faiss.IndexFlatIP(DIMS["clip_vitl14"])
    t2.add(nrs.standard_normal((len(lids), DIMS["clip_vitl14"])).astype(np.float32))
    faiss.write_index(t2, str(emb / "clip_vitl14_text.faiss"))
    ex.reencode_text.add("clip_vitl14")
    write_registry(home / "legacy_models.json", DIMS)
    return ex
