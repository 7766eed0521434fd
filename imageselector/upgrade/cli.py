"""`scripts/upgrade_home.py [--dry-run]`: upgrade a home built by the original pipeline, in place.

Steps, each resumable (a kill -9 anywhere, then the same command again, ends in the same state):
1. database (database.py): today's schema in one transaction, with the upgrade marker;
2. images (images.py): flat `images/` and flat backup files renamed into today's layout;
3. vectors (vectors.py): row-order FAISS indexes adopted into the store under gids, flags reconciled;
4. finish: the marker is removed, so the entry points accept the home again.
`--dry-run` reads everything and changes nothing. Exit codes: 0 done (or nothing to do), 2 cannot.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from imageselector import db
from imageselector.config import SHARED_SECRET_MISSING, Settings, load_settings
from imageselector.fsutil import clean_tmp, file_lock
from imageselector.layout import DEFAULT_DEST, KV_DEST_HISTORY
from imageselector.logs import fmt_duration, setup_logging
from imageselector.models.registry import RegistryError, load_registry
from imageselector.upgrade import database, images, vectors
from imageselector.upgrade.rows import Rows
from imageselector.upgrade.state import Ops, read_marker, write_marker
from imageselector.vectorstore.migrate import legacy_names, migrate_legacy_store
from imageselector.vectorstore.store import IMAGE_INDEX, TEXT_SUFFIX

SCRIPT = "upgrade_home"
SHOW = 20
log = logging.getLogger(SCRIPT)


class Out:
    """Summary lines: to stdout, and to the log when there is one."""

    def __init__(self, logged: bool) -> None:
        self.logged = logged
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        self.lines.append(line)
        print(line, flush=True)
        if self.logged and line:
            log.info("%s", line)


def _summary_to_stdout_only() -> None:
    """The summary goes to stdout (Out) and the log file; stderr keeps only warnings and errors."""
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.setLevel(logging.WARNING)


def _open(path: Path) -> sqlite3.Connection:
    """A plain connection: no journal-mode switch, no migration (the dry run must change nothing)."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA cache_size=-131072")
    return conn


def _backup_root(settings: Settings, args: argparse.Namespace) -> Path | None:
    if args.no_backup:
        return None
    return Path(args.backup or settings.get("CLEANUP_DEST") or DEFAULT_DEST).expanduser()


def _moved_by_old_cleanup(conn: sqlite3.Connection) -> int:
    """Rows the original cleanup would have moved to the backup disk (non-primary, all five embedded)."""
    cols = {r[1] for r in conn.execute("PRAGMA table_info(image_status)")}
    need = [f"embed_{m}" for m in db.EMBED_MODELS]
    if "is_primary" not in cols or not set(need) <= cols:
        return 0
    where = " AND ".join(f"{c}=1" for c in need)
    return int(conn.execute(f"SELECT COUNT(*) FROM image_status WHERE is_primary=0 AND {where}").fetchone()[0])


def _registry(settings: Settings) -> dict[str, Any]:
    return load_registry(settings=settings)


def _env_lines(settings: Settings, out: Out) -> None:
    if settings.api_key and not settings.shared_secret:
        out(f".env: {SHARED_SECRET_MISSING}")


def _say_images(plan: images.FolderPlan, label: str, out: Out, *, dry: bool) -> None:
    if not plan.exists:
        out(f"{label}: {plan.root} not found")
        return
    verb = "to move" if dry else "moved"
    n = len(plan.moves) if dry else plan.moved
    out(
        f"{label}: {plan.flat_files:,} flat files in {plan.root}: {n:,} {verb} into today's layout,"
        f" {len(plan.unplaced):,} cannot be placed (left untouched); {plan.already:,} already in today's layout"
    )
    for u in plan.unplaced[:SHOW]:
        out(f"  cannot place {u.path}: {u.reason}")
    if len(plan.unplaced) > SHOW:
        out(f"  ... and {len(plan.unplaced) - SHOW:,} more" + ("" if dry else f" (every one is in {SCRIPT}.log)"))
    for u in plan.unplaced[SHOW:]:
        log.info("cannot place %s: %s", u.path, u.reason)


