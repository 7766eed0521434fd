#!/usr/bin/env python3
"""Benchmark the Ray backend of the embedding stage on a local cluster (127.0.0.1).

ViT-B-32 at its real size with random weights. The same images, the same batch size:
  - Ray with 1 actor (1 thread), then Ray with 2 actors (1 thread each), through `run_remote`
    (claim, read bytes, ship, decode + preprocess + forward in the actor, index append, flush, flags);
  - the local path with 2 torch threads (`EmbedStage.run`).
Prints images/s for each, the scaling ratio 2 actors / 1 actor (goal >= 1.7 on 2 cores) and
Ray 2 actors / local 2 threads (goal >= 0.9). Actor start-up and model loading are excluded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["RAY_AUTH_MODE"] = "disabled"  # a throwaway loopback cluster

from imageselector import db  # noqa: E402
from imageselector.config import load_settings  # noqa: E402
from imageselector.stopping import Stopper  # noqa: E402
from tests.helpers.ray_cluster import local_cluster  # noqa: E402


def _bench_embed_module():
    spec = importlib.util.spec_from_file_location("bench_embed", ROOT / "bench" / "embed.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def make_template(root: Path, n: int) -> Path:
    home = root / "template"
    home.mkdir()
    settings = load_settings(home)
    conn = db.connect(settings.db_path)
    _bench_embed_module().make_images(settings, conn, n)
    conn.close()
    registry = root / "models.json"
    registry.write_text(
        json.dumps(
            {"version": 1, "models": {"clip_vitb32": {"library": "open_clip", "source": "ViT-B-32", "dim": 512}}}
        )
    )
    return registry


def fresh(root: Path, name: str) -> Path:
    home = root / name
    shutil.copytree(root / "template", home)
    return home


def run_local(home: Path, registry: Path, batch: int, threads: int, dtype: str) -> float:
    import torch

    from imageselector.embedding.stage import EmbedStage, Options
    from imageselector.models.encoders import load_encoder
    from imageselector.models.registry import load_registry

    torch.set_num_threads(threads)
    settings = load_settings(home)
    conn = db.connect(settings.db_path)
    enc = {"clip_vitb32": load_encoder(load_registry(registry)["clip_vitb32"], "cpu", dtype)}
    stage = EmbedStage(settings, conn, enc, Options(batch_size=batch, workers=2, progress_s=1e9),
                       Stopper(home, ("KILL_EMBED",), install_signals=False))  # fmt: skip
    stage.open()
    t0 = time.perf_counter()
    stage.run()
    took = time.perf_counter() - t0
    conn.close()
    return took


def run_ray(home: Path, registry: Path, address: str, actors: int, batch: int, dtype: str) -> float:
    import ray

    from imageselector.embedding.remote import run_remote
    from imageselector.embedding.stage import EmbedStage, Options
    from imageselector.models.encoders import load_encoder
    from imageselector.models.registry import load_registry
    from imageselector.scaleout import RayPool

    settings = load_settings(home)
    conn = db.connect(settings.db_path)
    enc = {"clip_vitb32": load_encoder(load_registry(registry)["clip_vitb32"], "cpu", dtype)}
    kwargs = {"models_file": str(registry), "models": ["clip_vitb32"], "device": "cpu", "dtype": dtype}
    pool = RayPool("imageselector.embedding.compute:make_embed_compute", kwargs, address=address,
                   replicas=actors, threads_per_actor=1)  # fmt: skip
    ray.get([a.pid.remote() for a in pool.actors])  # wait until every replica has loaded its model
    # warm each actor once (first forward allocates), on no rows: an empty batch
    ray.get([a.run.remote({"images": [], "want": {"clip_vitb32": []}}) for a in pool.actors])
    stage = EmbedStage(settings, conn, enc, Options(batch_size=batch, progress_s=1e9),
                       Stopper(home, ("KILL_EMBED",), install_signals=False))  # fmt: skip
    stage.open()
    t0 = time.perf_counter()
    run_remote(stage, pool)
    took = time.perf_counter() - t0
    pool.close()
    done = conn.execute("SELECT SUM(embed_clip_vitb32) FROM image_status").fetchone()[0]
    conn.close()
    assert done == conn_rows(home), "not every image was embedded"
    return took


def conn_rows(home: Path) -> int:
    c = db.connect(home / "etsy_data.db")
    n = c.execute("SELECT COUNT(*) FROM image_status").fetchone()[0]
    c.close()
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dtype", default="fp32", help="fp32 (default) or bf16")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        registry = make_template(root, args.images)
        n = args.images
        local_s = run_local(fresh(root, "local"), registry, args.batch, 2, args.dtype)
        print(f"local, 2 torch threads:  {n / local_s:7.2f} images/s ({local_s:.1f}s)", flush=True)
        with local_cluster(root / "ray", num_cpus=2) as address:
            one = run_ray(fresh(root, "ray1"), registry, address, 1, args.batch, args.dtype)
            print(f"Ray, 1 actor x 1 thread: {n / one:7.2f} images/s ({one:.1f}s)", flush=True)
            two = run_ray(fresh(root, "ray2"), registry, address, 2, args.batch, args.dtype)
            print(f"Ray, 2 actors x 1 thread:{n / two:7.2f} images/s ({two:.1f}s)", flush=True)
    print(f"Ray 2 actors / local 2 threads: {local_s / two:.2f} (goal >= 0.9)")
    print(f"scaling 2 actors / 1 actor: {one / two:.2f} (goal >= 1.7)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
