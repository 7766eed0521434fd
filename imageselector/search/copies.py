"""Is photo B a copy of photo A (cropped, resized, re-encoded, background removed)? A handcrafted test.

Why handcrafted: the learned models find look-alikes (another mug, another print); a copy is the SAME
photo, and the test must work offline and without trained weights (tests and the demo run stand-ins).
Why this one: the edits a reseller makes to a stolen photo (crop, resize, JPEG, background removal) keep
the photo's pixels in place up to one scale and one shift, so after alignment the two agree pixel by pixel,
while a different photo of a look-alike does not (other pose, light, colour, framing).

The test, `copy_score(a, b)`:
- Both photos are reduced to small RGB thumbnails (`SIDE` px on the longer side) plus a mask of pixels
  that carry the photo: removed background (transparent, or the near-white flat fill that bg removal
  leaves) is masked out on either side, so a bg-removed copy still matches its original.
- One photo (the template, tried both ways) is scaled to cover a fraction `f` (from `MIN_FRACTION` to 1)
  of the other's width and slid over it; at each shift the masked normalised cross-correlation over the
  pixels both masks keep is computed for all shifts at once with FFTs (Padfield, "Masked object
  registration in the Fourier domain", 2012), over the three colour channels together.
- The best alignment is checked again at `FINE_SIDE` px, a pixel and two percent of scale either way, in
  colour: the masked correlation of the RGB values minus `COLOUR_PENALTY` times their mean absolute
  difference (the correlation alone would call a recoloured look-alike of the same photograph a copy;
  crop, resize, JPEG and background removal keep the colours).
- The score is the best of that over both directions, with at least `MIN_OVERLAP` of the template's
  pixels compared. A copy scores near 1; the threshold `THRESHOLD` was measured by
  bench/copies.py (see docs/search.md for precision and recall).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.ndimage import binary_erosion

SIDE = 48  # thumbnail side the search runs at: small enough for ~ms per pair, large enough for detail
FRACTIONS = tuple(np.round(np.linspace(0.5, 1.0, 11), 3))  # template width / image width
MIN_FRACTION = FRACTIONS[0]
MIN_OVERLAP = 0.5  # share of the template's kept pixels that must be compared at a shift
WHITE = 238  # a pixel at or above this on all channels, in a flat run, counts as removed background
COARSE_MIN = 0.6  # coarse correlation below which the fine check is not worth running
FINE_SIDE = 96
COLOUR_PENALTY = 2.0  # score minus this times the mean absolute colour difference (0..1) after alignment  # side of the second, colour check at the alignment the coarse search found
THRESHOLD = 0.80  # measured by bench/copies.py


@dataclass
class Thumb:
    """A photo reduced for the copy test: RGB float32 [h, w, 3] in 0..1 and its keep mask [h, w]."""

    rgb: np.ndarray
    mask: np.ndarray
    fine: Thumb | None = None  # the same photo at FINE_SIDE, for the colour check at the found alignment

    @property
    def gray(self) -> np.ndarray:
        return self.rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[1], self.rgb.shape[0]


def _mask_of(rgba: np.ndarray) -> np.ndarray:
    """Pixels that carry the photo: not transparent, and not part of a near-white flat fill."""
    alpha_ok = rgba[..., 3] >= 128
    rgb = rgba[..., :3]
    white = (rgb >= WHITE).all(axis=-1)
    keep = alpha_ok & ~white
    if not keep.all():  # drop one pixel along cut-out edges: resampling blends them with the fill
        keep = binary_erosion(keep, iterations=1, border_value=1)
    return keep.astype(np.float32)


def thumb_of(img: Image.Image, side: int = SIDE) -> Thumb:
    """An image (any mode) -> its Thumb at `side` px on the longer side."""
    img = img.convert("RGBA")
    scale = side / max(img.size)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    if img.width > 4 * w:  # cheap box pre-shrink of big photos
        img = img.reduce(max(1, img.width // (2 * w)))
    arr = np.asarray(img.resize((w, h), Image.BILINEAR), dtype=np.uint8)
    fine = thumb_of(img, FINE_SIDE) if side < FINE_SIDE else None
    return Thumb(arr[..., :3].astype(np.float32) / 255.0, _mask_of(arr), fine)


def thumb_of_bytes(data: bytes, side: int = SIDE) -> Thumb:
    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG":
            im.draft("RGB", (side * 4, side * 4))  # decode at a fraction of the size: we only need a thumbnail
        return thumb_of(im, side)


def _resize(t: Thumb, w: int, h: int) -> Thumb:
    rgb = (
        np.asarray(Image.fromarray((t.rgb * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR), dtype=np.float32)
        / 255.0
    )
    mask = np.asarray(Image.fromarray((t.mask * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)) >= 128
    return Thumb(rgb, mask.astype(np.float32))


class _Target:
    """The image side of the correlation, transformed once for every template size tried on it."""

    def __init__(self, img: Thumb) -> None:
        self.img = img
        ih, iw = img.mask.shape
        self.shape = (2 * ih - 1, 2 * iw - 1)  # room for any template no larger than the image
        g, m = img.gray, img.mask
        fft = np.fft.rfft2
        self.m = fft(m, self.shape)
        self.i = fft(g * m, self.shape)
        self.i2 = fft(g * g * m, self.shape)


def _masked_ncc(tpl: Thumb, tgt: _Target) -> tuple[float, int, int]:
    """Best masked NCC of `tpl` at every shift inside the target image (tpl no larger than it)."""
    th, tw = tpl.mask.shape
    ih, iw = tgt.img.mask.shape
    fft, ifft = np.fft.rfft2, np.fft.irfft2
    shape = tgt.shape

    def corr(a_spec: np.ndarray, b_spec: np.ndarray) -> np.ndarray:
        return ifft(a_spec * b_spec, shape)[th - 1 : ih, tw - 1 : iw]

    mt = tpl.mask[::-1, ::-1]
    t = (tpl.gray * tpl.mask)[::-1, ::-1]
    mt_s, t_s, t2_s = fft(mt, shape), fft(t, shape), fft(t * tpl.gray[::-1, ::-1], shape)
    n = corr(mt_s, tgt.m)
    valid = n >= MIN_OVERLAP * max(float(tpl.mask.sum()), 1.0)
    if not valid.any():
        return 0.0, 0, 0
    nn = np.maximum(n, 1.0)
    s_t, s_i = corr(t_s, tgt.m), corr(mt_s, tgt.i)
    num = corr(t_s, tgt.i) - s_t * s_i / nn
    var_t = corr(t2_s, tgt.m) - s_t * s_t / nn
    var_i = corr(mt_s, tgt.i2) - s_i * s_i / nn
    ncc = num / np.sqrt(np.maximum(var_t, 1e-6) * np.maximum(var_i, 1e-6))
    ncc = np.where(valid, ncc, -1.0)
    y, x = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
    return float(ncc[y, x]), int(y), int(x)


def _coarse(tpl: Thumb, img: Thumb) -> tuple[float, float, float, float]:
    """`tpl` as a crop of `img`: best (score, width fraction, x, y) over the fractions, keeping tpl's aspect."""
    best = (-1.0, 1.0, 0.0, 0.0)
    iw, ih = img.size
    tw0, th0 = tpl.size
    tgt = _Target(img)
    for f in FRACTIONS:
        w = max(4, round(iw * f))
        h = max(4, round(w * th0 / tw0))
        if h > ih:  # taller than the image: scale by height instead
            h = ih
            w = max(4, round(h * tw0 / th0))
            if w > iw:
                continue
        score, y, x = _masked_ncc(_resize(tpl, w, h), tgt)
        if score > best[0]:
            best = (score, w / iw, x / iw, y / ih)
    return best


