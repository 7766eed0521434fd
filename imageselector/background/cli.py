"""`scripts/bg_remover.py`: remove backgrounds of downloaded images, in place.

This file holds the stage's arguments and builders; `stage_entry.run_stage` does the rest.
Exit codes: 0 done or stopped gracefully, 1 fatal runtime error, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from imageselector import weights
from imageselector.background.compute import FACTORY, BgCompute
from imageselector.background.imaging import parse_color
from imageselector.background.providers import CPU, ProviderError
from imageselector.background.remote import RayBgRunner
from imageselector.background.session import ModelError, default_threads, models_dir
from imageselector.background.stage import STAGE, BgStageOptions, BgWriter, LocalBgRunner
from imageselector.fsutil import clean_tmp
from imageselector.scaleout import add_ray_arguments, build_compute, open_pool_or_fallback, ray_address
from imageselector.stage_entry import Context, Entry, StageJob, UsageError, run_stage
from imageselector.stopping import KILL, KILL_BG

ENTRY = Entry(script="bg_remover", stage=STAGE, kill_files=(KILL_BG, KILL), leases=(STAGE,))


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


def compute_kwargs(args: argparse.Namespace, ctx: Context, *, remote: bool) -> dict[str, Any]:
    """The factory's arguments: the local runner and every Ray replica build the compute from these."""
    settings = ctx.settings
    threads = args.threads or default_threads(settings)
    return dict(
        model=args.model,
        model_path=str(args.model_path.resolve()) if args.model_path else None,
        models_dir=str(models_dir(settings)),
        provider=args.provider,
        gpu=(args.gpu or not args.provider) if remote else args.gpu,  # replicas use their node's GPU when it has one
        threads=(args.ray_threads or 1) if remote else threads,
        batch_size=args.batch_size or settings.get_int("BG_BATCH_SIZE", 1),
        background=args.background_rgb,
        quality=args.jpeg_quality,
    )


def build_local_compute(args: argparse.Namespace, ctx: Context) -> BgCompute:
    log = ctx.log
    kwargs = compute_kwargs(args, ctx, remote=False)
    if args.model_path is None:
        check = weights.preflight_rembg(args.model, Path(kwargs["models_dir"]))
        if not check.ok:
            raise UsageError(check.line)
    log.info("loading rembg model %s from %s", args.model_path or args.model, kwargs["models_dir"])
    try:
        compute: BgCompute = build_compute(FACTORY, kwargs)
    except (ModelError, ProviderError) as exc:
        raise UsageError(str(exc)) from exc
    choice, model = compute.choice, compute.model
    if choice is not None and choice.warning:
        log.warning("%s", choice.warning)
    active = model.providers
    log.info(
        "running %s on %s (onnxruntime intra-op threads %d, %s, up to %d image(s) per call)",
        model.name,
        active[0],
        kwargs["threads"],
        "batched u2net path" if model.fast else "rembg predict per image",
        model.max_batch,
    )
    if choice is not None and choice.primary != CPU and active[0] != choice.primary:
        log.warning("%s was asked for but onnxruntime runs %s: expect CPU speed", choice.primary, active[0])
    return compute


def builder(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    def build(ctx: Context) -> StageJob | int:
        if args.keep_originals is not None:
            removed = clean_tmp(args.keep_originals / ".tmp")
            if removed:
                ctx.log.info("removed %d temp file(s) left in %s", removed, args.keep_originals / ".tmp")
        opts = BgStageOptions(keep_dir=args.keep_originals, claim_size=args.claim_size, limit=args.limit)
        writer = BgWriter(ctx.settings, ctx.conn, opts, ctx.stopper, ctx.log)

        def local(w: BgWriter) -> LocalBgRunner:
            return LocalBgRunner(w, build_local_compute(args, ctx))

        address = ray_address(args, ctx.settings)
        if address:
            kwargs = compute_kwargs(args, ctx, remote=True)
            pool = open_pool_or_fallback(FACTORY, kwargs, args, address, ctx.stopper, ctx.log)
            if pool is not None:
                ctx.log.info(
                    "background removal on Ray at %s: %d replica(s); this process writes files and flags",
                    address,
                    pool.n,
                )
                return RayBgRunner(writer, pool, local if args.ray_fallback == "local" else None)
            if ctx.stopper.should_stop():
                return 0
        return local(writer)

    return build


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.background_rgb = parse_color(args.background)
    except ValueError as exc:
        print(f"bg_remover.py: --background: {exc}", file=sys.stderr)
        return 2
    if not 1 <= args.jpeg_quality <= 100 or args.claim_size < 1:
        print("bg_remover.py: --jpeg-quality must be 1-100 and --claim-size at least 1", file=sys.stderr)
        return 2
    if args.keep_originals is not None:
        args.keep_originals = args.keep_originals.expanduser().resolve()
    return run_stage(ENTRY, builder(args), watch=args.watch, poll_s=args.poll)


if __name__ == "__main__":
    sys.exit(main())
