"""`image_search_v2/embed.py`: embed bg-removed images with one or all five models into embeddings/.

    venv/bin/python image_search_v2/embed.py --model all --batch-size 8 [--watch]

Stops between batches on KILL_EMBED (or KILL, SIGTERM, Ctrl-C), flushing what it has and flagging it.
Exit codes: 0 done or stopped gracefully, 2 bad usage/config (unknown model, bad models file, an index
built by a different model, another embed.py already embedding the same model).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from imageselector import db, weights
from imageselector.config import load_settings
from imageselector.logs import setup_logging
from imageselector.models.registry import RegistryError, load_registry
from imageselector.scaleout import (
    RayUnavailable,
    add_ray_arguments,
    after_cluster_loss,
    build_compute,
    open_pool_or_fallback,
    ray_address,
)
from imageselector.stage_entry import Context, Entry, StageJob, UsageError, run_stage
from imageselector.stopping import KILL, KILL_EMBED, guarded_main
from imageselector.vectorstore.export import export_faiss, export_image_index
from imageselector.vectorstore.migrate import migrate_legacy_store

FACTORY = "imageselector.embedding.compute:make_embed_compute"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="embed.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="all", help="all, or one name from the models file (e.g. clip_vitb32)")
    ap.add_argument("--batch-size", type=int, default=8, help="images per model per forward pass (default 8)")
    ap.add_argument("--device", default="auto", choices=["auto", "mps", "cuda", "cpu"], help="auto: mps, cuda, cpu")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "fp16", "bf16"],
        help="auto: fp16 on mps/cuda, bf16 on a CPU with native bf16, else fp32 (docs/embedding.md)",
    )
    ap.add_argument(
        "--preprocess",
        default="fast",
        choices=["fast", "reference"],
        help="fast: one resize per image, JPEG draft decode (default); reference: each library's own transform",
    )
    ap.add_argument("--watch", action="store_true", help="keep polling for new images instead of exiting when done")
    ap.add_argument("--models-file", help="registry JSON to use instead of the shipped one (IMAGESELECTOR_MODELS_FILE)")
    add_ray_arguments(ap)
    ap.add_argument("--workers", type=int, default=2, help="decode/preprocess threads (default 2)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ap.add_argument(
        "--decode-overlap",
        choices=("auto", "on", "off"),
        default="auto",
        help="decode the next batch while the models run (auto: on a GPU yes; when every model runs on the "
        "CPU no, decoding runs between batches; on with the CPU: the decode threads run at background "
        "priority where the OS allows it; default auto)",
    )
    ap.add_argument("--flush-every", type=int, default=1024, help="flush after this many new vectors (default 1024)")
    ap.add_argument("--flush-seconds", type=float, default=60.0, help="flush after this many seconds (default 60)")
    ap.add_argument(
        "--flush-growth",
        type=float,
        default=0.02,
        help="ignored (kept for old command lines): a flush now writes only its new vectors",
    )
    ap.add_argument("--export-faiss", nargs=2, metavar=("NAME", "OUT"), help="write NAME's vectors as OUT.faiss, exit")
    ap.add_argument("--export-image-index", metavar="OUT", help="write gid -> [listing_id, image_id] JSON, exit")
    ap.add_argument("--migrate", action="store_true", help="migrate old-format embeddings/*.faiss files, exit")
    ap.add_argument("--flush-max-seconds", type=float, default=1800.0, help="flush at least this often (default 1800)")
    return ap


class EmbedJob(StageJob):
    """The embed stage under run_stage: `EmbedStage.run` locally, or `run_remote` with the image compute on Ray."""

    def __init__(self, ctx: Context, args: argparse.Namespace) -> None:
        # torch and the model libraries load here, not at the top: usage, registry and weight errors answer in
        # a second (exit 2) without paying for torch's import
        import torch

        from imageselector.embedding.stage import EmbedStage, Options

        log, settings = ctx.log, ctx.settings
        logging.getLogger("faiss").setLevel(logging.WARNING)
        try:
            registry = load_registry(args.models_file, settings)
        except RegistryError as exc:
            raise UsageError(str(exc)) from exc
        if args.model == "all":
            names = list(registry)
        elif args.model in registry:
            names = [args.model]
        else:
            raise UsageError(f"unknown model {args.model!r}; the models file has: {', '.join(registry)}")
        if args.threads:
            torch.set_num_threads(args.threads)
        check = weights.preflight_embedding({n: registry[n] for n in names})
        if not check.ok:
            raise UsageError(check.line)
        if check.all_local:
            weights.go_offline()  # everything is here: no hub round trips, no retries when the network is down
        else:
            log.info("%s", check.line)
        # the same factory and arguments as the Ray runner's actors: one compute, two runners
        self.kwargs: dict[str, Any] = dict(
            models_file=str(Path(args.models_file).resolve())
            if args.models_file
            else settings.get("IMAGESELECTOR_MODELS_FILE"),
            models=names,
            device=args.device,
            dtype=args.dtype,
            preprocess=args.preprocess,
        )
        try:
            compute = build_compute(FACTORY, self.kwargs)
        except (ValueError, RegistryError) as exc:
            raise UsageError(str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - a model that cannot be loaded is a config problem, said in one line
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise UsageError(f"cannot load a model: {type(exc).__name__}: {first}") from exc
        opts = Options(
            batch_size=args.batch_size,
            watch=args.watch,
            workers=args.workers,
            overlap={"auto": None, "on": True, "off": False}[args.decode_overlap],
            flush_every=args.flush_every,
            flush_s=args.flush_seconds,
            flush_growth=args.flush_growth,
            flush_max_s=args.flush_max_seconds,
        )
        self.args, self.names = args, names
        self.new_stage = lambda: EmbedStage(settings, ctx.conn, compute, opts, ctx.stopper)
        self.stage = self.new_stage()
        try:
            self.stage.open()
        except (RuntimeError, ValueError) as exc:
            self.stage.store.close()
            raise UsageError(str(exc)) from exc
        log.info(
            "embedding with %s; batch %d, %d decode threads, %d torch threads",
            ", ".join(
                f"{n} ({e.device}/{e.dtype_name}/{'fast' if e.recipe else 'reference'})"
                for n, e in compute.encoders.items()
            ),
            args.batch_size,
            args.workers,
            torch.get_num_threads(),
        )

    def run(self, ctx: Context, *, watch: bool, poll_s: float) -> None:
        address = ray_address(self.args, ctx.settings)
        if address:
            code = self._run_on_ray(ctx, address)
            if code is not None:
                self.exit_code = code
                return
            self.stage.store.close()  # its model locks: the local stage below takes them again
            self.stage = self.new_stage()  # fall back to local compute
            self.stage.open()
        self.stage.run(ctx.heartbeat)

    def _run_on_ray(self, ctx: Context, address: str) -> int | None:
        """Image compute on Ray; this process keeps the store and the flags. None: continue locally."""
        from imageselector.embedding.remote import run_remote  # torch, like the stage itself

        args, log = self.args, ctx.log
        pool = open_pool_or_fallback(FACTORY, self.kwargs, args, address, ctx.stopper, log)
        if pool is None:
            if ctx.stopper.should_stop():
                self.stage.store.close()
                return 0
            return None
        log.info("embedding on Ray at %s: %d replica(s) of %s; this process writes indexes and flags",
                 address, pool.n, ", ".join(self.names))  # fmt: skip
        try:
            run_remote(self.stage, pool, ctx.heartbeat)
        except RayUnavailable as exc:
            pool.close()
            return after_cluster_loss(exc, args, log)
        pool.close()
        return 0


def _tools(args, settings, log) -> int:  # type: ignore[no-untyped-def]
    """--export-faiss / --export-image-index / --migrate: one job each, no model loaded."""
    if args.migrate:
        result = migrate_legacy_store(settings.embeddings_dir, settings.tmp_dir)
        for name, r in result.items():
            log.info("%s: %s", name, r)
        if any(r.get("status") == "error" for r in result.values()):
            return 2
    if args.export_faiss:
        name, out = args.export_faiss
        try:
            n = export_faiss(settings.embeddings_dir, name, Path(out), settings.tmp_dir)
        except KeyError as exc:
            log.error("%s", exc.args[0])
            return 2
        log.info(
            "wrote %s: %d vectors of %s (ids are %s)", out, n, name, "listing_ids" if name.endswith("_text") else "gids"
        )
    if args.export_image_index:
        conn = db.connect(settings.db_path)
        try:
            n = export_image_index(conn, Path(args.export_image_index), settings.tmp_dir)
        finally:
            conn.close()
        log.info("wrote %s: %d gids", args.export_image_index, n)
    return 0


def main(argv: list[str] | None = None) -> int:
    return guarded_main("embed.py", lambda: _main(argv))  # the settings read before run_stage too


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1 or args.workers < 1:
        print("embed.py: --batch-size and --workers must be at least 1", file=sys.stderr)
        return 2
    os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")
    hf_token = load_settings().get("HF_TOKEN") or ""
    if hf_token:  # from .env too: huggingface_hub reads only the process environment (or `hf auth login`)
        os.environ.setdefault("HF_TOKEN", hf_token)
    if args.export_faiss or args.export_image_index or args.migrate:  # one job each, no model loaded
        settings = load_settings()
        db.check_usable(settings, write=True)
        log = setup_logging("embed", settings.home, secrets=[*settings.secrets(), hf_token])
        return _tools(args, settings, log)
    entry = Entry(script="embed", stage="embed", kill_files=(KILL_EMBED, KILL), secrets=(hf_token,) if hf_token else ())
    return run_stage(entry, lambda ctx: EmbedJob(ctx, args), watch=args.watch)


if __name__ == "__main__":
    sys.exit(main())
