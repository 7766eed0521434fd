"""scripts/upgrade_home.py on a home built from the original guide: everything adopted, bit for bit, even
when killed (deterministic kills in every phase, and real SIGKILLs by time); and every entry point refusing
such a home with exit 2, one line, and not one byte changed."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from imageselector import db
from imageselector.config import load_settings
from imageselector.layout import image_path
from imageselector.proving.verify import verify
from imageselector.upgrade.cli import main as upgrade_main
from imageselector.upgrade.state import DIE_ENV, OPS_ENV, SLEEP_ENV
from imageselector.vectorstore.store import TEXT_SUFFIX, open_snapshot
from tests.helpers.legacy_home import COLUMNS, MODELS, Expect, build_legacy_home

faiss.omp_set_num_threads(1)  # no OpenMP pool in this process: the upgrade runs in forked children
ROOT = Path(__file__).resolve().parent.parent
UPGRADE = str(ROOT / "scripts" / "upgrade_home.py")


def env_for(home: Path, backup: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETSY_", "IMAGESELECTOR_", "CLEANUP_"))}
    env.update(
        IMAGESELECTOR_HOME=str(home),
        IMAGESELECTOR_MODELS_FILE=str(home / "legacy_models.json"),
        CLEANUP_DEST=str(backup),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_upgrade(home: Path, backup: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, UPGRADE, *args],
        env=env_for(home, backup, **extra),
        capture_output=True,
        text=True,
        timeout=120,
    )


def upgrade_in_fork(home: Path, backup: Path, **extra: str) -> int:
    """The upgrade in a forked child (no interpreter start, no imports: ~10x faster than a subprocess).
    Returns its exit code, or -signal when killed, like subprocess."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        rc = 99
        try:
            os.environ.clear()
            os.environ.update(env_for(home, backup, **extra))
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            rc = upgrade_main([])
        finally:
            os._exit(rc)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def snapshot(*roots: Path) -> dict[str, tuple[int, int, str]]:
    """path -> (size, mtime_ns, sha256) of every file under the roots (directories by their entries)."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            out[dirpath] = (len(dirnames) + len(filenames), 0, "")
            for f in filenames:
                p = os.path.join(dirpath, f)
                st = os.stat(p)
                out[p] = (st.st_size, st.st_mtime_ns, hashlib.sha256(Path(p).read_bytes()).hexdigest())
    return out


@pytest.fixture
def legacy(tmp_path: Path) -> tuple[Path, Path, Expect]:
    home, backup = tmp_path / "home", tmp_path / "hdd" / "embedded_backup" / "images"
    return home, backup, build_legacy_home(home, backup)


def check_upgraded(home: Path, backup: Path, ex: Expect, legacy_files: dict[str, bytes]) -> None:
    """Everything the home held is there, once, where today's code looks for it."""
    assert db.home_state(home / "etsy_data.db") is None
    conn = db.connect(home / "etsy_data.db")
    try:
        got = conn.execute(f"SELECT {', '.join(COLUMNS)}, gid, archived_at FROM image_status ORDER BY rowid").fetchall()
        n = len(ex.rows)
        assert len(got) == n
        gid_of = {}
        flag_cols = {f"embed_{m}" for m in MODELS}
        for want, row in zip(ex.rows, got, strict=True):
            for c, a, b in zip(COLUMNS, want, tuple(row)[: len(COLUMNS)], strict=True):
                if c not in flag_cols:
                    assert a == b, (c, a, b)
            gid_of[(row["listing_id"], row["image_id"])] = row["gid"]
        assert [r["gid"] for r in got] == list(range(n))  # dense, in rowid order
        archived = {(r["listing_id"], r["image_id"]) for r in got if r["archived_at"] is not None}
        assert archived == set(ex.backup_files)
        counters = {r["name"]: r["n"] for r in conn.execute("SELECT name, n FROM counters")}
        assert counters["total"] == n
        for c in db.FLAG_COLUMNS:
            assert counters[c] == conn.execute(f"SELECT SUM({c}) FROM image_status").fetchone()[0]
        for m in MODELS:
            flagged = {r[0] for r in conn.execute(f"SELECT gid FROM image_status WHERE embed_{m}=1")}
            assert flagged == {gid_of[p] for p in ex.vectors[m]}, m
        assert conn.execute("SELECT state FROM listings LIMIT 1").fetchone()[0] == "active"  # extra column kept
        assert conn.execute("SELECT COUNT(*) FROM listings WHERE images_fetched_at IS NULL").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM shops WHERE crawl_state='done'").fetchone()[0] == 5
    finally:
        conn.close()
    pair_of = {g: p for p, g in gid_of.items()}
    for pair, data in ex.files.items():
        assert image_path(home / "images", *pair).read_bytes() == data
    for pair, data in ex.backup_files.items():
        assert image_path(backup, *pair).read_bytes() == data
    for path, data in ex.unplaceable.items():
        assert Path(path).read_bytes() == data
    flat = {p.name for p in (home / "images").iterdir() if p.is_file()}
    assert flat == {Path(p).name for p in ex.unplaceable if Path(p).parent == home / "images"}
    emb = home / "embeddings"
    for m in MODELS:  # the upgrade ends with the vectors in the segment store (vectorstore/migrate.py)
        assert not (emb / f"{m}.faiss").exists()
        got = stored(emb, m)
        assert len(got) == len(ex.vectors[m])  # nothing duplicated (stored() checks), nothing lost
        for g, v in got.items():
            assert v.tobytes() == ex.vectors[m][pair_of[g]].tobytes()  # bit-identical
    text = stored(emb, "clip_vitb32" + TEXT_SUFFIX)
    assert sorted(text) == sorted(ex.text["clip_vitb32"])
    for lid, v in text.items():
        assert v.tobytes() == ex.text["clip_vitb32"][lid].tobytes()
    assert open_snapshot(emb, "clip_vitl14" + TEXT_SUFFIX) is None  # not mappable: re-encoded by the embed stage
    assert not (emb / "image_index.json").exists()  # the database holds gid -> (listing_id, image_id) now
    for name, data in legacy_files.items():
        assert (emb / "legacy" / name).read_bytes() == data  # the originals are kept, untouched


