"""Embedding through the Ray backend, on a local cluster the test starts and stops."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from imageselector import db  # noqa: E402
from imageselector.vectorstore.store import open_snapshot  # noqa: E402
from tests.helpers.embed_checks import check_no_lies, check_store_files, check_texts  # noqa: E402
from tests.helpers.embed_data import seed_embeddable  # noqa: E402
from tests.helpers.embed_fixtures import standin_registry  # noqa: E402, F401
from tests.helpers.ray_cluster import local_cluster  # noqa: E402

EMBED = Path(__file__).resolve().parent.parent / "image_search_v2" / "embed.py"
MODELS = ["clip_vitb32", "clip_vitl14", "dinov2_base", "dinov2_large", "dinov3_base"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_cluster(tmp_path_factory.mktemp("ray")) as address:
        yield address


def _home(tmp_path: Path, name: str, n: int) -> Path:
    h = tmp_path / name
    h.mkdir()
    conn = db.connect(h / "etsy_data.db")
    seed_embeddable(conn, h / "images", n, size=(96, 80))
    conn.close()
    return h


def _cmd(home: Path, registry: Path, *extra: str) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "IMAGESELECTOR_HOME": str(home), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(EMBED), "--models-file", str(registry), "--model", "all", "--batch-size", "4",
           "--device", "cpu", "--dtype", "fp32", *extra]  # fmt: skip
    return cmd, env


def _vectors(home: Path, m: str) -> dict[int, np.ndarray]:
    snap = open_snapshot(home / "embeddings", m)
    return {int(g): v for keys, vecs in snap.iter_chunks() for g, v in zip(keys, vecs, strict=True)}


def test_ray_vectors_equal_local_vectors(tmp_path, cluster, standin_registry) -> None:  # noqa: F811
    ray_home, local_home = _home(tmp_path, "ray", 9), _home(tmp_path, "local", 9)
    cmd, env = _cmd(ray_home, standin_registry, "--ray", cluster)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on Ray at" in (ray_home / "embed.log").read_text()
    cmd, env = _cmd(local_home, standin_registry)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    for m in MODELS:
        a, b = _vectors(ray_home, m), _vectors(local_home, m)
        assert a.keys() == b.keys() and len(a) == 9
        for g in a:
            np.testing.assert_allclose(a[g], b[g], rtol=0, atol=1e-5)
    conn = db.connect(ray_home / "etsy_data.db")
    check_no_lies(conn, ray_home / "embeddings", MODELS, exact=True)
    check_texts(conn, ray_home / "embeddings", ["clip_vitb32", "clip_vitl14"])
    check_store_files(ray_home / "embeddings", MODELS)
    conn.close()


def _actor_pids() -> list[int]:
    pids = []
    for p in psutil.process_iter(["pid", "cmdline", "name"]):
        text = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
        if "_ComputeActorImpl" in text:
            pids.append(p.info["pid"])
    return pids


def test_actor_killed_mid_run_loses_and_duplicates_nothing(tmp_path, cluster, standin_registry) -> None:  # noqa: F811
    home = _home(tmp_path, "kill", 40)
    cmd, env = _cmd(home, standin_registry, "--ray", cluster, "--ray-replicas", "2", "--batch-size", "2")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = 0
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not killed:
        pids = _actor_pids()
        log = home / "embed.log"
        if pids and log.exists() and "on Ray at" in log.read_text():
            time.sleep(0.3)
            try:
                os.kill(pids[0], 9)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    assert proc.wait(timeout=240) == 0
    assert killed == 1
    conn = db.connect(home / "etsy_data.db")
    counts = check_no_lies(conn, home / "embeddings", MODELS, exact=True)
    assert all(n == 40 for n in counts.values()), counts
    assert (
        conn.execute("SELECT COUNT(*) FROM image_status WHERE embed_clip_vitb32_claim IS NOT NULL").fetchone()[0] == 0
    )
    conn.close()
