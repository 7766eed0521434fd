"""How the search reads the embedding store: the READ contract of issue 15, in one place.

`open_snapshot(embeddings_dir, model) -> Snapshot | None` is the store's own function
(imageselector/vectorstore/store.py: segments + manifest, or its legacy reader for a store not yet
migrated). The search calls it through this module only, so a benchmark or a test can substitute a
store (bench/search.py regenerates synthetic vectors chunk by chunk this way).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from imageselector.vectorstore import store as _store


class Snapshot(Protocol):
    """The read contract (issue 15): one model's vectors at one committed generation.

    The store's snapshots also offer `search(queries, k)` (exact, on the mappings) and
    `removed_since(generation)`; the search uses them when present.
    """

    model: str
    dim: int
    count: int
    generation: int
    source: str | None

    def iter_chunks(
        self, chunk: int = 65536, since_generation: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...

    def get(self, gids: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def open_snapshot(embeddings_dir: Path, model: str) -> Snapshot | None:
    """The store's snapshot of one model (None: no vectors)."""
    return _store.open_snapshot(Path(embeddings_dir), model)
