"""A small searchable data home: the simulator's catalogue as rows and photos, embedded by the real embed stage.

The rows and files are what sync + download would have produced from the simulator (its `Catalogue`
is the simulator's ground truth, its renderer draws the CDN photos); background removal is skipped
(flags set), and `image_search_v2/embed.py` (the real stage) embeds everything with stand-in models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from imageselector import db
from imageselector.config import load_settings
from imageselector.etsy import store
from imageselector.layout import image_path

PHOTO_SIZE = "170x135"
SNAPSHOTS = 3
T0 = 1_700_000_000


@dataclass
class SearchHome:
    home: Path
    registry: Path
    # listing_id -> [(image_id, path)], primary first
    images: dict[int, list[tuple[int, Path]]] = field(default_factory=dict)
    titles: dict[int, str] = field(default_factory=dict)
    urls: dict[int, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return {**os.environ, "IMAGESELECTOR_HOME": str(self.home), "IMAGESELECTOR_MODELS_FILE": str(self.registry)}


def build_search_home(home: Path, registry: Path, *, listings: int = 8, seed: int = 3) -> SearchHome:
    """Catalogue rows + photos in `home`, embedded with the stand-ins of `registry` (fp32 on the CPU)."""
    from imageselector.embedding.cli import main as embed_main
    from imageselector.etsy.simulator.catalogue import Catalogue
    from imageselector.etsy.simulator.images import render_jpeg

    settings = load_settings(home)
    conn = db.connect(settings.db_path)
    cat = Catalogue(listings, seed=seed)
    out = SearchHome(home, registry)
    rows = []
    # what sync writes: listings, shops and SNAPSHOTS weeks apart (the simulator's figures move with tick())
    for week in range(SNAPSHOTS):
        now = T0 + week * 7 * 86400
        with conn:
            store.write_listings(conn, [cat.listing_json(i) for i in range(cat.n)], snapshot_every_s=0, now=now)
            for s in sorted({int(x) for x in cat.shop_of[: cat.n]}):
                store.write_shop(conn, cat.shop_json(s), now=now)
        cat.tick(7)
    for i in range(cat.n):
        s = int(cat.shop_of[i])
        lid, shop_id = int(cat.listing_ids[i]), int(cat.shop_ids[s])
        out.titles[lid] = cat.title(i)
        out.urls[lid] = cat.listing_json(i)["url"]
        for j in range(int(cat.img_start[i]), int(cat.img_start[i + 1])):
            iid = int(cat.image_ids[j])
            path = image_path(settings.images_dir, lid, iid)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(render_jpeg(cat, j, PHOTO_SIZE))
            out.images.setdefault(lid, []).append((iid, path))
            rows.append(
                dict(
                    listing_id=lid,
                    image_id=iid,
                    shop_id=shop_id,
                    hex=cat.image_hex(j),
                    suffix=cat.image_suffix(j),
                    is_primary=int(j == int(cat.img_start[i])),
                    when_made=cat.when_made(i),
                    price=int(cat.price[i]) / 100,
                )
            )
    db.upsert_images(conn, rows)
    conn.execute("UPDATE image_status SET download_done=1, bg_removed=1")
    conn.close()
    old = os.environ.get("IMAGESELECTOR_HOME")
    os.environ["IMAGESELECTOR_HOME"] = str(home)
    try:
        rc = embed_main(["--model", "all", "--models-file", str(registry), "--device", "cpu", "--dtype", "fp32"])
    finally:
        if old is None:
            os.environ.pop("IMAGESELECTOR_HOME", None)
        else:
            os.environ["IMAGESELECTOR_HOME"] = old
    assert rc == 0, f"embed.py exited {rc}"
    return out


@pytest.fixture(scope="session")
def search_home(standin_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> SearchHome:
    """One embedded catalogue home for all search tests of the session (about 6 s)."""
    return build_search_home(tmp_path_factory.mktemp("search") / "home", standin_registry)


@pytest.fixture(scope="session")
def search_service(search_home: SearchHome):
    from imageselector.search.service import SearchService

    settings = load_settings(search_home.home)
    return SearchService(settings, models_file=str(search_home.registry), device="cpu", dtype="fp32")