def _colour_ncc(t: np.ndarray, tm: np.ndarray, img: Thumb, x0: int, y0: int) -> tuple[float, float]:
    """Masked colour correlation of template pixels `t` (mask `tm`) placed at (x0, y0) in `img`."""
    ih, iw = img.mask.shape
    th, tw = tm.shape
    ax, ay, bx, by = max(0, x0), max(0, y0), min(iw, x0 + tw), min(ih, y0 + th)
    if bx - ax < 4 or by - ay < 4:
        return -1.0, 1.0
    tt, mm = t[ay - y0 : by - y0, ax - x0 : bx - x0], tm[ay - y0 : by - y0, ax - x0 : bx - x0]
    ii = img.rgb[ay:by, ax:bx]
    m = (mm * img.mask[ay:by, ax:bx]) > 0.5
    if m.sum() < MIN_OVERLAP * max(float(tm.sum()), 1.0):
        return -1.0, 1.0
    a, b = tt[m], ii[m]
    drift = float(np.abs(a - b).mean())  # absolute colour: a copy keeps it, a recoloured look-alike does not
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return (float((a * b).sum() / den) if den > 1e-9 else -1.0), drift


def _fine(tpl: Thumb, img: Thumb, frac: float, fx: float, fy: float) -> tuple[float, float, float]:
    """The colour check at FINE_SIDE around the coarse alignment (a few px and percent either way).

    Returns (score, correlation, colour drift) at the position with the best score."""
    t, i = tpl.fine or tpl, img.fine or img
    iw, ih = i.size
    best = (-9.0, -1.0, 1.0)
    for ds in (0.98, 1.0, 1.02):
        w = max(4, round(iw * frac * ds))
        h = max(4, round(w * t.size[1] / t.size[0]))
        rt = _resize(t, w, h)
        cx, cy = round(fx * iw - (ds - 1) * w / 2), round(fy * ih - (ds - 1) * h / 2)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ncc, drift = _colour_ncc(rt.rgb, rt.mask, i, cx + dx, cy + dy)
                best = max(best, (ncc - COLOUR_PENALTY * drift, ncc, drift))
    return best


def _one_way(tpl: Thumb, img: Thumb) -> tuple[float, float, float]:
    score, frac, fx, fy = _coarse(tpl, img)
    if score < COARSE_MIN:
        return score, score, 0.0
    return _fine(tpl, img, frac, fx, fy)


def copy_parts(a: Thumb, b: Thumb, settle: float | None = None) -> tuple[float, float, float]:
    """(score, correlation, colour drift) of the better direction; stops after the first when its score
    reaches `settle` (None: always both). The bench sweeps the penalty from the last two."""
    first = _one_way(a, b)
    if settle is not None and first[0] >= settle:
        return first
    return max(first, _one_way(b, a))


def copy_score(a: Thumb, b: Thumb) -> float:
    """How surely one photo is a (cropped, resized, re-encoded, bg-removed) copy of the other."""
    return copy_parts(a, b, settle=THRESHOLD)[0]


def is_copy(a: Thumb, b: Thumb, threshold: float = THRESHOLD) -> bool:
    return copy_score(a, b) >= threshold
