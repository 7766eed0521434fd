"""The embed stage in-process: stored vectors, flags, text vectors, parking, reconcile, locks, source changes."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from imageselector import db
from imageselector.embedding import stage as stage_mod
from imageselector.embedding.stage import EmbedStage, Options, can_lower_thread_priority
from imageselector.layout import image_path
from imageselector.models.preprocess import decode
from imageselector.stopping import KILL, KILL_EMBED, Stopper
from imageselector.vectorstore.store import StoreWriter, read_manifest
from tests.helpers import embed_fixtures
from tests.helpers.embed_checks import check_no_lies, check_store_files, check_texts, flagged, ids_in, vector_of
from tests.helpers.embed_data import seed_embeddable

ALL = ["clip_vitb32", "clip_vitl14", "dinov2_base", "dinov2_large", "dinov3_base"]

standin_registry = embed_fixtures.standin_registry
standin_encoders = embed_fixtures.standin_encoders


def make_stage(settings, conn, encoders, names=ALL, **kw) -> EmbedStage:
    stopper = Stopper(settings.home, (KILL_EMBED, KILL), install_signals=False)
    opts = Options(batch_size=kw.pop("batch_size", 4), poll_s=0.1, **kw)
    return EmbedStage(settings, conn, {n: encoders[n] for n in names}, opts, stopper)


def run_stage(settings, conn, encoders, names=ALL, **kw) -> EmbedStage:
    st = make_stage(settings, conn, encoders, names, **kw)
    st.open()
    st.run()
    return st


@pytest.mark.skipif(not can_lower_thread_priority(), reason="per-thread priority is Linux's")
def test_background_decoding_runs_below_the_forward(settings, conn, standin_encoders, monkeypatch) -> None:
    """Overlapped on the CPU, the prefetch thread and its decode pool run at background priority; the
    thread that runs the models keeps its own. Every decode thread runs its torch ops on one thread (no
    OpenMP team of its own, which would make libgomp throttle the forward's spin-waits); the models' thread
    keeps its count, and so do threads started after the stage. Every image is embedded once."""
    seen: dict[str, set[tuple[int, int, int]]] = {"caller": set(), "decode": set()}
    load = stage_mod.Prefetcher._load

    def policy() -> tuple[int, int, int]:
        tid = threading.get_native_id()
        return os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid), torch.get_num_threads()

    def spy(self, row, models):
        seen["caller" if threading.current_thread().name.startswith("embed-decode-fg") else "decode"].add(policy())
        return load(self, row, models)

    monkeypatch.setattr(stage_mod.Prefetcher, "_load", spy)
    seed_embeddable(conn, settings.images_dir, 40)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        main = policy()
        assert main[0] != os.SCHED_IDLE and main[2] == 3
        st = run_stage(settings, conn, standin_encoders, ["clip_vitb32"], flush_every=8, overlap=True)
        assert st.overlap and st.prefetcher.background
        assert len(seen["decode"]) == 1
        ((decode_policy, decode_nice, decode_threads),) = seen["decode"]
        assert decode_policy == os.SCHED_IDLE or decode_nice == stage_mod.BACKGROUND_NICE
        assert decode_threads == 1
        assert seen["caller"] <= {(main[0], main[1], 1)}  # the caller's rounds: its priority, one torch thread
        assert policy() == main
        later: list[int] = []
        t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert later == [3]
    finally:
        torch.set_num_threads(before)
    assert check_no_lies(conn, settings.embeddings_dir, ["clip_vitb32"], exact=True) == {"clip_vitb32": 40}


def test_a_starved_background_does_not_stall_the_stage(settings, conn, standin_encoders, monkeypatch) -> None:
    """When the background decoders get no CPU (here: they sleep before each round), the thread that runs
    the models makes the rounds itself; the background's own round is still embedded, nothing twice."""
    make_round = stage_mod.Prefetcher.make_round

    def slow(self, conn_, pool):
        if pool is self.pool:  # the background's
            time.sleep(0.4)
        return make_round(self, conn_, pool)

    monkeypatch.setattr(stage_mod.Prefetcher, "make_round", slow)
    seed_embeddable(conn, settings.images_dir, 48)
    st = run_stage(settings, conn, standin_encoders, ["clip_vitb32"], flush_every=8, overlap=True)
    assert st.prefetcher.background
    assert st.prefetcher.rounds_by_caller >= 6  # of the 12 rounds of 4, most were made by the caller
    assert check_no_lies(conn, settings.embeddings_dir, ["clip_vitb32"], exact=True) == {"clip_vitb32": 48}


def test_stored_vector_equals_the_models_own_encode(settings, conn, standin_encoders) -> None:
    rows = seed_embeddable(conn, settings.images_dir, 1)
    run_stage(settings, conn, standin_encoders)
    path = image_path(settings.images_dir, rows[0]["listing_id"], rows[0]["image_id"])
    for m, enc in standin_encoders.items():
        stored = vector_of(settings.embeddings_dir, m, int(rows[0]["gid"]))
        own = enc.encode_batch(enc.preprocess(decode(path))[None])[0]
        np.testing.assert_allclose(stored, own, rtol=0, atol=1e-6)


@pytest.mark.parametrize("overlap", [None, True, False])
def test_all_models_flags_texts_manifest(settings, conn, standin_encoders, overlap) -> None:
    """The same outcome whether the next round is decoded on the prefetch thread (overlap, on the CPU at
    background priority where the OS allows it) or in lockstep (the CPU's default)."""
    seed_embeddable(conn, settings.images_dir, 14, per_listing=3)
    st = run_stage(settings, conn, standin_encoders, flush_every=8, overlap=overlap)
    assert st.overlap is (overlap if overlap is not None else False)  # the stand-ins run on the CPU: lockstep
    assert st.prefetcher is not None and (st.prefetcher.ident is not None) is st.overlap
    assert st.prefetcher.background is st.overlap  # on the CPU, overlap always means background
    emb = settings.embeddings_dir
    counts = check_no_lies(conn, emb, ALL, exact=True)
    assert counts == dict.fromkeys(ALL, 14)
    check_texts(conn, emb, ["clip_vitb32", "clip_vitl14"])
    assert len(ids_in(emb, "clip_vitb32_text")) == 5
    check_store_files(emb, ALL)
    man = read_manifest(emb / "manifest.json")
    assert {m: man["models"][m]["count"] for m in ALL} == dict.fromkeys(ALL, 14)
    assert all(man["models"][m]["standin"] for m in ALL)
    assert man["models"]["dinov2_large"]["dim"] == standin_encoders["dinov2_large"].dim
    assert "stand-in" in (db.kv_get(conn, "status_warning") or "")
    assert all(p.done == 14 for p in st.progress.values())
    recorded = json.loads(db.kv_get(conn, db.KV_EMBED_COST))  # evaluation's cost column, written at each flush
    assert {m: recorded[m]["images"] for m in ALL} == dict.fromkeys(ALL, 14)
    assert set(db.embed_costs(conn)) == set(ALL) and all(v > 0 for v in db.embed_costs(conn).values())
    # A second run finds nothing to do and changes nothing.
    before = {m: (emb / m / "manifest.json").read_bytes() for m in ALL}
    run_stage(settings, conn, standin_encoders)
    assert before == {m: (emb / m / "manifest.json").read_bytes() for m in ALL}


def test_undecodable_or_missing_image_goes_back_to_download(settings, conn, standin_encoders) -> None:
    rows = seed_embeddable(conn, settings.images_dir, 4)
    bad = image_path(settings.images_dir, rows[1]["listing_id"], rows[1]["image_id"])
    bad.write_bytes(b"not a jpeg at all")
    image_path(settings.images_dir, rows[2]["listing_id"], rows[2]["image_id"]).unlink()
    run_stage(settings, conn, standin_encoders, ["dinov2_base", "clip_vitb32"])
    for gid, why in ((rows[1]["gid"], "undecodable"), (rows[2]["gid"], "missing")):
        r = conn.execute("SELECT * FROM image_status WHERE gid=?", (gid,)).fetchone()
        assert r["download_done"] == 0 and r["bg_removed"] == 0 and r["download_parked"] == 0
        assert "sent back by embed_" in r["download_error"] and why in r["download_error"]
        for m in ("dinov2_base", "clip_vitb32"):
            st = db.stage(f"embed_{m}")
            assert r[st.parked_col] == 0 and r[st.claim_col] is None and r[st.attempts_col] == 0
    assert not bad.exists()
    for m in ("dinov2_base", "clip_vitb32"):
        assert flagged(conn, m) == {rows[0]["gid"], rows[3]["gid"]}
    check_no_lies(conn, settings.embeddings_dir, ["dinov2_base", "clip_vitb32"], exact=True)


def test_reconcile_repairs_both_kinds(settings, conn, standin_encoders) -> None:
    names = ["clip_vitb32", "dinov2_base"]
    rows = seed_embeddable(conn, settings.images_dir, 6)
    run_stage(settings, conn, standin_encoders, names)
    emb = settings.embeddings_dir
    g = [int(r["gid"]) for r in rows]
    # (a) vector durable, flag 0: a crash between the file rename and the flag commit.
    conn.execute(
        "UPDATE image_status SET embed_clip_vitb32=0, embed_clip_vitb32_claim='h:999999:x' WHERE gid=?", (g[0],)
    )
    # (b) flag 1, vector missing: a store restored from an older copy.
    w = StoreWriter(emb, settings.tmp_dir, background=False)
    enc = standin_encoders["dinov2_base"]
    w.open_model("dinov2_base", enc.dim, text=False, source=enc.spec.describe(), standin=True)
    w.remove("dinov2_base", np.array([g[1]], dtype=np.int64))
    w.commit()
    w.close()
    # (c) a vector for a row that is parked (not ready): removed.
    conn.execute("UPDATE image_status SET embed_clip_vitb32=0, embed_clip_vitb32_parked=1 WHERE gid=?", (g[2],))
    st = make_stage(settings, conn, standin_encoders, names)
    st.open()
    assert st.repairs["clip_vitb32"] == {"adopted": 1, "removed": 1, "reset": 0, "vectors": 5}
    assert st.repairs["dinov2_base"] == {"adopted": 0, "removed": 0, "reset": 1, "vectors": 5}
    check_no_lies(conn, emb, names, exact=True)
    assert g[0] in flagged(conn, "clip_vitb32") and g[1] not in flagged(conn, "dinov2_base")
    st.run()
    assert flagged(conn, "dinov2_base") == set(g)
    assert flagged(conn, "clip_vitb32") == set(g) - {g[2]}
    check_no_lies(conn, emb, names, exact=True)


def test_missing_text_vectors_are_backfilled(settings, conn, standin_encoders) -> None:
    seed_embeddable(conn, settings.images_dir, 6, per_listing=2)
    run_stage(settings, conn, standin_encoders, ["clip_vitl14"])
    emb = settings.embeddings_dir
    w = StoreWriter(emb, settings.tmp_dir, background=False)
    enc = standin_encoders["clip_vitl14"]
    w.open_model("clip_vitl14", enc.dim, text=True, source=enc.spec.describe(), standin=True)
    w.remove("clip_vitl14_text", w.live_keys("clip_vitl14_text"))
    w.commit()
    w.close()
    assert len(ids_in(emb, "clip_vitl14_text")) == 0
    st = make_stage(settings, conn, standin_encoders, ["clip_vitl14"])
    st.open()
    st.store.close()
    assert len(ids_in(emb, "clip_vitl14_text")) == 3
    check_texts(conn, settings.embeddings_dir, ["clip_vitl14"])


def test_one_writer_per_model_and_no_source_change(settings, conn, standin_encoders) -> None:
    seed_embeddable(conn, settings.images_dir, 2)
    run_stage(settings, conn, standin_encoders, ["dinov2_base"])
    a = make_stage(settings, conn, standin_encoders, ["dinov2_base"])
    a.open()
    b = make_stage(settings, conn, standin_encoders, ["dinov2_base"])
    with pytest.raises(RuntimeError, match="another process"):
        b.open()
    a.store.close()
    man_path = settings.embeddings_dir / "dinov2_base" / "manifest.json"
    man = json.loads(man_path.read_text())
    man["source"] = "transformers:facebook/dinov2-base"
    man_path.write_text(json.dumps(man))
    c = make_stage(settings, conn, standin_encoders, ["dinov2_base"])
    with pytest.raises(RuntimeError, match="not be comparable"):
        c.open()


def test_kill_file_stops_between_batches(settings, conn, standin_encoders) -> None:
    seed_embeddable(conn, settings.images_dir, 12)
    st = make_stage(settings, conn, standin_encoders, ["dinov2_base"], batch_size=2)
    st.open()
    real = st.run_batch

    def one_then_kill() -> int:
        n = real()
        (Path(settings.home) / KILL_EMBED).touch()
        return n

    st.run_batch = one_then_kill  # type: ignore[method-assign]
    st.run()
    done = flagged(conn, "dinov2_base")
    assert len(done) == 2
    check_no_lies(conn, settings.embeddings_dir, ["dinov2_base"], exact=True)
    claimed = conn.execute("SELECT COUNT(*) FROM image_status WHERE embed_dinov2_base_claim IS NOT NULL").fetchone()[0]
    assert claimed == 0  # prefetched rounds were handed back


def test_flush_waits_until_due_and_pending_rows_keep_their_leases(settings, conn, standin_encoders) -> None:
    import time

    from imageselector.worker import ClaimedBatch

    seed_embeddable(conn, settings.images_dir, 3)
    st = make_stage(settings, conn, standin_encoders, ["dinov2_base"], flush_every=500, flush_s=1000.0)
    st.open()
    flushes: list[int] = []
    st.flush = lambda: flushes.append(st.since_flush)  # type: ignore[method-assign]
    rows = db.claim_batch(conn, "embed_dinov2_base", st.owner, 3, lease_s=5)
    st.pending["dinov2_base"] = [(ClaimedBatch(conn, "embed_dinov2_base", st.owner, rows), [r["rid"] for r in rows])]
    st.oldest_pending = time.monotonic() - 1000
    st.last_flush = time.monotonic() - 100
    st.since_flush = 10
    st.maybe_flush()
    assert flushes == []  # 10 new vectors, 100 s: not due (500 vectors or 1000 s)
    lease_end = conn.execute("SELECT MIN(embed_dinov2_base_not_before) FROM image_status").fetchone()[0]
    assert lease_end > time.time() + 0.9 * db.stage("embed_dinov2_base").lease_s  # renewed
    st.since_flush = 600
    st.maybe_flush()
    assert flushes == [600]
    st.release_pending()
    st.store.close()


def test_model_error_keeps_attempts_counted(settings, conn, standin_encoders) -> None:
    """A batch that crashes the model is not handed back as untried: repeated crashes end in parking."""
    seed_embeddable(conn, settings.images_dir, 2)
    st = make_stage(settings, conn, standin_encoders, ["dinov3_base"])
    st.open()

    class Boom(RuntimeError):
        pass

    def boom(x):
        raise Boom("model exploded")

    st.encoders["dinov3_base"] = type("E", (), {})()
    real = standin_encoders["dinov3_base"]
    st.encoders["dinov3_base"].encode_batch = boom
    st.encoders["dinov3_base"].preprocess = real.preprocess
    with pytest.raises(Boom):
        st.run()
    rows = conn.execute(
        "SELECT embed_dinov3_base_attempts AS a, embed_dinov3_base_claim AS c FROM image_status"
    ).fetchall()
    assert [r["a"] for r in rows] == [1, 1] and all(r["c"] == st.owner for r in rows)
    assert flagged(conn, "dinov3_base") == set()


def test_archived_image_is_read_from_the_backup_location(home, tmp_path, monkeypatch, standin_encoders) -> None:
    from imageselector.config import load_settings
    from imageselector.layout import image_relpath

    backup = tmp_path / "hdd" / "images"
    monkeypatch.setenv("CLEANUP_DEST", str(backup))
    settings = load_settings(home)
    conn = db.connect(settings.db_path)
    rows = seed_embeddable(conn, settings.images_dir, 2)
    r = rows[1]
    src = image_path(settings.images_dir, r["listing_id"], r["image_id"])
    dst = backup / image_relpath(r["listing_id"], r["image_id"])
    dst.parent.mkdir(parents=True)
    src.rename(dst)
    conn.execute("UPDATE image_status SET archived_at=1 WHERE gid=?", (r["gid"],))
    run_stage(settings, conn, standin_encoders, ["dinov2_base"])
    assert flagged(conn, "dinov2_base") == {rows[0]["gid"], r["gid"]}
    enc = standin_encoders["dinov2_base"]
    stored = vector_of(settings.embeddings_dir, "dinov2_base", int(r["gid"]))
    np.testing.assert_allclose(stored, enc.encode_batch(enc.preprocess(decode(dst))[None])[0], atol=1e-6)
    conn.close()


def test_an_old_format_home_is_migrated_at_start(settings, conn, standin_encoders) -> None:
    """embeddings/dinov2_base.faiss + image_index.json of before the segment store: moved, flags kept."""
    import faiss

    rows = seed_embeddable(conn, settings.images_dir, 4)
    enc = standin_encoders["dinov2_base"]
    emb = settings.embeddings_dir
    emb.mkdir(parents=True, exist_ok=True)
    old = np.random.default_rng(0).random((2, enc.dim), dtype=np.float32)
    ix = faiss.IndexIDMap2(faiss.IndexFlatIP(enc.dim))
    ix.add_with_ids(old, np.array([rows[0]["gid"], rows[1]["gid"]], dtype=np.int64))
    faiss.write_index(ix, str(emb / "dinov2_base.faiss"))
    rec = {"dim": enc.dim, "count": 2, "source": enc.spec.describe(), "standin": True}
    (emb / "manifest.json").write_text(json.dumps({"models": {"dinov2_base": rec}, "text": {}, "version": 4}))
    (emb / "image_index.json").write_text(json.dumps([[r["listing_id"], r["image_id"]] for r in rows]))
    conn.execute("UPDATE image_status SET embed_dinov2_base=1 WHERE gid IN (?, ?)", (rows[0]["gid"], rows[1]["gid"]))
    st = run_stage(settings, conn, standin_encoders, ["dinov2_base"])
    assert st.repairs["dinov2_base"] == {"adopted": 0, "removed": 0, "reset": 0, "vectors": 2}
    assert flagged(conn, "dinov2_base") == {int(r["gid"]) for r in rows}
    check_no_lies(conn, emb, ["dinov2_base"], exact=True)
    check_store_files(emb, ["dinov2_base"])  # the old file and image_index.json are gone
    np.testing.assert_array_equal(vector_of(emb, "dinov2_base", int(rows[1]["gid"])), old[1])  # not recomputed
