"""image_status in columns (numpy), for joining file names and FAISS rows to rows without a query each.

1.2M rows take ~60 MB here, read in chunks; a look-up by image_id (and listing_id when the name has it)
is a vectorised binary search. Works on the legacy schema too: there a row's gid is its position in
rowid order, exactly what the database upgrade assigns.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import numpy as np

from imageselector import db

MISSING = -1
AMBIGUOUS = -2
_CHUNK = 100_000


@dataclass
class Rows:
    rowid: np.ndarray
    lid: np.ndarray
    iid: np.ndarray
    gid: np.ndarray
    flags: dict[str, np.ndarray]  # done column -> 0/1 (legacy values other than 1 count as 0)
    parked: dict[str, np.ndarray]  # done column -> 0/1
    archived: np.ndarray
    primary: np.ndarray

    def __len__(self) -> int:
        return len(self.rowid)

    @classmethod
    def load(cls, conn: sqlite3.Connection) -> Rows:
        cols = {r[1] for r in conn.execute("PRAGMA table_info(image_status)")}
        legacy = "gid" not in cols
        done_cols = [st.done_col for st in db.STAGES.values()]
        # flags, parked flags, archived and primary packed into one integer: 5 values a row cross into Python
        bits = [f"(CASE WHEN {c}=1 THEN 1 ELSE 0 END)" if c in cols else "0" for c in done_cols]
        bits += [
            f"(CASE WHEN {db.STAGES[s].parked_col}=1 THEN 1 ELSE 0 END)" if db.STAGES[s].parked_col in cols else "0"
            for s in db.STAGES
        ]
        bits.append("(archived_at IS NOT NULL)" if "archived_at" in cols else "0")
        bits.append("(CASE WHEN is_primary=1 THEN 1 ELSE 0 END)" if "is_primary" in cols else "0")
        packed = " | ".join(f"({b} << {k})" for k, b in enumerate(bits))
        gid = "0" if legacy else "gid"
        cur = conn.execute(
            f"SELECT rowid, COALESCE(listing_id, -1), COALESCE(image_id, -1), {gid}, {packed}"
            " FROM image_status ORDER BY rowid"
        )
        parts = []
        while chunk := cur.fetchmany(_CHUNK):
            parts.append(np.asarray(chunk, dtype=np.int64))
        data = np.concatenate(parts) if parts else np.zeros((0, 5), dtype=np.int64)
        del parts
        word = data[:, 4]
        n = len(done_cols)

        def bit(k: int) -> np.ndarray:
            return (word >> k) & 1

        rows = cls(
            data[:, 0].copy(),
            data[:, 1].copy(),
            data[:, 2].copy(),
            np.arange(len(data), dtype=np.int64) if legacy else data[:, 3].copy(),
            {c: bit(i) for i, c in enumerate(done_cols)},
            {c: bit(n + i) for i, c in enumerate(done_cols)},
            bit(2 * n),
            bit(2 * n + 1),
        )
        del data
        rows._order = np.argsort(rows.iid, kind="stable")
        rows._sorted_iid = rows.iid[rows._order]
        return rows

    def find(self, lids: np.ndarray, iids: np.ndarray) -> np.ndarray:
        """Row positions for (listing_id, image_id) pairs; listing_id -1 means "by image_id alone".

        MISSING where no row matches, AMBIGUOUS where an image_id alone names several rows."""
        lids = np.asarray(lids, dtype=np.int64)
        iids = np.asarray(iids, dtype=np.int64)
        out = np.full(len(iids), MISSING, dtype=np.int64)
        if not len(iids) or not len(self):
            return out
        left = np.searchsorted(self._sorted_iid, iids, "left")
        right = np.searchsorted(self._sorted_iid, iids, "right")
        single = (right - left) == 1
        cand = self._order[np.minimum(left, len(self) - 1)]
        ok = single & ((lids == -1) | (self.lid[cand] == lids))
        out[ok] = cand[ok]
        for i in np.nonzero((right - left) > 1)[0]:
            pos = self._order[left[i] : right[i]]
            if lids[i] == -1:
                out[i] = AMBIGUOUS
                continue
            hit = pos[self.lid[pos] == lids[i]]
            out[i] = hit[0] if len(hit) == 1 else (AMBIGUOUS if len(hit) > 1 else MISSING)
        return out

    def pos_of_gid(self, gids: np.ndarray) -> np.ndarray:
        """Row positions of gids (gids are dense 0..n-1 after the upgrade, in rowid order)."""
        order = np.argsort(self.gid, kind="stable")
        idx = np.searchsorted(self.gid[order], gids)
        idx = np.minimum(idx, len(order) - 1)
        pos = order[idx]
        return np.where(self.gid[pos] == gids, pos, MISSING)
