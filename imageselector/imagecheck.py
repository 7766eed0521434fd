"""Is a downloaded body a whole, sane image? Answered from headers and trailers, without a full decode.

`Image.open` parses only the header (format, size); `verify()` walks PNG chunks and their CRCs but is a
no-op for JPEG, so a JPEG is also checked for its end-of-image marker (a cut-off body lacks it). The
pixel count is checked against an explicit limit before anything could allocate a decompression bomb.
Formats other than JPEG and PNG (rare on Etsy's CDN) get a full decode, still under the pixel limit.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # 8000 x 8000; Etsy's fullxfull photos stay far below this

OK = "ok"
NOT_IMAGE = "not_image"
TRUNCATED = "truncated"
TOO_BIG = "too_big"


@dataclass(frozen=True)
class Verdict:
    kind: str  # OK, NOT_IMAGE, TRUNCATED or TOO_BIG
    detail: str = ""
    width: int = 0
    height: int = 0
    format: str = ""

    @property
    def ok(self) -> bool:
        return self.kind == OK


_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF")


def _jpeg_complete(body: bytes) -> bool:
    """A JPEG ends with FF D9 (EOI); some encoders pad a few zero bytes after it."""
    tail = body[-64:].rstrip(b"\0")
    return tail.endswith(b"\xff\xd9")


def check_image(body: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Verdict:
    """Classify a response body: OK, NOT_IMAGE (HTML, junk), TRUNCATED (cut off or corrupt), TOO_BIG (bomb)."""
    if not body:
        return Verdict(TRUNCATED, "empty body")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(body)) as im:
                w, h = im.size
                fmt = im.format or "?"
                if w <= 0 or h <= 0:
                    return Verdict(NOT_IMAGE, f"{fmt} with size {w}x{h}")
                if w * h > max_pixels:
                    return Verdict(TOO_BIG, f"{fmt} {w}x{h} exceeds {max_pixels:,} pixels", w, h, fmt)
                if fmt == "JPEG":
                    im.verify()
                    if not _jpeg_complete(body):
                        return Verdict(TRUNCATED, f"JPEG {w}x{h} without end marker ({len(body):,} bytes)", w, h, fmt)
                elif fmt == "PNG":
                    im.verify()
                else:
                    old = Image.MAX_IMAGE_PIXELS
                    Image.MAX_IMAGE_PIXELS = max_pixels
                    try:
                        im.load()
                    finally:
                        Image.MAX_IMAGE_PIXELS = old
                return Verdict(OK, "", w, h, fmt)
    except UnidentifiedImageError:
        if body.startswith(_MAGIC):
            return Verdict(TRUNCATED, f"image header cut short ({len(body):,} bytes)")
        head = body[:40].decode("latin-1", "replace").replace("\n", " ").strip()
        return Verdict(NOT_IMAGE, f"not an image ({len(body):,} bytes starting {head!r})")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return Verdict(TOO_BIG, str(exc))
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, struct.error) on bad data
        return Verdict(TRUNCATED, f"corrupt image: {type(exc).__name__}: {exc}")


def decode_error(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Fully decode an image file with bounded memory; None when it decodes, else why not.

    A JPEG is decoded through `draft` at 1/8 scale: every entropy-coded block is still read (so a cut-off
    or corrupt stream fails), but the pixels held are 64 times fewer. The pixel limit is checked before
    anything is allocated. Used by `image_downloader.py --verify`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w <= 0 or h <= 0:
                    return f"{im.format} with size {w}x{h}"
                if w * h > max_pixels:
                    return f"{im.format} {w}x{h} exceeds {max_pixels:,} pixels"
                if im.format == "JPEG":
                    im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))
                im.load()
        return None
    except FileNotFoundError:
        return "missing"
    except UnidentifiedImageError:
        return "not an image Pillow recognises"
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types on bad data
        return f"{type(exc).__name__}: {exc}"
