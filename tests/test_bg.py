"""Background removal, in process: output format, marker, parking, once-only across a crash, providers."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from imageselector import db
from imageselector.background import cli
from imageselector.background.imaging import MARKER
from imageselector.background.providers import (
    COREML,
    CPU,
    CUDA,
    ProviderError,
    choose_providers,
)
from tests.helpers.bg import BRIGHT, DARK, flags, object_image, seed_downloaded, standin_in_home


@pytest.fixture(autouse=True)
def _models_dir_in_home(home, monkeypatch):
    """Never touch the user's model directory: U2NET_HOME (env beats .env) points into the test home."""
    monkeypatch.setenv("U2NET_HOME", str(home / "models" / "rembg"))


@pytest.fixture
def model(home):
    return standin_in_home(home)


def run(model, *extra: str) -> int:
    return cli.main(["--model-path", str(model), *extra])


def comment(path) -> bytes:
    return Image.open(path).info.get("comment", b"")


# -- providers -------------------------------------------------------------------------------------


def test_gpu_prefers_coreml_on_macos_and_cuda_elsewhere():
    mac = choose_providers(gpu=True, available=[COREML, CPU], system="Darwin")
    assert mac.names == [COREML, CPU]
    assert mac.options[COREML]["MLComputeUnits"] == "ALL"
    assert choose_providers(gpu=True, available=["AzureExecutionProvider", CUDA, CPU], system="Linux").names == [
        CUDA,
        CPU,
    ]
    # CoreML listed on a non-Mac is not chosen; CUDA is
    assert choose_providers(gpu=True, available=[COREML, CUDA, CPU], system="Linux").primary == CUDA


def test_gpu_without_accelerator_falls_back_to_cpu_with_a_warning():
    choice = choose_providers(gpu=True, available=["AzureExecutionProvider", CPU], system="Linux")
    assert choice.names == [CPU]
    assert choice.warning and "CPU" in choice.warning


def test_no_flags_means_cpu_even_when_cuda_exists():
    assert choose_providers(available=[CUDA, CPU], system="Linux").names == [CPU]


def test_forced_provider_must_exist_and_is_matched_loosely():
    assert choose_providers(provider="cuda", available=[CUDA, CPU], system="Linux").names == [CUDA, CPU]
    assert choose_providers(provider="cpu", available=[CPU], system="Linux").names == [CPU]
    with pytest.raises(ProviderError, match="not available"):
        choose_providers(provider="CoreML", available=[CPU], system="Linux")


def test_unavailable_provider_is_bad_usage(home, model):
    assert run(model, "--provider", "TensorrtExecutionProvider") == 2


# -- output ----------------------------------------------------------------------------------------


def test_output_is_rgb_jpeg_on_white_where_mask_is_zero(settings, conn, model):
    paths = seed_downloaded(conn, settings.images_dir, 3, size=(96, 72))
    assert run(model) == 0
    assert flags(conn) == {"done": 3, "parked": 0, "n": 3}
    for i, p in enumerate(paths):
        im = Image.open(p)
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (96, 72)
        assert comment(p).startswith(MARKER) and b"model=u2net_custom:standin.onnx bg=#ffffff" in comment(p)
        out = np.asarray(im, dtype=int)
        src = np.asarray(object_image(96, 72, seed=i), dtype=int)
        dark = (src == DARK).all(axis=2)
        bright = (src == BRIGHT).all(axis=2)
        # away from the object's edges (LANCZOS ringing), background is white and the object kept
        inner_dark = dark & np.roll(dark, 6, 0) & np.roll(dark, -6, 0) & np.roll(dark, 6, 1) & np.roll(dark, -6, 1)
        inner_bright = (
            bright & np.roll(bright, 4, 0) & np.roll(bright, -4, 0) & np.roll(bright, 4, 1) & np.roll(bright, -4, 1)
        )
        assert inner_dark.sum() > 1000 and inner_bright.sum() > 100
        assert out[inner_dark].min() >= 245
        assert np.abs(out[inner_bright] - np.array(BRIGHT)).max() <= 12


def test_background_colour_flag(settings, conn, model):
    (p,) = seed_downloaded(conn, settings.images_dir, 1)
    assert run(model, "--background", "#00ff00") == 0
    assert b"bg=#00ff00" in comment(p)
    assert tuple(int(v) for v in np.asarray(Image.open(p))[2, 2]) == pytest.approx((0, 255, 0), abs=8)
    assert run(model, "--background", "no-such-colour") == 2


