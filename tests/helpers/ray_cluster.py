"""A real Ray head on 127.0.0.1 for the scale-out tests: started by the test, stopped after it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RAY_BIN = Path(sys.executable).parent / "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_cluster(tmp: Path, num_cpus: int = 2) -> Iterator[str]:
    """Yield the head's address. Token auth is off: a throwaway loopback cluster the test driver joins."""
    import ray

    port = free_port()
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(
        [str(RAY_BIN), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
         "--include-dashboard=false", f"--temp-dir={tmp}", "--disable-usage-stats"],
        check=True, env=env, capture_output=True, timeout=120,
    )  # fmt: skip
    try:
        yield f"127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([str(RAY_BIN), "stop", "--force"], env=env, capture_output=True, timeout=120)
