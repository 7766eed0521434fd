"""Product photos for the simulated CDN, composed from the real photographs scikit-image ships.

A listing shows ONE object: its product type's base photo, cropped, tinted towards the listing's colour word and
set on a listing-specific backdrop (tinted texture, optional frame for prints). Its several images show that same
object from different crops, zooms and tilts, so same-listing images are more alike than cross-listing ones.
Everything is drawn from seeded hashes: identical bytes for identical (seed, image, size).
"""

from __future__ import annotations

import colorsys
import importlib.util
import io
import math
import random
import threading
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageOps

from imageselector import cdn
from imageselector.etsy.simulator import vocab
from imageselector.etsy.simulator.catalogue import Catalogue, stable_hash

# Object box inside each photo, as fractions (left, top, right, bottom); "cutout" photos get an alpha mask.
PHOTOS: dict[str, tuple[str, tuple[float, float, float, float], str]] = {
    "coffee": ("coffee.png", (0.12, 0.02, 0.88, 0.98), "photo"),
    "chelsea": ("chelsea.png", (0.12, 0.0, 0.88, 1.0), "print"),
    "rocket": ("rocket.jpg", (0.25, 0.0, 0.8, 1.0), "print"),
    "motorcycle_left": ("motorcycle_left.png", (0.05, 0.05, 0.95, 0.95), "print"),
    "motorcycle_right": ("motorcycle_right.png", (0.05, 0.05, 0.95, 0.95), "print"),
    "astronaut": ("astronaut.png", (0.05, 0.0, 0.95, 1.0), "print"),
    "camera": ("camera.png", (0.05, 0.0, 0.95, 0.9), "print"),
    "coins": ("coins.png", (0.0, 0.0, 1.0, 1.0), "photo"),
    "clock_motion": ("clock_motion.png", (0.05, 0.05, 0.95, 0.95), "photo"),
    "horse": ("horse.png", (0.0, 0.0, 1.0, 1.0), "dark_cutout"),
    "moon": ("moon.png", (0.0, 0.0, 1.0, 1.0), "print"),
    "hubble_deep_field": ("hubble_deep_field.jpg", (0.0, 0.0, 1.0, 1.0), "print"),
    "ihc": ("ihc.png", (0.0, 0.0, 1.0, 1.0), "print"),
    "retina": ("retina.jpg", (0.0, 0.0, 1.0, 1.0), "print"),
    "logo": ("logo.png", (0.0, 0.0, 1.0, 1.0), "light_cutout"),
}
TEXTURES = ("brick.png", "grass.png", "gravel.png")
WORK_PX = 800  # largest side composed at full detail
GRAIN_SIGMA = 5.0  # photo grain: real JPEGs carry noise (and so 570xN files weigh ~70 KB at quality 85)
GRAIN_PAD = 64
_DATA_DIR: Path | None = None
_loaded: dict[str, Image.Image] = {}
_load_lock = threading.Lock()


def data_dir() -> Path:
    """skimage's bundled data folder, found without importing skimage (slow, and its fetchers go online)."""
    global _DATA_DIR
    if _DATA_DIR is None:
        spec = importlib.util.find_spec("skimage")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("scikit-image is not installed: the simulated CDN needs its bundled photos")
        _DATA_DIR = Path(next(iter(spec.submodule_search_locations))) / "data"
    return _DATA_DIR


def _load(name: str) -> Image.Image:
    """A base photo (RGBA, object box applied, alpha for cutouts) or a texture (L), loaded once per process."""
    with _load_lock:
        im = _loaded.get(name)
        if im is not None:
            return im
        if name in PHOTOS:
            fname, (x0, y0, x1, y1), kind = PHOTOS[name]
            src = Image.open(data_dir() / fname)
            src.load()
            w, h = src.size
            src = src.crop((round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)))
            rgb = src.convert("RGB")
            if kind == "dark_cutout":
                alpha = ImageOps.invert(rgb.convert("L")).point(lambda v: min(255, v * 2))
                rgb = Image.new("RGB", rgb.size, (60, 45, 35))
            elif kind == "light_cutout":
                alpha = ImageOps.invert(rgb.convert("L")).point(lambda v: min(255, v * 6))
            else:
                alpha = Image.new("L", rgb.size, 255)
            im = rgb.convert("RGBA")
            im.putalpha(alpha)
            im.info["kind"] = kind
        else:
            im = Image.open(data_dir() / name).convert("L")
            im.load()
        _loaded[name] = im
        return im


