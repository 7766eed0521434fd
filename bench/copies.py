#!/usr/bin/env python3
"""Copies bench: precision and recall of the copy test (search/copies.py) on copies of the simulator's photos.

    venv/bin/python bench/copies.py [--listings 60] [--copies 240] [--seed 7] [--threshold 0.8]
    venv/bin/python bench/copies.py --copies-dir DIR   # copies made elsewhere: DIR/<j>_<anything>.<ext>

The catalogue is the simulator's photos (imageselector/etsy/simulator/images.py) at 570xN. Each copy is one
catalogue photo j with a random chain of edits, each with its probability:
  crop        keep 60-95 % of the width and of the height, at a random place        (p 0.7)
  resize      0.35x-1.6x                                                             (always)
  background  removed: the renderer's own object mask (the photo rendered once on black and once on white
              backdrops; where they differ is background), background filled white  (p 0.4)
  re-encode   JPEG quality 30-90                                                     (always)
Every copy is scored against every catalogue photo. A pair is a copy when the photo is the copy's source j;
every photo of ANOTHER listing is a negative. Other photos of the copy's own listing (the same object from
another angle, zoom and light) are neither: they are reported apart ("same-listing views flagged").
The catalogue is scored twice: as downloaded, and with its backgrounds removed (what images/ holds after
bg_remover). Prints scores' spread and, for thresholds around the chosen one, precision and recall.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image, ImageChops

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imageselector.etsy.simulator import images as sim_images  # noqa: E402
from imageselector.etsy.simulator.catalogue import Catalogue  # noqa: E402
from imageselector.search import copies  # noqa: E402

SIZE = "570xN"


def render(cat: Catalogue, j: int) -> Image.Image:
    return sim_images.render(cat, j, SIZE)


def object_mask(cat: Catalogue, j: int) -> Image.Image:
    """Where the object is: the photo rendered on a black and on a white backdrop differs elsewhere."""

    def flat(rgb: tuple[int, int, int]):  # type: ignore[no-untyped-def]
        return lambda look, view, w, h: Image.new("RGB", (w, h), rgb)

    with mock.patch.object(sim_images, "_backdrop", flat((0, 0, 0))):
        dark = sim_images.render(cat, j, SIZE)
    with mock.patch.object(sim_images, "_backdrop", flat((255, 255, 255))):
        light = sim_images.render(cat, j, SIZE)
    diff = ImageChops.difference(dark, light).convert("L")
    return diff.point(lambda v: 255 if v < 60 else 0)


def remove_background(img: Image.Image, mask: Image.Image) -> Image.Image:
    return Image.composite(img, Image.new("RGB", img.size, "white"), mask)


def make_copy(img: Image.Image, mask: Image.Image, r: random.Random) -> tuple[Image.Image, str]:
    edits = []
    if r.random() < 0.4:
        img = remove_background(img, mask)
        edits.append("bg")
    if r.random() < 0.7:
        w, h = img.size
        fw, fh = r.uniform(0.6, 0.95), r.uniform(0.6, 0.95)
        cw, ch = round(w * fw), round(h * fh)
        x, y = r.randint(0, w - cw), r.randint(0, h - ch)
        img = img.crop((x, y, x + cw, y + ch))
        edits.append(f"crop{fw:.2f}x{fh:.2f}")
    s = r.uniform(0.35, 1.6)
    img = img.resize((max(16, round(img.width * s)), max(16, round(img.height * s))), Image.BICUBIC)
    q = r.randint(30, 90)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=q)
    edits.append(f"x{s:.2f} q{q}")
    return Image.open(io.BytesIO(buf.getvalue())), " ".join(edits)


def evaluate(scores: np.ndarray, pos: np.ndarray, neg: np.ndarray, thr: float) -> tuple[float, float, int, int]:
    flagged = scores >= thr
    tp = int((flagged & pos).sum())
    fp = int((flagged & neg).sum())
    fn = int((~flagged & pos).sum())
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    return precision, recall, fp, fn


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listings", type=int, default=60)
    ap.add_argument("--copies", type=int, default=200)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threshold", type=float, default=copies.THRESHOLD)
    ap.add_argument("--copies-dir", type=Path, help="use these copies (named <j>_*.jpg|png) instead of making them")
    ap.add_argument("--penalties", default="", help="also sweep these colour penalties, e.g. 0,1,2,3 (exploration)")
    ap.add_argument("--downloaded-only", action="store_true", help="skip the bg-removed catalogue")
    args = ap.parse_args()

    t0 = time.monotonic()
    cat = Catalogue(args.listings, seed=args.seed)
    n_img = int(cat.img_start[cat.n])
    originals = [render(cat, j) for j in range(n_img)]
    masks = [object_mask(cat, j) for j in range(n_img)]
    listing_of = np.array([cat.listing_of_image(j) for j in range(n_img)])
    print(f"catalogue: {cat.n} listings, {n_img} photos at {SIZE} ({time.monotonic() - t0:.1f} s to render)")

    queries: list[tuple[int, Image.Image, str]] = []
    if args.copies_dir:
        for p in sorted(args.copies_dir.iterdir()):
            j = int(p.name.split("_", 1)[0])
            queries.append((j, Image.open(p), p.name))
    else:
        r = random.Random(args.seed)
        for _ in range(args.copies):
            j = r.randrange(n_img)
            img, how = make_copy(originals[j], masks[j], r)
            queries.append((j, img, how))
    q_thumbs = [copies.thumb_of(img) for _, img, _ in queries]
    src = np.array([j for j, _, _ in queries])

    variants = [("catalogue as downloaded", originals)]
    if not args.downloaded_only:
        bg_removed = [remove_background(o, m) for o, m in zip(originals, masks, strict=True)]
        variants.append(("catalogue with backgrounds removed", bg_removed))
    for label, cat_imgs in variants:
        c_thumbs = [copies.thumb_of(im) for im in cat_imgs]
        t1 = time.monotonic()
        parts = np.array([[copies.copy_parts(q, c) for c in c_thumbs] for q in q_thumbs])  # both directions
        scores = parts[..., 0]
        per_pair_ms = (time.monotonic() - t1) * 1000 / scores.size
        pos = src[:, None] == np.arange(n_img)[None, :]
        same_listing = (listing_of[src][:, None] == listing_of[None, :]) & ~pos
        neg = ~pos & ~same_listing
        print(f"\n== {label}: {len(queries)} copies x {n_img} photos, {per_pair_ms:.1f} ms per pair")
        print(
            f"copy scores: min {scores[pos].min():.3f} p5 {np.percentile(scores[pos], 5):.3f} "
            f"median {np.median(scores[pos]):.3f}; negatives: max {scores[neg].max():.3f} "
            f"p99.9 {np.percentile(scores[neg], 99.9):.3f} median {np.median(scores[neg]):.3f}"
        )
        for thr in sorted({round(args.threshold + d, 2) for d in (-0.1, -0.05, 0.0, 0.05, 0.1)}):
            p, rc, fp, fn = evaluate(scores, pos, neg, thr)
            flagged_views = float((scores[same_listing] >= thr).mean()) if same_listing.any() else 0.0
            mark = "  <- chosen" if abs(thr - args.threshold) < 1e-9 else ""
            print(
                f"threshold {thr:.2f}: precision {p:.3f} recall {rc:.3f} (false pos {fp}, missed {fn}; "
                f"same-listing views flagged {flagged_views:.3f}){mark}"
            )
        for pen in [float(x) for x in args.penalties.split(",") if x.strip()]:
            alt = parts[..., 1] - pen * parts[..., 2]
            best = max((min(evaluate(alt, pos, neg, t)[:2]), t) for t in np.round(np.arange(0.5, 1.0, 0.01), 2))
            p, rc, fp, fn = evaluate(alt, pos, neg, best[1])
            print(f"  penalty {pen:g}: best threshold {best[1]:.2f} precision {p:.3f} recall {rc:.3f}")
        missed = [queries[i][2] for i in np.flatnonzero(~(scores[pos] >= args.threshold))]
        if missed:
            print("missed copies' edits:", "; ".join(missed[:12]))
    print(f"\ntotal {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
