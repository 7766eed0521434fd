"""The status database: schema, migrations, connections, `retry_on_lock`, and the one claim protocol.

Every stage meets every other stage only here. The protocol, for a stage S with done-flag F:

1. `claim_batch` atomically leases up to N ready rows (`UPDATE ... RETURNING` under BEGIN IMMEDIATE):
   it stamps `S_claim` with the worker's owner token, pushes `S_not_before` to now + lease and counts
   an attempt.
2. The worker does the work and makes the artifact durable (temp file, fsync, rename).
3. `complete` sets F=1 only for rows this owner still holds, in one transaction with the progress log.
4. `fail` records the error; a transient failure becomes ready again after a backoff, a permanent
   one (or the last allowed attempt) is parked with its reason. `release` hands back unstarted rows.

A worker that dies leaves its lease to expire (or to `reclaim_dead`, which frees leases of dead local
pids at once); the row becomes claimable again. A row abandoned `max_attempts` times is parked, so a
poison input that crashes workers can never loop forever. Flags stay 0/1; failures live in the
`S_error`, `S_attempts` and `S_parked` columns.
"""

from __future__ import annotations

import functools
import json
import os
import random
import socket
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from imageselector.config import DatabaseUnreadable, HomeError, HomeReadOnly, NewerSchema
from imageselector.fsutil import pid_alive

T = TypeVar("T")

EMBED_MODELS: tuple[str, ...] = (
    "clip_vitb32",
    "clip_vitl14",
    "dinov2_base",
    "dinov2_large",
    "dinov3_base",
)


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: its done flag, what makes a row ready for it, and its column prefix."""

    name: str
    done_col: str
    ready_sql: str
    prefix: str
    max_attempts: int = 5
    lease_s: float = 600.0

    @property
    def ready_col(self) -> str:
        """The flag whose counter is the upper side of the backlog (`ready_sql` is `<flag>=1`)."""
        return self.ready_sql.split("=", 1)[0]

    @property
    def claim_col(self) -> str:
        return f"{self.prefix}_claim"

    @property
    def not_before_col(self) -> str:
        return f"{self.prefix}_not_before"

    @property
    def attempts_col(self) -> str:
        return f"{self.prefix}_attempts"

    @property
    def error_col(self) -> str:
        return f"{self.prefix}_error"

    @property
    def parked_col(self) -> str:
        return f"{self.prefix}_parked"

    @property
    def pending_sql(self) -> str:
        """Rows this stage still has to do (ready, not done, not parked): its partial index predicate."""
        return f"{self.ready_sql} AND {self.done_col}=0 AND {self.parked_col}=0"


STAGES: dict[str, Stage] = {
    "download": Stage("download", "download_done", "to_download=1", "download", lease_s=300.0),
    "bg": Stage("bg", "bg_removed", "download_done=1", "bg", lease_s=900.0),
}
for _m in EMBED_MODELS:
    STAGES[f"embed_{_m}"] = Stage(f"embed_{_m}", f"embed_{_m}", "bg_removed=1", f"embed_{_m}", lease_s=900.0)

FLAG_COLUMNS: tuple[str, ...] = (
    "to_download",
    "download_done",
    "bg_removed",
    *(f"embed_{m}" for m in EMBED_MODELS),
)


def counters(conn: sqlite3.Connection) -> dict[str, int]:
    """Every flag's exact total (kept by triggers): O(1) however large the table."""
    return {r[0]: int(r[1]) for r in conn.execute("SELECT name, n FROM counters")}


def parked_count(conn: sqlite3.Connection, name: str) -> int:
    st = stage(name)
    return conn.execute(
        f"SELECT COUNT(*) FROM image_status INDEXED BY ix_{st.prefix}_failed"
        f" WHERE {st.error_col} IS NOT NULL AND {st.done_col}=0 AND {st.parked_col}=1"
    ).fetchone()[0]


def backlog(
    conn: sqlite3.Connection, name: str, *, counts: dict[str, int] | None = None, parked: int | None = None
) -> int:
    """The one definition of a stage's backlog: rows ready for it, not done and not parked (failing ones count).

    Read from the counters (O(1)) and the small parked index; pass `counts` / `parked` when already at hand.
    """
    st = stage(name)
    counts = counters(conn) if counts is None else counts
    parked = parked_count(conn, name) if parked is None else parked
    return max(0, counts.get(st.ready_col, 0) - counts.get(st.done_col, 0) - parked)


def stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; known: {', '.join(STAGES)}") from None


# --------------------------------------------------------------------------------------------------
# Schema and migrations. Append-only: never edit a shipped migration, add a new one at the end.
# PRAGMA user_version holds how many have been applied.
# --------------------------------------------------------------------------------------------------


