"""Uploaded query photos kept under their content hash, so a search's URL can name its photo.

Why: the page puts the query in the URL (`/?upload=<sha256>`), so the back button and a shared link
replay the search. The photo is stored once per content (`<home>/search_uploads/<sha256>`), written
atomically, and the folder is bounded: at most `SEARCH_UPLOAD_CACHE_MB` (200) and
`SEARCH_UPLOAD_CACHE_FILES` (500) files, none older than `SEARCH_UPLOAD_CACHE_DAYS` (7). A file's
mtime is its last use (reads touch it), so eviction drops the least recently used first. An evicted
upload's link answers 404 with a message to upload the photo again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from pathlib import Path

from imageselector.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

HASH_RE = re.compile(r"^[0-9a-f]{64}$")
DIR_NAME = "search_uploads"


class UploadCache:
    def __init__(
        self, root: Path, tmp_dir: Path, max_bytes: int = 200 << 20, max_files: int = 500, max_age_s: float = 7 * 86400
    ) -> None:
        self.root, self.tmp_dir = Path(root), Path(tmp_dir)
        self.max_bytes, self.max_files, self.max_age_s = max_bytes, max_files, max_age_s
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings) -> UploadCache:  # type: ignore[no-untyped-def]
        return cls(
            settings.home / DIR_NAME,
            settings.tmp_dir,
            max_bytes=settings.get_int("SEARCH_UPLOAD_CACHE_MB", 200) << 20,
            max_files=settings.get_int("SEARCH_UPLOAD_CACHE_FILES", 500),
            max_age_s=settings.get_float("SEARCH_UPLOAD_CACHE_DAYS", 7.0) * 86400,
        )

    def put(self, data: bytes) -> str:
        """Store `data` (idempotent) and return its sha256 hex; evicts the oldest uses beyond the bounds."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.root / digest
        with self._lock:
            if path.exists():
                os.utime(path)
            else:
                self.root.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, data, self.tmp_dir)
            self._evict(keep=digest)
        return digest

    def get(self, digest: str) -> bytes | None:
        """The upload's bytes (and mark it used), or None when unknown or evicted."""
        if not HASH_RE.match(digest or ""):
            return None
        path = self.root / digest
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            data = f.read()
        try:
            os.utime(path)
        except OSError:
            pass
        return data

    def _evict(self, keep: str) -> None:
        now = time.time()
        entries = []
        for p in self.root.iterdir():
            if not HASH_RE.match(p.name):
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime, st.st_size, p))
        entries.sort(reverse=True)  # most recently used first
        total, kept = 0, 0
        for mtime, size, p in entries:
            total += size
            kept += 1
            too_old = now - mtime > self.max_age_s
            if p.name != keep and (too_old or total > self.max_bytes or kept > self.max_files):
                p.unlink(missing_ok=True)
                total -= size
                kept -= 1
                log.info("upload cache: evicted %s (%s)", p.name[:12], "age" if too_old else "size")