def stored(emb: Path, name: str) -> dict[int, np.ndarray]:
    """Every vector of one store by key, read through the store's read contract; fails on a duplicate key."""
    snap = open_snapshot(emb, name)
    out: dict[int, np.ndarray] = {}
    if snap is None:
        return out
    for keys, vecs in snap.iter_chunks():
        for k, v in zip(keys.tolist(), vecs, strict=True):
            assert k not in out, f"{name}: key {k} twice"
            out[k] = v
    return out


def legacy_files(home: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (home / "embeddings").iterdir() if p.is_file()}


def test_dry_run_changes_nothing_then_upgrade_adopts_everything(legacy: tuple[Path, Path, Expect]) -> None:
    home, backup, ex = legacy
    before = snapshot(home, backup.parent)
    dry = run_upgrade(home, backup, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert snapshot(home, backup.parent) == before
    out = dry.stdout
    assert "56 image rows" in out and "42 to move" in out and "4 cannot be placed" in out
    assert "dinov3_base: REFUSED" in out and "IndexPQ" in out
    assert "1 set (vector without flag)" in out and "1 re-queued (flag without vector)" in out
    assert "ETSY_SHARED_SECRET" in out and "your-apps" in out
    files = legacy_files(home)
    res = run_upgrade(home, backup)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "upgrade finished" in res.stdout
    assert "upgrade finished" in (home / "upgrade_home.log").read_text()
    check_upgraded(home, backup, ex, files)
    again = run_upgrade(home, backup)
    assert again.returncode == 0 and "nothing to do" in again.stdout
    rep = verify(load_settings(home))  # flags, files, ids and image_index.json agree (work is left, of course)
    assert rep.inconsistencies == [] and rep.orphan_vectors == 0 and rep.stuck_leases == 0


def test_killed_at_any_step_then_rerun_ends_the_same(tmp_path: Path) -> None:
    ref_home, ref_backup = tmp_path / "ref" / "home", tmp_path / "ref" / "hdd"
    build_legacy_home(ref_home, ref_backup)
    ops_file = tmp_path / "ops.json"
    assert upgrade_in_fork(ref_home, ref_backup, **{OPS_ENV: str(ops_file)}) == 0
    ops = json.loads(ops_file.read_text())
    total, phases = ops["total"], ops["phases"]
    assert {"database", "images", "vectors", "finish"} <= set(phases)
    rng = random.Random(14)
    points = {
        lo + (hi - lo) * k // 2 for lo, hi in phases.values() for k in range(3)
    }  # every phase: start, middle, end
    points |= {rng.randint(1, total) for _ in range(24 - len(points))}
    killed_phases = set()
    for i, point in enumerate(sorted(points)):
        home, backup = tmp_path / f"k{i}" / "home", tmp_path / f"k{i}" / "hdd"
        ex = build_legacy_home(home, backup)
        files = legacy_files(home)
        assert upgrade_in_fork(home, backup, **{DIE_ENV: str(point)}) == -signal.SIGKILL, point
        killed_phases |= {p for p, (lo, hi) in phases.items() if lo <= point <= hi}
        if i % 2:  # a second kill during the resumed run
            assert upgrade_in_fork(home, backup, **{DIE_ENV: str(rng.randint(1, 8))}) in (0, -signal.SIGKILL)
        assert db.home_state(home / "etsy_data.db") in (db.LEGACY, db.UPGRADING, None)
        assert upgrade_in_fork(home, backup) == 0, point
        check_upgraded(home, backup, ex, files)
    assert killed_phases >= {"database", "images", "vectors", "finish"}


def test_real_sigkill_by_time_then_rerun(tmp_path: Path) -> None:
    rng = random.Random(1414)
    for i in range(3):
        home, backup = tmp_path / f"t{i}" / "home", tmp_path / f"t{i}" / "hdd"
        ex = build_legacy_home(home, backup)
        files = legacy_files(home)
        p = subprocess.Popen(
            [sys.executable, UPGRADE],
            env=env_for(home, backup, **{SLEEP_ENV: "0.01"}),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while not (home / "upgrade_home.log").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 1.2))
        p.send_signal(signal.SIGKILL)
        p.wait()
        final = run_upgrade(home, backup)
        assert final.returncode == 0, final.stdout + final.stderr
        check_upgraded(home, backup, ex, files)