def _stage_columns() -> str:
    cols = []
    for st in STAGES.values():
        cols += [
            f"{st.claim_col} TEXT",
            f"{st.not_before_col} REAL NOT NULL DEFAULT 0",
            f"{st.attempts_col} INTEGER NOT NULL DEFAULT 0",
            f"{st.error_col} TEXT",
            f"{st.parked_col} INTEGER NOT NULL DEFAULT 0",
        ]
    return ",\n    ".join(cols)


def _stage_indexes() -> list[str]:
    out = []
    for st in STAGES.values():
        p = st.prefix
        # "Next work" for a stage: an index range scan over only its pending rows.
        out.append(
            f"CREATE INDEX IF NOT EXISTS ix_{p}_todo ON image_status({st.not_before_col}) WHERE {st.pending_sql}"
        )
        # Live leases (tiny): for reclaim_dead and the stuck-lease check.
        out.append(
            f"CREATE INDEX IF NOT EXISTS ix_{p}_claimed ON image_status({st.claim_col}) "
            f"WHERE {st.claim_col} IS NOT NULL"
        )
        # Failures (usually few): for image_db.py's failed/parked counts.
        out.append(
            f"CREATE INDEX IF NOT EXISTS ix_{p}_failed ON image_status({st.parked_col}) "
            f"WHERE {st.error_col} IS NOT NULL"
        )
    return out


def _counter_triggers() -> list[str]:
    """Keep `counters` exact in the same transaction as every change, so status reads are O(1)."""
    stmts = [
        "INSERT OR IGNORE INTO counters(name, n) VALUES ('total', 0)",
        "CREATE TRIGGER IF NOT EXISTS trg_img_ins AFTER INSERT ON image_status BEGIN "
        "UPDATE counters SET n = n + 1 WHERE name = 'total'; "
        + " ".join(f"UPDATE counters SET n = n + NEW.{c} WHERE name = '{c}';" for c in FLAG_COLUMNS)
        + " END",
        "CREATE TRIGGER IF NOT EXISTS trg_img_del AFTER DELETE ON image_status BEGIN "
        "UPDATE counters SET n = n - 1 WHERE name = 'total'; "
        + " ".join(f"UPDATE counters SET n = n - OLD.{c} WHERE name = '{c}';" for c in FLAG_COLUMNS)
        + " END",
    ]
    for c in FLAG_COLUMNS:
        stmts.append(f"INSERT OR IGNORE INTO counters(name, n) VALUES ('{c}', 0)")
        stmts.append(
            f"CREATE TRIGGER IF NOT EXISTS trg_img_upd_{c} AFTER UPDATE OF {c} ON image_status "
            f"WHEN NEW.{c} IS NOT OLD.{c} BEGIN "
            f"UPDATE counters SET n = n + NEW.{c} - OLD.{c} WHERE name = '{c}'; END"
        )
    return stmts