def _colour_matrix(hue_deg: float, sat: float, bright: float) -> tuple[float, ...]:
    """RGB->RGB 12-tuple for Image.convert: luminance-preserving hue rotation, saturation, brightness."""
    c, s = math.cos(math.radians(hue_deg)), math.sin(math.radians(hue_deg))
    hue = (
        (0.213 + c * 0.787 - s * 0.213, 0.715 - c * 0.715 - s * 0.715, 0.072 - c * 0.072 + s * 0.928),
        (0.213 - c * 0.213 + s * 0.143, 0.715 + c * 0.285 + s * 0.140, 0.072 - c * 0.072 - s * 0.283),
        (0.213 - c * 0.213 - s * 0.787, 0.715 - c * 0.715 + s * 0.715, 0.072 + c * 0.928 + s * 0.072),
    )
    lum = (0.213, 0.715, 0.072)
    satm = [[(1 - sat) * lum[k] + (sat if r == k else 0.0) for k in range(3)] for r in range(3)]
    out: list[float] = []
    for r in range(3):
        for k in range(3):
            out.append(bright * sum(satm[r][m] * hue[m][k] for m in range(3)))
        out.append(0.0)
    return tuple(out)


def _hsv_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:

    r, g, b = colorsys.hsv_to_rgb((h % 360) / 360.0, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


class Look:
    """What every image of one listing shares: the object, its colour and its backdrop."""

    def __init__(self, cat: Catalogue, i: int):
        r = random.Random(stable_hash(cat.seed, "look", int(cat.listing_ids[i])))
        self.product = vocab.PRODUCTS[int(cat.prod[i])]
        self.color_word, self.hue, self.sat = vocab.COLORS[int(cat.color_i[i])]
        self.hue_jitter = r.uniform(-12, 12)
        self.crop = (r.uniform(0, 0.1), r.uniform(0, 0.1), r.uniform(0.9, 1.0), r.uniform(0.9, 1.0))
        self.flip = r.random() < 0.5
        self.tint = r.uniform(0.5, 0.75)  # how strongly the object takes the colour word's hue
        self.obj_frac = r.uniform(0.62, 0.85)
        bg_h = (self.hue + 180 + r.uniform(-60, 60)) % 360
        self.bg = _hsv_rgb(bg_h, r.uniform(0.08, 0.35), r.uniform(0.7, 0.97))
        self.bg2 = _hsv_rgb(bg_h + r.uniform(-25, 25), r.uniform(0.1, 0.4), r.uniform(0.45, 0.8))
        self.texture = r.choice(TEXTURES)
        self.tex_alpha = r.uniform(0.15, 0.45)
        self.frame = _hsv_rgb(r.uniform(0, 360), r.uniform(0, 0.5), r.uniform(0.05, 0.5))
        self.framed = PHOTOS[self.product.photo][2] == "print" and r.random() < 0.8


class View:
    """What differs between the images of one listing: zoom, position, tilt and light."""

    def __init__(self, seed: int, image_id: int, rank: int):
        r = random.Random(stable_hash(seed, "view", image_id))
        first = rank == 1
        self.zoom = 1.0 if first else r.choice((r.uniform(0.7, 0.95), r.uniform(1.1, 1.4), r.uniform(1.45, 1.8)))
        self.dx = 0.0 if first else r.uniform(-0.12, 0.12)
        self.dy = 0.0 if first else r.uniform(-0.1, 0.1)
        self.angle = 0.0 if first else r.uniform(-10, 10)
        self.light = 1.0 if first else r.uniform(0.88, 1.1)
        self.light_dir = r.random() < 0.5
        self.grain_xy = (r.randrange(GRAIN_PAD), r.randrange(GRAIN_PAD))


class _ObjectCache:
    """Each listing's coloured, framed object at source resolution (LRU): a listing's images are fetched together."""

    def __init__(self, size: int = 48):
        self.size = size
        self._d: OrderedDict[tuple, Image.Image] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, make) -> Image.Image:
        with self._lock:
            im = self._d.get(key)
            if im is not None:
                self._d.move_to_end(key)
                return im
        im = make()
        with self._lock:
            self._d[key] = im
            while len(self._d) > self.size:
                self._d.popitem(last=False)
        return im


