"""Background removal through the Ray backend, on a local cluster the test starts and stops."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

pytest.importorskip("ray")

from imageselector import db  # noqa: E402
from tests.helpers.bg import SCRIPT, flags, seed_downloaded, standin_in_home  # noqa: E402
from tests.helpers.ray_cluster import free_port, local_cluster  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_cluster(tmp_path_factory.mktemp("ray")) as address:
        yield address


def _run(home, *args, timeout=180):
    env = {**os.environ, "IMAGESELECTOR_HOME": str(home), "RAY_AUTH_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _twin_homes(tmp_path, n):
    homes = []
    for name in ("ray", "local"):
        h = tmp_path / name
        h.mkdir()
        conn = db.connect(h / "etsy_data.db")
        seed_downloaded(conn, h / "images", n)
        conn.close()
        standin_in_home(h)
        homes.append(h)
    return homes


def test_ray_results_equal_local_results(tmp_path, cluster) -> None:
    ray_home, local_home = _twin_homes(tmp_path, 6)
    model = ["--model-path", "models/rembg/standin.onnx"]
    r = _run(ray_home, *[a if a != model[1] else str(ray_home / model[1]) for a in model], "--ray", cluster)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "on Ray at" in (ray_home / "bg_remover.log").read_text()
    r = _run(local_home, "--model-path", str(local_home / model[1]))
    assert r.returncode == 0, r.stderr[-2000:]
    files = sorted(p.relative_to(ray_home / "images") for p in (ray_home / "images").rglob("*.jpg"))
    assert len(files) == 6
    for rel in files:
        assert (ray_home / "images" / rel).read_bytes() == (local_home / "images" / rel).read_bytes()
    for h in (ray_home, local_home):
        conn = db.connect(h / "etsy_data.db")
        assert flags(conn) == {"done": 6, "parked": 0, "n": 6}
        conn.close()


def test_unreachable_cluster_falls_back_to_local(tmp_path) -> None:
    home, _ = _twin_homes(tmp_path, 3)
    dead = f"127.0.0.1:{free_port()}"
    r = _run(home, "--model-path", str(home / "models/rembg/standin.onnx"), "--ray", dead, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    log = (home / "bg_remover.log").read_text()
    assert f"Ray cluster at {dead} is not reachable" in log and "computing locally instead" in log
    conn = db.connect(home / "etsy_data.db")
    assert flags(conn)["done"] == 3
    conn.close()


def test_unreachable_cluster_waits_until_kill_file(tmp_path) -> None:
    home, _ = _twin_homes(tmp_path, 2)
    dead = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "IMAGESELECTOR_HOME": str(home)}
    p = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--model-path", str(home / "models/rembg/standin.onnx"), "--ray", dead,
         "--ray-fallback", "wait"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 90
    while "retrying in" not in _read(home / "bg_remover.log") and time.time() < deadline:
        time.sleep(0.5)
    (home / "KILL_BG").touch()
    t0 = time.time()
    assert p.wait(timeout=60) == 0
    assert time.time() - t0 < 15
    conn = db.connect(home / "etsy_data.db")
    assert flags(conn)["done"] == 0  # it waited; nothing was done behind the user's back
    conn.close()


def test_kill_file_stops_ray_stage_and_releases_leases(tmp_path, cluster) -> None:
    home, _ = _twin_homes(tmp_path, 4)
    env = {**os.environ, "IMAGESELECTOR_HOME": str(home), "RAY_AUTH_MODE": "disabled"}
    p = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--model-path", str(home / "models/rembg/standin.onnx"), "--ray", cluster,
         "--watch", "--poll", "0.5"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    conn = db.connect(home / "etsy_data.db")
    deadline = time.time() + 120
    while flags(conn)["done"] < 4 and time.time() < deadline:
        time.sleep(0.5)
    assert flags(conn)["done"] == 4
    (home / "KILL_BG").touch()
    t0 = time.time()
    assert p.wait(timeout=60) == 0
    assert time.time() - t0 < 15
    assert conn.execute("SELECT COUNT(*) FROM image_status WHERE bg_claim IS NOT NULL").fetchone()[0] == 0
    conn.close()
    shutil.rmtree(home / "images")


def _read(path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""