def _migration_1(conn: sqlite3.Connection) -> None:
    embed_cols = ",\n    ".join(f"embed_{m} INTEGER DEFAULT 0" for m in EMBED_MODELS)
    conn.execute(
        f"""
CREATE TABLE IF NOT EXISTS image_status (
    listing_id INTEGER,
    image_id INTEGER,
    shop_id INTEGER,
    hex TEXT,
    suffix TEXT,
    is_primary INTEGER,
    when_made TEXT,
    price REAL,
    to_download INTEGER DEFAULT 1,
    download_done INTEGER DEFAULT 0,
    bg_removed INTEGER DEFAULT 0,
    {embed_cols},
    gid INTEGER NOT NULL,
    created_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
    archived_at REAL,
    {_stage_columns()},
    PRIMARY KEY (listing_id, image_id)
)"""
    )
    conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS ix_image_gid ON image_status(gid)")
    conn.execute("CREATE INDEX IF NOT EXISTS ix_image_shop ON image_status(shop_id)")
    conn.execute(
        "CREATE INDEX IF NOT EXISTS ix_image_archived ON image_status(archived_at) WHERE archived_at IS NOT NULL"
    )
    for sql in _stage_indexes():
        conn.execute(sql)
    conn.execute("CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, n INTEGER NOT NULL)")
    for sql in _counter_triggers():
        conn.execute(sql)
    _exec_script(
        conn,
        """
CREATE TABLE IF NOT EXISTS progress (
    ts REAL NOT NULL,
    stage TEXT NOT NULL,
    n INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_progress_stage_ts ON progress(stage, ts);

CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT,
    updated_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
);

CREATE TABLE IF NOT EXISTS listings (
    listing_id INTEGER PRIMARY KEY,
    shop_id INTEGER,
    title TEXT,
    description TEXT,
    url TEXT,
    tags TEXT,
    materials TEXT,
    when_made TEXT,
    taxonomy_id INTEGER,
    who_made TEXT,
    is_supply INTEGER,
    currency_code TEXT,
    created_timestamp INTEGER,
    original_creation_timestamp INTEGER,
    first_seen REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
    last_seen REAL,
    last_snapshot_at REAL,
    images_fetched_at REAL
);
CREATE INDEX IF NOT EXISTS ix_listings_shop ON listings(shop_id);
CREATE INDEX IF NOT EXISTS ix_listings_images_todo ON listings(listing_id) WHERE images_fetched_at IS NULL;
CREATE INDEX IF NOT EXISTS ix_listings_snapshot ON listings(last_snapshot_at);

CREATE TABLE IF NOT EXISTS listings_dynamic (
    listing_id INTEGER NOT NULL,
    snapshot_timestamp INTEGER NOT NULL,
    state TEXT,
    quantity INTEGER,
    num_favorers INTEGER,
    views INTEGER,
    price REAL,
    PRIMARY KEY (listing_id, snapshot_timestamp)
);

CREATE TABLE IF NOT EXISTS shops (
    shop_id INTEGER PRIMARY KEY,
    shop_name TEXT,
    user_id INTEGER,
    create_date INTEGER,
    url TEXT,
    shop_location_country_iso TEXT,
    shipping_from_country_iso TEXT,
    currency_code TEXT,
    first_seen REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
    crawl_state TEXT NOT NULL DEFAULT 'pending',
    crawl_attempts INTEGER NOT NULL DEFAULT 0,
    crawl_error TEXT,
    crawled_at REAL,
    last_snapshot_at REAL
);
CREATE INDEX IF NOT EXISTS ix_shops_crawl_todo ON shops(shop_id) WHERE crawl_state = 'pending';
CREATE INDEX IF NOT EXISTS ix_shops_snapshot ON shops(last_snapshot_at);

CREATE TABLE IF NOT EXISTS shops_dynamic (
    shop_id INTEGER NOT NULL,
    snapshot_timestamp INTEGER NOT NULL,
    listing_active_count INTEGER,
    num_favorers INTEGER,
    review_count INTEGER,
    review_average REAL,
    transaction_sold_count INTEGER,
    PRIMARY KEY (shop_id, snapshot_timestamp)
);

CREATE TABLE IF NOT EXISTS reviews (
    shop_id INTEGER NOT NULL,
    listing_id INTEGER,
    transaction_id INTEGER,
    buyer_user_id INTEGER,
    rating INTEGER,
    review TEXT,
    language TEXT,
    create_timestamp INTEGER,
    update_timestamp INTEGER,
    natural_key TEXT NOT NULL UNIQUE
);
CREATE INDEX IF NOT EXISTS ix_reviews_shop ON reviews(shop_id);

CREATE TABLE IF NOT EXISTS crawl_partitions (
    key TEXT PRIMARY KEY,
    params TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    next_offset INTEGER NOT NULL DEFAULT 0,
    total_count INTEGER,
    parent_key TEXT,
    updated_at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0)
);
CREATE INDEX IF NOT EXISTS ix_partitions_todo ON crawl_partitions(key) WHERE state != 'done';

CREATE TABLE IF NOT EXISTS bad_records (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
    kind TEXT NOT NULL,
    ref TEXT,
    detail TEXT
);
""",
    )


def _exec_script(conn: sqlite3.Connection, script: str) -> None:
    """Run ';'-separated DDL inside the caller's transaction (executescript would commit it)."""
    for stmt in script.split(";\n"):
        if stmt.strip():
            conn.execute(stmt)


def _migration_2(conn: sqlite3.Connection) -> None:
    """Sync: failed image-batch attempts per listing, so a listing whose batch keeps failing cannot stall the queue."""
    conn.execute("ALTER TABLE listings ADD COLUMN images_attempts INTEGER NOT NULL DEFAULT 0")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _migration_1,
    _migration_2,
    # append new migrations here: def _migration_N(conn): ...
]

SCHEMA_VERSION = len(MIGRATIONS)


# --------------------------------------------------------------------------------------------------
# Connections and lock handling
# --------------------------------------------------------------------------------------------------

LOCK_RETRIES = 30


