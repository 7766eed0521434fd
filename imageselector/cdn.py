"""The Etsy image CDN URL pattern, shared by the crawler (parse), the downloader (build) and the simulator (serve).

`{base}/{shop_id}/r/il/{hex6}/{image_id}/il_{size}.{image_id}_{suffix}.jpg`, e.g.
`https://i.etsystatic.com/19569591/r/il/6290b5/1884081600/il_fullxfull.1884081600_tg5r.jpg`.
`hex6` and `suffix` cannot be derived from anything else, so they are parsed from the API's URLs and stored;
a URL that does not match is a `ValueError` for the caller to record, never a guess.
"""

from __future__ import annotations

import re
from typing import NamedTuple

DEFAULT_CDN_BASE = "https://i.etsystatic.com"

# Size tags the API returns (first four) and the ones that also resolve on the same path.
API_SIZES = ("75x75", "170x135", "570xN", "fullxfull")
SIZES = ("75x75", "170x135", "340x270", "570xN", "794xN", "1140xN", "1588xN", "fullxfull")

_SIZE_RE = r"(?:\d{2,4}x\d{2,4}|\d{2,4}xN|fullxfull)"
_PATH_RE = (
    r"/(?P<shop_id>[1-9]\d{0,18})/r/il/(?P<hex>[0-9a-fA-F]{6})/(?P<image_id>[1-9]\d{0,18})"
    rf"/il_(?P<size>{_SIZE_RE})\.(?P=image_id)_(?P<suffix>[A-Za-z0-9]{{1,16}})\.jpg"
)
# Strict: scheme + host (+ optional path prefix, so a local simulator under a prefix still parses), nothing after .jpg.
CDN_RE = re.compile(rf"^(?P<base>https?://[^/?#\s]+(?:/[^?#\s]*?)?){_PATH_RE}$")
# The path alone (what the simulator's HTTP handler sees).
CDN_PATH_RE = re.compile(rf"^{_PATH_RE}$")


class CdnParts(NamedTuple):
    shop_id: int
    hex: str
    image_id: int
    size: str
    suffix: str


def _parts(m: re.Match) -> CdnParts:
    return CdnParts(int(m["shop_id"]), m["hex"], int(m["image_id"]), m["size"], m["suffix"])


def parse_image_url(url: str) -> CdnParts:
    """Split a CDN image URL into its parts; `ValueError` when it is not exactly the CDN pattern."""
    m = CDN_RE.match(url.strip()) if isinstance(url, str) else None
    if not m:
        raise ValueError(f"not an Etsy CDN image URL: {url!r}")
    return _parts(m)


def parse_image_path(path: str) -> CdnParts:
    """Like `parse_image_url` for the URL path only (`/{shop_id}/r/il/...jpg`)."""
    m = CDN_PATH_RE.match(path)
    if not m:
        raise ValueError(f"not an Etsy CDN image path: {path!r}")
    return _parts(m)


def build_image_url(cdn_base: str, shop_id: int, hex: str, image_id: int, suffix: str, size: str = "570xN") -> str:
    """The URL of one size of one image; the inverse of `parse_image_url`."""
    if not re.fullmatch(_SIZE_RE, size):
        raise ValueError(f"bad CDN size tag: {size!r}")
    return f"{cdn_base.rstrip('/')}/{int(shop_id)}/r/il/{hex}/{int(image_id)}/il_{size}.{int(image_id)}_{suffix}.jpg"


def size_dims(size: str, orig_w: int, orig_h: int) -> tuple[int, int]:
    """Pixel size a tag implies for an original of `orig_w` x `orig_h`.

    `WxH` tags are exact boxes (the CDN centre-crops to fill them); `WxN` keeps the aspect ratio at width W
    (never upscaling past the original); `fullxfull` is the original.
    """
    if orig_w <= 0 or orig_h <= 0:
        raise ValueError("original size must be positive")
    if size == "fullxfull":
        return orig_w, orig_h
    m = re.fullmatch(r"(\d{2,4})x(\d{2,4}|N)", size)
    if not m:
        raise ValueError(f"bad CDN size tag: {size!r}")
    w = int(m[1])
    if m[2] != "N":
        return w, int(m[2])
    w = min(w, orig_w)
    return w, max(1, round(orig_h * w / orig_w))
