"""Run a stage's compute on a Ray cluster while the stage process stays the only writer.

The stage process claims batches as always, sends each batch's image bytes to a pool of Ray actors
(one model replica each), and receives cutouts or vectors back; it alone writes files, FAISS
indexes and flags. A compute is built from a *factory*, `"module:function"` plus keyword arguments,
that returns a callable `payload -> result`. The local path calls the very same factory in-process,
so Ray results equal local results by construction.

Failure model:
- An actor (or its node) dies: its batches are resubmitted to a fresh actor. Nothing is committed
  until a result is back, so nothing is committed twice or lost.
- The main process dies: its leases expire and the rows are claimed again (the claim protocol).
- The cluster is unreachable: `RayUnavailable` with a clear message; the stage falls back to local
  compute or waits and retries, as configured (`--ray-fallback local|wait`).

`ray` is an optional extra (`pip install -r requirements-ray.txt`); it is imported lazily.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imageselector

log = logging.getLogger(__name__)


class RayUnavailable(RuntimeError):
    """The Ray cluster cannot be reached (or ray is not installed)."""


def build_compute(factory: str, kwargs: dict[str, Any]) -> Callable[[Any], Any]:
    """Import `module:function` and call it with kwargs: the one way both paths build a compute."""
    module_name, _, func_name = factory.partition(":")
    fn = getattr(importlib.import_module(module_name), func_name)
    return fn(**kwargs)


class _ComputeActorImpl:
    """Body of the Ray actor: holds one model replica and applies it to payloads."""

    def __init__(self, factory: str, kwargs: dict[str, Any], threads: int | None) -> None:
        if threads:
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                os.environ[var] = str(threads)
            try:
                import torch

                torch.set_num_threads(threads)
            except ImportError:
                pass
        self.compute = build_compute(factory, kwargs)

    def run(self, payload: Any) -> Any:
        return self.compute(payload)

    def pid(self) -> int:

        return os.getpid()


@dataclass
class _Task:
    key: Any
    payload: Any
    actor_index: int
    generation: int
    ref: Any
    tries: int = 1
    submitted: float = field(default_factory=time.monotonic)


def connect_ray(address: str, *, timeout_s: float = 15.0, num_cpus: int | None = None) -> Any:
    """Connect to a cluster (`ray://host:port`, `host:port`, `auto`) or start a local one (`local`)."""
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - the extra is installed in dev
        raise RayUnavailable("ray is not installed: venv/bin/pip install -r requirements-ray.txt") from exc
    if ray.is_initialized():
        return ray

    # Ship this package's code to the workers, so a worker node needs only the same venv (torch, rembg, ...).
    package_dir = str(Path(imageselector.__file__).resolve().parent)
    kw: dict[str, Any] = {
        "log_to_driver": False,
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "runtime_env": {"py_modules": [package_dir]},
    }
    if address == "local":
        kw["num_cpus"] = num_cpus
    else:
        kw["address"] = address
        if not _reachable(address, timeout_s):
            raise RayUnavailable(f"Ray cluster at {address} is not reachable (no answer within {timeout_s:.0f}s)")
    try:
        ray.init(**kw)
    except Exception as exc:  # noqa: BLE001 - ray raises many types here
        raise RayUnavailable(f"Ray cluster at {address} could not be joined: {exc}") from exc
    return ray


def _reachable(address: str, timeout_s: float) -> bool:
    """A TCP probe of the GCS port, so an unreachable cluster fails fast instead of hanging in ray.init."""

    if address in ("auto",):
        return True
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return True  # let ray interpret it
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=min(2.0, timeout_s)):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)


class RayPool:
    """A pool of compute actors with bounded in-flight work and resubmission on actor death."""

    def __init__(
        self,
        factory: str,
        kwargs: dict[str, Any],
        *,
        address: str = "local",
        replicas: int | None = None,
        threads_per_actor: int | None = None,
        max_in_flight_per_actor: int = 2,
        max_tries: int = 3,
        num_cpus_local: int | None = None,
    ) -> None:
        self.ray = connect_ray(address, num_cpus=num_cpus_local)
        self.factory, self.kwargs = factory, kwargs
        self.threads = threads_per_actor
        self.max_tries = max_tries
        gpus = int(self.ray.cluster_resources().get("GPU", 0))
        cpus = int(self.ray.cluster_resources().get("CPU", 1))
        if gpus:
            self.options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1}
            default_replicas = gpus
        else:
            per = max(1, threads_per_actor or 1)
            self.options = {"num_cpus": per}
            default_replicas = max(1, cpus // per)
        self.n = replicas or default_replicas
        self.max_in_flight = self.n * max_in_flight_per_actor
        self._actor_cls = self.ray.remote(_ComputeActorImpl)
        self.actors = [self._new_actor() for _ in range(self.n)]
        self._load = [0] * self.n
        self._generation = [0] * self.n
        self.pending: dict[Any, _Task] = {}  # ref -> task
        self.done: deque[tuple[Any, Any]] = deque()
        self.restarts = 0
        log.info("Ray pool: %d actor(s) with %s each (cluster has %d CPU, %d GPU)", self.n, self.options, cpus, gpus)

    def _new_actor(self) -> Any:
        return self._actor_cls.options(**self.options, max_restarts=0).remote(self.factory, self.kwargs, self.threads)

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    def has_room(self) -> bool:
        return self.in_flight < self.max_in_flight

    def submit(self, key: Any, payload: Any, tries: int = 1) -> None:
        i = min(range(self.n), key=lambda j: self._load[j])
        ref = self.actors[i].run.remote(payload)
        self._load[i] += 1
        self.pending[ref] = _Task(key, payload, i, self._generation[i], ref, tries)

    def _replace_actor(self, i: int, generation: int) -> None:
        """Replace actor i, unless another failed task of the same dead actor already did."""
        if self._generation[i] != generation:
            return
        self._generation[i] += 1
        try:
            self.ray.kill(self.actors[i], no_restart=True)
        except Exception:  # noqa: BLE001 - it is already dead
            pass
        self.actors[i] = self._new_actor()
        self._load[i] = 0
        self.restarts += 1

    def wait_one(self, timeout_s: float | None = None) -> tuple[Any, Any] | None:
        """Block until one batch is back; returns (key, result), or None on timeout / nothing pending."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

        while not self.done:
            if not self.pending:
                return None
            ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=timeout_s)
            if not ready:
                return None
            task = self.pending.pop(ready[0])
            if task.generation == self._generation[task.actor_index]:
                self._load[task.actor_index] = max(0, self._load[task.actor_index] - 1)
            try:
                self.done.append((task.key, self.ray.get(ready[0])))
            except (RayActorError, ActorDiedError, ActorUnavailableError) as exc:
                if task.tries >= self.max_tries:
                    raise RuntimeError(f"batch {task.key!r} failed on {task.tries} actors: {exc}") from exc
                log.warning("actor %d died (%s); resubmitting batch %r", task.actor_index, type(exc).__name__, task.key)
                self._replace_actor(task.actor_index, task.generation)
                self.submit(task.key, task.payload, task.tries + 1)
        return self.done.popleft()

    def map(self, items: Iterator[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
        """Submit with backpressure and yield results as they come back."""
        for key, payload in items:
            while not self.has_room():
                got = self.wait_one()
                if got is not None:
                    yield got
            self.submit(key, payload)
        while self.pending or self.done:
            got = self.wait_one()
            if got is not None:
                yield got

    def alive(self) -> bool:
        """Whether the cluster still has a live node (False when the head is gone)."""
        try:
            return any(n.get("Alive") for n in self.ray.nodes())
        except Exception:  # noqa: BLE001 - a lost GCS raises various errors
            return False

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self.actors = []


class RemoteStageRunner:
    """The stage loop with the compute on Ray: several claimed batches in flight, one writer.

    `claim()` leases a batch and returns `(batch, ctx, payload)` (or None when no work is ready);
    `commit(batch, ctx, result)` makes the results durable and sets the flags. Batches are committed
    as their results come back; a stop waits `grace_s` for those in flight, then releases the rest.
    """

    def __init__(
        self,
        pool: RayPool,
        claim: Callable[[], tuple[Any, Any, Any] | None],
        commit: Callable[[Any, Any, Any], None],
        *,
        stalled_s: float = 300.0,
        grace_s: float = 20.0,
    ) -> None:
        self.pool = pool
        self.claim = claim
        self.commit = commit
        self.stalled_s = stalled_s
        self.grace_s = grace_s
        self.inflight: dict[int, tuple[Any, Any]] = {}
        self._next_key = 0

    def run_batch(self) -> int:
        """Top up the batches in flight, then commit one that came back. Returns rows handled (0: no work)."""
        while self.pool.has_room():
            got = self.claim()
            if got is None:
                break
            batch, ctx, payload = got
            key = self._next_key
            self._next_key += 1
            self.inflight[key] = (batch, ctx)
            self.pool.submit(key, payload)
        if not self.inflight:
            return 0
        waited = 0.0
        while True:
            got = self.pool.wait_one(timeout_s=10.0)
            if got is not None:
                break
            waited += 10.0
            if waited >= self.stalled_s or not self.pool.alive():
                raise RayUnavailable(f"no result from the Ray cluster for {waited:.0f}s: it looks unreachable")
        key, result = got
        batch, ctx = self.inflight.pop(key)
        with batch:
            self.commit(batch, ctx, result)
        return max(1, len(batch))

    def drain(self) -> None:
        """On stop: commit what comes back within the grace period, release everything else."""
        deadline = time.monotonic() + self.grace_s
        try:
            while self.inflight and time.monotonic() < deadline:
                got = self.pool.wait_one(timeout_s=max(0.1, deadline - time.monotonic()))
                if got is None:
                    break
                batch, ctx = self.inflight.pop(got[0])
                with batch:
                    self.commit(batch, ctx, got[1])
        except Exception as exc:  # noqa: BLE001 - the cluster may be gone; releasing is what matters
            log.warning("while draining Ray results: %s", exc)
        self.abandon()

    def abandon(self) -> None:
        """Release every batch still in flight (its rows become claimable at once)."""
        for batch, _ctx in self.inflight.values():
            batch.__exit__(None, None, None)
        self.inflight.clear()


def add_ray_arguments(ap: Any) -> None:
    """The Ray flags shared by bg_remover.py and embed.py."""
    g = ap.add_argument_group("Ray backend (optional: pip install -r requirements-ray.txt)")
    g.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run the compute on a Ray cluster (host:port of its head, 'auto', or 'local'); "
        "setting IMAGESELECTOR_RAY_ADDRESS",
    )
    g.add_argument(
        "--ray-replicas", type=int, help="model replicas (default: one per GPU, else per --ray-threads CPUs)"
    )
    g.add_argument("--ray-threads", type=int, default=None, help="CPU threads per replica (default 1 on CPU clusters)")
    g.add_argument(
        "--ray-fallback",
        choices=("local", "wait"),
        default="local",
        help="when the cluster is unreachable: compute locally (default) or wait and retry",
    )


def ray_address(args: Any, settings: Any) -> str | None:
    return getattr(args, "ray", None) or settings.get("IMAGESELECTOR_RAY_ADDRESS") or None


def open_pool_or_fallback(
    factory: str,
    kwargs: dict[str, Any],
    args: Any,
    address: str,
    stopper: Any,
    logger: logging.Logger,
    *,
    retry_s: float = 30.0,
) -> RayPool | None:
    """Connect to the cluster; on failure return None (fall back to local) or wait, as `--ray-fallback` says."""
    while True:
        try:
            return RayPool(
                factory,
                kwargs,
                address=address,
                replicas=args.ray_replicas,
                threads_per_actor=args.ray_threads or 1,
            )
        except RayUnavailable as exc:
            if args.ray_fallback == "local":
                logger.warning("%s; computing locally instead (--ray-fallback local)", exc)
                return None
            logger.warning("%s; retrying in %.0fs (--ray-fallback wait)", exc, retry_s)
            if stopper.wait(retry_s):
                return None


def after_cluster_loss(exc: Exception, args: Any, logger: logging.Logger) -> int | None:
    """The cluster went away mid-run (in-flight batches already released): None = go on locally, else exit 1."""
    if args.ray_fallback == "local":
        logger.warning("%s; released the batches in flight and continuing locally", exc)
        return None
    logger.error("%s; released the batches in flight; exiting so the monitor restarts the stage", exc)
    return 1
