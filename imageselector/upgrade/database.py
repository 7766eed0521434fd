"""The database step: the original schema (IMAC_OPERATIONS.md §7) to today's, in one transaction.

Inside one BEGIN EXCLUSIVE ... COMMIT, so a kill -9 leaves the old schema whole or the new one with the
upgrade marker (which every entry point refuses until the later steps finish):

1. every legacy table that today's schema also defines is renamed aside (`_upgrade_old_<name>`);
2. all migrations run (`db.MIGRATIONS`, the one owner of the schema) and `user_version` is set;
3. image_status is filled with one INSERT ... SELECT in rowid order: rowids kept, `gid` = position in
   rowid order (dense, stable), flag values other than 0/1 become 0 with the row parked for that stage
   ("legacy value N"); its indexes and triggers are dropped for the fill and rebuilt after it, and the
   counters are set by one aggregate query (faster than 1.2M trigger firings);
4. the other tables are copied column by column: columns only the legacy table has are kept (added to
   the new table), columns only today's schema has get their defaults; a table whose rows do not all
   fit today's constraints is kept whole as `legacy_<name>` beside the new one, never dropped;
5. crawl bookkeeping so sync continues instead of starting over: listings that have images are marked
   as fetched, shops that were read are marked crawled, snapshot times come from the *_dynamic tables.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from imageselector import db
from imageselector.upgrade.state import write_marker

OLD_PREFIX = "_upgrade_old_"
KEPT_PREFIX = "legacy_"
FLAG_STAGE = {st.done_col: st for st in db.STAGES.values()}


class UpgradeError(RuntimeError):
    """The database cannot be upgraded as it is (one clear line for the user)."""


@dataclass
class DbReport:
    rows: int = 0
    flags: dict[str, int] = field(default_factory=dict)
    odd_values: dict[str, int] = field(default_factory=dict)  # flag column -> rows with a value not 0/1/NULL
    tables: dict[str, int] = field(default_factory=dict)  # legacy table -> rows
    extra_columns: dict[str, list[str]] = field(default_factory=dict)  # kept as they are
    kept_tables: dict[str, int] = field(default_factory=dict)  # table -> rows that did not fit today's schema
    listings_marked_fetched: int = 0
    shops_marked_crawled: int = 0
    seconds: float = 0.0


def _tables(conn: sqlite3.Connection) -> list[str]:
    return [
        r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")
    ]


def _columns(conn: sqlite3.Connection, table: str) -> list[tuple[str, str, int, Any]]:
    """(name, declared type, notnull, default expression) per column."""
    return [(r[1], r[2] or "", int(r[3]), r[4]) for r in conn.execute(f'PRAGMA table_info("{table}")')]


def target_schema() -> dict[str, list[tuple[str, str, int, Any]]]:
    """Today's tables and their columns, from running every migration on an empty in-memory database."""
    mem = sqlite3.connect(":memory:", isolation_level=None)
    try:
        for mig in db.MIGRATIONS:
            mig(mem)
        return {t: _columns(mem, t) for t in _tables(mem)}
    finally:
        mem.close()


def _target_objects() -> set[str]:
    mem = sqlite3.connect(":memory:", isolation_level=None)
    try:
        for mig in db.MIGRATIONS:
            mig(mem)
        return {r[0] for r in mem.execute("SELECT name FROM sqlite_master WHERE type IN ('index','trigger')")}
    finally:
        mem.close()


def _has_rowid(conn: sqlite3.Connection, table: str) -> bool:
    try:
        conn.execute(f'SELECT rowid FROM "{table}" LIMIT 1').fetchall()
        return True
    except sqlite3.OperationalError:
        return False


