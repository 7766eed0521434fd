#!/usr/bin/env python3
"""Benchmark the background-removal stage against bare onnxruntime on the same model and images.

Model: U^2-Net at its published size (bench/u2net_arch.py, 44.0M parameters, random weights since
the real ones are on GitHub), exported once to bench/out/u2net_home/u2net.onnx and loaded the
production way: `--model u2net` found in U2NET_HOME, no download.
Images: skimage's bundled photos resized to Etsy's 570xN, written as JPEG downloads.

Two ways, same session (providers, threads, batch size), same images, same 320x320 input:
  end to end: LocalBgRunner under worker.run_loop, as scripts/bg_remover.py runs it (claim rows, read and
              decode, prepare, onnxruntime, mask, composite, JPEG with marker, atomic write with
              fsync, flag), timed from the first claim to the last flag; process start and model load excluded
  bare:       inner_session.run on pre-made input tensors
Rounds alternate (bare, end to end, ...); the machine is shared, so the ratio printed last is the median of
the per-round ratios (each pair ran under similar load), with best/best beside it. Also printed: CPU
seconds per image of each way (process CPU time over all threads), whose ratio is insensitive to other
load on the machine. Goal: ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from imageselector import db, layout  # noqa: E402
from imageselector.background.compute import BgCompute  # noqa: E402
from imageselector.background.providers import choose_providers  # noqa: E402
from imageselector.background.session import open_model  # noqa: E402
from imageselector.background.stage import BgStageOptions, BgWriter, LocalBgRunner  # noqa: E402
from imageselector.config import load_settings  # noqa: E402
from imageselector.stopping import Stopper  # noqa: E402
from imageselector.worker import run_loop  # noqa: E402

OUT = ROOT / "bench" / "out"
U2NET_HOME = OUT / "u2net_home"
SAMPLES = (
    "astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "ihc.png",
    "hubble_deep_field.jpg", "retina.jpg", "color.png", "horse.png",
)  # fmt: skip


def ensure_model() -> Path:
    path = U2NET_HOME / "u2net.onnx"
    if not path.is_file():
        sys.path.insert(0, str(ROOT / "bench"))
        from u2net_arch import export_u2net

        t0 = time.perf_counter()
        params = export_u2net(path)
        print(
            f"exported U2NET ({params / 1e6:.1f}M params, random weights) to {path} in {time.perf_counter() - t0:.0f}s"
        )
    return path


def sample_images(n: int) -> list[bytes]:
    import io

    import skimage.data

    folder = Path(skimage.data.__file__).parent
    out = []
    for i in range(n):
        im = Image.open(folder / SAMPLES[i % len(SAMPLES)]).convert("RGB")
        if i >= len(SAMPLES):
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im = im.resize((570, max(2, round(570 * im.height / im.width))), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=88)
        out.append(buf.getvalue())
    return out


def fresh_home(images: list[bytes]) -> Path:
    home = OUT / "bg_home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    conn = db.connect(home / "etsy_data.db")
    rows = [
        dict(listing_id=7000 + i, image_id=8_000_000 + i, shop_id=1, hex="abcdef", suffix="x", is_primary=1,
             when_made="2020_2026", price=1.0)
        for i in range(len(images))
    ]  # fmt: skip
    db.upsert_images(conn, rows)
    conn.execute("UPDATE image_status SET download_done=1")
    conn.close()
    for r, data in zip(rows, images, strict=True):
        p = layout.image_path(home / "images", r["listing_id"], r["image_id"])
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return home


def run_e2e(model, images: list[bytes], claim_size: int) -> tuple[float, float]:
    """images/s and CPU seconds per image (all threads of this process)."""
    home = fresh_home(images)
    settings = load_settings(home)
    conn = db.connect(settings.db_path)
    log = logging.getLogger("bench.bg")
    stopper = Stopper(home, [], install_signals=False)
    writer = BgWriter(settings, conn, BgStageOptions(claim_size=claim_size), stopper, log)
    runner = LocalBgRunner(writer, BgCompute(model, (255, 255, 255), 95))
    t0, c0 = time.perf_counter(), time.process_time()
    run_loop(runner.run_batch, stopper, watch=False, logger=log)
    runner.close()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    done = conn.execute("SELECT COUNT(*) FROM image_status WHERE bg_removed=1").fetchone()[0]
    conn.close()
    assert done == len(images) == writer.processed, (done, writer.processed)
    return len(images) / dt, cpu / len(images)


def run_bare(model, tensors: list[np.ndarray]) -> tuple[float, float]:
    sess, name, b = model.session.inner_session, model.input_name, model.max_batch
    batches = [np.stack(tensors[i : i + b]) for i in range(0, len(tensors), b)]
    t0, c0 = time.perf_counter(), time.process_time()
    for x in batches:
        sess.run(None, {name: x})
    return len(tensors) / (time.perf_counter() - t0), (time.process_time() - c0) / len(tensors)


def overhead_cpu(model, images: list[bytes]) -> tuple[float, float]:
    """CPU seconds per image of the stage's own work around inference, measured single-threaded."""
    from imageselector.background.imaging import composite, decode, encode_jpeg, marker_text
    from imageselector.background.session import mask_from_pred
    from imageselector.fsutil import atomic_write_bytes

    tmp = OUT / "overhead"
    tmp.mkdir(parents=True, exist_ok=True)
    c0 = time.process_time()
    decoded = [decode(b).img for b in images]
    tensors = [model.prepare(img) for img in decoded]
    c1 = time.process_time()
    pred = np.random.default_rng(0).random((320, 320), dtype=np.float32)
    for i, img in enumerate(decoded):
        data = encode_jpeg(
            composite(img, mask_from_pred(pred, img.size), (255, 255, 255)), marker_text("u2net", (255, 255, 255)), 95
        )
        atomic_write_bytes(tmp / f"{i}.jpg", data, tmp_dir=tmp / ".tmp")
    c2 = time.process_time()
    shutil.rmtree(tmp, ignore_errors=True)
    assert len(tensors) == len(images)
    return (c1 - c0) / len(images), (c2 - c1) / len(images)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--claim-size", type=int, default=32)
    ap.add_argument("--provider")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    ensure_model()
    os.environ["U2NET_HOME"] = str(U2NET_HOME)
    images = sample_images(args.images)
    settings = load_settings(OUT / "bg_home")
    choice = choose_providers(provider=args.provider)
    model = open_model(
        settings, "u2net", model_path=None, choice=choice, threads=args.threads, batch_size=args.batch_size
    )
    assert model.fast
    from imageselector.background.imaging import decode

    tensors = [model.prepare(decode(b).img) for b in images]  # type: ignore[arg-type]
    run_bare(model, tensors[:2])  # warm-up
    print(
        f"model u2net (U2NET architecture, 44.0M params, random weights), {len(images)} images 570xN -> 320x320, "
        f"provider {model.providers[0]}, intra-op threads {args.threads}, batch {model.max_batch}, cores {os.cpu_count()}"
    )
    pre, post = overhead_cpu(model, images)
    print(f"CPU work per image outside onnxruntime: decode+prepare {pre * 1000:.1f} ms, "
          f"mask+composite+JPEG+atomic write {post * 1000:.1f} ms")  # fmt: skip
    rows = []
    for r in range(args.rounds):
        b, bc = run_bare(model, tensors)
        e, ec = run_e2e(model, images, args.claim_size)
        rows.append((b, e, bc, ec))
        print(f"round {r + 1}: bare {b:.3f} img/s ({bc:.2f} CPU-s/img), end to end {e:.3f} img/s ({ec:.2f} CPU-s/img)")
    b = max(r[0] for r in rows)
    e = max(r[1] for r in rows)
    paired = statistics.median(r[1] / r[0] for r in rows)
    cpu = statistics.median(r[2] / r[3] for r in rows)
    print(f"bare onnxruntime run:   best {b:.3f} images/s ({1000 / b:.0f} ms/image)")
    print(f"bg_remover end to end:  best {e:.3f} images/s ({1000 / e:.0f} ms/image)")
    print(f"CPU cost ratio (bare CPU-s per image / end-to-end CPU-s per image), median: {cpu:.3f}")
    bare_cpu = statistics.median(r[2] for r in rows)
    print(
        f"no-overlap bound from CPU costs: bare / (bare + decode/prepare + write) = {bare_cpu / (bare_cpu + pre + post):.3f}"
    )
    print(f"ratio end-to-end / bare (median of paired rounds; best/best {e / b:.3f}): {paired:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