def _is_lock_error(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    msg = str(exc).lower()
    return "locked" in msg or "busy" in msg


def retry_on_lock(fn: Callable[..., T]) -> Callable[..., T]:
    """Retry a write up to 30 times on 'database is locked', exponential backoff with full jitter."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        delay = 0.01
        for attempt in range(LOCK_RETRIES + 1):
            try:
                return fn(*args, **kwargs)
            except sqlite3.OperationalError as exc:
                if not _is_lock_error(exc) or attempt == LOCK_RETRIES:
                    raise
                time.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    return wrapper


class Transaction:
    """`with Transaction(conn):` runs the block under BEGIN IMMEDIATE, commit or rollback."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        elif self.conn.in_transaction:  # SQLite may have rolled back itself (e.g. 'database or disk is full')
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the original error is the one to report


SQLITE_MAGIC = b"SQLite format 3\x00"


def check_file(path: str | os.PathLike[str]) -> None:
    """Before anything is opened or written: is the file (if any) a SQLite database of a schema we know?

    Reads the 100-byte header only (magic string; PRAGMA user_version is the big-endian int at offset 60),
    so a bad home is refused before a log file or a -wal is created beside it.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(100)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DatabaseUnreadable(f"cannot read the database {path}: {exc.strerror or exc}") from None
    if not head:
        return  # an empty file is a database SQLite has not written yet
    if not head.startswith(SQLITE_MAGIC) or len(head) < 64:
        raise DatabaseUnreadable(
            f"{path} is not a SQLite database (corrupt or overwritten); restore it from a backup "
            f"or move it away to start afresh"
        )
    version = int.from_bytes(head[60:64], "big")
    if version > SCHEMA_VERSION:
        raise NewerSchema(
            f"{path} has schema v{version}, newer than this code (v{SCHEMA_VERSION}): update the code (git pull)"
        )


def check_usable(settings: Any, *, write: bool) -> None:
    """An entry point's first check of its home (config.Settings): the database file, and write access if needed."""
    check_file(settings.db_path)
    if write:
        settings.require_writable()


def _classify(exc: sqlite3.Error, path: Path) -> Exception:
    """Turn an open-time SQLite error into the HomeError it means, or return it unchanged."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if name in ("SQLITE_NOTADB", "SQLITE_CORRUPT") or "not a database" in text or "malformed" in text:
        return DatabaseUnreadable(f"{path} is not a readable SQLite database ({text}); restore it from a backup")
    if name in ("SQLITE_READONLY", "SQLITE_CANTOPEN") or "readonly" in text or "unable to open" in text:
        return HomeReadOnly(f"cannot open {path} for writing ({text}): is the home read-only?")
    return exc


def connect(
    path: str | os.PathLike[str], *, migrate: bool = True, readonly: bool = False, allow_legacy: bool = False
) -> sqlite3.Connection:
    """Open the database in WAL mode with a busy timeout; apply pending migrations unless told not to.

    A seed-era database (or one whose upgrade was interrupted) raises LegacyHomeError before anything
    is written to it: no journal-mode switch, no migration. Only the upgrade passes `allow_legacy`.
    `readonly` opens with mode=ro; where even that fails (a read-only home cannot hold the -shm file WAL
    readers need) it falls back to `immutable=1`, which reads the main file only. Raises
    DatabaseUnreadable / NewerSchema / HomeReadOnly (config.HomeError) for a home that cannot be used.
    """
    path = Path(path)
    check_file(path)
    try:
        conn = _open(path, readonly, migrate, allow_legacy)
    except sqlite3.Error as exc:
        raise _classify(exc, path) from exc
    return conn


def _open(path: Path, readonly: bool, migrate: bool, allow_legacy: bool) -> sqlite3.Connection:
    if readonly:
        if not path.is_file():
            raise DatabaseUnreadable(f"no database at {path}")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=10.0)
        try:
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError as exc:
            conn.close()
            if "unable to open" not in str(exc) and "readonly" not in str(exc):
                raise
            conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, isolation_level=None, timeout=10.0)
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None, timeout=10.0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout=10000")
    if not allow_legacy:
        try:
            state = schema_state(conn)
        except BaseException:
            conn.close()
            raise
        if state is not None:
            conn.close()
            raise LegacyHomeError(legacy_message(state, path))
    if not readonly:
        _retry_pragma(conn, "PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=OFF")
    if hasattr(os, "uname") and os.uname().sysname == "Darwin":
        # macOS fsync does not flush the drive cache; make checkpoints truly durable.
        conn.execute("PRAGMA checkpoint_fullfsync=1")
    if migrate and not readonly:
        apply_migrations(conn)
    return conn


@retry_on_lock
def _retry_pragma(conn: sqlite3.Connection, sql: str) -> None:
    conn.execute(sql)


@retry_on_lock
def apply_migrations(conn: sqlite3.Connection) -> int:
    """Bring the schema to SCHEMA_VERSION. Each migration runs in its own transaction."""
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    if current > SCHEMA_VERSION:
        raise NewerSchema(f"database schema v{current} is newer than this code (v{SCHEMA_VERSION}): update the code")
    for version in range(current + 1, SCHEMA_VERSION + 1):
        with Transaction(conn):
            if conn.execute("PRAGMA user_version").fetchone()[0] >= version:
                continue  # another process migrated meanwhile
            MIGRATIONS[version - 1](conn)
            conn.execute(f"PRAGMA user_version={version}")
    return SCHEMA_VERSION


def schema_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


# --------------------------------------------------------------------------------------------------
# Seed-era homes: the original pipeline's database (image_status without gid) must be upgraded by
# scripts/upgrade_home.py before any other code touches it. Detection never writes.
# --------------------------------------------------------------------------------------------------

UPGRADE_COMMAND = "venv/bin/python scripts/upgrade_home.py"
KV_UPGRADE = "upgrade_home"  # present while an upgrade is under way (set with the new schema, removed at its end)
# Rows with gid below this came from the original pipeline: their bg-removed files carry no marker.
KV_LEGACY_ROWS = "legacy_rows"
LEGACY = "legacy"
UPGRADING = "upgrading"


class LegacyHomeError(HomeError, RuntimeError):
    """The data home holds the original pipeline's database, or an upgrade that has not finished."""


def legacy_message(state: str, db_path: str | os.PathLike[str]) -> str:
    if state == UPGRADING:
        return (
            f"the upgrade of {db_path} has not finished (interrupted?): run `{UPGRADE_COMMAND}` again to complete it, "
            "then start the pipeline"
        )
    return (
        f"{db_path} is the original pipeline's database (image_status has no gid column): upgrade this home first "
        f"with `{UPGRADE_COMMAND} --dry-run`, then `{UPGRADE_COMMAND}` (IMAC_OPERATIONS.md, Upgrading an existing "
        "installation)"
    )


def schema_state(conn: sqlite3.Connection) -> str | None:
    """LEGACY, UPGRADING or None (a current or new database), read without writing anything."""
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "image_status" not in names:
        return None
    cols = {r[1] for r in conn.execute("PRAGMA table_info(image_status)")}
    if "gid" not in cols:
        return LEGACY
    if "kv" in names and conn.execute("SELECT 1 FROM kv WHERE key=?", (KV_UPGRADE,)).fetchone() is not None:
        return UPGRADING
    return None


def home_state(db_path: str | os.PathLike[str]) -> str | None:
    """`schema_state` of a database file, without creating -wal/-shm files or changing a byte.

    The main file is read as immutable (no locks, no WAL). Only when it looks legacy and a non-empty
    -wal exists (the newest state may be there) is it read again through SQLite's WAL, read-only.
    """
    path = Path(db_path)
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True, isolation_level=None)
        try:
            state = schema_state(conn)
        finally:
            conn.close()
        wal = Path(f"{path}-wal")
        if state is None or not wal.is_file() or wal.stat().st_size == 0:
            return state
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=10.0)
        try:
            return schema_state(conn)
        finally:
            conn.close()
    except sqlite3.Error:
        return None  # not readable as a database: the normal open reports it