_objects = _ObjectCache()


def _object(look: Look) -> Image.Image:
    """The listing's object (RGBA, source resolution): cropped, coloured, mirrored and framed."""
    base = _load(look.product.photo)
    w, h = base.size
    x0, y0, x1, y1 = look.crop
    obj = base.crop((round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)))
    alpha = obj.getchannel("A")
    rgb = obj.convert("RGB")
    if look.color_word == "black":
        rgb = rgb.convert("RGB", _colour_matrix(0, 0.0, 0.55))
    elif look.color_word == "white":
        rgb = Image.blend(rgb.convert("RGB", _colour_matrix(0, 0.2, 1.0)), Image.new("RGB", rgb.size, "white"), 0.35)
    else:
        rgb = rgb.convert("RGB", _colour_matrix(look.hue_jitter, min(1.3, look.sat), 1.0))
        dark = _hsv_rgb(look.hue, 0.9, 0.25)
        light = _hsv_rgb(look.hue, min(1.0, 0.35 * look.sat + 0.2), 1.0)
        duo = ImageOps.colorize(rgb.convert("L"), dark, light)
        rgb = Image.blend(rgb, duo, look.tint)
    if look.flip:
        rgb, alpha = ImageOps.mirror(rgb), ImageOps.mirror(alpha)
    if look.framed:
        px = max(rgb.size)
        mat = max(2, round(px * 0.06))
        edge = max(2, round(px * 0.03))
        framed = Image.new("RGB", (rgb.width + 2 * (mat + edge), rgb.height + 2 * (mat + edge)), look.frame)
        ImageDraw.Draw(framed).rectangle(
            (edge, edge, framed.width - edge - 1, framed.height - edge - 1), fill=(246, 244, 238)
        )
        framed.paste(rgb, (mat + edge, mat + edge))
        rgb, alpha = framed, Image.new("L", framed.size, 255)
    out = rgb.convert("RGBA")
    out.putalpha(alpha)
    return out


def _place(obj: Image.Image, px: int, angle: float) -> Image.Image:
    """`obj` scaled so its longer side is `px` and turned by `angle` degrees, in one resampling pass."""
    scale = px / max(obj.size)
    while scale < 0.5 and min(obj.size) >= 4:  # pre-shrink (box filter) so the affine pass does not alias
        obj = obj.reduce(2)
        scale *= 2
    w, h = obj.size
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    ow = max(1, round(abs(w * scale * c) + abs(h * scale * s)))
    oh = max(1, round(abs(w * scale * s) + abs(h * scale * c)))
    a, b, d, e = c / scale, s / scale, -s / scale, c / scale
    cxo, cyo, cxi, cyi = ow / 2, oh / 2, w / 2, h / 2
    data = (a, b, cxi - a * cxo - b * cyo, d, e, cyi - d * cxo - e * cyo)
    return obj.transform((ow, oh), Image.Transform.AFFINE, data, resample=Image.BILINEAR)


@lru_cache(maxsize=64)
def _gradient(w: int, h: int, flip: bool) -> Image.Image:
    grad = Image.linear_gradient("L").resize((w, h), Image.BILINEAR)
    return grad.transpose(Image.Transpose.FLIP_TOP_BOTTOM) if flip else grad


@lru_cache(maxsize=32)
def _texture(name: str, w: int, h: int) -> Image.Image:
    side = max(w, h)
    return _load(name).resize((side, side), Image.BILINEAR).crop((0, 0, w, h)).convert("RGB")


