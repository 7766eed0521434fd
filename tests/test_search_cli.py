"""The CLI (`image_search_v2/search.py`) over a catalogue embedded by the real embed stage with stand-ins."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from imageselector.db import EMBED_MODELS
from imageselector.search.cli import main
from tests.helpers.embed_fixtures import standin_registry  # noqa: F401 - session fixture
from tests.helpers.search_home import SearchHome, search_home, search_service  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def env(search_home: SearchHome, monkeypatch: pytest.MonkeyPatch) -> SearchHome:  # noqa: F811
    monkeypatch.setenv("IMAGESELECTOR_HOME", str(search_home.home))
    monkeypatch.setenv("IMAGESELECTOR_MODELS_FILE", str(search_home.registry))
    return search_home


def run_json(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, dict]:
    rc = main([*argv, "--json", "--device", "cpu", "--dtype", "fp32"])
    return rc, json.loads(capsys.readouterr().out)


def test_image_query_json_from_the_entry_script(env: SearchHome) -> None:
    listing = sorted(env.images)[2]
    _, path = env.images[listing][-1]  # not the primary: the card must still show the primary photo
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "image_search_v2/search.py"),
            "--image",
            str(path),
            "--k",
            "5",
            "--json",
            "--device",
            "cpu",
            "--dtype",
            "fp32",
        ],
        env=env.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert res["query"]["type"] == "image" and res["models"] == list(EMBED_MODELS)
    top = res["results"][0]
    assert top["listing_id"] == listing and top["n_models"] == 5 and top["rank"] == 1
    assert set(top["scores"]) == set(EMBED_MODELS)
    assert all(s == pytest.approx(1.0, abs=1e-3) for s in top["scores"].values())
    assert top["title"] == env.titles[listing] and top["price"] > 0 and top["currency"] and top["shop_name"]
    assert top["url"] == env.urls[listing]  # as the API (here the simulator) gave it, stored by sync
    assert top["primary_image_id"] == env.images[listing][0][0]
    assert top["image_url"] == top["primary_image_url"] == f"/image/{listing}/{env.images[listing][0][0]}"
    assert top["matched_image_ids"]["dinov2_base"] == env.images[listing][-1][0]
    # the photo that matched, named and addressable, not the primary
    assert top["matched_image_id"] == env.images[listing][-1][0]
    assert top["matched_image_url"] == f"/image/{listing}/{env.images[listing][-1][0]}"
    assert res["market"]["listings"] == len(res["results"]) and res["market"]["price"]["median"] > 0
    assert 1 <= len(res["results"]) <= 5
    assert len({r["listing_id"] for r in res["results"]}) == len(res["results"])  # one row per listing
    fused = [r["fused_score"] for r in res["results"]]
    assert fused == sorted(fused, reverse=True)
    assert any("only structural" in w for w in res["warnings"])


def test_text_query_uses_both_clip_towers_on_image_and_text_indexes(env: SearchHome, capsys) -> None:
    listing = sorted(env.titles)[0]
    rc, res = run_json(capsys, "--text", env.titles[listing], "--k", "3")
    assert rc == 0
    assert res["models"] == ["clip_vitb32", "clip_vitb32_text", "clip_vitl14", "clip_vitl14_text"]
    assert 1 <= len(res["results"]) <= 3 and res["results"][0]["url"].startswith("https://www.etsy.com/listing/")
    assert all(r["matched_image_url"].startswith(f"/image/{r['listing_id']}/") for r in res["results"])
    assert "clip_vitb32_text" in res["fusion"]["weights"]


def test_model_subset_and_weights_file(env: SearchHome, capsys) -> None:
    weights = env.home / "embeddings" / "fusion_weights.json"
    weights.write_text(json.dumps({"method": "test weights", "weights": {"dinov2_base": 0.25}}))
    try:
        listing = sorted(env.images)[0]
        rc, res = run_json(capsys, "--image", str(env.images[listing][0][1]), "--models", "dinov2_base,clip_vitb32")
    finally:
        weights.unlink()
    assert rc == 0 and res["models"] == ["clip_vitb32", "dinov2_base"]
    assert res["fusion"]["weights"] == {"clip_vitb32": 1.0, "dinov2_base": 0.25}
    assert res["fusion"]["weights_source"] == "test weights"
    assert res["results"][0]["listing_id"] == listing


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--image", "/no/such/file.jpg"], "no such file"),
        (["--image", __file__], "not a readable image"),
        (["--text", "mug", "--models", "dinov2_base"], "CLIP models only"),
        (["--text", "mug", "--k", "0"], "k must be between"),
        (["--text", "   "], "type something"),
    ],
)
def test_bad_queries_exit_2_with_a_message(env: SearchHome, capsys, argv: list[str], message: str) -> None:
    rc, res = run_json(capsys, *argv)
    assert rc == 2 and message in res["error"]


def test_no_index_yet_says_what_to_run(home: Path, capsys) -> None:
    rc, res = run_json(capsys, "--text", "mug")
    assert rc == 2 and "embed.py" in res["error"]


def test_index_built_by_another_model_is_skipped_with_a_warning(env: SearchHome, capsys) -> None:
    manifest = env.home / "embeddings" / "manifest.json"
    original = manifest.read_text()
    doc = json.loads(original)
    doc["models"]["dinov2_base"]["source"] = "transformers:facebook/dinov2-base"
    manifest.write_text(json.dumps(doc))
    try:
        rc, res = run_json(capsys, "--image", str(env.images[sorted(env.images)[0]][0][1]))
    finally:
        manifest.write_text(original)
    assert rc == 0 and "dinov2_base" not in res["models"] and len(res["models"]) == 4
    assert any("dinov2_base: skipped" in w for w in res["warnings"])


def test_a_model_that_cannot_embed_is_a_warning_not_a_failure(search_service, search_home, monkeypatch) -> None:  # noqa: F811
    from imageselector.search.service import read_path_image

    real = search_service.encoder

    def broken(name: str):  # type: ignore[no-untyped-def]
        if name == "dinov3_base":
            raise RuntimeError("weights file is corrupt")
        return real(name)

    monkeypatch.setattr(search_service, "encoder", broken)
    listing = sorted(search_home.images)[3]
    res = search_service.search_image(read_path_image(search_home.images[listing][0][1], search_service.limits), 3)
    assert "dinov3_base" not in res["models"] and len(res["models"]) == 4
    assert res["results"][0]["listing_id"] == listing
    assert any(
        "dinov3_base: cannot embed the query (RuntimeError: weights file is corrupt)" in w for w in res["warnings"]
    )


def test_similar_to_uses_stored_vectors_and_puts_the_photo_first(env: SearchHome, capsys, monkeypatch) -> None:
    from imageselector.search.service import SearchService

    def no_encoder(self, name):  # type: ignore[no-untyped-def]
        raise AssertionError("--similar-to must not embed anything")

    monkeypatch.setattr(SearchService, "encoder", no_encoder)
    listing = sorted(env.images)[5]
    image_id = env.images[listing][-1][0]
    rc, res = run_json(capsys, "--similar-to", f"{listing}:{image_id}", "--k", "4")
    assert rc == 0 and res["query"]["type"] == "similar" and res["models"] == list(EMBED_MODELS)
    top = res["results"][0]
    assert top["listing_id"] == listing and top["matched_image_id"] == image_id
    assert all(rank == 1 for rank in top["ranks"].values()) and len(top["ranks"]) == 5
    assert all(s == pytest.approx(1.0, abs=1e-3) for s in top["scores"].values())
    assert "market" in res and res["market"]["listings"] == len(res["results"])


@pytest.mark.parametrize(
    ("ref", "message"), [("1:2", "no image 1:2"), ("99999999999999999999:1", "no image"), ("12", "LISTING_ID:IMAGE_ID")]
)
def test_similar_to_unknown_photo(env: SearchHome, capsys, ref: str, message: str) -> None:
    rc, res = run_json(capsys, "--similar-to", ref)
    assert rc == 2 and message in res["error"]


def test_table_output_strips_terminal_escapes_from_etsy_text(env: SearchHome, capsys) -> None:
    import sqlite3

    listing = sorted(env.images)[6]
    db_path = env.home / "etsy_data.db"
    with sqlite3.connect(db_path) as c:
        old = c.execute("SELECT title FROM listings WHERE listing_id=?", (listing,)).fetchone()[0]
        c.execute(
            "UPDATE listings SET title=? WHERE listing_id=?",
            ("Mug \x1b]0;pwned\x07\x1b[2J\x1b[31mred\x1b[0m\rover\u202eevil\x9b1A", listing),
        )
    try:
        rc = main(["--similar-to", f"{listing}:{env.images[listing][0][0]}", "--k", "2", "--device", "cpu"])
        out = capsys.readouterr().out
    finally:
        with sqlite3.connect(db_path) as c:
            c.execute("UPDATE listings SET title=? WHERE listing_id=?", (old, listing))
    assert rc == 0 and "Mug" in out and "red" in out and "market over" in out
    assert not any(ch in out for ch in ("\x1b", "\r", "\x07", "\u202e", "\x9b"))
