"""The downloader against a scripted CDN: every fault's outcome, Retry-After, reconciliation, flags == files."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from imageselector import layout
from imageselector.download.cli import main
from imageselector.download.engines import DONE, EngineOptions, Job, make_engine, retry_after_s
from imageselector.download.stage import reconcile
from imageselector.imagecheck import NOT_IMAGE, OK, TOO_BIG, TRUNCATED, check_image
from tests.helpers.download_setup import all_rows, assert_flags_match_files, files_under, row_path
from tests.helpers.fake_cdn import FakeCdn, Reply, free_port, jpeg_bytes
from tests.helpers.rows import seed_images

ENGINES = ["threads", "async"]


def run(monkeypatch, cdn: FakeCdn, *args: str) -> int:
    monkeypatch.setenv("ETSY_CDN_BASE", cdn.base)
    return main(["--progress-interval", "600", *args])


def by_image(conn) -> dict[int, dict]:
    return {r["image_id"]: dict(r) for r in all_rows(conn)}


# --------------------------------------------------------------------------------------------------
# The image check and header parsing
# --------------------------------------------------------------------------------------------------


def test_check_image_tells_whole_cut_junk_and_bombs_apart():
    good = jpeg_bytes(80, 60)
    assert check_image(good).kind == OK
    assert check_image(good[: len(good) // 2]).kind == TRUNCATED
    assert check_image(good[:20]).kind == TRUNCATED
    assert check_image(b"").kind == TRUNCATED
    assert check_image(b"<html><body>Service unavailable</body></html>").kind == NOT_IMAGE
    assert check_image(good, max_pixels=80 * 60 - 1).kind == TOO_BIG
    png = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(png, "PNG")
    assert check_image(png.getvalue()).kind == OK
    assert check_image(png.getvalue()[:-30]).kind == TRUNCATED


def test_retry_after_header_forms():
    assert retry_after_s("3") == 3.0
    assert retry_after_s(None) is None
    assert retry_after_s("soon") is None
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait
    assert 9 <= retry_after_s(time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 10))) <= 11


# --------------------------------------------------------------------------------------------------
# Whole runs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_downloads_every_row_once_and_flags_match_files(conn, settings, monkeypatch, engine):
    seed_images(conn, 60)
    with FakeCdn() as cdn:
        assert (
            run(
                monkeypatch,
                cdn,
                "--engine",
                engine,
                "--concurrency",
                "8",
                "--batch-size",
                "16",
                "--progress-interval",
                "0",
            )
            == 0
        )
    rows = all_rows(conn)
    logged = (settings.home / "image_downloader.log").read_text()
    assert "images done" in logged and "MB/s" in logged and "left, ETA" in logged
    assert all(r["download_done"] == 1 and r["download_parked"] == 0 for r in rows)
    assert sorted(cdn.hits) == sorted(row_path(r) for r in rows)
    assert set(cdn.hits.values()) == {1}
    assert_flags_match_files(conn, settings.images_dir)
    assert not list(settings.tmp_dir.glob("*")), "temp files left behind"
    assert conn.execute("SELECT n FROM counters WHERE name='download_done'").fetchone()[0] == 60
    assert (settings.run_dir / "download.heartbeat").is_file()


@pytest.mark.parametrize("engine", ENGINES)
def test_each_fault_ends_parked_retried_or_done(conn, settings, monkeypatch, engine):
    seed_images(conn, 11)
    rows = all_rows(conn)
    ids = [r["image_id"] for r in rows]
    good = jpeg_bytes(50, 40)
    no_eoi = good[:-2] + b"\0\0"
    scripts = {
        0: [Reply(404)],
        1: [Reply(410)],
        2: [Reply(200, b"<html>captcha</html>")],  # never an image: parked after the tries
        3: [Reply(cut_after=100)],  # connection cut mid-body every time: parked
        4: [Reply(200, no_eoi)],  # a cut JPEG the server calls complete: parked
        5: [Reply(500)],  # always 5xx: transient, back to the database's backoff
        6: [Reply(500), Reply(cut_after=50), Reply()],  # recovers within the tries
        7: [Reply(delay=2.0)],  # slower than the read timeout every time: transient
        8: [Reply(delay=0.3)],  # slow but within the timeout
        9: [Reply(503, headers={"Retry-After": "1"}), Reply(429, headers={"Retry-After": "1"}), Reply()],
        10: [Reply(200, b"<html>oops</html>"), Reply()],  # one bad body, then fine
    }
    with FakeCdn() as cdn:
        for i, seq in scripts.items():
            cdn.script[row_path(rows[i])] = seq
        started = time.time()
        assert run(monkeypatch, cdn, "--engine", engine, "--timeout", "0.5", "--tries", "3") == 0
    got = by_image(conn)

    def st(i):
        return got[ids[i]]

    for i in (0, 1):
        assert st(i)["download_parked"] == 1 and f"HTTP {404 if i == 0 else 410}" in st(i)["download_error"]
        assert cdn.hits[row_path(rows[i])] == 1  # a permanent answer is not asked twice
    assert st(2)["download_parked"] == 1 and "not an image" in st(2)["download_error"]
    assert st(3)["download_parked"] == 1 and "(after 3 tries)" in st(3)["download_error"]
    assert st(4)["download_parked"] == 1 and "end marker" in st(4)["download_error"]
    for i in (2, 3, 4):
        assert cdn.hits[row_path(rows[i])] == 3
    for i, word in ((5, "HTTP 500"), (7, "timeout")):
        r = st(i)
        assert r["download_done"] == 0 and r["download_parked"] == 0, r
        assert word in r["download_error"] and r["download_not_before"] > started + 10
        assert r["download_claim"] is None and cdn.hits[row_path(rows[i])] == 3
    for i in (6, 8, 9, 10):
        assert st(i)["download_done"] == 1 and st(i)["download_error"] is None, st(i)
    t = cdn.times[row_path(rows[9])]
    assert t[1] - t[0] >= 0.9 and t[2] - t[1] >= 0.9, "Retry-After not honoured"
    assert_flags_match_files(conn, settings.images_dir)
    assert not list(settings.tmp_dir.glob("*"))


def test_decompression_bomb_guard_parks(conn, settings, monkeypatch):
    seed_images(conn, 2)
    with FakeCdn() as cdn:
        assert run(monkeypatch, cdn, "--max-pixels", "1000") == 0  # the fake's JPEGs are 64x48 = 3,072 pixels
    assert all(r["download_parked"] == 1 and "exceeds" in r["download_error"] for r in all_rows(conn))
    assert files_under(settings.images_dir) == set()


def test_whole_file_on_disk_is_adopted_and_a_broken_one_replaced(conn, settings, monkeypatch):
    seed_images(conn, 3)
    rows = all_rows(conn)
    paths = [layout.image_path(settings.images_dir, r["listing_id"], r["image_id"]) for r in rows]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    paths[0].write_bytes(jpeg_bytes(30, 30))  # written by a run killed before its flag
    paths[1].parent.mkdir(parents=True, exist_ok=True)
    paths[1].write_bytes(jpeg_bytes(30, 30)[:200])  # not ours (atomic writes never leave this), but cope
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    (settings.tmp_dir / ".x.jpg.999999999.abcd1234.tmp").write_bytes(b"debris")  # from a dead writer
    conn.execute("UPDATE image_status SET download_attempts=1")  # claimed by that run
    with FakeCdn() as cdn:
        assert run(monkeypatch, cdn) == 0
    assert row_path(rows[0]) not in cdn.hits
    assert cdn.hits[row_path(rows[1])] == 1
    assert_flags_match_files(conn, settings.images_dir)
    assert not list(settings.tmp_dir.glob("*"))


def test_reconcile_resets_flags_whose_file_is_gone(conn, settings):
    seed_images(conn, 6)
    rows = all_rows(conn)
    conn.execute("UPDATE image_status SET download_done=1, bg_removed=1")
    conn.execute("UPDATE image_status SET archived_at=1 WHERE rowid=?", (rows[5]["rid"],))  # on the backup disk
    for r in rows[:2]:
        p = layout.image_path(settings.images_dir, r["listing_id"], r["image_id"])
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(jpeg_bytes())
    res = reconcile(conn, settings.images_dir, sample=6)
    assert res.full and res.missing == 3  # the sample saw a missing file, so every row was checked
    got = by_image(conn)
    assert [got[r["image_id"]]["download_done"] for r in rows] == [1, 1, 0, 0, 0, 1]
    assert [got[r["image_id"]]["bg_removed"] for r in rows] == [1, 1, 0, 0, 0, 1]
    assert reconcile(conn, settings.images_dir, full=True).missing == 0


def test_kill_file_present_means_no_start(conn, settings, monkeypatch):
    seed_images(conn, 3)
    (settings.home / "KILL_DL").touch()
    with FakeCdn() as cdn:
        assert run(monkeypatch, cdn) == 0
    assert cdn.hits == {}
    assert tuple(conn.execute("SELECT SUM(download_done), SUM(download_attempts) FROM image_status").fetchone()) == (
        0,
        0,
    )


def test_bad_usage_exits_2(settings, monkeypatch):
    with FakeCdn() as cdn:
        assert run(monkeypatch, cdn, "--concurrency", "0") == 2
        with pytest.raises(SystemExit) as exc:
            run(monkeypatch, cdn, "--size", "999x999x")
    assert exc.value.code == 2


def test_row_without_url_parts_is_parked(conn, settings, monkeypatch):
    seed_images(conn, 2)
    conn.execute("UPDATE image_status SET hex=NULL WHERE rowid=(SELECT MIN(rowid) FROM image_status)")
    with FakeCdn() as cdn:
        assert run(monkeypatch, cdn) == 0
    rows = all_rows(conn)
    assert rows[0]["download_parked"] == 1 and "URL" in rows[0]["download_error"]
    assert rows[1]["download_done"] == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_cdn_outage_pauses_the_host_instead_of_failing_images(settings, engine):
    port = free_port()  # nothing listens: every connect is refused
    opts = EngineOptions(concurrency=4, per_host=4, tries=3, outage_after=3, outage_pause=0.3, backoff_base=0.05)
    eng = make_engine(engine, opts, settings.tmp_dir)
    jobs = [Job(i, f"j{i}", f"http://127.0.0.1:{port}/p{i}.jpg", settings.images_dir / f"{i}.jpg") for i in range(6)]
    try:
        for job in jobs:
            eng.submit(job)
        time.sleep(1.0)
        assert eng.results.empty(), "an image was failed during an outage"
        assert eng.gate.wait_s(f"127.0.0.1:{port}") > 0
        with FakeCdn(port=port):  # the CDN comes back
            outs = [eng.results.get(timeout=15) for _ in jobs]
    finally:
        eng.close()
    assert [o.kind for o in outs] == [DONE] * len(jobs)
    assert all(check_image(j.dest.read_bytes()).ok for j in jobs)


@pytest.mark.parametrize("engine", ENGINES)
def test_disk_that_refuses_writes_stops_the_run_and_fails_nothing(conn, settings, monkeypatch, engine):
    import errno

    import imageselector.download.engines as engines

    def full(*_a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engines, "store", full)
    seed_images(conn, 30)
    with FakeCdn() as cdn:
        # EXIT_NO_SPACE (75): the monitor pauses for disk space instead of counting a crash
        assert run(monkeypatch, cdn, "--engine", engine, "--concurrency", "4") == 75
    rows = all_rows(conn)
    assert all(r["download_done"] == 0 and r["download_parked"] == 0 and r["download_error"] is None for r in rows)
    assert all(r["download_claim"] is None and r["download_attempts"] == 0 for r in rows)
    assert "No space left on device" in (settings.home / "image_downloader.log").read_text()