def _say_model(rep: vectors.ModelReport, entries: int, out: Out, *, dry: bool) -> None:
    m = rep.model
    if rep.refused:
        out(f"{m}: REFUSED: {rep.refused}; {rep.requeued:,} flagged rows queued to embed again (file kept in legacy/)")
    elif rep.kind == "missing":
        out(f"{m}: no legacy index; {rep.requeued:,} rows flagged without a vector queued to embed again")
    else:
        verb = "to adopt" if dry else "adopted"
        mismatch = f" (image_index.json has {entries:,} entries)" if rep.vectors != entries else ""
        out(
            f"{m}: {rep.kind} dim {rep.dim}, {rep.vectors:,} vectors{mismatch}: {rep.adopted:,} {verb};"
            f" not adopted: {rep.unmapped:,} naming no row, {rep.duplicates:,} second copies of one image,"
            f" {rep.not_ready:,} for rows not background-removed; flags: {rep.flag_set:,} set (vector without flag),"
            f" {rep.requeued:,} re-queued (flag without vector)"
        )
    if rep.text.outcome != "none":
        out(f"{m} text: {rep.text.vectors:,} vectors: {rep.text.outcome}" + (
            f", {rep.text.adopted:,} listings" if rep.text.outcome.startswith("adopted") else
            " (the embed stage encodes listing texts again at its next start)"))


def _say_db(rep: database.DbReport, out: Out, *, dry: bool) -> None:
    f = rep.flags
    out(
        f"database: {rep.rows:,} image rows; to_download {f.get('to_download', 0):,}, downloaded"
        f" {f.get('download_done', 0):,}, bg removed {f.get('bg_removed', 0):,}, "
        + ", ".join(f"{m} {f.get(f'embed_{m}', 0):,}" for m in db.EMBED_MODELS)
    )
    others = ", ".join(f"{t} {n:,}" for t, n in rep.tables.items() if t != "image_status")
    if others:
        out(f"database: other tables: {others}")
    for col, n in rep.odd_values.items():
        out(f"database: {n:,} rows with {col} other than 0/1: {'will be' if dry else ''} parked for that stage"
            " ('legacy value N')")
    for t, cols in rep.extra_columns.items():
        out(f"database: {t} has columns today's schema lacks, kept as they are: {', '.join(cols)}")
    for t, n in rep.kept_tables.items():
        out(f"database: {n:,} rows did not fit today's schema: the whole legacy table is kept as {t}")
    if not dry:
        out(
            f"database: upgraded in {rep.seconds:.1f}s; {rep.listings_marked_fetched:,} listings marked as having"
            f" their images, {rep.shops_marked_crawled:,} shops marked crawled"
        )


# --------------------------------------------------------------------------------------------------
# Dry run
# --------------------------------------------------------------------------------------------------