def check_home(db_path: str | os.PathLike[str]) -> None:
    """Raise LegacyHomeError (one line naming the upgrade command) for a seed-era or half-upgraded home."""
    state = home_state(db_path)
    if state is not None:
        raise LegacyHomeError(legacy_message(state, db_path))


# --------------------------------------------------------------------------------------------------
# Inserting images (sync) and the global image number
# --------------------------------------------------------------------------------------------------

IMAGE_FIELDS = ("listing_id", "image_id", "shop_id", "hex", "suffix", "is_primary", "when_made", "price")


@retry_on_lock
def upsert_images(conn: sqlite3.Connection, rows: Iterable[dict[str, Any]]) -> int:
    """Insert new images with to_download=1; refresh metadata of known ones. Returns rows inserted.

    Each new row gets the next `gid` (dense, never reused, stable across VACUUM): the id under which
    its vectors are stored in every FAISS index.
    """
    inserted = 0
    with Transaction(conn):
        next_gid = conn.execute("SELECT COALESCE(MAX(gid), -1) + 1 FROM image_status").fetchone()[0]
        for r in rows:
            cur = conn.execute(
                "INSERT INTO image_status (listing_id, image_id, shop_id, hex, suffix, is_primary, when_made,"
                " price, to_download, gid) VALUES (?,?,?,?,?,?,?,?,1,?)"
                " ON CONFLICT(listing_id, image_id) DO UPDATE SET shop_id=excluded.shop_id,"
                " is_primary=excluded.is_primary, when_made=excluded.when_made, price=excluded.price"
                " WHERE image_status.hex IS excluded.hex AND image_status.suffix IS excluded.suffix"
                " RETURNING gid",
                (*(r.get(k) for k in IMAGE_FIELDS), next_gid),
            )
            got = cur.fetchone()
            if got is not None and got[0] == next_gid:
                inserted += 1
                next_gid += 1
    return inserted


