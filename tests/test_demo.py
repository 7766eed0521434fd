"""The demo's pieces: when the pipeline counts as done, the home .env it leaves, the model choice offline."""

from __future__ import annotations

from imageselector.proving import demo, demo_models


def _data(total=10, backlog=0, failing=0, leased=0):
    stage = {"backlog": backlog, "failing": failing, "leased": leased}
    return {"total": total, "stages": {"download": dict(stage), "bg": dict(stage, backlog=0)}}


def _state(sync="finished", **others):
    return {"stages": {"sync": {"state": sync}, **{k: {"state": v} for k, v in others.items()}}}


def test_pipeline_done_waits_for_sync_and_every_backlog():
    assert demo.pipeline_done(_data(), _state("running"))[0] is False
    assert demo.pipeline_done(_data(backlog=3), _state())[0] is False
    assert demo.pipeline_done(_data(leased=1), _state())[0] is False
    assert demo.pipeline_done(_data(backlog=2, failing=2), _state()) == (True, "backlog done")  # only retries left
    assert demo.pipeline_done(_data(), _state()) == (True, "backlog done")
    done, why = demo.pipeline_done(_data(backlog=5), _state("running", embed="failed"))
    assert done and "embed" in why and why not in demo.OK_REASONS


def test_home_env_is_updated_in_place(tmp_path):
    (tmp_path / ".env").write_text("KEEP=1\nIMAGESELECTOR_MODELS_FILE=/old\n")
    demo.set_home_env(tmp_path, {"IMAGESELECTOR_MODELS_FILE": "/new", "HF_HUB_OFFLINE": None})
    assert (tmp_path / ".env").read_text().splitlines() == ["KEEP=1", "IMAGESELECTOR_MODELS_FILE=/new"]


def test_offline_without_weights_chooses_standins_with_a_warning(settings, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf"))  # no cached weights
    monkeypatch.setattr(demo_models.Path, "home", lambda: tmp_path)  # no ~/.u2net
    built = []

    def fake_build(path, *a, **kw):  # the real builders are tested by their owners; keep this test fast
        built.append(path)
        p = path / "standin_models.json" if not str(path).endswith(".onnx") else path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("{}")
        return p

    import imageselector.background.standins as bg_standin
    import imageselector.models.standins as emb_standins

    monkeypatch.setattr(emb_standins, "build_standins", fake_build)
    monkeypatch.setattr(bg_standin, "build_standin_u2net", fake_build)
    choice = demo_models.choose(settings, "auto", tmp_path / "standin")
    assert not choice.real_embed and not choice.real_bg
    assert choice.registry is not None and choice.registry.is_file()
    assert choice.bg_model_path is not None and choice.bg_model_path.is_file()
    assert choice.warning and "random weights" in choice.warning
    assert len(built) == 2