def dry_run(settings: Settings, conn: sqlite3.Connection, state: str, backup: Path | None, specs: dict) -> int:
    out = Out(logged=False)
    out(f"dry run: nothing is changed. Home {settings.home}")
    if state == db.UPGRADING:
        out(f"an upgrade is under way (marker: {read_marker(conn)}); running {db.UPGRADE_COMMAND} continues it")
    else:
        _say_db(database.inspect(conn), out, dry=True)
    table = Rows.load(conn)
    local = images.scan(settings.images_dir, table)
    _say_images(local, "images", out, dry=True)
    if backup is not None:
        _say_images(images.scan(backup, table), "backup", out, dry=True)
        if not backup.is_dir():
            n = _moved_by_old_cleanup(conn)
            if n:
                out(f"backup: {n:,} rows look moved there by the old cleanup: mount it or pass --backup DIR"
                    " (or --no-backup if nothing was ever moved)")
    emb = settings.embeddings_dir
    marker = read_marker(conn) or {}
    moved = bool(marker.get("moved"))
    rowmap = vectors.load_row_map(vectors.legacy_file(emb, IMAGE_INDEX, moved), table)
    out(f"vectors: image_index.json has {rowmap.entries:,} rows ({rowmap.bad_entries:,} unreadable entries)")
    for m in db.EMBED_MODELS:
        if m in marker.get("models_done", []):
            out(f"{m}: already adopted")
            continue
        spec = specs.get(m)
        text = vectors.legacy_file(emb, f"{m}{TEXT_SUFFIX}.faiss", moved) if m in vectors.TEXT_MODELS else None
        plan = vectors.plan_model(m, spec.dim if spec else None, vectors.legacy_file(emb, f"{m}.faiss", moved),
                                  text, rowmap, table)
        _say_model(plan.report, rowmap.entries, out, dry=True)
    _env_lines(settings, out)
    out(f"to upgrade: stop the pipeline (touch KILL), back up etsy_data.db and embeddings/, then {db.UPGRADE_COMMAND}")
    return 0


# --------------------------------------------------------------------------------------------------
# The real run
# --------------------------------------------------------------------------------------------------


def _commit_marker(conn: sqlite3.Connection, marker: dict[str, Any]) -> None:
    with db.Transaction(conn):
        write_marker(conn, marker)


def _images_phase(
    settings: Settings, conn: sqlite3.Connection, table: Rows, backup: Path | None, marker: dict, ops: Ops, out: Out
) -> None:
    t0 = time.monotonic()
    reports = {}
    for label, root in (("images", settings.images_dir), ("backup", backup)):
        if root is None:
            continue
        plan = images.scan(root, table)
        if plan.exists:
            images.adopt(plan, table, ops.tick)
        _say_images(plan, label, out, dry=False)
        reports[label] = {"flat": plan.flat_files, "moved": plan.moved, "unplaced": len(plan.unplaced),
                          "bytes": plan.bytes}
    local = np.zeros(len(table), dtype=bool)
    local[images.located(settings.images_dir, table)] = True
    archive = np.zeros(0, dtype=np.int64)
    if backup is not None and backup.is_dir():
        there = np.zeros(len(table), dtype=bool)
        there[images.located(backup, table)] = True
        archive = table.rowid[there & ~local & (table.archived == 0)]
    missing = int(((table.flags["download_done"] == 1) & ~local & (table.archived == 0)).sum()) - len(archive)
    now = time.time()
    with db.Transaction(conn):
        conn.executemany(
            "UPDATE image_status SET archived_at=? WHERE rowid=? AND archived_at IS NULL",
            ((now, int(r)) for r in archive),
        )
        if backup is not None and backup.is_dir():
            hist = json.loads(db.kv_get(conn, KV_DEST_HISTORY) or "[]")
            if str(backup) not in hist:
                conn.execute(
                    "INSERT OR REPLACE INTO kv(key, value, updated_at) VALUES (?,?,?)",
                    (KV_DEST_HISTORY, json.dumps([*hist, str(backup)]), now),
                )
        reports["archived"] = len(archive)
        reports["missing"] = max(0, missing)
        reports["seconds"] = time.monotonic() - t0
        marker.setdefault("report", {})["images"] = reports
        marker["phase"] = "vectors"
        write_marker(conn, marker)
    ops.tick()
    out(f"images: {len(archive):,} rows recorded as on the backup disk (archived)")
    if missing > 0:
        out(f"images: {missing:,} rows flagged downloaded have no file in images/ or the backup: the downloader"
            " finds them at its start and downloads them again")


