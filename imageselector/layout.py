"""Where an image lives on disk, computed from (listing_id, image_id) alone.

`images/{image_id % 1000:03d}/{listing_id}_{image_id}.jpg`: a million images spread over 1,000
folders of about 1,000 files each (a flat folder of a million files is slow to list and to back up).
A moved image (scripts/cleanup_images.py) lives at the same relative path under the backup root.
"""

from __future__ import annotations

from pathlib import Path


def image_relpath(listing_id: int, image_id: int) -> str:
    return f"{int(image_id) % 1000:03d}/{int(listing_id)}_{int(image_id)}.jpg"


def image_path(images_dir: Path, listing_id: int, image_id: int) -> Path:
    return Path(images_dir) / image_relpath(listing_id, image_id)
