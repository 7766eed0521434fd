#!/usr/bin/env python3
"""Copies bench: precision and recall of the copy test (search/copies.py) on copies of the simulator's photos.

    venv/bin/python bench/copies.py [--listings 30] [--copies 30] [--seeds 7,11] [--workers 2]
    venv/bin/python bench/copies.py --copies-dir DIR   # copies made elsewhere: DIR/<j>_<anything>.<ext>

The catalogue is the simulator's photos (imageselector/etsy/simulator/images.py) at 570xN. Copies are made
here, independently of the detector: each is one catalogue photo j with a random chain of edits
  background  removed with p 0.5: the renderer's own object mask (the photo rendered on a black and on a
              white backdrop; where they differ is background), filled white
  crop        with p 0.8: 5-25 % off the width and 5-25 % off the height, at a random place
  resize      always, 0.4x-1.5x
  re-encode   always, JPEG quality 30-95
Ground truth (what a seller means by "the same product photo"): a copy's positive is its source photo j.
Every photo of ANOTHER listing is a negative, including the many the simulator draws from the same source
photograph in another colour, crop, framing or backdrop (a recoloured or reframed variant is another photo).
Other photos of the copy's own listing (the same object from another zoom, angle and light) are neither:
copies mode looks for other listings, and they are reported apart ("same-listing views flagged").
Every copy is scored against every catalogue photo, twice: catalogue as downloaded, and with its backgrounds
removed (what images/ holds after bg_remover). The threshold is chosen on the first seed (the best
min(precision, recall)) and reported on the second, held out. Last line:
    copies: threshold T, precision P, recall R (N copies, M negatives)
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
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
SWEEP = tuple(np.round(np.arange(0.30, 0.90, 0.02), 3))


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
    if r.random() < 0.5:
        img = remove_background(img, mask)
        edits.append("bg")
    if r.random() < 0.8:
        w, h = img.size
        fw, fh = 1 - r.uniform(0.05, 0.25), 1 - r.uniform(0.05, 0.25)
        cw, ch = round(w * fw), round(h * fh)
        x, y = r.randint(0, w - cw), r.randint(0, h - ch)
        img = img.crop((x, y, x + cw, y + ch))
        edits.append(f"crop{fw:.2f}x{fh:.2f}")
    s = r.uniform(0.4, 1.5)
    img = img.resize((max(16, round(img.width * s)), max(16, round(img.height * s))), Image.BICUBIC)
    q = r.randint(30, 95)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=q)
    edits.append(f"x{s:.2f} q{q}")
    return Image.open(io.BytesIO(buf.getvalue())), " ".join(edits)


_CATS: list[list[copies.Thumb]] = []


def _score_row(q: copies.Thumb) -> np.ndarray:
    """One copy against every catalogue photo of every variant: [variants, photos] scores (both directions)."""
    return np.array([[copies.copy_parts(q, c)[0] for c in cat] for cat in _CATS])


def evaluate(scores: np.ndarray, pos: np.ndarray, neg: np.ndarray, thr: float) -> tuple[float, float, int, int]:
    flagged = scores >= thr
    tp = int((flagged & pos).sum())
    fp = int((flagged & neg).sum())
    fn = int((~flagged & pos).sum())
    return (tp / (tp + fp) if tp + fp else 1.0), (tp / (tp + fn) if tp + fn else 1.0), fp, fn


def run_seed(args: argparse.Namespace, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list]:
    """Scores [copies, variants, photos], positives, negatives and same-listing masks [copies, photos]."""
    t0 = time.monotonic()
    cat = Catalogue(args.listings, seed=seed)
    n_img = int(cat.img_start[cat.n])
    originals = [render(cat, j) for j in range(n_img)]
    masks = [object_mask(cat, j) for j in range(n_img)]
    listing_of = np.array([cat.listing_of_image(j) for j in range(n_img)])
    queries: list[tuple[int, Image.Image, str]] = []
    if args.copies_dir:
        for p in sorted(args.copies_dir.iterdir()):
            queries.append((int(p.name.split("_", 1)[0]), Image.open(p), p.name))
    else:
        r = random.Random(seed * 1000 + 17)
        for _ in range(args.copies):
            j = r.randrange(n_img)
            img, how = make_copy(originals[j], masks[j], r)
            queries.append((j, img, how))
    _CATS[:] = [[copies.thumb_of(o) for o in originals]]
    if not args.downloaded_only:
        _CATS.append([copies.thumb_of(remove_background(o, m)) for o, m in zip(originals, masks, strict=True)])
    q_thumbs = [copies.thumb_of(img) for _, img, _ in queries]
    t1 = time.monotonic()
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        scores = np.array(pool.map(_score_row, q_thumbs, chunksize=1))
    per_pair = (time.monotonic() - t1) * 1000 * args.workers / scores.size
    src = np.array([j for j, _, _ in queries])
    pos = src[:, None] == np.arange(n_img)[None, :]
    same = (listing_of[src][:, None] == listing_of[None, :]) & ~pos
    neg = ~pos & ~same
    print(
        f"seed {seed}: {cat.n} listings, {n_img} photos, {len(queries)} copies, {scores.size} pairs, "
        f"{per_pair:.1f} ms per pair per core, {time.monotonic() - t0:.0f} s"
    )
    return scores, pos, neg, same, [how for _, _, how in queries]


def report(scores: np.ndarray, pos: np.ndarray, neg: np.ndarray, same: np.ndarray, thr: float) -> None:
    """Per catalogue variant and together: spread and the sweep around `thr`."""
    labels = ["as downloaded", "backgrounds removed"][: scores.shape[1]]
    for v, label in enumerate(labels):
        s = scores[:, v]
        p, rc, fp, fn = evaluate(s, pos, neg, thr)
        print(
            f"  catalogue {label}: precision {p:.3f} recall {rc:.3f} (false pos {fp}, missed {fn}); copies min "
            f"{s[pos].min():.3f} median {np.median(s[pos]):.3f}; negatives max {s[neg].max():.3f} "
            f"median {np.median(s[neg]):.3f}; same-listing views flagged {(s[same] >= thr).mean():.3f}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listings", type=int, default=30)
    ap.add_argument("--copies", type=int, default=30, help="copies per seed")
    ap.add_argument(
        "--seeds", default="7,11", help="CHOOSE,REPORT: threshold chosen on the first, reported on the second"
    )
    ap.add_argument("--threshold", type=float, default=None, help="skip choosing: report at this threshold")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--copies-dir", type=Path, help="use these copies (named <j>_*.jpg|png) instead of making them")
    ap.add_argument("--downloaded-only", action="store_true", help="skip the bg-removed catalogue")
    args = ap.parse_args()
    t0 = time.monotonic()
    seeds = [int(s) for s in args.seeds.split(",")]
    thr = args.threshold
    if thr is None:
        sc, pos, neg, same, _ = run_seed(args, seeds[0])
        pos3, neg3 = np.repeat(pos[:, None], sc.shape[1], 1), np.repeat(neg[:, None], sc.shape[1], 1)
        print(f"threshold sweep on seed {seeds[0]} (choosing; both catalogue variants together):")
        best = (-1.0, 0.0)
        for t in SWEEP:
            p, rc, fp, fn = evaluate(sc, pos3, neg3, float(t))
            print(f"  {t:.3f}: precision {p:.3f} recall {rc:.3f} (false pos {fp}, missed {fn})")
            best = max(best, (min(p, rc), float(t)))
        thr = best[1]
        print(
            f"chosen on seed {seeds[0]}: threshold {thr:.3f} (best min(precision, recall) {best[0]:.3f}; "
            f"{int(pos3.sum())} copies, {int(neg3.sum())} negatives)"
        )
        report(sc, pos, neg, same, thr)
    held = seeds[-1]
    sc, pos, neg, same, hows = run_seed(args, held)
    pos3, neg3 = np.repeat(pos[:, None], sc.shape[1], 1), np.repeat(neg[:, None], sc.shape[1], 1)
    print(f"held-out seed {held}: sweep (both catalogue variants together)")
    for t in SWEEP:
        p, rc, fp, fn = evaluate(sc, pos3, neg3, float(t))
        mark = "  <- chosen" if abs(t - thr) < 1e-9 else ""
        print(f"  {t:.3f}: precision {p:.3f} recall {rc:.3f} (false pos {fp}, missed {fn}){mark}")
    report(sc, pos, neg, same, thr)
    missed = sorted({hows[i] for i, _ in zip(*np.nonzero((sc < thr).any(axis=1) & pos), strict=True)})
    if missed:
        print("  missed copies' edits:", "; ".join(missed[:12]))
    p, rc, _, _ = evaluate(sc, pos3, neg3, thr)
    print(f"total {time.monotonic() - t0:.0f} s")
    print(
        f"copies: threshold {thr:.3f}, precision {p:.3f}, recall {rc:.3f} ({int(pos3.sum())} copies, {int(neg3.sum())} negatives)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