def _vectors_phase(
    settings: Settings, conn: sqlite3.Connection, table: Rows, specs: dict, marker: dict, ops: Ops, out: Out
) -> None:
    t0 = time.monotonic()
    emb = settings.embeddings_dir
    if not marker.get("moved"):
        emb.mkdir(parents=True, exist_ok=True)
        vectors.move_aside(emb, ops.tick)
        marker["moved"] = True
        _commit_marker(conn, marker)
        ops.tick()
    rowmap = vectors.load_row_map(vectors.legacy_file(emb, IMAGE_INDEX, True), table)
    out(f"vectors: image_index.json has {rowmap.entries:,} rows ({rowmap.bad_entries:,} unreadable entries);"
        f" the original files are kept in {vectors.legacy_dir(emb)}")
    plans = []
    for m in db.EMBED_MODELS:
        spec = specs.get(m)
        text = vectors.legacy_file(emb, f"{m}{TEXT_SUFFIX}.faiss", True) if m in vectors.TEXT_MODELS else None
        plans.append(vectors.plan_model(m, spec.dim if spec else None, vectors.legacy_file(emb, f"{m}.faiss", True),
                                        text, rowmap, table))
    if not marker.get("entries"):
        vectors.write_entries(emb, settings.tmp_dir, plans, table)
        marker["entries"] = True
        _commit_marker(conn, marker)
        ops.tick()
    reports = marker.setdefault("report", {}).setdefault("vectors", {})
    for plan in plans:
        m = plan.report.model
        if m in marker.get("models_done", []):
            out(f"{m}: already adopted by an earlier run")
            continue
        spec = specs.get(m)
        meta = {"source": spec.describe() if spec else "unknown", "standin": bool(spec and spec.standin),
                "adopted_from": "original row-order index (upgrade_home)"}
        vectors.adopt_model(plan, emb, settings.tmp_dir, meta, ops.tick)
        ops.tick()
        reports[m] = dataclasses.asdict(plan.report)
        set_n, reset_n = vectors.apply_flags(conn, m, plan.adopted_gids, marker)
        ops.tick()
        plan.report.flag_set, plan.report.requeued = set_n, reset_n
        _say_model(plan.report, rowmap.entries, out, dry=False)
        vectors.close_plan(plan)
    marker["phase"] = "finish"
    marker["report"]["vectors_seconds"] = time.monotonic() - t0
    _commit_marker(conn, marker)
    ops.tick()


