"""The verifier finds every kind of lie the chaos run looks for (and passes an honest home)."""

from __future__ import annotations

import io
import json
import socket

import numpy as np
from PIL import Image

from imageselector import layout
from imageselector.background.imaging import encode_jpeg, marker_text
from imageselector.proving.verify import verify
from imageselector.vectorstore.store import new_index, write_index
from tests.helpers.rows import seed_images


def _jpeg(marked: bool) -> bytes:
    img = Image.new("RGB", (32, 24), (200, 40, 40))
    if marked:
        return encode_jpeg(img, marker_text("u2net", (255, 255, 255)), 90)
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


def _honest_home(settings, conn, n=4):
    """n rows, each downloaded, bg-removed (marked file) and embedded by clip_vitb32 only."""
    seed_images(conn, n)
    rows = conn.execute("SELECT rowid AS rid, * FROM image_status ORDER BY gid").fetchall()
    for r in rows:
        p = layout.image_path(settings.images_dir, r["listing_id"], r["image_id"])
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_jpeg(marked=True))
    conn.execute("UPDATE image_status SET download_done=1, bg_removed=1, embed_clip_vitb32=1")
    index = new_index(4)
    vecs = np.random.default_rng(0).random((len(rows), 4), dtype=np.float32)
    index.add_with_ids(vecs, np.array([r["gid"] for r in rows], dtype=np.int64))
    settings.embeddings_dir.mkdir(parents=True, exist_ok=True)
    write_index(index, settings.embeddings_dir / "clip_vitb32.faiss", settings.tmp_dir)
    (settings.embeddings_dir / "image_index.json").write_text(
        json.dumps([[r["listing_id"], r["image_id"]] for r in rows])
    )
    return rows


STAGES = ("download", "bg", "embed_clip_vitb32")


def test_an_honest_home_verifies_clean(settings, conn):
    _honest_home(settings, conn)
    rep = verify(settings, stages=STAGES)
    assert rep.ok, rep.inconsistencies
    assert rep.done == {"download": 4, "bg": 4, "embed_clip_vitb32": 4}


def test_each_kind_of_inconsistency_is_reported(settings, conn):
    rows = _honest_home(settings, conn, n=6)
    path = lambda r: layout.image_path(settings.images_dir, r["listing_id"], r["image_id"])  # noqa: E731
    path(rows[0]).unlink()  # flag without file
    path(rows[1]).write_bytes(_jpeg(True)[:200])  # truncated file
    path(rows[2]).write_bytes(_jpeg(False))  # bg flag, no marker
    idx = json.loads((settings.embeddings_dir / "image_index.json").read_text())
    idx[rows[3]["gid"]] = [1, 2]  # wrong ids in image_index.json
    (settings.embeddings_dir / "image_index.json").write_text(json.dumps(idx))
    conn.execute("UPDATE image_status SET embed_clip_vitb32=0 WHERE rowid=?", (rows[4]["rid"],))  # unfinished
    dead = f"{socket.gethostname()}:{2**22 + 12345}:dead"  # above any pid_max: a process that is gone
    conn.execute("UPDATE image_status SET embed_clip_vitb32_claim=? WHERE rowid=?", (dead, rows[4]["rid"]))
    conn.execute(  # parked without a reason
        "UPDATE image_status SET bg_removed=0, embed_clip_vitb32=0, bg_parked=1 WHERE rowid=?", (rows[5]["rid"],)
    )
    rep = verify(settings, stages=STAGES)
    text = "\n".join(rep.inconsistencies)
    assert "download_done=1 but the file missing" in text
    assert "download_done=1 but the file does not decode" in text
    assert "no background-removal marker" in text
    assert f"image_index.json[{rows[3]['gid']}] is [1, 2]" in text
    assert "parked in bg without a reason" in text
    assert rep.unfinished["embed_clip_vitb32"] == 1 and rep.stuck_leases == 1
    # row 5 is parked in bg: its vector can never be flagged (an orphan); row 4 is still in flight (pending)
    assert rep.orphan_vectors == 1 and rep.pending_vectors == 1
    assert "1 orphan vector(s)" in text
    assert not rep.ok


def test_flag_without_vector_and_duplicate_ids_in_an_index(settings, conn):
    rows = _honest_home(settings, conn, n=3)
    index = new_index(4)
    gid = rows[0]["gid"]
    index.add_with_ids(np.eye(4, dtype=np.float32)[:2], np.array([gid, gid], dtype=np.int64))
    write_index(index, settings.embeddings_dir / "clip_vitb32.faiss", settings.tmp_dir)
    rep = verify(settings, stages=STAGES)
    text = "\n".join(rep.inconsistencies)
    assert "the clip_vitb32 store holds 1 duplicated ids" in text
    assert sum("embed_clip_vitb32=1 but gid not in the clip_vitb32 store" in m for m in rep.inconsistencies) == 2


def test_a_backlog_is_consistent_exit_0_and_only_settled_asks_for_none(settings, conn, home):
    from imageselector.proving.verify import main

    rows = _honest_home(settings, conn, n=4)
    seed_images(conn, 3, start_listing=9000)  # three new rows not downloaded yet: a backlog, nothing wrong
    # a row flushed to the index before its flag (the flag comes with the next flush): pending, not orphan
    conn.execute("UPDATE image_status SET embed_clip_vitb32=0 WHERE rowid=?", (rows[0]["rid"],))
    rep = verify(settings, stages=STAGES)
    assert rep.ok and rep.backlog == 4 and not rep.settled
    assert rep.orphan_vectors == 0 and rep.pending_vectors == 1
    assert main(["--home", str(home)]) == 0
    assert main(["--home", str(home), "--settled"]) == 1


def test_the_vector_of_a_row_parked_for_its_model_is_an_orphan(settings, conn):
    rows = _honest_home(settings, conn, n=3)
    conn.execute(
        "UPDATE image_status SET embed_clip_vitb32=0, embed_clip_vitb32_parked=1, embed_clip_vitb32_error='x'"
        " WHERE rowid=?",
        (rows[2]["rid"],),
    )
    rep = verify(settings, stages=STAGES)
    assert rep.orphan_vectors == 1 and not rep.ok
    assert any("1 orphan vector(s)" in m for m in rep.inconsistencies)


def test_segment_store_home_verifies_and_a_missing_vector_is_found(settings, conn):
    """The same checks over the segment store: honest, then one gid deleted from the store."""
    from imageselector.vectorstore.store import StoreWriter

    rows = _honest_home(settings, conn, n=5)
    (settings.embeddings_dir / "clip_vitb32.faiss").unlink()
    (settings.embeddings_dir / "image_index.json").unlink()
    w = StoreWriter(settings.embeddings_dir, settings.tmp_dir, background=False)
    w.open_model("clip_vitb32", 4, text=False, source="s", standin=True)
    gids = np.array([r["gid"] for r in rows], dtype=np.int64)
    w.append("clip_vitb32", gids, np.random.default_rng(1).random((5, 4), dtype=np.float32))
    w.commit()
    rep = verify(settings, stages=STAGES)
    assert rep.ok, rep.inconsistencies
    w.remove("clip_vitb32", gids[:1])
    w.commit()
    w.close()
    rep = verify(settings, stages=STAGES)
    assert [m for m in rep.inconsistencies if "not in the clip_vitb32 store" in m] == [
        f"{rows[0]['listing_id']}_{rows[0]['image_id']} (gid {rows[0]['gid']}): embed_clip_vitb32=1 but gid not in the clip_vitb32 store"
    ]
