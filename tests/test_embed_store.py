"""The segment store: snapshots, replacement and deletion, compaction, bytes written, kill -9, migration, export."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from imageselector.search.indexes import IndexPolicy, IndexSet
from imageselector.vectorstore.export import export_faiss
from imageselector.vectorstore.migrate import migrate_legacy_store
from imageselector.vectorstore.store import (
    CompactionPolicy,
    StoreWriter,
    open_snapshot,
    read_store_manifest,
)
from tests.conftest import ROOT
from tests.helpers.store_writer_proc import DIM, NAME, durable_log, vec_of

SMALL = CompactionPolicy(fanout=3, max_level=2, buffer_bytes=256)


def _writer(tmp_path: Path, policy: CompactionPolicy = SMALL, dim: int = 4) -> StoreWriter:
    w = StoreWriter(tmp_path / "emb", tmp_path / ".tmp", policy=policy, background=False)
    w.open_model("m", dim, text=False, source="src", standin=True)
    return w


def _all(snap) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    parts = list(snap.iter_chunks(chunk=5))
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, snap.dim), np.float32)
    return np.concatenate([k for k, _ in parts]), np.concatenate([v for _, v in parts])


def _check_equals(snap, truth: dict[int, np.ndarray]) -> None:  # type: ignore[no-untyped-def]
    keys, vecs = _all(snap)
    assert len(keys) == len(set(keys.tolist())), "a key twice in one snapshot"
    assert snap.count == len(keys) == len(truth)
    assert sorted(keys.tolist()) == sorted(truth)
    for k, v in zip(keys.tolist(), vecs, strict=True):
        np.testing.assert_array_equal(v, truth[k])
    assert snap.keys().tolist() == sorted(truth)


def test_random_appends_replacements_deletions_through_compaction(tmp_path: Path) -> None:
    w = _writer(tmp_path)
    emb = tmp_path / "emb"
    rng = np.random.default_rng(3)
    truth: dict[int, np.ndarray] = {}
    merges = 0
    for i in range(30):
        keys = rng.choice(300, 12, replace=False)
        vecs = rng.random((12, 4), dtype=np.float32)
        w.append("m", keys, vecs)
        truth.update({int(k): v for k, v in zip(keys, vecs, strict=True)})
        if i % 3 == 2:
            gone = rng.choice(300, 6, replace=False)
            w.remove("m", gone)
            for k in gone.tolist():
                truth.pop(k, None)
        w.commit()
        merges += w.compact()
        snap = open_snapshot(emb, "m")
        _check_equals(snap, truth)
        ask = np.array([*list(truth)[:4], 1000, -1], dtype=np.int64)
        found, got = snap.get(ask)
        assert found.tolist() == [k for k in ask.tolist() if k in truth]
        for k, v in zip(found.tolist(), got, strict=True):
            np.testing.assert_array_equal(v, truth[k])
        assert w.contains("m", ask).tolist() == [k in truth for k in ask.tolist()]
    assert merges >= 5
    doc = read_store_manifest(emb, "m")
    assert doc["generation"] == 30 and max(s["level"] for s in doc["segments"]) == 2
    # only files the manifest names are left
    assert sorted(p.name for p in (emb / "m").glob("*.seg")) == sorted(s["file"] for s in doc["segments"])
    # exact search over the segments equals brute force over the truth
    q = rng.random((3, 4), dtype=np.float32)
    scores, ids = snap.search(q, 5)
    keys = np.array(sorted(truth))
    ref = q @ np.stack([truth[k] for k in keys]).T
    for r in range(3):
        assert ids[r].tolist() == keys[np.argsort(-ref[r], kind="stable")[:5]].tolist()
    w.close()


def test_since_generation_and_removed_since(tmp_path: Path) -> None:
    w = _writer(tmp_path, CompactionPolicy(fanout=2, max_level=2))
    emb = tmp_path / "emb"
    w.append("m", np.arange(10), np.ones((10, 4), np.float32))
    w.commit()
    g1 = open_snapshot(emb, "m").generation
    w.append("m", np.array([3, 20]), np.full((2, 4), 2.0, np.float32))  # 3 replaced, 20 new
    w.remove("m", np.array([5]))
    w.commit()
    w.compact()  # the two merge into one segment: row generations survive it
    snap = open_snapshot(emb, "m")
    assert snap.generation == g1 + 1 and len(snap.segments) == 1
    keys, vecs = _all_since(snap, g1)
    assert sorted(keys.tolist()) == [3, 20] and (vecs == 2.0).all()
    assert snap.removed_since(g1) is None  # the tombstone was merged away (oldest segment): start over
    w.append("m", np.array([30]), np.ones((1, 4), np.float32))
    w.remove("m", np.array([7]))
    w.commit()
    snap = open_snapshot(emb, "m")
    assert snap.removed_since(snap.generation - 1).tolist() == [7]
    w.close()


def _all_since(snap, g):  # type: ignore[no-untyped-def]
    parts = list(snap.iter_chunks(since_generation=g))
    return np.concatenate([k for k, _ in parts]), np.concatenate([v for _, v in parts])


def test_a_snapshot_stays_whole_while_compaction_deletes_its_files(tmp_path: Path) -> None:
    w = _writer(tmp_path, CompactionPolicy(fanout=4, max_level=1))
    emb = tmp_path / "emb"
    truth = {}
    for i in range(4):
        keys = np.arange(i * 10, i * 10 + 10)
        vecs = np.random.default_rng(i).random((10, 4), dtype=np.float32)
        w.append("m", keys, vecs)
        truth.update({int(k): v for k, v in zip(keys, vecs, strict=True)})
        w.commit()
    old = open_snapshot(emb, "m")
    files = [emb / "m" / s["file"] for s in old.segments]
    assert w.compact() == 1
    assert not any(f.exists() for f in files)  # the inputs are gone from the folder...
    _check_equals(old, truth)  # ...and the snapshot opened before still reads all of them
    new = open_snapshot(emb, "m")
    assert len(new.segments) == 1 and new.generation == old.generation and new.version > old.version
    _check_equals(new, truth)
    w.close()


def test_bytes_written_over_a_build_stay_within_three_times_the_final_size(tmp_path: Path) -> None:
    w = _writer(tmp_path, CompactionPolicy(fanout=4, max_level=2), dim=64)
    rng = np.random.default_rng(0)
    for i in range(200):  # 200 flushes: 12 merges into level 1, 3 into level 2
        w.append("m", np.arange(i * 50, i * 50 + 50), rng.random((50, 64), dtype=np.float32))
        w.commit()
        w.compact()
    final = sum(p.stat().st_size for p in (tmp_path / "emb" / "m").glob("*.seg"))
    ratio = w.segment_bytes_written / final
    assert 2.0 < ratio <= 3.0, ratio
    assert open_snapshot(tmp_path / "emb", "m").count == 10_000
    w.close()


def test_one_writer_per_model(tmp_path: Path) -> None:
    w = _writer(tmp_path)
    other = StoreWriter(tmp_path / "emb", tmp_path / ".tmp", background=False)
    with pytest.raises(RuntimeError, match="another process"):
        other.open_model("m", 4, text=False, source="src", standin=True)
    w.close()
    other.open_model("m", 4, text=False, source="src", standin=True)
    other.close()


def _check_after_kill(emb: Path, log: Path) -> int:
    added, removed = durable_log(log)
    snap = open_snapshot(emb, NAME)
    keys, vecs = _all(snap) if snap is not None else (np.zeros(0, np.int64), None)
    have = set(keys.tolist())
    assert len(have) == len(keys), "a key twice after kill -9"
    if snap is not None:
        assert snap.count == len(keys)
        np.testing.assert_array_equal(vecs, vec_of(keys))
    lost = {k for k in added if k % 7 != 0} - have
    assert not lost, f"{len(lost)} durable (flagged) key(s) lost"
    assert not (removed & have), "a durably deleted key came back"
    return len(added)


def test_kill_9_during_flush_and_compaction_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    emb, tmp, log = tmp_path / "emb", tmp_path / ".tmp", tmp_path / "flags.log"
    rng = random.Random(5)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tests.helpers.store_writer_proc", str(emb), str(tmp), str(log)]
    merged = 0
    for _ in range(6):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not log.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.2, 1.2))
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        n = _check_after_kill(emb, log)
        doc = read_store_manifest(emb, NAME)
        merged = max(merged, max(s["level"] for s in doc["segments"]))
    assert n > 200 and merged >= 2  # flushes and merges (levels 1 and 2) were under way when killed
    w = StoreWriter(emb, tmp, background=False)  # opening removes what no manifest names
    w.open_model(NAME, DIM, text=False, source="test", standin=True)
    doc = read_store_manifest(emb, NAME)
    assert sorted(p.name for p in (emb / NAME).glob("*.seg")) == sorted(s["file"] for s in doc["segments"])
    w.close()
    _check_after_kill(emb, log)


def _legacy_home(emb: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    emb.mkdir(parents=True)
    rng = np.random.default_rng(1)
    ids = rng.permutation(n * 2)[:n].astype(np.int64)  # not in key order, with gaps
    vecs = vec_of(ids)
    ix = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    ix.add_with_ids(vecs, ids)
    faiss.write_index(ix, str(emb / f"{NAME}.faiss"))
    text = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    text.add_with_ids(vecs[:50], ids[:50] + 10**6)
    faiss.write_index(text, str(emb / f"{NAME}_text.faiss"))
    man = {"models": {NAME: {"dim": DIM, "count": n, "source": "hf:x", "standin": False}}, "text": {}, "version": 9}
    (emb / "manifest.json").write_text(json.dumps(man))
    (emb / "image_index.json").write_text(json.dumps([[1, 2]] * (2 * n)))
    return ids, vecs


def test_migration_under_kill_9_then_rerun(tmp_path: Path) -> None:
    emb, tmp = tmp_path / "emb", tmp_path / ".tmp"
    ids, vecs = _legacy_home(emb, 3000)
    truth = dict(zip(ids.tolist(), vecs, strict=True))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "tests.helpers.store_writer_proc", str(emb), str(tmp), "-", "--migrate"]
    for delay in (0.5, 0.8):
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.monotonic()
        while read_store_manifest(emb, NAME) is None and proc.poll() is None and time.monotonic() - t0 < 60:
            time.sleep(0.005)
        time.sleep(delay * 0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        doc = read_store_manifest(emb, NAME)
        assert doc is not None
        if not doc["migration"]["done"]:
            assert (emb / f"{NAME}.faiss").exists()  # readers still read the old file meanwhile
        _check_equals(open_snapshot(emb, NAME), truth)  # whole either way
    doc = read_store_manifest(emb, NAME)
    assert 0 < doc["migration"]["done_rows"] < 3000, "the kills did not land mid-migration"
    before = [seg["file"] for seg in doc["segments"]]
    out = migrate_legacy_store(emb, tmp)
    assert out[NAME]["status"] in ("resumed", "finished") and out[f"{NAME}_text"]["vectors"] == 50
    assert not (emb / f"{NAME}.faiss").exists() and not (emb / "image_index.json").exists()
    snap = open_snapshot(emb, NAME)
    _check_equals(snap, truth)
    assert snap.source == "hf:x" and [seg["file"] for seg in snap.segments][: len(before)] == before  # resumed
    assert open_snapshot(emb, f"{NAME}_text").key == "listing_id"
    assert migrate_legacy_store(emb, tmp) == {}  # rerun: nothing left to do


def test_export_is_a_plain_faiss_index_byte_for_byte(tmp_path: Path) -> None:
    w = _writer(tmp_path, CompactionPolicy(fanout=2, max_level=2))
    rng = np.random.default_rng(2)
    for _ in range(5):
        w.append("m", rng.choice(100, 20, replace=False), rng.random((20, 4), dtype=np.float32))
        w.remove("m", rng.choice(100, 3, replace=False))
        w.commit()
    w.close()
    emb = tmp_path / "emb"
    n = export_faiss(emb, "m", tmp_path / "out" / "m.faiss", tmp_path / ".tmp")
    keys, vecs = _all(open_snapshot(emb, "m"))
    ref = faiss.IndexIDMap2(faiss.IndexFlatIP(4))
    ref.add_with_ids(vecs, keys)
    assert n == len(keys) and (tmp_path / "out" / "m.faiss").read_bytes() == faiss.serialize_index(ref).tobytes()
    ix = faiss.read_index(str(tmp_path / "out" / "m.faiss"))
    np.testing.assert_array_equal(ix.reconstruct(int(keys[3])), vecs[3])
    with pytest.raises(KeyError):
        export_faiss(emb, "nothing", tmp_path / "x.faiss", tmp_path / ".tmp")


def test_search_reads_the_segment_store_and_sees_a_new_commit(tmp_path: Path) -> None:
    w = StoreWriter(tmp_path / "emb", tmp_path / ".tmp", background=False)
    w.open_model("dinov2_base", 4, text=False, source="s", standin=False)
    x = np.eye(4, dtype=np.float32)
    w.append("dinov2_base", np.array([10, 11]), x[:2])
    w.commit()
    s = IndexSet(tmp_path / "emb", IndexPolicy(index_min=1000))
    assert s.refresh(force=True) == ["dinov2_base"] and s.get("dinov2_base").count == 2
    w.append("dinov2_base", np.array([12]), x[2:3])
    w.remove("dinov2_base", np.array([10]))
    w.commit()
    assert s.refresh(check_s=0) == ["dinov2_base"]
    _, ids = s.get("dinov2_base").search(x[2], 3)
    assert ids[0].tolist() == [12, 11, -1]
    w.close()