def upgrade(settings: Settings, backup: Path | None, specs: dict, out: Out) -> int:
    ops = Ops()
    conn = _open(settings.db_path)
    try:
        state = db.schema_state(conn)
        if state is None:
            if legacy_names(settings.embeddings_dir):  # killed while moving the vectors into the segment store
                for name, res in sorted(migrate_legacy_store(settings.embeddings_dir, settings.tmp_dir).items()):
                    out(f"store {name}: {res.get('status')}")
                return 0
            out("this home is up to date: nothing to do")
            return 0
        if state == db.LEGACY and backup is not None and not backup.is_dir():
            n = _moved_by_old_cleanup(conn)
            if n:
                out(f"error: {n:,} rows look moved to {backup} by the old cleanup (non-primary, all five models"
                    " embedded) but that folder does not exist: mount the backup disk or pass --backup DIR"
                    " (or --no-backup if no image was ever moved)")
                return 2
        t_all = time.monotonic()
        removed = clean_tmp(settings.tmp_dir)
        if removed:
            log.info("removed %d temp files left by an interrupted run", removed)
        ops.enter("database")
        times: dict[str, float] = {}
        t = time.monotonic()
        if state == db.LEGACY:
            rep = database.upgrade(conn, {"started": time.time(), "version": 1}, ops.tick)
            if rep is not None:
                _say_db(rep, out, dry=False)
        conn.execute("PRAGMA journal_mode=WAL")
        marker = read_marker(conn) or {}
        if rep_saved := marker.get("report", {}).get("database"):
            log.info("database step done earlier: %s", rep_saved)
        table = Rows.load(conn)
        times["database"], t = time.monotonic() - t, time.monotonic()
        ops.enter("images")
        if marker.get("phase") == "images":
            _images_phase(settings, conn, table, backup, marker, ops, out)
        times["images"], t = time.monotonic() - t, time.monotonic()
        ops.enter("vectors")
        if marker.get("phase") == "vectors":
            _vectors_phase(settings, conn, table, specs, marker, ops, out)
        times["vectors"], t = time.monotonic() - t, time.monotonic()
        ops.enter("finish")
        with db.Transaction(conn):
            conn.execute("DELETE FROM kv WHERE key=?", (db.KV_UPGRADE,))
            conn.execute(
                "INSERT OR REPLACE INTO kv(key, value, updated_at) VALUES (?,?,?)",
                ("upgrade_home_report", json.dumps(marker.get("report", {}), sort_keys=True), time.time()),
            )
        ops.tick()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        times["finish"], t = time.monotonic() - t, time.monotonic()
        # The adopted indexes are in the store's old single-file format; move them into the segment store
        # now (resumable on its own: embed.py would also finish it at its next start).
        migrated = migrate_legacy_store(settings.embeddings_dir, settings.tmp_dir)
        for name, res in sorted(migrated.items()):
            out(f"store {name}: {res.get('status')}" + (f" ({res['message']})" if res.get("message") else ""))
        times["store"] = time.monotonic() - t
        log.info("phase times: %s", ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
        print("phase times: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()), flush=True)
        counts = db.connect(settings.db_path)
        try:
            c = {r["name"]: int(r["n"]) for r in counts.execute("SELECT name, n FROM counters")}
        finally:
            counts.close()
        out(
            f"upgrade finished in {fmt_duration(time.monotonic() - t_all)}: {c.get('total', 0):,} images, "
            f"downloaded {c.get('download_done', 0):,}, bg removed {c.get('bg_removed', 0):,}, "
            + ", ".join(f"{m} {c.get(f'embed_{m}', 0):,}" for m in db.EMBED_MODELS)
        )
        _env_lines(settings, out)
        out("start the pipeline again: rm -f KILL; nohup venv/bin/python scripts/pipeline_monitor.py >> pipeline.log 2>&1 &")
        return 0
    finally:
        ops.record()
        conn.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="scripts/upgrade_home.py",
        description="Upgrade a home built by the original pipeline (database, flat images/, row-order FAISS "
        "indexes) in place. Stop the pipeline and back up etsy_data.db and embeddings/ first.",
    )
    ap.add_argument("--dry-run", action="store_true", help="print what would be done; change nothing")
    ap.add_argument("--backup", help=f"the old cleanup's backup folder (default CLEANUP_DEST or {DEFAULT_DEST})")
    ap.add_argument("--no-backup", action="store_true", help="no image was ever moved to a backup folder")
    args = ap.parse_args(argv)
    settings = load_settings(check_home=False)
    if not settings.db_path.is_file():
        print(f"error: no etsy_data.db in {settings.home}: nothing to upgrade (set IMAGESELECTOR_HOME?)",
              file=sys.stderr)
        return 2
    try:
        specs = _registry(settings)
    except RegistryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    backup = _backup_root(settings, args)
    if args.dry_run:
        conn = _open(settings.db_path)
        try:
            state = db.schema_state(conn)
            if state is None:
                print("this home is up to date: nothing to do")
                return 0
            return dry_run(settings, conn, state, backup, specs)
        finally:
            conn.close()
    with file_lock(settings.run_dir / "upgrade.lock", blocking=False) as got:
        if not got:
            print("error: another upgrade_home.py is running on this home", file=sys.stderr)
            return 2
        setup_logging(SCRIPT, settings.home, secrets=settings.secrets())
        _summary_to_stdout_only()
        try:
            return upgrade(settings, backup, specs, Out(logged=True))
        except database.UpgradeError as exc:
            log.error("%s", exc)
            return 2
        except vectors.Refused as exc:
            log.error("%s", exc)
            return 2
