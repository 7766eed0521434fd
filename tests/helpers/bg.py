"""Helpers for the background-removal tests: downloaded-looking images and a stand-in model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from imageselector import layout
from imageselector.background.standins import build_standin_u2net
from tests.helpers.rows import seed_images

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bg_remover.py"
DARK = (12, 14, 10)
BRIGHT = (240, 200, 60)


def object_image(w: int = 96, h: int = 72, seed: int = 0) -> Image.Image:
    """A bright rectangle (the product) on a dark backdrop: the stand-in model's foreground and background."""
    rng = np.random.default_rng(seed)
    a = np.empty((h, w, 3), np.uint8)
    a[:] = DARK
    x0, y0 = int(rng.integers(10, w // 3)), int(rng.integers(10, h // 3))
    a[y0 : y0 + h // 2, x0 : x0 + w // 2] = BRIGHT
    return Image.fromarray(a, "RGB")


def seed_downloaded(conn, images_dir: Path, n: int, *, size: tuple[int, int] = (96, 72)) -> list[Path]:
    """n rows with download_done=1 and their JPEG files at the layout's paths."""
    seed_images(conn, n)
    conn.execute("UPDATE image_status SET download_done=1")
    paths = []
    for i, r in enumerate(conn.execute("SELECT listing_id, image_id FROM image_status ORDER BY rowid")):
        p = layout.image_path(images_dir, r["listing_id"], r["image_id"])
        p.parent.mkdir(parents=True, exist_ok=True)
        object_image(*size, seed=i).save(p, "JPEG", quality=92)
        paths.append(p)
    return paths


def standin_in_home(home: Path, name: str = "standin.onnx", size: str = "tiny") -> Path:
    """The stand-in u2net inside the default models directory (<home>/models/rembg), as rembg requires."""
    return build_standin_u2net(home / "models" / "rembg" / name, size)


def run_cli(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "IMAGESELECTOR_HOME": str(home)}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def flags(conn) -> dict[str, int]:
    r = conn.execute(
        "SELECT SUM(bg_removed) AS done, SUM(bg_parked) AS parked, COUNT(*) AS n FROM image_status"
    ).fetchone()
    return {"done": r["done"] or 0, "parked": r["parked"] or 0, "n": r["n"]}
