"""Schema, migrations and the claim protocol."""

from __future__ import annotations

import sqlite3
import time

import pytest

from imageselector import db
from imageselector.config import NewerSchema
from tests.helpers.rows import image_rows, seed_images

GUIDE_COLUMNS = [
    "listing_id", "image_id", "shop_id", "hex", "suffix", "is_primary", "when_made", "price", "to_download",
    "download_done", "bg_removed", "embed_clip_vitb32", "embed_clip_vitl14", "embed_dinov2_base",
    "embed_dinov2_large", "embed_dinov3_base",
]  # fmt: skip


def test_schema_has_guide_columns_tables_and_wal(conn: sqlite3.Connection) -> None:
    cols = [r["name"] for r in conn.execute("PRAGMA table_info(image_status)")]
    assert cols[: len(GUIDE_COLUMNS)] == GUIDE_COLUMNS
    pk = [r["name"] for r in sorted(conn.execute("PRAGMA table_info(image_status)"), key=lambda r: r["pk"]) if r["pk"]]
    assert pk == ["listing_id", "image_id"]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"image_status", "listings", "listings_dynamic", "shops", "shops_dynamic", "reviews"} <= tables
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.schema_version(conn) == db.SCHEMA_VERSION


def test_migrations_are_idempotent_and_refuse_newer_schema(settings) -> None:
    c1 = db.connect(settings.db_path)
    seed_images(c1, 5)
    c1.close()
    c2 = db.connect(settings.db_path)  # re-applying must be a no-op that keeps data
    assert c2.execute("SELECT COUNT(*) FROM image_status").fetchone()[0] == 5
    c2.execute(f"PRAGMA user_version={db.SCHEMA_VERSION + 1}")
    with pytest.raises(NewerSchema, match="newer than this code"):
        db.apply_migrations(c2)
    c2.close()


def test_guide_sql_still_works(conn: sqlite3.Connection) -> None:
    seed_images(conn, 6)
    conn.execute("UPDATE image_status SET download_done=1, bg_removed=1")
    for m in db.EMBED_MODELS:
        conn.execute(f"UPDATE image_status SET embed_{m}=1 WHERE is_primary=0")
    row = conn.execute(
        "SELECT COUNT(*) as total, SUM(download_done) as downloaded, SUM(bg_removed) as bg_done,"
        " SUM(embed_clip_vitb32) as clip32 FROM image_status"
    ).fetchone()
    assert tuple(row) == (6, 6, 6, 4)
    ready = conn.execute(
        "SELECT COUNT(*) FROM image_status WHERE is_primary = 0 AND embed_clip_vitb32 = 1 AND embed_clip_vitl14 = 1"
        " AND embed_dinov2_base = 1 AND embed_dinov2_large = 1 AND embed_dinov3_base = 1"
    ).fetchone()[0]
    assert ready == 4


def test_upsert_is_idempotent_and_gids_dense(conn: sqlite3.Connection) -> None:
    rows = image_rows(10)
    assert db.upsert_images(conn, rows) == 10
    assert db.upsert_images(conn, rows) == 0
    assert db.upsert_images(conn, image_rows(12)) == 2
    gids = [r[0] for r in conn.execute("SELECT gid FROM image_status ORDER BY gid")]
    assert gids == list(range(12))
    c = {r["name"]: r["n"] for r in conn.execute("SELECT name, n FROM counters")}
    assert c["total"] == 12 and c["to_download"] == 12


def test_counters_follow_flag_changes_exactly(conn: sqlite3.Connection) -> None:
    seed_images(conn, 20)
    conn.execute("UPDATE image_status SET download_done=1 WHERE gid < 15")
    conn.execute("UPDATE image_status SET download_done=1 WHERE gid < 10")  # no change: must not double count
    conn.execute("UPDATE image_status SET download_done=0 WHERE gid = 3")
    conn.execute("DELETE FROM image_status WHERE gid = 19")
    c = {r["name"]: r["n"] for r in conn.execute("SELECT name, n FROM counters")}
    real = conn.execute("SELECT COUNT(*), SUM(download_done), SUM(to_download) FROM image_status").fetchone()
    assert (c["total"], c["download_done"], c["to_download"]) == tuple(real) == (19, 14, 19)


def test_claim_is_exclusive_and_complete_needs_ownership(conn: sqlite3.Connection) -> None:
    seed_images(conn, 10)
    a, b = db.make_owner("a"), db.make_owner("b")
    ra = db.claim_batch(conn, "download", a, 6)
    rb = db.claim_batch(conn, "download", b, 6)
    assert len(ra) == 6 and len(rb) == 4
    assert not {r["rid"] for r in ra} & {r["rid"] for r in rb}
    assert db.claim_batch(conn, "download", b, 6) == []
    # b cannot complete a's rows
    assert db.complete(conn, "download", b, [ra[0]["rid"]]) == []
    assert db.complete(conn, "download", a, [r["rid"] for r in ra]) == [r["rid"] for r in ra]
    assert conn.execute("SELECT SUM(download_done) FROM image_status").fetchone()[0] == 6
    assert conn.execute("SELECT SUM(n) FROM progress WHERE stage='download'").fetchone()[0] == 6


def test_expired_lease_is_reclaimed_and_old_owner_cannot_commit(conn: sqlite3.Connection) -> None:
    seed_images(conn, 3)
    dead, live = db.make_owner(), db.make_owner()
    rows = db.claim_batch(conn, "download", dead, 3, lease_s=0.05)
    assert db.claim_batch(conn, "download", live, 3) == []  # still leased
    time.sleep(0.1)
    again = db.claim_batch(conn, "download", live, 3)
    assert sorted(r["rid"] for r in again) == sorted(r["rid"] for r in rows)
    assert db.complete(conn, "download", dead, [r["rid"] for r in rows]) == []
    assert len(db.complete(conn, "download", live, [r["rid"] for r in again])) == 3