def inspect(conn: sqlite3.Connection) -> DbReport:
    """What the upgrade will find (read only): rows, flag totals, odd flag values, tables, extra columns."""
    rep = DbReport()
    target = target_schema()
    cols = {c[0] for c in _columns(conn, "image_status")}
    flag_cols = ["to_download", *FLAG_STAGE]
    sums = ", ".join(f"SUM(CASE WHEN {c}=1 THEN 1 ELSE 0 END)" if c in cols else "0" for c in flag_cols)
    odd = ", ".join(
        f"SUM(CASE WHEN {c} IS NOT NULL AND {c} NOT IN (0,1) THEN 1 ELSE 0 END)" if c in cols else "0"
        for c in flag_cols
    )
    row = conn.execute(f"SELECT COUNT(*), {sums}, {odd} FROM image_status").fetchone()
    rep.rows = int(row[0])
    n = len(flag_cols)
    rep.flags = {c: int(row[1 + i] or 0) for i, c in enumerate(flag_cols)}
    rep.odd_values = {c: int(row[1 + n + i] or 0) for i, c in enumerate(flag_cols) if row[1 + n + i]}
    for t in _tables(conn):
        if t in target:
            rep.tables[t] = int(conn.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0])
            extra = [c[0] for c in _columns(conn, t) if c[0] not in {x[0] for x in target[t]}]
            if extra:
                rep.extra_columns[t] = extra
    return rep


def _flag_exprs(legacy_cols: set[str]) -> tuple[list[str], list[str]]:
    """Target columns and SELECT expressions for the flags and their stages' error/parked columns."""
    names, exprs = [], []
    if "to_download" in legacy_cols:
        names.append("to_download")
        exprs.append("CASE WHEN to_download IS NULL THEN 1 WHEN to_download=0 THEN 0 ELSE 1 END")
    for col, st in FLAG_STAGE.items():
        if col not in legacy_cols:
            continue
        odd = f"({col} IS NOT NULL AND {col} NOT IN (0,1))"
        names += [col, st.parked_col, st.error_col]
        exprs += [
            f"CASE WHEN {col}=1 THEN 1 ELSE 0 END",
            f"CASE WHEN {odd} THEN 1 ELSE 0 END",
            f"CASE WHEN {odd} THEN 'legacy value ' || {col} ELSE NULL END",
        ]
    return names, exprs


def _fill_image_status(conn: sqlite3.Connection, tick: Callable[[], None]) -> int:
    old = f"{OLD_PREFIX}image_status"
    legacy = {c[0] for c in _columns(conn, old)}
    target = {c[0]: c for c in _columns(conn, "image_status")}
    if not {"listing_id", "image_id"} <= legacy:
        raise UpgradeError("image_status has no listing_id/image_id columns: this is not the guide's database")
    for col, decl, _nn, _d in _columns(conn, old):
        if col not in target:
            conn.execute(f'ALTER TABLE image_status ADD COLUMN "{col}" {decl}')
    saved = [
        r[0]
        for r in conn.execute(
            "SELECT sql FROM sqlite_master WHERE tbl_name='image_status' AND type IN ('index','trigger')"
            " AND sql IS NOT NULL"
        )
    ]
    for kind, name in conn.execute(
        "SELECT type, name FROM sqlite_master WHERE tbl_name='image_status' AND type IN ('index','trigger')"
        " AND sql IS NOT NULL"
    ).fetchall():
        conn.execute(f'DROP {kind.upper()} "{name}"')
    tick()
    flag_names, flag_exprs = _flag_exprs(legacy)
    plain = [c for c in legacy if c not in flag_names and c != "gid"]
    names = [f'"{c}"' for c in plain] + flag_names
    exprs = [f'"{c}"' for c in plain] + flag_exprs
    if _has_rowid(conn, old):
        order = "rowid"
        names.insert(0, "rowid")
        exprs.insert(0, "rowid")
    else:
        order = "listing_id, image_id"
    try:
        n = conn.execute(
            f"INSERT INTO image_status ({', '.join(names)}, gid)"
            f" SELECT {', '.join(exprs)}, ROW_NUMBER() OVER (ORDER BY {order}) - 1 FROM {old} ORDER BY {order}"
        ).rowcount
    except sqlite3.IntegrityError as exc:
        raise UpgradeError(f"image_status rows do not fit today's schema ({exc}); nothing was changed") from None
    tick()
    conn.execute(f"DROP TABLE {old}")
    for sql in saved:
        conn.execute(sql)
        tick()
    totals = conn.execute(
        "SELECT COUNT(*), " + ", ".join(f"COALESCE(SUM({c}), 0)" for c in db.FLAG_COLUMNS) + " FROM image_status"
    ).fetchone()
    conn.execute("UPDATE counters SET n=? WHERE name='total'", (totals[0],))
    for i, c in enumerate(db.FLAG_COLUMNS):
        conn.execute("UPDATE counters SET n=? WHERE name=?", (totals[1 + i], c))
    return int(n)