@lru_cache(maxsize=32)
def _grain(w: int, h: int) -> Image.Image:
    """Gaussian sensor-like grain around 128, larger than (w, h) so each image can use a different window."""
    return Image.effect_noise((w + GRAIN_PAD, h + GRAIN_PAD), GRAIN_SIGMA).convert("RGB")


def _backdrop(look: Look, view: View, w: int, h: int) -> Image.Image:
    """The listing's tinted, textured backdrop, lit from above or below and brighter or darker per view."""

    def lit(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
        return tuple(min(255, round(c * view.light)) for c in rgb)  # type: ignore[return-value]

    top, bottom = Image.new("RGB", (w, h), lit(look.bg2)), Image.new("RGB", (w, h), lit(look.bg))
    bg = Image.composite(top, bottom, _gradient(w, h, view.light_dir))
    return Image.blend(bg, ImageChops.multiply(bg, _texture(look.texture, w, h)), look.tex_alpha)


def render(cat: Catalogue, j: int, size: str) -> Image.Image:
    """Image `j` of the catalogue at CDN size tag `size` (centre-cropped to fill WxH boxes, like the CDN)."""
    i = cat.listing_of_image(j)
    fw, fh = cat.image_full_dims(j)
    ow, oh = cdn.size_dims(size, fw, fh)
    s = max(ow / fw, oh / fh)
    sw, sh = max(ow, round(fw * s)), max(oh, round(fh * s))
    # compose at most WORK_PX wide (the source photos are smaller than that anyway), then scale up
    ws = min(1.0, WORK_PX / max(sw, sh))
    ww, wh = max(1, round(sw * ws)), max(1, round(sh * ws))
    look = Look(cat, i)
    view = View(cat.seed, int(cat.image_ids[j]), j - int(cat.img_start[i]) + 1)
    canvas = _backdrop(look, view, ww, wh)
    base = _objects.get((cat.seed, int(cat.listing_ids[i])), lambda: _object(look))
    obj = _place(base, max(8, round(min(ww, wh) * look.obj_frac * view.zoom)), view.angle)
    alpha = obj.getchannel("A")
    off = max(1, min(obj.size) // 30)
    cx, cy = ww / 2 + view.dx * ww, wh / 2 + view.dy * wh
    x, y = round(cx - obj.width / 2), round(cy - obj.height / 2)
    canvas.paste((20, 20, 20), (x + off, y + off), alpha.point(lambda v: v // 4))  # a soft drop shadow
    canvas.paste(obj, (x, y), alpha)
    if (ww, wh) != (sw, sh):
        canvas = canvas.resize((sw, sh), Image.BICUBIC)
    if (sw, sh) != (ow, oh):
        left, top = (sw - ow) // 2, (sh - oh) // 2
        canvas = canvas.crop((left, top, left + ow, top + oh))
    gx, gy = view.grain_xy
    grain = _grain(ow, oh).crop((gx, gy, gx + ow, gy + oh))
    return ImageChops.add(canvas, grain, 1.0, -128)


def render_jpeg(cat: Catalogue, j: int, size: str, quality: int = 85) -> bytes:
    buf = io.BytesIO()
    render(cat, j, size).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class JpegCache:
    """Generated JPEG bytes by (image index, size), bounded by total bytes (LRU)."""

    def __init__(self, cat: Catalogue, max_bytes: int = 256 << 20, quality: int = 85):
        self.cat, self.max_bytes, self.quality = cat, max_bytes, quality
        self._d: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, j: int, size: str) -> bytes:
        key = (j, size)
        with self._lock:
            data = self._d.get(key)
            if data is not None:
                self._d.move_to_end(key)
                return data
        data = render_jpeg(self.cat, j, size, self.quality)
        with self._lock:
            if key not in self._d:
                self._d[key] = data
                self._bytes += len(data)
                while self._bytes > self.max_bytes and self._d:
                    _, old = self._d.popitem(last=False)
                    self._bytes -= len(old)
        return data