# --------------------------------------------------------------------------------------------------
# The claim protocol
# --------------------------------------------------------------------------------------------------


def make_owner(tag: str = "") -> str:
    """A token naming one worker process: host, pid and a nonce (so a reused pid is not us)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}{(':' + tag) if tag else ''}"


def owner_pid(owner: str) -> tuple[str, int] | None:
    parts = owner.split(":")
    if len(parts) < 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


@retry_on_lock
def claim_batch(
    conn: sqlite3.Connection,
    stage_name: str,
    owner: str,
    limit: int,
    *,
    lease_s: float | None = None,
    now: float | None = None,
) -> list[sqlite3.Row]:
    """Lease up to `limit` ready rows of a stage to `owner`. Returns them (with `rowid` as `rid`).

    Rows whose leases have expired are claimable again; rows abandoned `max_attempts` times are parked
    first, so they are never handed out again.
    """
    st = stage(stage_name)
    now = time.time() if now is None else now
    lease = st.lease_s if lease_s is None else lease_s
    with Transaction(conn):
        conn.execute(
            f"UPDATE image_status SET {st.parked_col}=1, {st.claim_col}=NULL,"
            f" {st.error_col}=COALESCE({st.error_col}, 'abandoned: lease expired')"
            f"   || ' (gave up after ' || {st.attempts_col} || ' attempts)'"
            f" WHERE rowid IN (SELECT rowid FROM image_status INDEXED BY ix_{st.prefix}_claimed"
            f"   WHERE {st.claim_col} IS NOT NULL AND {st.pending_sql} AND {st.not_before_col} <= ?"
            f"   AND {st.attempts_col} >= ?)",
            (now, st.max_attempts),
        )
        rows = conn.execute(
            f"UPDATE image_status SET {st.claim_col}=?, {st.not_before_col}=?,"
            f" {st.attempts_col}={st.attempts_col}+1"
            f" WHERE rowid IN (SELECT rowid FROM image_status INDEXED BY ix_{st.prefix}_todo"
            f"   WHERE {st.pending_sql} AND {st.not_before_col} <= ?"
            f"   ORDER BY {st.not_before_col} LIMIT ?)"
            f" RETURNING rowid AS rid, *",
            (owner, now + lease, now, limit),
        ).fetchall()
    rows.sort(key=lambda r: r["rid"])
    return rows


@retry_on_lock
def renew(
    conn: sqlite3.Connection, stage_name: str, owner: str, rids: Sequence[int], lease_s: float | None = None
) -> int:
    """Extend this owner's leases (for a batch that takes longer than expected)."""
    st = stage(stage_name)
    lease = st.lease_s if lease_s is None else lease_s
    with Transaction(conn):
        return _exec_many(
            conn,
            f"UPDATE image_status SET {st.not_before_col}=? WHERE rowid=? AND {st.claim_col}=?",
            [(time.time() + lease, rid, owner) for rid in rids],
        )


def _exec_many(conn: sqlite3.Connection, sql: str, params: list[tuple[Any, ...]]) -> int:
    n = 0
    for p in params:
        n += conn.execute(sql, p).rowcount
    return n


@retry_on_lock
def complete(
    conn: sqlite3.Connection,
    stage_name: str,
    owner: str,
    rids: Sequence[int],
    extra: Callable[[sqlite3.Connection], None] | None = None,
) -> list[int]:
    """Set the done flag for rows this owner still holds. Call only once the artifact is durable.

    Returns the rids actually completed (a row whose lease was taken over by another worker is
    skipped). `extra` runs inside the same transaction (for stage-specific bookkeeping).
    """
    st = stage(stage_name)
    done: list[int] = []
    with Transaction(conn):
        for rid in rids:
            cur = conn.execute(
                f"UPDATE image_status SET {st.done_col}=1, {st.claim_col}=NULL, {st.not_before_col}=0,"
                f" {st.error_col}=NULL WHERE rowid=? AND {st.claim_col}=? AND {st.done_col}=0",
                (rid, owner),
            )
            if cur.rowcount:
                done.append(rid)
        if done:
            conn.execute("INSERT INTO progress(ts, stage, n) VALUES (?,?,?)", (time.time(), st.name, len(done)))
        if extra is not None:
            extra(conn)
    return done


