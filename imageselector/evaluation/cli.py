"""`image_search_v2/evaluate.py`: how well each model and each fusion finds a listing's other photos."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from imageselector import db
from imageselector.config import load_settings
from imageselector.db import EMBED_MODELS
from imageselector.evaluation import report
from imageselector.evaluation import stage as evaluation
from imageselector.fusion import DEFAULT_RRF_K
from imageselector.logs import setup_logging
from imageselector.stopping import guarded_main

SCRIPT = "evaluate"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Measure retrieval quality on your own catalogue: query with one image of a listing, count the "
        "listing's other images as relevant. Reports recall@1, recall@10 and mAP@10 (listing and image level, "
        "95%% bootstrap CIs) per model, per fusion, for the CLIP text towers, with query time and embedding cost.",
    )
    ap.add_argument("--sample", type=int, default=500, help="query listings to sample (default 500; 0 = all)")
    ap.add_argument("--seed", type=int, default=0, help="random seed for the sample and the bootstrap (default 0)")
    ap.add_argument("--json", action="store_true", help="print the full results as JSON instead of the table")
    ap.add_argument(
        "--fit-weights",
        action="store_true",
        help="write the RRF weights fitted on the held-out split to embeddings/fusion_weights.json (search uses them)",
    )
    ap.add_argument(
        "--min-fit", type=int, default=50, help="held-out listings needed before --fit-weights writes (default 50)"
    )
    ap.add_argument("--fit-frac", type=float, default=0.3, help="share of sampled listings held out to fit weights")
    ap.add_argument("--depth", type=int, default=100, help="images retrieved per model per query (default 100)")
    ap.add_argument("--models", default=",".join(EMBED_MODELS), help="comma-separated models (default: all five)")
    ap.add_argument("--no-text", action="store_true", help="skip the CLIP listing-text indexes")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    ap.add_argument(
        "--measure-cost", action="store_true", help="load each model and time embedding on sampled images here"
    )
    ap.add_argument("--cost-images", type=int, default=16, help="images to time per model with --measure-cost")
    ap.add_argument("--out", help="report folder (default <home>/evaluation/<UTC timestamp>)")
    return ap


def main(argv: list[str] | None = None) -> int:
    return guarded_main("evaluate.py", lambda: _main(argv))


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in EMBED_MODELS]
    if bad or not models or args.depth < 1 or not 0 <= args.fit_frac < 1 or args.sample < 0:
        print(
            f"bad arguments: unknown model(s) {bad}"
            if bad
            else "bad arguments: check --models/--depth/--fit-frac/--sample",
            file=sys.stderr,
        )
        return 2
    if args.fit_weights and args.fit_frac <= 0:
        print("--fit-weights needs --fit-frac > 0 (a held-out split to fit on)", file=sys.stderr)
        return 2
    settings = load_settings()
    log = setup_logging(SCRIPT, settings.home, secrets=settings.secrets())
    if not settings.db_path.exists():
        log.error("no database at %s: nothing to evaluate", settings.db_path)
        return 2
    opts = evaluation.Options(
        sample=args.sample or None,
        seed=args.seed,
        depth=args.depth,
        fit_frac=args.fit_frac,
        n_boot=args.bootstrap,
        with_text=not args.no_text,
        models=models,
        rrf_k=settings.get_float("SEARCH_RRF_K", DEFAULT_RRF_K),
        measure_cost=args.measure_cost,
        cost_images=args.cost_images,
    )
    conn = db.connect(settings.db_path, readonly=True)
    try:
        results = evaluation.run(settings, conn, opts)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    finally:
        conn.close()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(results["generated_at"]))
    out_dir = Path(args.out) if args.out else settings.home / "evaluation" / stamp
    if args.fit_weights:
        blocker = evaluation.weights_blocker(results, args.min_fit)
        if blocker:
            results["weights"]["not_written"] = blocker
            log.warning("fusion weights NOT written: %s", blocker)
        else:
            path = evaluation.write_weights(settings, results)
            results["weights"]["written"] = str(path)
            log.info("fusion weights written to %s: %s", path, results["weights"]["fitted"]["rrf"])
    files = report.write_report(results, out_dir)
    if args.json:
        print(report.to_json(results))
    else:
        print(report.render_table(results))
        print(f"\nReport: {files['markdown']}  (chart {files['chart'].name}, data {files['json'].name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
