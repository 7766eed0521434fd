"""One immutable segment file of the embedding store: sorted keys, their vectors, and deletions.

A segment is written once (streamed into `<home>/.tmp`, fsynced, renamed into the model's folder) and
never modified; it is deleted only after a manifest that no longer names it is durable (store.py).

Layout (little-endian; every section starts at a multiple of 64 bytes):

    header   64 bytes: b"ISSEG001", dim int32, 0 int32, rows int64, dels int64, zeros
    keys     int64[rows]      ascending, unique (gid, or listing_id for a text store)
    gens     int32[rows]      the store generation each row was committed in (for `since_generation`)
    vecs     float32[rows, dim]
    del_keys int64[dels]      ascending, unique: keys this segment deletes from OLDER segments
    del_gens int32[dels]

A key is never both a row and a deletion of the same segment. Readers map the file (`SegmentReader`);
the writer reads it with `pread` into bounded buffers (`read_rows`), so a merge's working set is its
buffers, not the files' pages in its resident set.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imageselector.fsutil import atomic_writer

MAGIC = b"ISSEG001"
HEADER = struct.Struct("<8siiqq")
HEADER_SIZE = 64
ALIGN = 64


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class Layout:
    """Byte offsets of the sections of a segment with `rows` rows and `dels` deletions."""

    dim: int
    rows: int
    dels: int

    @property
    def keys(self) -> int:
        return HEADER_SIZE

    @property
    def gens(self) -> int:
        return _align(self.keys + 8 * self.rows)

    @property
    def vecs(self) -> int:
        return _align(self.gens + 4 * self.rows)

    @property
    def del_keys(self) -> int:
        return _align(self.vecs + 4 * self.dim * self.rows)

    @property
    def del_gens(self) -> int:
        return _align(self.del_keys + 8 * self.dels)

    @property
    def size(self) -> int:
        return self.del_gens + 4 * self.dels

    def header(self) -> bytes:
        return HEADER.pack(MAGIC, self.dim, 0, self.rows, self.dels).ljust(HEADER_SIZE, b"\0")


class SegmentError(ValueError):
    """A segment file that is not what its manifest says (truncated, another dim, not a segment)."""


def read_layout(path: Path) -> Layout:
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
        size = os.fstat(f.fileno()).st_size
    if len(head) < HEADER.size:
        raise SegmentError(f"{path.name}: not a segment (too short)")
    magic, dim, _, rows, dels = HEADER.unpack_from(head)
    if magic != MAGIC:
        raise SegmentError(f"{path.name}: not a segment (bad magic)")
    lay = Layout(dim, rows, dels)
    if size != lay.size:
        raise SegmentError(f"{path.name}: {size} bytes, its header says {lay.size}")
    return lay


def _pad(f, pos: int, target: int) -> int:  # type: ignore[no-untyped-def]
    if target > pos:
        f.write(b"\0" * (target - pos))
    return target


def write_segment(
    path: Path,
    tmp_dir: Path,
    dim: int,
    keys: np.ndarray,
    gens: np.ndarray,
    vec_chunks: Iterator[np.ndarray],
    del_keys: np.ndarray,
    del_gens: np.ndarray,
) -> int:
    """Stream a segment to `path` atomically (temp file in `tmp_dir`, fsync, rename). Returns its size.

    `vec_chunks` yields the vectors in key order, in pieces, so a merge never holds them all.
    """
    lay = Layout(int(dim), len(keys), len(del_keys))
    with atomic_writer(Path(path), Path(tmp_dir)) as f:
        f.write(lay.header())
        f.write(np.ascontiguousarray(keys, dtype="<i8").tobytes())
        pos = _pad(f, lay.keys + 8 * lay.rows, lay.gens)
        f.write(np.ascontiguousarray(gens, dtype="<i4").tobytes())
        pos = _pad(f, pos + 4 * lay.rows, lay.vecs)
        n = 0
        for chunk in vec_chunks:
            c = np.ascontiguousarray(chunk, dtype="<f4").reshape(-1, lay.dim)
            f.write(c.tobytes())
            n += len(c)
        if n != lay.rows:
            raise ValueError(f"segment {path.name}: {n} vectors for {lay.rows} keys")
        pos = _pad(f, lay.vecs + 4 * lay.dim * lay.rows, lay.del_keys)
        f.write(np.ascontiguousarray(del_keys, dtype="<i8").tobytes())
        pos = _pad(f, pos + 8 * lay.dels, lay.del_gens)
        f.write(np.ascontiguousarray(del_gens, dtype="<i4").tobytes())
    return lay.size


def pread_array(fd: int, offset: int, count: int, dtype: str) -> np.ndarray:
    """`count` items at `offset`, read with pread into a fresh array (not a mapping)."""
    item = np.dtype(dtype).itemsize
    out = np.empty(count, dtype=dtype)
    view = memoryview(out).cast("B")
    done = 0
    total = count * item
    while done < total:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise SegmentError(f"short read at {offset + done}")
        done += n
    return out


class SegmentFile:
    """The writer's handle: reads sections with pread (bounded buffers, nothing mapped)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.layout = read_layout(self.path)
        self.fd = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def keys(self) -> np.ndarray:
        return pread_array(self.fd, self.layout.keys, self.layout.rows, "<i8")

    def gens(self) -> np.ndarray:
        return pread_array(self.fd, self.layout.gens, self.layout.rows, "<i4")

    def del_keys(self) -> np.ndarray:
        return pread_array(self.fd, self.layout.del_keys, self.layout.dels, "<i8")

    def del_gens(self) -> np.ndarray:
        return pread_array(self.fd, self.layout.del_gens, self.layout.dels, "<i4")

    def read_rows(self, start: int, count: int) -> np.ndarray:
        d = self.layout.dim
        flat = pread_array(self.fd, self.layout.vecs + 4 * d * start, count * d, "<f4")
        return flat.reshape(count, d)


class SegmentReader:
    """A reader's handle: the sections memory-mapped (page cache, shared, survives the file's unlink)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.layout = lay = read_layout(self.path)
        mm = np.memmap(self.path, dtype=np.uint8, mode="r") if lay.size else np.zeros(0, np.uint8)
        self._mm = mm
        self.keys = mm[lay.keys : lay.keys + 8 * lay.rows].view("<i8")
        self.gens = mm[lay.gens : lay.gens + 4 * lay.rows].view("<i4")
        self.vecs = mm[lay.vecs : lay.vecs + 4 * lay.dim * lay.rows].view("<f4").reshape(lay.rows, lay.dim)
        self.del_keys = mm[lay.del_keys : lay.del_keys + 8 * lay.dels].view("<i8")
        self.del_gens = mm[lay.del_gens : lay.del_gens + 4 * lay.dels].view("<i4")


def member(sorted_keys: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(found mask, position) of each q in an ascending array (positions valid where found)."""
    if len(sorted_keys) == 0 or len(q) == 0:
        return np.zeros(len(q), bool), np.zeros(len(q), np.int64)
    at = np.searchsorted(sorted_keys, q)
    at_c = np.minimum(at, len(sorted_keys) - 1)
    return np.asarray(sorted_keys[at_c]) == q, at_c
