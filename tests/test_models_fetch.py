"""Model weights: the one fetch command (with a fake downloader: no network here), and the one-line
message a stage gives at once when weights are missing and cannot be fetched."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import GatedRepoError

from imageselector import fetch_models, weights
from imageselector.models.registry import load_registry
from imageselector.proving import demo_models

ROOT = Path(__file__).resolve().parent.parent
DINOV3 = "facebook/dinov3-vitb16-pretrain-lvd1689m"


def put_hf(cache: Path, repo: str, filename: str) -> Path:
    """A file in the Hugging Face cache layout, as hf_hub_download leaves it."""
    folder = cache / ("models--" + repo.strip("/").replace("/", "--"))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text("0" * 40)
    path = folder / "snapshots" / ("0" * 40) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    return path


class FakeFetcher(fetch_models.Fetcher):
    """Puts files where the real downloads would; DINOv3's gated repo answers 403 unless `granted`."""

    def __init__(self, cache: Path, *, granted: bool = False, fail: bool = False) -> None:
        self.cache, self.granted, self.fail = cache, granted, fail
        self.calls: list[str] = []

    def _check(self, what: str) -> None:
        self.calls.append(what)
        if self.fail:
            raise ConnectionError(f"cannot reach the hub for {what}\nsecond line of noise")

    def hf_file(self, repo: str, filename: str, revision: str | None = None) -> Path:
        self._check(repo)
        return put_hf(self.cache, repo, filename)

    def hf_repo(self, repo: str, revision: str | None = None) -> Path:
        self._check(repo)
        if repo == DINOV3 and not self.granted:
            raise GatedRepoError(
                "Access to model is restricted",
                response=httpx2.Response(403, request=httpx2.Request("GET", "https://hub/x")),
            )
        for f in ("config.json", "preprocessor_config.json", "model.safetensors"):
            put_hf(self.cache, repo, f)
        return self.cache

    def rembg(self, model: str, directory: Path) -> Path:
        self._check(model)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{model}.onnx").write_bytes(b"onnx")
        return directory / f"{model}.onnx"


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("U2NET_HOME", raising=False)
    # go_offline() switches the hub off in this process: restore it after the test
    monkeypatch.setenv("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", hf_constants.HF_HUB_OFFLINE)
    return cache


def _verifier(seen: list):  # type: ignore[no-untyped-def]
    def verify(kind: str, target) -> str:  # type: ignore[no-untyped-def]
        assert os.environ["HF_HUB_OFFLINE"] == "1"  # loads are proven from local files alone
        seen.append((kind, target.name if kind == "embed" else target[0]))
        return "loads"

    return verify


def test_fetch_all_reports_the_gated_fallback_verifies_and_then_stages_find_everything(settings, hf_cache) -> None:
    specs = load_registry()
    fetcher, seen = FakeFetcher(hf_cache), []
    out = fetch_models.run(settings, specs, fetcher=fetcher, verify=_verifier(seen))
    by = {o.name: o for o in out}
    assert set(by) == {*specs, "u2net"} and all(o.ok for o in out), fetch_models.report(out)
    dino = by["dinov3_base"]
    assert dino.source == "timm vit_base_patch16_dinov3.lvd1689m"
    assert any("gated weights NOT granted for " + DINOV3 in n for n in dino.notes)
    assert "hf auth login" in dino.notes[0]
    assert by["clip_vitb32"].notes == ["fetched"] and by["u2net"].notes == ["fetched"]
    assert sorted(seen) == sorted([("embed", n) for n in specs] + [("bg", "u2net")])
    # what the fetcher put is exactly what the stages look for
    check = weights.preflight_embedding(specs)
    assert check.ok and check.all_local
    assert weights.locate_rembg("u2net", settings.home / "models" / "rembg") is not None
    assert not demo_models.choose(settings, "auto", settings.home / "standin").warning
    # a second run fetches nothing
    again = fetch_models.run(settings, specs, fetcher=FakeFetcher(hf_cache, fail=True), verify=None)
    assert all(o.ok and o.notes[0] == "already in the local cache" for o in again if o.name != "dinov3_base")
    assert by["dinov3_base"].ok


def test_granted_dinov3_says_so(settings, hf_cache) -> None:
    specs = {"dinov3_base": load_registry()["dinov3_base"]}
    out = fetch_models.run(settings, specs, bg_model=None, fetcher=FakeFetcher(hf_cache, granted=True), verify=None)
    (o,) = out
    assert o.ok and o.source == f"transformers {DINOV3}" and o.notes == ["fetched", "gated weights granted"]


def test_network_failure_is_one_line_per_model_and_exit_1(settings, hf_cache, monkeypatch, capsys) -> None:
    monkeypatch.setattr(fetch_models, "Fetcher", lambda: FakeFetcher(hf_cache, fail=True))
    assert fetch_models.main(["--only", "clip_vitb32,u2net", "--no-verify"]) == 1
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("MISSING")]
    assert len(lines) == 2
    assert all("ConnectionError: cannot reach the hub" in ln and "noise" not in ln for ln in lines)
    assert fetch_models.main(["--only", "nosuchmodel"]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Counting(http.server.BaseHTTPRequestHandler):
    hits = 0

    def _any(self) -> None:
        type(self).hits += 1
        self.send_response(404)
        self.end_headers()

    do_GET = do_HEAD = _any

    def log_message(self, *a) -> None:  # type: ignore[no-untyped-def]
        pass


def _embed_env(home: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    (tmp_path / "empty_hf").mkdir(exist_ok=True)
    env.update(
        IMAGESELECTOR_HOME=str(home),
        HF_HOME=str(tmp_path / "empty_hf"),
        XDG_CACHE_HOME=str(tmp_path / "empty_xdg"),
        **extra,
    )
    env.pop("IMAGESELECTOR_MODELS_FILE", None)
    return env


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_offline_embed_says_what_is_missing_in_one_line_without_touching_the_hub(home, tmp_path) -> None:
    _Counting.hits = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = _embed_env(home, tmp_path, HF_HUB_OFFLINE="1", HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}")
        proc = subprocess.run(
            [sys.executable, str(ROOT / "image_search_v2" / "embed.py"), "--model", "all"],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    line = _one_error_line(proc)
    for name in ("clip_vitb32", "clip_vitl14", "dinov2_base", "dinov2_large", "dinov3_base"):
        assert name in line
    assert "HF_HUB_OFFLINE" in line and line.endswith(f"fetch them with: {weights.FETCH_COMMAND}")
    assert _Counting.hits == 0


def test_unreachable_hub_is_one_line_too(home, tmp_path) -> None:
    env = _embed_env(home, tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    proc = subprocess.run(
        [sys.executable, str(ROOT / "image_search_v2" / "embed.py"), "--model", "dinov2_base"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    line = _one_error_line(proc)
    assert "model weights missing for dinov2_base (" in line and "is unreachable" in line
    assert weights.FETCH_COMMAND in line


def test_offline_bg_without_u2net_says_so(home, tmp_path) -> None:
    env = _embed_env(home, tmp_path, HF_HUB_OFFLINE="1")
    env.pop("U2NET_HOME", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bg_remover.py")], env=env, capture_output=True, text=True, timeout=300
    )
    line = _one_error_line(proc)
    assert "model weights missing for u2net (no u2net.onnx in" in line and weights.FETCH_COMMAND in line


def test_demo_banner_points_at_the_fetch_command() -> None:
    assert weights.FETCH_COMMAND in demo_models.STANDIN_WARNING
