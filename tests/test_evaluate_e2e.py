"""image_search_v2/evaluate.py end to end: the simulator's catalogue, embedded by the real embed stage with stand-ins."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from imageselector import db
from imageselector.evaluation import stage as evaluation
from imageselector.evaluation.cli import main
from imageselector.fusion import load_weights
from tests.helpers.embed_fixtures import standin_registry  # noqa: F401 - session fixture
from tests.helpers.search_home import build_search_home

MODELS = ["clip_vitb32", "clip_vitl14", "dinov2_base", "dinov2_large", "dinov3_base"]
FUSIONS = ["max", "max (weighted)", "rrf", "rrf (weighted)", "rrf + text"]


@pytest.fixture(scope="module")
def evaluated_home(tmp_path_factory, standin_registry):  # noqa: F811
    return build_search_home(tmp_path_factory.mktemp("evalhome") / "home", standin_registry, listings=12, seed=5)


def _run(capsys, args: list[str]) -> tuple[int, dict | None]:
    rc = main(args)
    out = capsys.readouterr().out
    return rc, (json.loads(out) if rc == 0 and "--json" in args else None)


def _check_stat(stat: dict, n: int) -> None:
    assert stat["n"] == n
    for k in ("mean", "lo", "hi"):
        assert isinstance(stat[k], float) and math.isfinite(stat[k]) and 0.0 <= stat[k] <= 1.0
    assert stat["lo"] - 1e-9 <= stat["mean"] <= stat["hi"] + 1e-9


def test_report_end_to_end(evaluated_home, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("IMAGESELECTOR_HOME", str(evaluated_home.home))
    monkeypatch.setenv("IMAGESELECTOR_MODELS_FILE", str(evaluated_home.registry))
    out_dir = tmp_path / "report"
    args = ["--json", "--sample", "0", "--bootstrap", "200", "--fit-weights", "--min-fit", "1", "--out", str(out_dir)]
    rc, res = _run(capsys, args)
    assert rc == 0
    n_eval = res["queries"]["eval"]
    assert n_eval >= 5 and res["queries"]["fit"] >= 1
    assert res["queries"]["sampled"] == res["eligible_listings"]  # --sample 0 = every eligible listing
    names = [m["name"] for m in res["methods"]]
    assert names == [*MODELS, "clip_vitb32_text", "clip_vitl14_text", *FUSIONS]
    for m in res["methods"]:
        for metric, stat in m["metrics"].items():
            if m["kind"] == "text" and metric.startswith("image_"):
                assert stat is None  # a listing-text index has no image level
            else:
                _check_stat(stat, n_eval)
        assert math.isfinite(m["query_ms"]) and m["query_ms"] >= 0
    assert all(res["models"][m]["standin"] for m in MODELS)
    for m in MODELS:  # the embed stage ran in this home: it recorded each model's time per image in the database
        assert res["costs"][m]["source"] == "recorded by embed.py" and res["costs"][m]["sec_per_image"] > 0
    assert {a["model"] for a in res["ablation"]} == set(MODELS)
    for a in res["ablation"]:
        d = a["delta"]["listing_map10"]
        assert -1 <= d["lo"] <= d["mean"] <= d["hi"] <= 1

    # the report on disk
    md = (out_dir / "report.md").read_text()
    assert "![recall chart](chart.png)" in md and "Stand-in models" in md and "| rrf (weighted) |" in md
    with Image.open(out_dir / "chart.png") as img:
        assert img.format == "PNG" and img.width == 900
    assert json.loads((out_dir / "results.json").read_text())["queries"] == res["queries"]

    # --fit-weights: written in the format search reads, unless the fitted weights lost to equal weights
    fitted = res["weights"]["fitted"]["rrf"]
    assert set(fitted) == set(MODELS) and max(fitted.values()) == 1.0
    emb = evaluated_home.home / "embeddings"
    if res["weights"].get("written"):
        weights, method = load_weights(emb)
        assert weights == fitted and method.startswith("fitted by evaluate.py for rrf")
        assert json.loads((emb / "fusion_weights.json").read_text())["fusion"] == "rrf"
    else:
        assert "did worse than equal weights" in res["weights"]["not_written"]
    # either way, the file evaluate.py writes is what search reads
    from imageselector.config import load_settings

    path = evaluation.write_weights(load_settings(evaluated_home.home), res)
    weights, method = load_weights(emb)
    assert path == emb / "fusion_weights.json" and weights == fitted and "evaluate.py" in method
    path.unlink()


def test_reproducible_and_one_read_per_index(evaluated_home, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("IMAGESELECTOR_HOME", str(evaluated_home.home))
    reads: list[str] = []
    real = evaluation.open_snapshot
    monkeypatch.setattr(evaluation, "open_snapshot", lambda d, name: reads.append(name) or real(d, name))
    args = ["--json", "--sample", "6", "--seed", "3", "--bootstrap", "100", "--out", str(tmp_path / "a")]
    rc1, r1 = _run(capsys, args)
    assert rc1 == 0
    assert sorted(reads) == sorted([*MODELS, "clip_vitb32_text", "clip_vitl14_text"])
    rc2, r2 = _run(capsys, [*args[:-1], str(tmp_path / "b")])
    assert rc2 == 0
    assert r1["queries"]["sampled"] == 6
    assert [m["metrics"] for m in r1["methods"]] == [m["metrics"] for m in r2["methods"]]
    # the terminal table
    rc3 = main(["--sample", "6", "--bootstrap", "50", "--out", str(tmp_path / "c")])
    table = capsys.readouterr().out
    assert rc3 == 0 and "L mAP@10" in table and "Drop one model" in table and "rrf (weighted)" in table


def test_measure_cost_times_the_encoder(evaluated_home, monkeypatch):
    from imageselector.config import load_settings

    monkeypatch.setenv("IMAGESELECTOR_MODELS_FILE", str(evaluated_home.registry))
    settings = load_settings(evaluated_home.home)
    paths = [p for imgs in evaluated_home.images.values() for _, p in imgs][:3]
    got = evaluation.measure_costs(settings, ["clip_vitb32"], paths, device="cpu")
    assert set(got) == {"clip_vitb32"} and 0 < got["clip_vitb32"] < 60


def test_refuses_without_data(home, capsys):
    assert main(["--sample", "5"]) == 2  # no database
    from imageselector import db
    from imageselector.config import load_settings

    db.connect(load_settings().db_path).close()
    assert main(["--sample", "5"]) == 2  # no index
    assert main(["--models", "clip_vitb32,nope"]) == 2


def test_costs_come_from_the_database_pooled_over_runs(settings, conn):
    db.add_embed_cost(conn, {"clip_vitb32": (10.0, 50)})  # one run's flush
    db.add_embed_cost(conn, {"clip_vitb32": (30.0, 75), "dinov2_base": (4.0, 2)})  # a later run
    # clip: (10 + 30) s over (50 + 75) images
    assert evaluation.costs_from_db(settings, MODELS) == {
        "clip_vitb32": pytest.approx(40 / 125),
        "dinov2_base": pytest.approx(2.0),
    }
    db.kv_set(conn, db.KV_EMBED_COST, "not json")  # a damaged value costs nothing but the column
    assert evaluation.costs_from_db(settings, MODELS) == {}