def test_reclaim_dead_frees_leases_of_dead_local_pids(conn: sqlite3.Connection) -> None:
    import socket

    seed_images(conn, 4)
    ghost = f"{socket.gethostname()}:999999:deadbeef"  # no such pid
    db.claim_batch(conn, "bg", ghost, 4)  # nothing ready for bg yet
    db.claim_batch(conn, "download", ghost, 4)
    assert db.reclaim_dead(conn, "download") == 4
    assert len(db.claim_batch(conn, "download", db.make_owner(), 10)) == 4


def test_transient_failures_back_off_then_park_after_max_attempts(conn: sqlite3.Connection) -> None:
    seed_images(conn, 1)
    st = db.stage("download")
    me = db.make_owner()
    now = time.time()
    for attempt in range(1, st.max_attempts + 1):
        rows = db.claim_batch(conn, "download", me, 1, now=now)
        assert len(rows) == 1, f"attempt {attempt} should get the row"
        parked = db.fail(conn, "download", me, rows[0]["rid"], f"HTTP 503 try {attempt}")
        row = conn.execute("SELECT * FROM image_status").fetchone()
        if attempt < st.max_attempts:
            assert not parked and row["download_not_before"] > now  # backoff
            assert db.claim_batch(conn, "download", me, 1, now=now) == []  # not before its time
            now = row["download_not_before"] + 1
        else:
            assert parked and row["download_parked"] == 1
    assert db.claim_batch(conn, "download", me, 1, now=now + 1e6) == []
    row = conn.execute("SELECT * FROM image_status").fetchone()
    assert row["download_error"].startswith("HTTP 503") and row["download_done"] == 0


def test_permanent_failure_parks_at_once_with_reason(conn: sqlite3.Connection) -> None:
    seed_images(conn, 2)
    me = db.make_owner()
    rows = db.claim_batch(conn, "download", me, 2)
    assert db.fail(conn, "download", me, rows[0]["rid"], "HTTP 404 Not Found\nmore", permanent=True)
    r = conn.execute(
        "SELECT download_parked, download_error FROM image_status WHERE rowid=?", (rows[0]["rid"],)
    ).fetchone()
    assert r["download_parked"] == 1 and r["download_error"] == "HTTP 404 Not Found more"


def test_abandoned_rows_are_parked_not_looped(conn: sqlite3.Connection) -> None:
    seed_images(conn, 1)
    st = db.stage("download")
    now = time.time()
    for _ in range(st.max_attempts):  # a worker that dies every time it takes this row
        assert db.claim_batch(conn, "download", db.make_owner(), 1, lease_s=1, now=now)
        now += 2
    assert db.claim_batch(conn, "download", db.make_owner(), 1, now=now) == []
    row = conn.execute("SELECT download_parked, download_error, download_claim FROM image_status").fetchone()
    assert row["download_parked"] == 1 and "abandoned" in row["download_error"] and row["download_claim"] is None


def test_release_returns_rows_without_counting_an_attempt(conn: sqlite3.Connection) -> None:
    seed_images(conn, 3)
    me = db.make_owner()
    rows = db.claim_batch(conn, "download", me, 3)
    assert db.release(conn, "download", me, [r["rid"] for r in rows]) == 3
    assert conn.execute("SELECT MAX(download_attempts) FROM image_status").fetchone()[0] == 0
    assert len(db.claim_batch(conn, "download", me, 3)) == 3


def test_stage_readiness_chain(conn: sqlite3.Connection) -> None:
    seed_images(conn, 2)
    me = db.make_owner()
    assert db.claim_batch(conn, "bg", me, 5) == []
    rows = db.claim_batch(conn, "download", me, 1)
    db.complete(conn, "download", me, [rows[0]["rid"]])
    bg = db.claim_batch(conn, "bg", me, 5)
    assert [r["rid"] for r in bg] == [rows[0]["rid"]]
    assert db.claim_batch(conn, "embed_clip_vitb32", me, 5) == []
    db.complete(conn, "bg", me, [bg[0]["rid"]])
    for m in db.EMBED_MODELS:
        assert len(db.claim_batch(conn, f"embed_{m}", me, 5)) == 1  # each model leases independently


def test_next_work_query_uses_partial_index(conn: sqlite3.Connection) -> None:
    st = db.stage("download")
    plan = " ".join(
        r[3]
        for r in conn.execute(
            f"EXPLAIN QUERY PLAN SELECT rowid FROM image_status WHERE {st.pending_sql}"
            f" AND {st.not_before_col} <= 1 ORDER BY {st.not_before_col} LIMIT 5"
        )
    )
    assert "ix_download_todo" in plan and "SCAN image_status" not in plan.replace("USING INDEX", "")


def test_retry_on_lock_retries_then_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(db.time, "sleep", lambda s: None)
    calls = {"n": 0}

    @db.retry_on_lock
    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 5:
            raise sqlite3.OperationalError("database is locked")
        return "ok"

    assert flaky() == "ok" and calls["n"] == 5

    @db.retry_on_lock
    def always_locked() -> None:
        calls["n"] += 1
        raise sqlite3.OperationalError("database is locked")

    calls["n"] = 0
    with pytest.raises(sqlite3.OperationalError):
        always_locked()
    assert calls["n"] == db.LOCK_RETRIES + 1

    @db.retry_on_lock
    def other_error() -> None:
        calls["n"] += 1
        raise sqlite3.OperationalError("no such table: x")

    calls["n"] = 0
    with pytest.raises(sqlite3.OperationalError):
        other_error()
    assert calls["n"] == 1