def backoff_s(attempts: int, base: float = 30.0, cap: float = 6 * 3600.0) -> float:
    """Delay before a transient failure is retried: exponential in attempts, with jitter."""
    delay = min(cap, base * (2 ** max(0, attempts - 1)))
    return delay * random.uniform(0.75, 1.25)


@retry_on_lock
def fail(
    conn: sqlite3.Connection,
    stage_name: str,
    owner: str,
    rid: int,
    error: str,
    *,
    permanent: bool = False,
    retry_base_s: float = 30.0,
) -> bool:
    """Record a failure. Returns True when the row is now parked (permanent, or out of attempts)."""
    st = stage(stage_name)
    error = error.replace("\n", " ")[:500]
    with Transaction(conn):
        row = conn.execute(
            f"SELECT {st.attempts_col} AS a FROM image_status WHERE rowid=? AND {st.claim_col}=?",
            (rid, owner),
        ).fetchone()
        if row is None:
            return False
        park = permanent or row["a"] >= st.max_attempts
        conn.execute(
            f"UPDATE image_status SET {st.claim_col}=NULL, {st.error_col}=?, {st.parked_col}=?,"
            f" {st.not_before_col}=? WHERE rowid=?",
            (error, 1 if park else 0, 0 if park else time.time() + backoff_s(row["a"], retry_base_s), rid),
        )
    return park


@retry_on_lock
def send_back_to_download(conn: sqlite3.Connection, stage_name: str, owner: str, rid: int, error: str) -> bool | None:
    """A later stage found its input file undecodable or gone: download it again. Returns True when parked instead.

    Every flag after download goes back to 0 too (the new file needs its background removed and new
    vectors; an old vector is replaced when the row is embedded again), with fresh attempt counts: the
    input was at fault, not those stages. The row's `download_attempts` is the count across stages: a
    successful download never resets it, so an image the CDN serves corrupt every time is parked in the
    download stage (with the reason) once that stage has used its `max_attempts`, instead of looping
    between the stages. Only a row this owner holds is touched (None otherwise). Move the bad
    file away BEFORE calling this: once the flag is 0 a downloader may write the new file at any moment.
    """
    st = stage(stage_name)
    dl = stage("download")
    error = error.replace("\n", " ")[:400]
    with Transaction(conn):
        row = conn.execute(
            f"SELECT {dl.attempts_col} AS a FROM image_status WHERE rowid=? AND {st.claim_col}=?", (rid, owner)
        ).fetchone()
        if row is None:
            return None
        park = row["a"] >= dl.max_attempts
        why = f"{error} (still after {row['a']} downloads)" if park else f"sent back by {st.name}: {error}"
        resets = ", ".join(  # a new file is a new input for every later stage: their counts start afresh
            f"{s.done_col}=0, {s.claim_col}=NULL, {s.not_before_col}=0, {s.attempts_col}=0, {s.error_col}=NULL"
            for s in STAGES.values()
            if s.name != "download"
        )
        conn.execute(
            f"UPDATE image_status SET {resets},"
            f" download_done=0, {dl.claim_col}=NULL, {dl.not_before_col}=0, {dl.parked_col}=?, {dl.error_col}=?"
            f" WHERE rowid=?",
            (1 if park else 0, why, rid),
        )
    return park


@retry_on_lock
def release(conn: sqlite3.Connection, stage_name: str, owner: str, rids: Sequence[int]) -> int:
    """Hand back claimed rows untouched (graceful stop): ready at once, the attempt not counted."""
    st = stage(stage_name)
    with Transaction(conn):
        return _exec_many(
            conn,
            f"UPDATE image_status SET {st.claim_col}=NULL, {st.not_before_col}=0,"
            f" {st.attempts_col}=MAX(0, {st.attempts_col}-1) WHERE rowid=? AND {st.claim_col}=?",
            [(rid, owner) for rid in rids],
        )


@retry_on_lock
def reclaim_dead(conn: sqlite3.Connection, stage_name: str) -> int:
    """Free at once the leases held by processes on this host that no longer exist.

    Leases of other hosts (or of live pids) are left to expire on their own.
    """

    st = stage(stage_name)
    host = socket.gethostname()
    freed = 0
    with Transaction(conn):
        owners = [
            r[0]
            for r in conn.execute(
                f"SELECT DISTINCT {st.claim_col} FROM image_status INDEXED BY ix_{st.prefix}_claimed"
                f" WHERE {st.claim_col} IS NOT NULL"
            )
        ]
        for owner in owners:
            parsed = owner_pid(owner)
            if parsed is None or parsed[0] != host or pid_alive(parsed[1]):
                continue
            freed += conn.execute(
                f"UPDATE image_status SET {st.claim_col}=NULL, {st.not_before_col}=0"
                f" WHERE {st.claim_col}=? AND {st.done_col}=0",
                (owner,),
            ).rowcount
    return freed