def test_keep_originals_keeps_the_untouched_download(settings, conn, model, tmp_path):
    paths = seed_downloaded(conn, settings.images_dir, 2)
    before = [p.read_bytes() for p in paths]
    keep = tmp_path / "originals"
    assert run(model, "--keep-originals", str(keep)) == 0
    for p, data in zip(paths, before, strict=True):
        kept = keep / p.relative_to(settings.images_dir)
        assert kept.read_bytes() == data
        assert p.read_bytes() != data and comment(p).startswith(MARKER)


def test_flag_is_set_only_after_the_file_is_replaced(settings, conn, model, monkeypatch):
    paths = seed_downloaded(conn, settings.images_dir, 4)
    by_rid = {
        r["rid"]: p
        for r, p in zip(conn.execute("SELECT rowid AS rid FROM image_status ORDER BY rowid"), paths, strict=True)
    }
    seen = []
    real = db.complete

    def checking_complete(c, stage, owner, rids, extra=None):
        for rid in rids:
            seen.append(rid)
            assert comment(by_rid[rid]).startswith(MARKER), "flag set before the file was replaced"
        return real(c, stage, owner, rids, extra)

    monkeypatch.setattr(db, "complete", checking_complete)
    assert run(model) == 0
    assert sorted(seen) == sorted(by_rid)


# -- failures and crashes --------------------------------------------------------------------------


def test_corrupt_and_missing_images_go_back_to_download(settings, conn, model):
    """Undecodable or missing input is not bg's to park: the file is taken away and the row downloaded again."""
    paths = seed_downloaded(conn, settings.images_dir, 4)
    paths[0].write_bytes(paths[0].read_bytes()[:200])  # truncated download
    paths[1].write_bytes(b"<html>not an image</html>")
    paths[2].unlink()  # missing
    assert run(model) == 0
    rows = conn.execute(
        "SELECT download_done, download_error, download_parked, bg_removed, bg_parked, bg_error, bg_attempts"
        " FROM image_status ORDER BY rowid"
    ).fetchall()
    assert [r["bg_removed"] for r in rows] == [0, 0, 0, 1]
    assert [r["download_done"] for r in rows] == [0, 0, 0, 1]
    assert "sent back by bg: undecodable" in rows[0]["download_error"]
    assert "sent back by bg: undecodable" in rows[1]["download_error"]
    assert "sent back by bg: image file missing" in rows[2]["download_error"]
    assert [r["bg_parked"] for r in rows] == [0, 0, 0, 0] and [r["bg_attempts"] for r in rows[:3]] == [0, 0, 0]
    assert not paths[0].exists() and not paths[1].exists()  # the bad files are gone (the download writes anew)
    assert not any(settings.tmp_dir.glob("*.tmp"))  # moved aside, then removed
    ready = conn.execute("SELECT COUNT(*) FROM image_status WHERE download_done=1 AND bg_removed=0").fetchone()[0]
    assert ready == 0  # nothing for bg until the downloads are done again


def test_an_image_broken_after_every_download_is_parked_not_looped(settings, conn, model):
    """download_attempts counts across stages: after max_attempts downloads, the row is parked in download."""
    paths = seed_downloaded(conn, settings.images_dir, 1)
    cdn_body = b"\xff\xd8\xff broken every time"
    max_attempts = db.stage("download").max_attempts
    for n in range(1, max_attempts + 1):
        conn.execute("UPDATE image_status SET download_done=1, download_attempts=?", (n,))  # "downloaded" n times
        paths[0].write_bytes(cdn_body)
        assert run(model) == 0
        row = conn.execute("SELECT * FROM image_status").fetchone()
        assert row["download_done"] == 0
        assert row["download_parked"] == (1 if n == max_attempts else 0), n
    assert "still after 5 downloads" in row["download_error"] and not paths[0].exists()
    assert row["bg_parked"] == 0 and row["bg_removed"] == 0


def test_processed_once_across_a_crash_between_replace_and_flag(settings, conn, model, monkeypatch):
    """A file replaced but not flagged (crash in between) is recognised by its marker and only flagged."""
    paths = seed_downloaded(conn, settings.images_dir, 3)
    assert run(model) == 0
    after_first = [p.read_bytes() for p in paths]
    db.reset_rows(conn, "bg", "rowid IN (SELECT rowid FROM image_status ORDER BY rowid LIMIT 2)")  # the "crash"
    assert flags(conn)["done"] == 1

    from imageselector.background.session import BgModel

    calls = []
    real = BgModel.masks
    monkeypatch.setattr(BgModel, "masks", lambda self, imgs, t: calls.append(len(imgs)) or real(self, imgs, t))
    assert run(model) == 0
    assert calls == []  # no inference at all
    assert [p.read_bytes() for p in paths] == after_first
    assert flags(conn)["done"] == 3
    log = (settings.home / "bg_remover.log").read_text()
    assert log.count("already carries the bg-removed marker") == 2


