"""The images step: the original flat folders into today's layout (layout.image_path), by rename.

The original pipeline kept every photo in one flat `images/` folder and its cleanup moved some to a flat
backup folder. File names are not spelled out by the guide, so both `{listing_id}_{image_id}.{ext}` and
`{image_id}.{ext}` are accepted (ext jpg, jpeg, png or webp, any case), joined to the database.

Why move rather than teach every reader a second layout: every reader (downloader checks, bg, embed,
cleanup, search thumbnails) finds a file from its ids alone, and a flat folder of a million files is
slow to list and back up. A rename within one filesystem is atomic, so a kill -9 leaves each file whole
in exactly one of its two places and a rerun just continues; the target is never overwritten (checked
first; the upgrade holds its lock and the pipeline is stopped). Folders are fsynced per batch.

Extensions: the bytes are kept as they are and the file takes today's `.jpg` name. Every reader opens
images by content (Pillow), the web page labels PNG by its magic bytes, and converting would recompress
945K photos (lossy, slow) and flatten the alpha of background-removed PNGs.

A file that cannot be placed (unknown name, no row, ambiguous image_id, a second file for one image, a
target already taken by other bytes) is reported and left exactly where it is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imageselector.fsutil import fsync_dir
from imageselector.layout import image_path
from imageselector.upgrade.rows import AMBIGUOUS, MISSING, Rows

NAME_RE = re.compile(r"^(?:(\d+)_)?(\d+)\.(jpe?g|png|webp)$", re.IGNORECASE)
SHARD_RE = re.compile(r"^\d{3}$")
BATCH = 20_000
_EXT_RANK = {"jpg": 0, "jpeg": 1, "png": 2, "webp": 3}


@dataclass
class Unplaced:
    path: str
    reason: str


@dataclass
class FolderPlan:
    """One flat folder: what is there and where each file goes."""

    root: Path
    exists: bool = True
    flat_files: int = 0
    moves: list[tuple[str, int]] = field(default_factory=list)  # (file name, row position)
    unplaced: list[Unplaced] = field(default_factory=list)
    already: int = 0  # files already in today's layout (a rerun, or a backup written by today's cleanup)
    moved: int = 0
    bytes: int = 0


def scan(root: Path, rows: Rows) -> FolderPlan:
    """List the flat files of `root` and join their names to rows (nothing is touched)."""
    plan = FolderPlan(root=Path(root))
    if not plan.root.is_dir():
        plan.exists = False
        return plan
    names: list[str] = []
    lids: list[int] = []
    iids: list[int] = []
    with os.scandir(plan.root) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                if SHARD_RE.match(e.name):
                    with os.scandir(e.path) as sub:
                        plan.already += sum(1 for f in sub if f.is_file(follow_symlinks=False))
                continue
            if e.name.startswith(".") and not NAME_RE.match(e.name):
                continue  # .DS_Store and friends: not photos, not reported
            plan.flat_files += 1
            if not e.is_file(follow_symlinks=False):
                plan.unplaced.append(Unplaced(e.path, "not a regular file"))
                continue
            m = NAME_RE.match(e.name)
            if m is None:
                plan.unplaced.append(Unplaced(e.path, "name is not {listing_id}_{image_id}.ext or {image_id}.ext"))
                continue
            names.append(e.name)
            lids.append(int(m.group(1)) if m.group(1) else -1)
            iids.append(int(m.group(2)))
    pos = rows.find(np.asarray(lids, dtype=np.int64), np.asarray(iids, dtype=np.int64))
    # One file per row: prefer the {listing_id}_{image_id} name, then .jpg, .jpeg, .png, .webp, then by name.
    order = sorted(
        range(len(names)),
        key=lambda i: (lids[i] == -1, _EXT_RANK[names[i].rsplit(".", 1)[1].lower()], names[i]),
    )
    taken: dict[int, str] = {}
    for i in order:
        p = int(pos[i])
        path = str(plan.root / names[i])
        if p == MISSING:
            what = f"listing {lids[i]} image {iids[i]}" if lids[i] != -1 else f"image {iids[i]}"
            plan.unplaced.append(Unplaced(path, f"no row in image_status for {what}"))
        elif p == AMBIGUOUS:
            plan.unplaced.append(Unplaced(path, f"image_id {iids[i]} belongs to several listings: name it"))
        elif p in taken:
            plan.unplaced.append(Unplaced(path, f"a second file for the image of {taken[p]}"))
        else:
            taken[p] = names[i]
            plan.moves.append((names[i], p))
    plan.moves.sort()
    return plan


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def adopt(plan: FolderPlan, rows: Rows, tick: Callable[[], None]) -> None:
    """Rename each planned file to its place in today's layout under the same root."""
    root = plan.root
    made: set[Path] = set()
    touched: set[Path] = set()
    pending = 0
    for name, p in plan.moves:
        src = root / name
        dst = image_path(root, int(rows.lid[p]), int(rows.iid[p]))
        if os.path.lexists(dst):
            same = _same_bytes(src, dst)
            plan.unplaced.append(
                Unplaced(str(src), f"{dst} already exists {'with the same bytes' if same else 'with other bytes'}")
            )
            continue
        size = src.stat().st_size
        if dst.parent not in made:
            dst.parent.mkdir(exist_ok=True)
            made.add(dst.parent)
        os.rename(src, dst)
        plan.moved += 1
        plan.bytes += size
        touched.add(dst.parent)
        pending += 1
        tick()
        if pending >= BATCH:
            _sync(root, touched)
            pending = 0
    _sync(root, touched)


def _sync(root: Path, touched: set[Path]) -> None:
    for d in sorted(touched):
        fsync_dir(d)
    fsync_dir(root)
    touched.clear()


def located(root: Path, rows: Rows) -> np.ndarray:
    """Row positions with a file in today's layout under `root` (read from the shard folders)."""
    lids: list[int] = []
    iids: list[int] = []
    if not root.is_dir():
        return np.zeros(0, dtype=np.int64)
    shards = [e.path for e in os.scandir(root) if SHARD_RE.match(e.name) and e.is_dir(follow_symlinks=False)]
    for d in shards:
        with os.scandir(d) as it:
            for e in it:
                m = re.match(r"^(\d+)_(\d+)\.jpg$", e.name)
                if m:
                    lids.append(int(m.group(1)))
                    iids.append(int(m.group(2)))
    pos = rows.find(np.asarray(lids, dtype=np.int64), np.asarray(iids, dtype=np.int64))
    return pos[pos >= 0]
