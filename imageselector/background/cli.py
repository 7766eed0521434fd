"""`scripts/bg_remover.py`: remove backgrounds of downloaded images, in place.

Exit codes: 0 done or stopped gracefully, 1 fatal runtime error, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from imageselector import db, weights
from imageselector.config import load_settings
from imageselector.fsutil import clean_tmp
from imageselector.logs import Progress, setup_logging
from imageselector.scaleout import add_ray_arguments, ray_address
from imageselector.stopping import KILL, KILL_BG, Stopper, guarded_main, refuse_if_killed
from imageselector.worker import Heartbeat, run_loop

from .imaging import parse_color
from .providers import CPU, ProviderError, choose_providers


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bg_remover.py",
        description="Remove backgrounds (rembg) of downloaded images and replace them in images/ as RGB JPEG "
        "on a plain background. Stop with: touch KILL_BG",
    )
    ap.add_argument("--watch", action="store_true", help="keep polling for newly downloaded images")
    ap.add_argument("--gpu", action="store_true", help="use CoreML (macOS) or CUDA when available, else CPU")
    ap.add_argument("--provider", metavar="NAME", help="force one onnxruntime provider (e.g. CoreML, CUDA, CPU)")
    ap.add_argument("--model", default="u2net", help="rembg model name (default: u2net)")
    ap.add_argument("--model-path", type=Path, metavar="ONNX", help="custom ONNX model (rembg's u2net_custom session)")
    ap.add_argument("--background", default="white", help="background colour: name, #rrggbb or r,g,b (default white)")
    ap.add_argument("--keep-originals", type=Path, metavar="DIR", help="keep each untouched download under DIR")
    ap.add_argument("--batch-size", type=int, help="images per onnxruntime call (setting BG_BATCH_SIZE, default 1)")
    ap.add_argument("--threads", type=int, help="onnxruntime intra-op threads (setting BG_ORT_THREADS, default: cores)")
    ap.add_argument("--claim-size", type=int, default=32, help="rows claimed per database transaction (default 32)")
    ap.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality of the result (default 95)")
    ap.add_argument("--limit", type=int, help="stop after this many images (tests, benchmarks)")
    ap.add_argument("--poll", type=float, default=10.0, help="--watch polling interval in seconds (default 10)")
    add_ray_arguments(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    return guarded_main("bg_remover.py", lambda: _main(argv))


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings()
    db.check_usable(settings, write=True)
    log = setup_logging("bg_remover", settings.home, stage="bg", secrets=settings.secrets())
    try:
        background = parse_color(args.background)
    except ValueError as exc:
        log.error("--background: %s", exc)
        return 2
    if not 1 <= args.jpeg_quality <= 100 or args.claim_size < 1:
        log.error("--jpeg-quality must be 1-100 and --claim-size at least 1")
        return 2
    stopper = Stopper(settings.home, [KILL_BG, KILL])
    if refuse_if_killed(stopper):
        return 0

    from .session import ModelError, default_threads, models_dir, open_model
    from .stage import BgOptions, BgStage, FatalStageError

    removed = clean_tmp(settings.tmp_dir)
    if args.keep_originals is not None:
        args.keep_originals = args.keep_originals.expanduser().resolve()
        removed += clean_tmp(args.keep_originals / ".tmp")
    if removed:
        log.info("removed %d temp file(s) left by an interrupted run", removed)
    mdir = models_dir(settings)
    try:
        choice = choose_providers(gpu=args.gpu, provider=args.provider, coreml_cache=mdir / "coreml_cache")
    except ProviderError as exc:
        log.error("%s", exc)
        return 2
    if choice.warning:
        log.warning("%s", choice.warning)
    threads = args.threads or default_threads(settings)
    batch_size = args.batch_size or settings.get_int("BG_BATCH_SIZE", 1)
    address = ray_address(args, settings)
    if address:
        code = _run_on_ray(args, settings, address, mdir, threads, batch_size, background, stopper, log)
        if code is not None:
            return code
    if args.model_path is None:
        check = weights.preflight_rembg(args.model, mdir)
        if not check.ok:
            log.error("%s", check.line)
            return 2
    log.info("loading rembg model %s from %s (providers asked: %s)", args.model_path or args.model, mdir, choice.names)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # we report the fallback ourselves, below
            model = open_model(
                settings, args.model, model_path=args.model_path, choice=choice, threads=threads, batch_size=batch_size
            )
    except ModelError as exc:
        log.error("%s", exc)
        return 2
    active = model.providers
    log.info(
        "running %s on %s (onnxruntime intra-op threads %d, %s, up to %d image(s) per call)",
        model.name,
        active[0],
        threads,
        "batched u2net path" if model.fast else "rembg predict per image",
        model.max_batch,
    )
    if choice.primary != CPU and active[0] != choice.primary:
        log.warning("%s was asked for but onnxruntime runs %s: expect CPU speed", choice.primary, active[0])

    conn = db.connect(settings.db_path)
    freed = db.reclaim_dead(conn, "bg")
    if freed:
        log.info("released %d row(s) leased by dead bg_remover processes", freed)
    opts = BgOptions(
        background=background,
        quality=args.jpeg_quality,
        keep_dir=args.keep_originals,
        claim_size=args.claim_size,
        limit=args.limit,
    )
    stage = BgStage(settings, conn, model, opts, stopper, log)
    code = 0
    try:
        run_loop(
            stage.run_batch,
            stopper,
            watch=args.watch,
            heartbeat=Heartbeat(settings.run_dir, "bg"),
            poll_s=args.poll,
            logger=log,
        )
    except FatalStageError as exc:
        log.error("giving up: %s", exc)
        code = 1
    finally:
        stage.close()
        stage.progress.report(final=True)
        log.info(
            "backgrounds removed: %d, already marked (flag only): %d, parked: %d, sent back to download: %d",
            stage.processed,
            stage.flagged_only,
            stage.parked,
            stage.sent_back,
        )
        conn.close()
    return code


def _run_on_ray(args, settings, address, mdir, threads, batch_size, background, stopper, log) -> int | None:  # type: ignore[no-untyped-def]
    """Run the stage with its compute on Ray. Returns an exit code, or None to continue locally (fallback)."""
    from imageselector.scaleout import RayUnavailable, RemoteStageRunner, after_cluster_loss, open_pool_or_fallback

    from .remote import RemoteBg

    kwargs = dict(
        model=args.model,
        model_path=str(args.model_path.resolve()) if args.model_path else None,
        models_dir=str(mdir),
        provider=args.provider,
        gpu=args.gpu or not args.provider,
        threads=args.ray_threads or 1,
        batch_size=batch_size,
        background=background,
        quality=args.jpeg_quality,
    )
    pool = open_pool_or_fallback("imageselector.background.remote:make_bg_compute", kwargs, args, address, stopper, log)
    if pool is None:
        return 0 if stopper.should_stop() else None
    conn = db.connect(settings.db_path)
    freed = db.reclaim_dead(conn, "bg")
    if freed:
        log.info("released %d row(s) leased by dead bg_remover processes", freed)
    progress = Progress(log, "images")
    remote = RemoteBg(settings, conn, args.claim_size, args.keep_originals, progress, log)
    runner = RemoteStageRunner(pool, remote.claim, remote.commit)
    log.info("background removal on Ray at %s: %d replica(s); this process writes files and flags", address, pool.n)
    try:
        run_loop(runner.run_batch, stopper, watch=args.watch, heartbeat=Heartbeat(settings.run_dir, "bg"),
                 poll_s=args.poll, logger=log)  # fmt: skip
        runner.drain()
    except RayUnavailable as exc:
        runner.abandon()
        pool.close()
        conn.close()
        return after_cluster_loss(exc, args, log)
    pool.close()
    progress.report(final=True)
    log.info("backgrounds removed: %d, already marked (flag only): %d, parked: %d",
             remote.processed, remote.flagged_only, remote.parked)  # fmt: skip
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