ENTRY_POINTS = [
    ["image_db.py"],
    ["sync_data.py", "--once"],
    ["scripts/image_downloader.py"],
    ["scripts/bg_remover.py"],
    ["image_search_v2/embed.py", "--model", "all"],
    ["image_search_v2/search.py", "--text", "brass lamp"],
    ["image_search_v2/evaluate.py"],
    ["scripts/pipeline_monitor.py"],
    ["scripts/cleanup_images.py", "--dry-run"],
    ["scripts/cleanup_images.py"],
]


def test_every_entry_point_refuses_a_seed_era_home_without_changing_it(tmp_path: Path) -> None:
    base, base_backup = tmp_path / "base" / "home", tmp_path / "base" / "hdd"
    build_legacy_home(base, base_backup)
    procs = []
    for i, cmd in enumerate(ENTRY_POINTS):
        home, backup = tmp_path / f"e{i}" / "home", tmp_path / f"e{i}" / "hdd"
        shutil.copytree(base, home, copy_function=shutil.copy2)
        shutil.copytree(base_backup, backup, copy_function=shutil.copy2)
        before = snapshot(home, backup)
        p = subprocess.Popen(
            [sys.executable, str(ROOT / cmd[0]), *cmd[1:]],
            env=env_for(home, backup),
            cwd=home,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append((cmd, home, backup, before, p))
    for cmd, home, backup, before, p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2, (cmd, out, err)
        lines = [x for x in (out + err).splitlines() if x.strip()]
        assert len(lines) == 1 and "scripts/upgrade_home.py" in lines[0] and "no gid column" in lines[0], (cmd, lines)
        assert snapshot(home, backup) == before, cmd
        assert not Path(f"{home}/etsy_data.db-wal").exists() and not Path(f"{home}/etsy_data.db-shm").exists()


def test_an_unfinished_upgrade_is_refused_until_rerun(legacy: tuple[Path, Path, Expect]) -> None:
    home, backup, ex = legacy
    files = legacy_files(home)
    ops_file = home.parent / "ops.json"
    # die right after the database step committed (its last tick), before any image moved
    probe = home.parent / "probe"
    build_legacy_home(probe / "home", probe / "hdd")
    run_upgrade(probe / "home", probe / "hdd", **{OPS_ENV: str(ops_file)})
    after_db = json.loads(ops_file.read_text())["phases"]["database"][1] + 1
    assert run_upgrade(home, backup, **{DIE_ENV: str(after_db)}).returncode == -signal.SIGKILL
    assert db.home_state(home / "etsy_data.db") == db.UPGRADING
    res = subprocess.run(
        [sys.executable, str(ROOT / "image_db.py")],
        env=env_for(home, backup),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "has not finished" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    with pytest.raises(db.LegacyHomeError):
        db.connect(home / "etsy_data.db")
    assert run_upgrade(home, backup).returncode == 0
    check_upgraded(home, backup, ex, files)


def test_connect_refuses_a_legacy_database_before_writing(legacy: tuple[Path, Path, Expect]) -> None:
    home, _, _ = legacy
    path = home / "etsy_data.db"
    before = snapshot(home)
    for kw in ({}, {"readonly": True}, {"migrate": False}):
        with pytest.raises(db.LegacyHomeError, match="upgrade_home.py"):
            db.connect(path, **kw)
    assert snapshot(home) == before
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA user_version").fetchone()[0] == 0
    con.close()


def test_sync_names_the_missing_shared_secret(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / ".env").write_text("ETSY_API_KEY=onlythekeystring\n")
    env = env_for(home, tmp_path / "hdd")
    res = subprocess.run(
        [sys.executable, str(ROOT / "sync_data.py"), "--once"], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2
    assert "ETSY_SHARED_SECRET" in res.stderr and "your-apps" in res.stderr and "Shared secret" in res.stderr


def test_refused_when_the_backup_disk_is_missing(tmp_path: Path) -> None:
    home, backup = tmp_path / "home", tmp_path / "hdd"
    build_legacy_home(home, backup)
    con = sqlite3.connect(home / "etsy_data.db")  # the guide's cleanup criterion: non-primary, all five embedded
    con.execute("UPDATE image_status SET " + ", ".join(f"embed_{m}=1" for m in MODELS) + " WHERE rowid=2")
    con.execute("UPDATE image_status SET is_primary=0 WHERE rowid=2")
    con.commit()
    con.close()
    before = snapshot(home / "images", home / "embeddings")
    db_bytes = (home / "etsy_data.db").read_bytes()
    res = run_upgrade(home, tmp_path / "not-mounted")
    assert res.returncode == 2 and "mount the backup disk" in res.stdout
    assert db.home_state(home / "etsy_data.db") == db.LEGACY
    assert snapshot(home / "images", home / "embeddings") == before
    assert (home / "etsy_data.db").read_bytes() == db_bytes
