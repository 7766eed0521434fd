"""Does the data home tell the truth? Every flag against its artifact, ids, leases, and where each row ended.

Used by the chaos test and bench after a run, and by hand: `python -m imageselector.proving.verify [--home DIR]`.
Checks, for rows not moved to the backup disk:
- `download_done=1` -> the file exists and decodes fully;
- `bg_removed=1` -> also carries the background-removal marker (and download_done=1), except rows adopted from
  the original pipeline by scripts/upgrade_home.py (gid below kv `legacy_rows`: their files predate the marker);
- `embed_<m>=1` -> gid is in model m's store (a snapshot of `embeddings/<m>/`, or an old-format
  `<m>.faiss` not yet migrated); where an old `image_index.json` is still present, its entry is
  [listing_id, image_id];
- no gid or (listing_id, image_id) twice, no id twice in any index;
- no lease held by a process that is gone (a stuck lease);
- no orphan vector: one whose gid has no row, or whose row is parked on its way to that model (download,
  bg or the model itself) without the model's flag. A vector of a row still in flight (flushed before its
  flag, the flag comes with the next flush or run) is "pending", not an orphan;
- every row a stage should handle is done, or parked with a reason ("unfinished" otherwise: a backlog).
A home is consistent (exit 0) when none of the above is wrong, backlog or not; `--settled` also requires
that there is no backlog (the chaos run's end state).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from imageselector import db, layout
from imageselector.background.imaging import is_marked
from imageselector.config import DatabaseUnreadable, HomeError, Settings, load_settings
from imageselector.fsutil import pid_alive


@dataclass
class VerifyReport:
    rows: int = 0
    done: dict[str, int] = field(default_factory=dict)
    parked: dict[str, int] = field(default_factory=dict)
    unfinished: dict[str, int] = field(default_factory=dict)
    stuck_leases: int = 0
    orphan_vectors: int = 0
    pending_vectors: int = 0
    inconsistencies: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Consistent: every flag backed by its artifact, no stuck lease, no orphan vector. A backlog is fine."""
        return not self.inconsistencies and not self.stuck_leases and not self.orphan_vectors

    @property
    def backlog(self) -> int:
        return sum(self.unfinished.values())

    @property
    def settled(self) -> bool:
        """Consistent and nothing left to do (every row done or parked)."""
        return self.ok and not self.backlog

    def add(self, msg: str) -> None:
        if len(self.inconsistencies) < 10_000:
            self.inconsistencies.append(msg)

    def summary(self) -> str:
        return (
            f"rows {self.rows:,}; done {sum(self.done.values()):,} stage-rows; parked {sum(self.parked.values()):,}; "
            f"unfinished (backlog) {self.backlog:,}; stuck leases {self.stuck_leases}; "
            f"orphan vectors {self.orphan_vectors}; pending vectors {self.pending_vectors}; "
            f"inconsistencies {len(self.inconsistencies)}"
        )


def _decodes(path: Path) -> str | None:
    """None when the file is a whole image, else why not."""
    try:
        with Image.open(path) as im:
            im.load()
        return None
    except FileNotFoundError:
        return "missing"
    except Exception as exc:  # noqa: BLE001 - any decode failure is the finding
        return f"does not decode ({type(exc).__name__}: {exc})"


def _is_marked(path: Path) -> bool:

    try:
        with Image.open(path) as im:
            return is_marked(im.info.get("comment"))
    except Exception:  # noqa: BLE001
        return False


def _index_ids(embeddings_dir: Path, name: str) -> list[int] | None:
    """Every key one snapshot of the store yields (a duplicate would show twice); None if no vectors."""
    from imageselector.vectorstore.store import open_snapshot

    snap = open_snapshot(embeddings_dir, name)
    if snap is None:
        return None
    return [int(k) for keys, _ in snap.iter_chunks() for k in keys.tolist()]


def verify(settings: Settings, *, check_files: bool = True, stages: tuple[str, ...] | None = None) -> VerifyReport:
    rep = VerifyReport()
    conn = db.connect(settings.db_path)
    try:
        _check(conn, settings, rep, check_files, stages or tuple(db.STAGES))
    finally:
        conn.close()
    return rep


