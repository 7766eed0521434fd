"""The CDN URL pattern: strict parsing, build/parse round trip, implied sizes."""

from __future__ import annotations

import pytest

from imageselector import cdn

REAL = "https://i.etsystatic.com/19569591/r/il/6290b5/1884081600/il_fullxfull.1884081600_tg5r.jpg"


def test_parse_real_url_and_round_trip():
    p = cdn.parse_image_url(REAL)
    assert p == cdn.CdnParts(19569591, "6290b5", 1884081600, "fullxfull", "tg5r")
    assert cdn.build_image_url("https://i.etsystatic.com", p.shop_id, p.hex, p.image_id, p.suffix, p.size) == REAL
    local = cdn.build_image_url("http://127.0.0.1:8123/", 1, "abcdef", 22, "x1y2", "75x75")
    assert local == "http://127.0.0.1:8123/1/r/il/abcdef/22/il_75x75.22_x1y2.jpg"
    assert cdn.parse_image_url(local).suffix == "x1y2"


@pytest.mark.parametrize(
    "bad",
    [
        REAL.replace("1884081600_", "1884081601_"),  # image id in file name differs from the folder
        REAL + "?v=1",
        REAL.replace("6290b5", "6290b"),
        REAL.replace("6290b5", "6290g5"),
        REAL.replace("/r/il/", "/r/xx/"),
        REAL.replace(".jpg", ".png"),
        REAL.replace("il_fullxfull", "il_big"),
        "ftp://i.etsystatic.com/1/r/il/6290b5/2/il_75x75.2_ab.jpg",
        "",
        None,
    ],
)
def test_parse_rejects(bad):
    with pytest.raises(ValueError):
        cdn.parse_image_url(bad)


def test_size_dims():
    assert cdn.size_dims("570xN", 1500, 1200) == (570, 456)
    assert cdn.size_dims("fullxfull", 1500, 1200) == (1500, 1200)
    assert cdn.size_dims("75x75", 1500, 1200) == (75, 75)
    assert cdn.size_dims("170x135", 800, 1000) == (170, 135)
    assert cdn.size_dims("1588xN", 1000, 800) == (1000, 800)  # never upscaled past the original
    with pytest.raises(ValueError):
        cdn.size_dims("big", 10, 10)
    assert set(cdn.API_SIZES) <= set(cdn.SIZES)