def test_leftover_temp_files_are_cleaned_at_start(settings, conn, model):
    seed_downloaded(conn, settings.images_dir, 1)
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    debris = settings.tmp_dir / ".1000_5000000.jpg.999999.deadbeef.tmp"  # pid 999999: not alive
    debris.write_bytes(b"half")
    assert run(model) == 0
    assert not debris.exists()


# -- models ----------------------------------------------------------------------------------------


def test_custom_model_outside_models_dir_is_placed_inside(settings, conn, tmp_path):
    from imageselector.background.standins import build_standin_u2net

    outside = build_standin_u2net(tmp_path / "elsewhere" / "mine.onnx")
    seed_downloaded(conn, settings.images_dir, 1)
    assert run(outside) == 0
    assert (settings.home / "models" / "rembg" / "custom" / "mine.onnx").read_bytes() == outside.read_bytes()
    assert flags(conn)["done"] == 1


def test_named_model_is_found_in_u2net_home_without_download(settings, conn, tmp_path, monkeypatch):
    """The production path: `--model u2net` with u2net.onnx already in U2NET_HOME (a custom setting here)."""
    from imageselector.background.standins import build_standin_u2net

    models = tmp_path / "u2net_home"
    build_standin_u2net(models / "u2net.onnx")
    monkeypatch.setenv("U2NET_HOME", str(models))
    (p,) = seed_downloaded(conn, settings.images_dir, 1)
    assert cli.main(["--model", "u2net", "--batch-size", "4"]) == 0
    assert b"model=u2net bg=" in comment(p)


def test_session_falls_back_to_bare_provider_names_when_options_are_rejected():
    from imageselector.background.providers import choose_providers
    from imageselector.background.session import _new_session

    calls = []

    def fake_new_session(model, providers, sess_opts, **kw):
        calls.append(providers)
        if isinstance(providers[0], tuple):
            raise RuntimeError("unknown option ModelFormat")
        return "session"

    choice = choose_providers(gpu=True, available=[COREML, CPU], system="Darwin")
    assert _new_session(fake_new_session, "u2net", choice, 2, {}) == "session"
    assert calls[0][0][0] == COREML and calls[1] == [COREML, CPU]


def test_unknown_model_is_bad_usage(home):
    assert cli.main(["--model", "no_such_model"]) == 2


def test_batched_masks_equal_rembg_predict(settings):
    """The fast path (prefetch-prepared tensors, batch of 3) gives rembg's own masks, bit for bit."""
    from skimage import data

    from imageselector.background.providers import choose_providers
    from imageselector.background.session import open_model

    path = standin_in_home(settings.home, "small.onnx", size="small")
    m = open_model(settings, "u2net", model_path=path, choice=choose_providers(), threads=2, batch_size=3)
    assert m.fast and m.max_batch == 3
    imgs = [Image.fromarray(a) for a in (data.astronaut(), data.coffee(), data.chelsea())]
    imgs.append(Image.open(io.BytesIO(_png(imgs[1]))).convert("RGB"))
    ours = m.masks(imgs, [m.prepare(i) for i in imgs])
    for img, mask in zip(imgs, ours, strict=True):
        ref = m.session.predict(img)[0]
        assert mask.size == img.size
        assert np.array_equal(np.asarray(ref), np.asarray(mask))
        assert np.asarray(mask).min() == 0 and np.asarray(mask).max() == 255


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_models_outside_the_u2net_family_go_through_rembg_predict(settings, conn, model, monkeypatch):
    """The generic path (any rembg model): session.predict per image, same result for a u2net-like model."""
    from imageselector.background import session as bgsession

    monkeypatch.setattr(bgsession, "U2NET_FAMILY", frozenset())
    (p,) = seed_downloaded(conn, settings.images_dir, 1)
    assert run(model) == 0
    assert "rembg predict per image" in (settings.home / "bg_remover.log").read_text()
    assert comment(p).startswith(MARKER) and flags(conn)["done"] == 1


def test_keep_original_copies_when_it_cannot_link(tmp_path, monkeypatch):
    """--keep-originals on another disk: hard links fail (EXDEV), the file is copied atomically instead."""
    import errno
    import os

    from imageselector.background.stage import keep_original

    src = tmp_path / "images" / "001" / "1_1001.jpg"
    src.parent.mkdir(parents=True)
    src.write_bytes(b"original bytes")

    def no_link(*_a, **_k):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    dest = tmp_path / "keep" / "001" / "1_1001.jpg"
    keep_original(src, dest, tmp_path / "keep" / ".tmp")
    assert dest.read_bytes() == b"original bytes"
    assert os.stat(dest).st_ino != os.stat(src).st_ino
    assert not list((tmp_path / "keep" / ".tmp").iterdir())
