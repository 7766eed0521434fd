"""The Ray pool on a real local cluster that the test starts and stops."""

from __future__ import annotations

import os
import signal
import time

import pytest

ray = pytest.importorskip("ray")

from imageselector.scaleout import RayPool, RayUnavailable, connect_ray  # noqa: E402
from tests.helpers.ray_cluster import free_port, local_cluster  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_cluster(tmp_path_factory.mktemp("ray")) as address:
        yield address


def test_pool_maps_every_batch_once_across_actors(cluster) -> None:
    pool = RayPool("tests.helpers.ray_compute:make_doubler", {"delay_s": 0.05}, address=cluster, replicas=2)
    try:
        out = dict(pool.map((k, [k, k + 1]) for k in range(10)))
        assert out.keys() == set(range(10))
        assert all(out[k]["out"] == [2 * k, 2 * k + 2] for k in out)
        assert len({v["pid"] for v in out.values()}) == 2  # both replicas worked
    finally:
        pool.close()


def test_actor_killed_mid_batch_is_redone_without_loss_or_duplicate(cluster) -> None:
    pool = RayPool("tests.helpers.ray_compute:make_doubler", {"delay_s": 1.0}, address=cluster, replicas=2)
    try:
        victim = ray.get(pool.actors[0].pid.remote())
        for k in range(4):
            pool.submit(k, [k])
        time.sleep(0.3)
        os.kill(victim, signal.SIGKILL)
        got = []
        while (item := pool.wait_one(timeout_s=60)) is not None:
            got.append(item[0])
        assert sorted(got) == [0, 1, 2, 3]
        assert pool.restarts >= 1
    finally:
        pool.close()


def test_unreachable_cluster_fails_fast_with_clear_message() -> None:
    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(RayUnavailable, match=f"127.0.0.1:{port} is not reachable"):
        connect_ray(f"127.0.0.1:{port}", timeout_s=1.0)
    assert time.monotonic() - t0 < 10