def _default(col: tuple[str, str, int, Any]) -> str | None:
    return None if col[3] is None else str(col[3])


def _review_key_sql(legacy: set[str]) -> str:
    """store.review_key() in SQL: f"{shop_id}:{listing_id}:{transaction_id}:{create_timestamp}" (None for NULL)."""

    def part(c: str) -> str:
        return f"COALESCE(CAST(\"{c}\" AS TEXT), 'None')" if c in legacy else "'None'"

    ts = "create_timestamp" if "create_timestamp" in legacy else "created_timestamp"
    return " || ':' || ".join(part(c) for c in ("shop_id", "listing_id", "transaction_id", ts))


def _copy_table(conn: sqlite3.Connection, table: str, rep: DbReport) -> None:
    old = f"{OLD_PREFIX}{table}"
    legacy_cols = _columns(conn, old)
    legacy = {c[0] for c in legacy_cols}
    target = {c[0]: c for c in _columns(conn, table)}
    for col, decl, _nn, _d in legacy_cols:
        if col not in target:
            conn.execute(f'ALTER TABLE "{table}" ADD COLUMN "{col}" {decl}')
    names, exprs = [], []
    for col, _decl, _nn, _d in legacy_cols:
        names.append(f'"{col}"')
        tcol = target.get(col)
        dflt = _default(tcol) if tcol is not None else None
        exprs.append(f'COALESCE("{col}", {dflt})' if tcol is not None and tcol[2] and dflt is not None else f'"{col}"')
    if table == "reviews" and "natural_key" not in legacy:
        names.append("natural_key")
        exprs.append(_review_key_sql(legacy))
    order = " ORDER BY rowid" if _has_rowid(conn, old) else ""
    copied = conn.execute(
        f'INSERT OR IGNORE INTO "{table}" ({", ".join(names)}) SELECT {", ".join(exprs)} FROM "{old}"{order}'
    ).rowcount
    total = int(conn.execute(f'SELECT COUNT(*) FROM "{old}"').fetchone()[0])
    if copied == total:
        conn.execute(f'DROP TABLE "{old}"')
    else:
        keep = f"{KEPT_PREFIX}{table}"
        n = 1
        while conn.execute("SELECT 1 FROM sqlite_master WHERE name=?", (keep,)).fetchone():
            n += 1
            keep = f"{KEPT_PREFIX}{table}_{n}"
        conn.execute(f'ALTER TABLE "{old}" RENAME TO "{keep}"')
        rep.kept_tables[keep] = total - copied