@retry_on_lock
def reset_rows(conn: sqlite3.Connection, stage_name: str, where: str, params: Sequence[Any] = ()) -> int:
    """Set a stage's flag back to 0 (and clear its failure state) for rows matching `where`.

    Used by reconciliation, e.g. a flag of 1 whose artifact is missing.
    """
    st = stage(stage_name)
    with Transaction(conn):
        return conn.execute(
            f"UPDATE image_status SET {st.done_col}=0, {st.claim_col}=NULL, {st.not_before_col}=0,"
            f" {st.attempts_col}=0, {st.error_col}=NULL, {st.parked_col}=0 WHERE {where}",
            tuple(params),
        ).rowcount


@retry_on_lock
def prune_progress(conn: sqlite3.Connection, keep_s: float = 2 * 86400) -> None:
    with Transaction(conn):
        conn.execute("DELETE FROM progress WHERE ts < ?", (time.time() - keep_s,))


# --------------------------------------------------------------------------------------------------
# Key-value state (crawl bookkeeping, rate-limit headers, ...)
# --------------------------------------------------------------------------------------------------

# The kv keys more than one process reads. Keys private to one stage are named in that stage's module
# (cleanup's `KV_INFLIGHT`); the backup roots are layout's (`layout.KV_DEST`, `layout.KV_DEST_HISTORY`).
KV_SYNC_STATS = "sync_stats"  # sync's counters and last rate-limit headers (JSON); read by the monitor's tuner
KV_STATUS_WARNING = "status_warning"  # one line every status view shows (e.g. stand-in models); "" = none
KV_EMBED_COST = "embed_cost"  # seconds of model time per image, per model (JSON); written by embed at each flush


@retry_on_lock
def kv_set(conn: sqlite3.Connection, key: str, value: str) -> None:
    with Transaction(conn):
        conn.execute(
            "INSERT INTO kv(key, value, updated_at) VALUES (?,?,?)"
            " ON CONFLICT(key) DO UPDATE SET value=excluded.value, updated_at=excluded.updated_at",
            (key, value, time.time()),
        )


def kv_get(conn: sqlite3.Connection, key: str, default: str | None = None) -> str | None:
    row = conn.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
    return default if row is None else row[0]


@retry_on_lock
def add_embed_cost(conn: sqlite3.Connection, spent: dict[str, tuple[float, int]]) -> None:
    """Add model seconds and images per model to kv `embed_cost` (pooled over every run), in one transaction."""
    with Transaction(conn):
        row = conn.execute("SELECT value FROM kv WHERE key=?", (KV_EMBED_COST,)).fetchone()
        try:
            totals = json.loads(row[0]) if row else {}
        except ValueError:
            totals = {}
        for model, (seconds, images) in spent.items():
            t = totals.get(model) if isinstance(totals.get(model), dict) else {}
            totals[model] = {
                "seconds": float(t.get("seconds", 0.0)) + seconds,
                "images": int(t.get("images", 0)) + images,
            }
        conn.execute(
            "INSERT INTO kv(key, value, updated_at) VALUES (?,?,?)"
            " ON CONFLICT(key) DO UPDATE SET value=excluded.value, updated_at=excluded.updated_at",
            (KV_EMBED_COST, json.dumps(totals, sort_keys=True), time.time()),
        )


def embed_costs(conn: sqlite3.Connection) -> dict[str, float]:
    """Seconds of model time per image, per model, from kv `embed_cost` (models never timed are absent)."""
    try:
        totals = json.loads(kv_get(conn, KV_EMBED_COST) or "{}")
    except ValueError:
        return {}
    out = {}
    for model, t in totals.items() if isinstance(totals, dict) else ():
        if isinstance(t, dict) and t.get("images") and t.get("seconds", 0) > 0:
            out[model] = float(t["seconds"]) / int(t["images"])
    return out


@retry_on_lock
def record_bad(conn: sqlite3.Connection, kind: str, ref: str, detail: str) -> None:
    """Keep bad input (an unparsable URL, malformed JSON after retries, ...) for the user to inspect."""
    with Transaction(conn):
        conn.execute("INSERT INTO bad_records(kind, ref, detail) VALUES (?,?,?)", (kind, ref, detail[:2000]))
