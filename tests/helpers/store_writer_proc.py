"""A writer process for the store's kill -9 tests: commits forever, logs what became durable.

    python -m tests.helpers.store_writer_proc EMB TMP LOG [--migrate]

Each round appends 40 new keys (vector = vec_of(key)), re-appends 5 old keys (same vectors: a
replacement) and deletes the keys of the round 3 rounds back that are multiples of 7. After
`commit` returns, a line "+k" / "-k" per change goes to LOG, fsynced: that is the "flag" the embed
stage would set. The store's compaction runs in the background with fanout 2, so kills land in
flushes, merges and manifest writes alike. With --migrate it migrates an old-format index instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from imageselector.vectorstore.store import CompactionPolicy, StoreWriter

DIM = 8
NAME = "dinov2_base"


def vec_of(keys: np.ndarray) -> np.ndarray:
    k = np.asarray(keys, dtype=np.float32)[:, None]
    return np.sin(k * np.arange(1, DIM + 1, dtype=np.float32)[None, :]).astype(np.float32)


def durable_log(path: Path) -> tuple[set[int], set[int]]:
    """(keys whose last durable line is +, keys whose last durable line is -)."""
    state: dict[int, bool] = {}
    if path.exists():
        for line in path.read_text().split("\n"):
            if len(line) > 1 and line[0] in "+-" and line[1:].isdigit():
                state[int(line[1:])] = line[0] == "+"
    return {k for k, v in state.items() if v}, {k for k, v in state.items() if not v}


def run(emb: Path, tmp: Path, log: Path) -> None:
    w = StoreWriter(emb, tmp, policy=CompactionPolicy(fanout=2, max_level=3, buffer_bytes=4096))
    w.open_model(NAME, DIM, text=False, source="test", standin=True)
    start = int(w.live_keys(NAME).max()) + 1 if w.count(NAME) else 0
    added, _ = durable_log(log)
    start = max([start, *[k + 1 for k in added]])
    rng = np.random.default_rng(start)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    while True:
        new = np.arange(start, start + 40, dtype=np.int64)
        start += 40
        old = rng.integers(0, max(1, start - 40), 5).astype(np.int64)
        old = old[old % 7 != 0]  # a deleted key is never revived here, so "-k" must mean absent
        gone = np.arange(start - 160, start - 120, dtype=np.int64)
        gone = gone[(gone >= 0) & (gone % 7 == 0)]
        w.append(NAME, np.concatenate([new, old]), vec_of(np.concatenate([new, old])))
        w.remove(NAME, gone)
        w.commit()
        lines = [f"+{k}" for k in new.tolist()] + [f"-{k}" for k in gone.tolist()]
        os.write(fd, ("\n".join(lines) + "\n").encode())
        os.fsync(fd)


if __name__ == "__main__":
    emb, tmp, log = (Path(a) for a in sys.argv[1:4])
    if "--migrate" in sys.argv:
        from imageselector.vectorstore import migrate

        migrate.SEGMENT_ROWS = 64
        migrate.COPY_ROWS = 16
        print(migrate.migrate_legacy_store(emb, tmp), flush=True)
    else:
        run(emb, tmp, log)