def _crawl_bookkeeping(conn: sqlite3.Connection, legacy_shop_cols: set[str], now: float, rep: DbReport) -> None:
    rep.listings_marked_fetched = conn.execute(
        "UPDATE listings SET images_fetched_at=? WHERE images_fetched_at IS NULL"
        " AND listing_id IN (SELECT listing_id FROM image_status)",
        (now,),
    ).rowcount
    conn.execute(
        "UPDATE listings SET last_snapshot_at=(SELECT MAX(snapshot_timestamp) FROM listings_dynamic d"
        " WHERE d.listing_id=listings.listing_id) WHERE last_snapshot_at IS NULL"
    )
    if "crawl_state" not in legacy_shop_cols:
        read = [c for c in ("shop_name", "url", "create_date", "user_id") if c in legacy_shop_cols]
        if read:
            cond = " OR ".join(f"{c} IS NOT NULL" for c in read)
            rep.shops_marked_crawled = conn.execute(
                f"UPDATE shops SET crawl_state='done', crawled_at=? WHERE crawl_state='pending' AND ({cond})", (now,)
            ).rowcount
    conn.execute(
        "UPDATE shops SET last_snapshot_at=COALESCE((SELECT MAX(snapshot_timestamp) FROM shops_dynamic d"
        " WHERE d.shop_id=shops.shop_id), crawled_at) WHERE last_snapshot_at IS NULL AND crawl_state='done'"
    )


def upgrade(conn: sqlite3.Connection, marker: dict[str, Any], tick: Callable[[], None]) -> DbReport | None:
    """Run the whole database step in one transaction. Returns None when it was already done."""
    t0 = time.monotonic()
    rep = DbReport()
    now = time.time()
    conn.execute("PRAGMA foreign_keys=OFF")
    conn.execute("PRAGMA legacy_alter_table=ON")  # a view naming image_status keeps naming the new table
    conn.execute("BEGIN EXCLUSIVE")
    try:
        if db.schema_state(conn) != db.LEGACY:
            conn.execute("ROLLBACK")
            return None
        target = target_schema()
        ours = _target_objects()
        legacy_tables = [t for t in _tables(conn) if t in target]
        rep.tables = {t: int(conn.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0]) for t in legacy_tables}
        legacy_shop_cols = {c[0] for c in _columns(conn, "shops")} if "shops" in legacy_tables else set()
        for t in legacy_tables:
            extra = [c[0] for c in _columns(conn, t) if c[0] not in {x[0] for x in target[t]}]
            if extra:
                rep.extra_columns[t] = extra
            for kind, name in conn.execute(
                "SELECT type, name FROM sqlite_master WHERE tbl_name=? AND type IN ('index','trigger')"
                " AND sql IS NOT NULL",
                (t,),
            ).fetchall():
                if name in ours:  # would make today's CREATE ... IF NOT EXISTS skip ours
                    conn.execute(f'DROP {kind.upper()} "{name}"')
            conn.execute(f'ALTER TABLE "{t}" RENAME TO "{OLD_PREFIX}{t}"')
        tick()
        for mig in db.MIGRATIONS:
            mig(conn)
        conn.execute(f"PRAGMA user_version={db.SCHEMA_VERSION}")
        tick()
        rep.rows = _fill_image_status(conn, tick)
        for t in legacy_tables:
            if t != "image_status":
                _copy_table(conn, t, rep)
                tick()
        _crawl_bookkeeping(conn, legacy_shop_cols, now, rep)
        agg = conn.execute(
            "SELECT " + ", ".join(f"COALESCE(SUM({c}), 0)" for c in db.FLAG_COLUMNS) + " FROM image_status"
        ).fetchone()
        rep.flags = dict(zip(db.FLAG_COLUMNS, (int(x) for x in agg), strict=True))
        for col, st in FLAG_STAGE.items():
            n = conn.execute(f"SELECT COUNT(*) FROM image_status WHERE {st.parked_col}=1").fetchone()[0]
            if n:
                rep.odd_values[col] = int(n)
        conn.execute(
            "INSERT OR REPLACE INTO kv(key, value, updated_at) VALUES (?,?,?)", (db.KV_LEGACY_ROWS, str(rep.rows), now)
        )
        rep.seconds = time.monotonic() - t0
        report = {"database": dataclasses.asdict(rep)}
        write_marker(conn, {**marker, "phase": "images", "legacy_rows": rep.rows, "report": report})
        tick()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    rep.seconds = time.monotonic() - t0
    return rep