def _check(conn: Any, settings: Settings, rep: VerifyReport, check_files: bool, stages: tuple[str, ...]) -> None:
    rows = conn.execute("SELECT rowid AS rid, * FROM image_status").fetchall()
    rep.rows = len(rows)
    for what, sql in (
        ("gid", "SELECT gid, COUNT(*) FROM image_status GROUP BY gid HAVING COUNT(*) > 1"),
        (
            "(listing_id, image_id)",
            "SELECT listing_id, COUNT(*) FROM image_status GROUP BY listing_id, image_id HAVING COUNT(*) > 1",
        ),
    ):
        for r in conn.execute(sql):
            rep.add(f"duplicated {what}: {r[0]} appears {r[1]} times")
    host = socket.gethostname()
    for name in stages:
        st = db.stage(name)
        for r in conn.execute(f"SELECT DISTINCT {st.claim_col} FROM image_status WHERE {st.claim_col} IS NOT NULL"):
            owner = db.owner_pid(r[0])
            n = conn.execute(f"SELECT COUNT(*) FROM image_status WHERE {st.claim_col}=?", (r[0],)).fetchone()[0]
            if owner is None or (owner[0] == host and not pid_alive(owner[1])):
                rep.stuck_leases += n
    image_index = _load_image_index(settings)
    ids_by_model: dict[str, set[int]] = {}
    for m in db.EMBED_MODELS:
        if f"embed_{m}" not in stages:
            continue
        ids = _index_ids(settings.embeddings_dir, m)
        if ids is None:
            ids_by_model[m] = set()
            continue
        uniq = set(ids)
        if len(uniq) != len(ids):
            rep.add(f"the {m} store holds {len(ids) - len(uniq)} duplicated ids")
        ids_by_model[m] = uniq
    for name in stages:
        rep.done[name] = rep.parked[name] = rep.unfinished[name] = 0
    flagged_gids: dict[str, set[int]] = {m: set() for m in ids_by_model}
    legacy_rows = int(db.kv_get(conn, db.KV_LEGACY_ROWS) or 0)  # adopted by the upgrade: bg files carry no marker
    for r in rows:
        _check_row(r, settings, rep, check_files, stages, image_index, ids_by_model, flagged_gids, legacy_rows)
    in_flight = {m: {r["gid"] for r in rows if not vector_is_orphan(r, m)} for m in ids_by_model}
    for m, ids in ids_by_model.items():
        unflagged = ids - flagged_gids[m]
        orphans = unflagged - in_flight[m]
        rep.orphan_vectors += len(orphans)
        rep.pending_vectors += len(unflagged) - len(orphans)
        if orphans:
            rep.add(f"{m}.faiss holds {len(orphans)} orphan vector(s) (parked or unknown rows), e.g. gid {min(orphans)}")


def vector_is_orphan(r: Any, model: str) -> bool:
    """Whether a vector for row `r` in `model`'s index is an orphan: the row will never be flagged for it
    (parked in download, bg or the model). The one definition verify and the chaos run share."""
    if r[f"embed_{model}"] == 1:
        return False
    return bool(r["download_parked"] or r["bg_parked"] or r[f"embed_{model}_parked"])


def _load_image_index(settings: Settings) -> list[Any]:
    try:
        data = json.loads((settings.embeddings_dir / "image_index.json").read_text())
        return data if isinstance(data, list) else []
    except (OSError, ValueError):
        return []


def _check_row(r, settings, rep, check_files, stages, image_index, ids_by_model, flagged_gids, legacy_rows=0) -> None:  # type: ignore[no-untyped-def]
    key = f"{r['listing_id']}_{r['image_id']} (gid {r['gid']})"
    archived = r["archived_at"] is not None
    path = layout.image_path(settings.images_dir, r["listing_id"], r["image_id"])
    for name in stages:
        st = db.stage(name)
        ready = bool(conn_ready(r, name))
        done, parked = r[st.done_col] == 1, r[st.parked_col] == 1
        if done:
            rep.done[name] += 1
        elif parked:
            rep.parked[name] += 1
            if not r[st.error_col]:
                rep.add(f"{key}: parked in {name} without a reason")
        elif ready:
            rep.unfinished[name] += 1
        if done and not ready:
            rep.add(f"{key}: {name} done but its input stage is not")
    if archived or not check_files:
        pass
    elif r["download_done"] == 1 and "download" in stages:
        why = _decodes(path)
        if why:
            rep.add(f"{key}: download_done=1 but the file {why}")
        elif r["bg_removed"] == 1 and "bg" in stages and r["gid"] >= legacy_rows and not _is_marked(path):
            rep.add(f"{key}: bg_removed=1 but the file has no background-removal marker")
    for m, ids in ids_by_model.items():
        if r[f"embed_{m}"] != 1:
            continue
        flagged_gids[m].add(r["gid"])
        if r["gid"] not in ids:
            rep.add(f"{key}: embed_{m}=1 but gid not in the {m} store")
        if not image_index:  # none since the segment store: the database is the mapping
            continue
        entry = image_index[r["gid"]] if 0 <= r["gid"] < len(image_index) else None
        if entry is None or list(entry) != [r["listing_id"], r["image_id"]]:
            rep.add(f"{key}: image_index.json[{r['gid']}] is {entry}, not [{r['listing_id']}, {r['image_id']}]")


def conn_ready(r: Any, name: str) -> int:
    """Whether the row is input for stage `name` (its ready condition)."""
    if name == "download":
        return r["to_download"]
    if name == "bg":
        return r["download_done"]
    return r["bg_removed"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m imageselector.proving.verify", description=__doc__.split("\n")[0])
    ap.add_argument("--home", help="data home (default IMAGESELECTOR_HOME or the project root)")
    ap.add_argument("--no-files", action="store_true", help="skip decoding image files")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--settled", action="store_true", help="also fail (exit 1) when a backlog is left")
    args = ap.parse_args(argv)
    try:
        settings = load_settings(args.home, create=False)
        db.check_file(settings.db_path)
        if not settings.db_path.is_file():
            raise DatabaseUnreadable(f"no database at {settings.db_path}")
        rep = verify(settings, check_files=not args.no_files)
    except HomeError as exc:
        print(f"verify: {exc}", file=sys.stderr)
        return 2
    good = rep.settled if args.settled else rep.ok
    if args.json:
        print(json.dumps({**asdict(rep), "ok": rep.ok, "settled": rep.settled, "backlog": rep.backlog}, indent=2))
    else:
        print(rep.summary())
        for msg in rep.inconsistencies[:50]:
            print("  " + msg)
        if rep.ok and rep.backlog:
            print(f"consistent; {rep.backlog:,} stage-rows still to do (a backlog, not an error)")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
