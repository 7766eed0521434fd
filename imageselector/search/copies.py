"""Is photo B a copy of photo A (cropped, resized, re-encoded, background removed)? A handcrafted test.

Why handcrafted: the learned models find look-alikes (another mug, another print); a copy is the SAME
photo, and the test must work offline and without trained weights (tests and the demo run stand-ins).
Why this one: the edits a reseller makes to a stolen photo (crop, resize, JPEG, background removal) keep
the photo's pixels in place up to one scale and one shift, so after alignment the two agree pixel by pixel
and colour by colour, while a different photo does not, even one made from the same photograph in
another colour, framing or crop (the simulator makes many of those: see docs/search.md).

The test, `copy_score(a, b)`:
- Both photos become RGB thumbnails (`FINE_SIDE` px on the longer side, and `SIDE` px reduced from it)
  plus a mask of pixels that carry the photo: removed background (transparent, or the near-white fill that
  background removal leaves) is masked out on either side, so a bg-removed copy still matches its original.
- Coarse alignment at `SIDE` px: one photo (the template, tried both ways) is scaled to cover a fraction `f`
  (`FRACTIONS`) of the other's width and slid over it; at every shift the masked normalised
  cross-correlation over the pixels both masks keep is computed at once with FFTs (Padfield, "Masked
  object registration in the Fourier domain", 2012), over luminance and two chroma channels together (a
  flat-coloured logo has little luminance structure). The template's transforms are cached per size.
- Fine check at `FINE_SIDE` px around the best alignments (`FINE_SHIFT` pixels and `FINE_SCALES` of scale
  either way, the coarse step's own uncertainty):
  masked colour correlation minus `COLOUR_PENALTY` times the mean absolute colour difference, minus
  `MISMATCH_PENALTY` times the share of clearly different pixels, minus `CAST_PENALTY` times the colour
  cast (the largest per-channel difference of mean colours): the correlation alone would call a
  recoloured look-alike of the same photograph a copy; crop, resize, JPEG and background removal keep
  colours, and their noise averages out of the means where a hue turn or another tint does not.
- The score is the best of that over both directions, with at least `MIN_OVERLAP` of the template's
  pixels compared. A copy scores near 1; `THRESHOLD` was chosen with bench/copies.py on one seed and
  measured on another (docs/search.md).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy.fft import irfft2, next_fast_len, rfft2
from scipy.ndimage import binary_erosion

SIDE = 48  # coarse alignment side: the FFT search runs here
FINE_SIDE = 128  # the colour check's side: detail (stars, texture, edges) that 48 px blurs away
FRACTIONS = tuple(np.round(np.linspace(0.7, 1.0, 13), 3))  # template width / image width
# The fine check searches the coarse step's own uncertainty: one 48 px pixel is 2.7 px at 128 (shifts of up to
# FINE_SHIFT), and consecutive FRACTIONS differ by 2.5-3.6 % (scales up to 2.5 % either way). With +-1 px and
# +-1.5 %, a cut-out copy whose best coarse fraction fell between two steps scored 0.08 against its source.
FINE_SCALES = (0.975, 0.9875, 1.0, 1.0125, 1.025)
FINE_SHIFT = 2
MIN_OVERLAP = 0.5  # share of the template's kept pixels that must be compared at a shift
WHITE = 236  # a pixel at or above this on all channels counts as removed background (white fill)
FINE_TRIES = 2  # coarse alignments checked at FINE_SIDE
COARSE_MIN = 0.5  # coarse correlation below which the fine check is not worth running
COLOUR_PENALTY = 3.0  # score = correlation - this x mean absolute colour difference (0..1) after alignment
CHROMA_WEIGHT = 2.0  # chroma channels' weight against luminance in the coarse correlation
MISMATCH = 0.12  # a pixel whose colour differs by more than this on some channel is a mismatch
MISMATCH_PENALTY = 1.5  # score minus this times the share of mismatched pixels
# score minus this times the colour cast: copies measured <= 0.011 (JPEG and resizing average out), the
# same photograph recoloured by another listing 0.006-0.04; chosen on seed 7 of bench/copies.py (docs/search.md)
CAST_PENALTY = 10.0
THRESHOLD = 0.50  # chosen by bench/copies.py on seed 7, reported on seed 11 (docs/search.md)
_YCC = np.array([[0.299, 0.587, 0.114], [-0.169, -0.331, 0.5], [0.5, -0.419, -0.081]], dtype=np.float32).T * np.array(
    [1.0, CHROMA_WEIGHT, CHROMA_WEIGHT], dtype=np.float32
)


@dataclass(eq=False)
class Thumb:
    """A photo reduced for the copy test: RGB float32 [h, w, 3] in 0..1 and its keep mask [h, w]."""

    rgb: np.ndarray
    mask: np.ndarray
    fine: Thumb | None = None  # the same photo at FINE_SIDE, for the colour check at the found alignment
    _cache: dict = field(default_factory=dict, repr=False)  # per-size template FFTs, target FFTs

    @property
    def ycc(self) -> np.ndarray:
        return self.rgb @ _YCC

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[1], self.rgb.shape[0]


def _mask_of(rgba: np.ndarray) -> np.ndarray:
    """Pixels that carry the photo: not transparent, and not the near-white fill of a removed background."""
    alpha_ok = rgba[..., 3] >= 128
    white = (rgba[..., :3] >= WHITE).all(axis=-1)
    keep = alpha_ok & ~white
    if not keep.all():  # drop one pixel along cut-out edges: resampling blends them with the fill
        keep = binary_erosion(keep, iterations=1, border_value=1)
    return keep.astype(np.float32)


def _thumb_at(img: Image.Image, side: int) -> tuple[np.ndarray, np.ndarray]:
    scale = side / max(img.size)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    arr = np.asarray(img.resize((w, h), Image.BOX), dtype=np.uint8)  # box: averages JPEG noise away
    return arr[..., :3].astype(np.float32) / 255.0, _mask_of(arr)


def thumb_of(img: Image.Image, side: int = SIDE) -> Thumb:
    """An image (any mode) -> its Thumb at `side` px on the longer side, with its FINE_SIDE twin."""
    img = img.convert("RGBA")
    big = max(side, FINE_SIDE)
    if max(img.size) > 4 * big:  # cheap box pre-shrink of big photos
        img = img.reduce(max(1, max(img.size) // (2 * big)))
    rgb, mask = _thumb_at(img, side)
    fine = Thumb(*_thumb_at(img, FINE_SIDE)) if side < FINE_SIDE else None
    return Thumb(rgb, mask, fine)


def thumb_of_bytes(data: bytes, side: int = SIDE) -> Thumb:
    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG":
            im.draft("RGB", (FINE_SIDE * 2, FINE_SIDE * 2))  # decode at a fraction of the size
        return thumb_of(im, side)


def _resize(t: Thumb, w: int, h: int) -> Thumb:
    key = ("resize", w, h)
    hit = t._cache.get(key)
    if hit is not None:
        return hit
    rgb = (
        np.asarray(Image.fromarray((t.rgb * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR), dtype=np.float32)
        / 255.0
    )
    mask = np.asarray(Image.fromarray((t.mask * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)) >= 128
    out = Thumb(rgb, mask.astype(np.float32))
    t._cache[key] = out
    return out


def _target(img: Thumb) -> tuple:
    """The image side of the correlation, transformed once for every template tried on it."""
    hit = img._cache.get("target")
    if hit is None:
        ih, iw = img.mask.shape
        shape = (next_fast_len(2 * ih - 1, True), next_fast_len(2 * iw - 1, True))  # room for any template
        m, c = img.mask, img.ycc
        fft = rfft2
        i = fft(c * m[..., None], shape, axes=(0, 1))
        i2 = fft((c * c).sum(-1) * m, shape)
        hit = img._cache["target"] = (shape, fft(m, shape), i, i2)
    return hit


def _template(tpl: Thumb, shape: tuple[int, int]) -> tuple:
    key = ("tpl", tpl.mask.shape, shape)
    hit = tpl._cache.get(key)
    if hit is None:
        fft = rfft2
        mt = tpl.mask[::-1, ::-1]
        c = tpl.ycc[::-1, ::-1]
        t = c * mt[..., None]
        hit = tpl._cache[key] = (fft(mt, shape), fft(t, shape, axes=(0, 1)), fft((t * c).sum(-1), shape), mt.sum())
    return hit


def _masked_ncc(tpl: Thumb, img: Thumb) -> tuple[float, int, int]:
    """Best masked NCC (luminance + chroma) of `tpl` at every shift inside `img` (tpl no larger)."""
    th, tw = tpl.mask.shape
    ih, iw = img.mask.shape
    shape, m_s, i_s, i2_s = _target(img)
    mt_s, t_s, t2_s, t_n = _template(tpl, shape)
    specs = np.concatenate(  # every correlation the NCC needs, inverted in one call
        [
            (mt_s * m_s)[..., None],
            t_s * m_s[..., None],
            mt_s[..., None] * i_s,
            t_s * i_s,
            (t2_s * m_s)[..., None],
            (mt_s * i2_s)[..., None],
        ],
        axis=-1,
    )
    out = irfft2(specs, shape, axes=(0, 1))[th - 1 : ih, tw - 1 : iw]
    n, s_t, s_i, st_i, st2, si2 = out[..., 0], out[..., 1:4], out[..., 4:7], out[..., 7:10], out[..., 10], out[..., 11]
    i_n = float(img.mask.sum()) * th * tw / (ih * iw)  # what the image keeps under a window, on average
    valid = n >= MIN_OVERLAP * max(min(float(t_n), i_n), 1.0)
    if not valid.any():
        return 0.0, 0, 0
    nn = np.maximum(n, 1.0)[..., None]
    num = (st_i - s_t * s_i / nn).sum(-1)
    var_t = st2 - (s_t * s_t / nn).sum(-1)
    var_i = si2 - (s_i * s_i / nn).sum(-1)
    ncc = num / np.sqrt(np.maximum(var_t, 1e-6) * np.maximum(var_i, 1e-6))
    ncc = np.where(valid, ncc, -1.0)
    y, x = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
    return float(ncc[y, x]), int(y), int(x)


def _coarse(tpl: Thumb, img: Thumb) -> list[tuple[float, float, float, float]]:
    """`tpl` as a crop of `img`: the best (score, width fraction, x, y) per fraction, keeping tpl's aspect,
    best first."""
    found = []
    iw, ih = img.size
    tw0, th0 = tpl.size
    for f in FRACTIONS:
        w = max(4, round(iw * f))
        h = max(4, round(w * th0 / tw0))
        if h > ih:  # taller than the image: scale by height instead
            h = ih
            w = max(4, round(h * tw0 / th0))
            if w > iw:
                continue
        score, y, x = _masked_ncc(_resize(tpl, w, h), img)
        found.append((score, w / iw, x / iw, y / ih))
    return sorted(found, reverse=True) or [(-1.0, 1.0, 0.0, 0.0)]


def _colour_ncc(t: np.ndarray, tm: np.ndarray, img: Thumb, x0: int, y0: int) -> tuple[float, float, float, float]:
    """Masked colour correlation, mean colour difference, share of clearly different pixels and colour cast
    (the largest per-channel difference of means) of template `t` (mask `tm`) placed at (x0, y0) in `img`."""
    ih, iw = img.mask.shape
    th, tw = tm.shape
    ax, ay, bx, by = max(0, x0), max(0, y0), min(iw, x0 + tw), min(ih, y0 + th)
    if bx - ax < 4 or by - ay < 4:
        return -1.0, 1.0, 1.0, 1.0
    tt, mm = t[ay - y0 : by - y0, ax - x0 : bx - x0], tm[ay - y0 : by - y0, ax - x0 : bx - x0]
    ii, im = img.rgb[ay:by, ax:bx], img.mask[ay:by, ax:bx]
    m = (mm * im) > 0.5
    if m.sum() < MIN_OVERLAP * max(min(float(tm.sum()), float(im.sum())), 1.0):
        return -1.0, 1.0, 1.0, 1.0
    a, b = tt[m], ii[m]
    diff = np.abs(a - b)
    drift = float(diff.mean())  # absolute colour: a copy keeps it, a recoloured look-alike does not
    mism = float((diff.max(axis=-1) > MISMATCH).mean())  # another backdrop, frame or tint shows here
    # JPEG and resampling noise averages out over the overlap; a hue turn or another tint does not
    cast = float(np.abs(a.mean(axis=0) - b.mean(axis=0)).max())
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return (float((a * b).sum() / den) if den > 1e-9 else -1.0), drift, mism, cast


Parts = tuple[float, float, float, float, float]  # (score, correlation, drift, mismatch share, colour cast)


def _fine(tpl: Thumb, img: Thumb, frac: float, fx: float, fy: float) -> Parts:
    """The colour check at FINE_SIDE around the coarse alignment."""
    t, i = tpl.fine or tpl, img.fine or img
    iw, ih = i.size
    best: Parts = (-9.0, -1.0, 1.0, 1.0, 1.0)
    for ds in FINE_SCALES:
        w = max(4, round(iw * frac * ds))
        h = max(4, round(w * t.size[1] / t.size[0]))
        rt = _resize(t, w, h)
        cx, cy = round(fx * iw - (ds - 1) * w / 2), round(fy * ih - (ds - 1) * h / 2)
        for dy in range(-FINE_SHIFT, FINE_SHIFT + 1):
            for dx in range(-FINE_SHIFT, FINE_SHIFT + 1):
                ncc, drift, mism, cast = _colour_ncc(rt.rgb, rt.mask, i, cx + dx, cy + dy)
                score = ncc - COLOUR_PENALTY * drift - MISMATCH_PENALTY * mism - CAST_PENALTY * cast
                best = max(best, (score, ncc, drift, mism, cast))
    return best


def _one_way(tpl: Thumb, img: Thumb) -> Parts:
    """The colour check at the `FINE_TRIES` best coarse alignments (low-texture objects, such as a field of
    stars or a flat logo, can put the right one second at 48 px)."""
    tries = _coarse(tpl, img)
    if tries[0][0] < COARSE_MIN:
        return tries[0][0] - COLOUR_PENALTY - MISMATCH_PENALTY - CAST_PENALTY, tries[0][0], 1.0, 1.0, 1.0
    return max(_fine(tpl, img, frac, fx, fy) for score, frac, fx, fy in tries[:FINE_TRIES] if score >= COARSE_MIN)


def copy_parts(a: Thumb, b: Thumb, settle: float | None = None) -> Parts:
    """(score, correlation, colour drift, mismatch share, colour cast) of the better direction; stops after the
    first when its score reaches `settle` (None: always both)."""
    first = _one_way(a, b)
    if settle is not None and first[0] >= settle:
        return first
    return max(first, _one_way(b, a))


def copy_score(a: Thumb, b: Thumb) -> float:
    """How surely one photo is a (cropped, resized, re-encoded, bg-removed) copy of the other."""
    return copy_parts(a, b, settle=THRESHOLD)[0]


def is_copy(a: Thumb, b: Thumb, threshold: float = THRESHOLD) -> bool:
    return copy_score(a, b) >= threshold
