"""Decoding, compositing and the "already processed" marker of background-removed images.

The marker: every file this stage writes carries a JPEG comment (COM segment) starting with
`imageselector:bg-removed`, e.g. `imageselector:bg-removed model=u2net bg=#ffffff`. A file that
already has it is never processed again (a crash between the replace and `bg_removed=1` only costs
setting the flag on the next run). Check one by hand with:
`venv/bin/python -c "from PIL import Image; print(Image.open('images/...jpg').info.get('comment'))"`.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError

MARKER = b"imageselector:bg-removed"

# Errors that mean "this file is not a usable image" (as opposed to a missing file or a full disk).
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class UndecodableImage(Exception):
    """The bytes are not an image Pillow can decode: park the row, retrying will not help."""


@dataclass
class Decoded:
    """An input file after reading: either already processed (`marked`) or an upright RGB image."""

    marked: bool
    img: Image.Image | None = None
    comment: bytes = b""


def marker_text(model: str, background: tuple[int, int, int]) -> bytes:
    return MARKER + f" model={model} bg=#{background[0]:02x}{background[1]:02x}{background[2]:02x}".encode()


def is_marked(comment: object) -> bool:
    return isinstance(comment, bytes | bytearray) and bytes(comment).startswith(MARKER)


def decode(data: bytes) -> Decoded:
    """Open image bytes: a marked file is reported as such (not decoded further); others fully decoded, upright, RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            comment = im.info.get("comment", b"")
            if is_marked(comment):
                return Decoded(marked=True, comment=comment)
            im.load()
            im = ImageOps.exif_transpose(im)  # as rembg.remove does before predicting
            if im.mode != "RGB":
                im = _flatten(im)
    except UnidentifiedImageError as exc:
        raise UndecodableImage(f"not an image Pillow recognises ({len(data)} bytes, starts {data[:8]!r})") from exc
    except (*DECODE_ERRORS, Image.DecompressionBombWarning) as exc:
        raise UndecodableImage(f"{exc.__class__.__name__}: {exc}") from exc
    if im.width < 2 or im.height < 2:
        raise UndecodableImage(f"image too small ({im.width}x{im.height})")
    return Decoded(marked=False, img=im)


def _flatten(im: Image.Image) -> Image.Image:
    """RGB from any mode; transparency is put on white so it does not turn black."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        base = Image.new("RGB", rgba.size, (255, 255, 255))
        base.paste(rgba, mask=rgba.getchannel("A"))
        return base
    return im.convert("RGB")


def parse_color(text: str) -> tuple[int, int, int]:
    """'white', '#f0f0f0', '240,240,240' -> an RGB triple."""
    text = text.strip()
    if "," in text:
        parts = [int(p) for p in text.split(",")]
        if len(parts) != 3 or not all(0 <= p <= 255 for p in parts):
            raise ValueError(f"colour {text!r}: need three numbers 0-255")
        return parts[0], parts[1], parts[2]
    rgb = ImageColor.getrgb(text)
    return rgb[0], rgb[1], rgb[2]


def composite(img: Image.Image, mask: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """The cutout on a plain background: out = img * a + bg * (1 - a), a = mask / 255.

    (rembg's own `remove(..., bgcolor=...)` multiplies the colour by alpha twice, darkening soft edges;
    a straight blend keeps them clean, and it is cheaper.)
    """
    return Image.composite(img, Image.new("RGB", img.size, background), mask)


def encode_jpeg(img: Image.Image, comment: bytes, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, comment=comment, optimize=False)
    return buf.getvalue()
