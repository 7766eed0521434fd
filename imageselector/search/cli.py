"""`image_search_v2/search.py`: query by image or text, serve the web page, or build the compressed indexes.

    venv/bin/python image_search_v2/search.py --image PATH [--k 20] [--models clip_vitb32 dinov2_base] [--json]
    venv/bin/python image_search_v2/search.py --text "blue ceramic mug" [--k 20] [--json]
    venv/bin/python image_search_v2/search.py --similar-to LISTING_ID:IMAGE_ID [--json]   # stored vectors
    venv/bin/python image_search_v2/search.py --copies --image PATH | --similar-to L:I [--json]
    venv/bin/python image_search_v2/search.py --serve [--host 127.0.0.1] [--port 8765]
    venv/bin/python image_search_v2/search.py --build-index      # compressed indexes above SEARCH_INDEX_MIN

Exit codes: 0 done; 2 bad usage or a query the search cannot answer (the message says why).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import threading

from imageselector.config import load_settings
from imageselector.logs import setup_logging
from imageselector.search.indexes import remove_index
from imageselector.search.service import SearchError, SearchService, parse_image_ref, read_path_image
from imageselector.stopping import guarded_main

log = logging.getLogger("search")
# ANSI/VT escape sequences (CSI, OSC, single-character) and every control character:
# Etsy text is printed on one line, so even tab and newline become spaces.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]|\x9b[0-?]*[ -/]*[@-~]")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def clean(text: object) -> str:
    """Etsy text made safe for a terminal: escape sequences removed, control characters turned to spaces."""
    return _CONTROLS.sub(" ", _ESCAPES.sub("", str(text or "")))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="image_search_v2/search.py",
        description="Ensemble search over the five image indexes (and the CLIP listing-text indexes).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", metavar="PATH", help="query by this image file")
    what.add_argument("--text", metavar="TEXT", help="query by text (the two CLIP text towers)")
    what.add_argument(
        "--similar-to",
        metavar="LISTING_ID:IMAGE_ID",
        help="more like this catalogued photo, searched with its stored vectors (no re-embedding)",
    )
    what.add_argument("--serve", action="store_true", help="run the web page")
    what.add_argument(
        "--build-index", action="store_true", help="build/update the compressed indexes of big models, then exit"
    )
    what.add_argument("--status", action="store_true", help="print the indexes, fusion weights and warnings as JSON")
    ap.add_argument("--k", type=int, default=20, help="listings to return (default 20, at most 200)")
    ap.add_argument("--models", nargs="+", metavar="NAME", help="a subset of the models (space or comma separated)")
    ap.add_argument("--json", action="store_true", help="print the full result as JSON")
    ap.add_argument(
        "--copies",
        action="store_true",
        help="with --image or --similar-to: find copies of that photo (cropped, resized, re-encoded, bg removed)",
    )
    ap.add_argument("--weights", metavar="NAME:W,...", help="fusion weights for this query, e.g. dinov2_base:2")
    ap.add_argument("--host", default="127.0.0.1", help="address for --serve (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8765, help="port for --serve (default 8765; 0 picks a free one)")
    ap.add_argument("--models-file", help="model registry (default: IMAGESELECTOR_MODELS_FILE, else the shipped one)")
    ap.add_argument("--device", default="auto", help="auto|cpu|mps|cuda for the query encoders")
    ap.add_argument("--dtype", default="auto", help="auto|fp32|fp16|bf16 for the query encoders")
    ap.add_argument(
        "--rebuild", action="store_true", help="with --build-index: delete the compressed indexes and build afresh"
    )
    ap.add_argument(
        "--no-build", action="store_true", help="with --serve: do not build the compressed indexes in the background"
    )
    return ap


def _models(raw: list[str] | None) -> list[str] | None:
    if not raw:
        return None
    return [m for part in raw for m in part.split(",") if m]


def _print_table(result: dict) -> None:
    q = result["query"]
    what = clean(q.get("text")) or (f"photo {q['listing_id']}:{q['image_id']}" if "listing_id" in q else "the image")
    how = result["fusion"]["method"] if "fusion" in result else result["copy_test"]["method"]
    print(
        f"{len(result['results'])} {'copies' if result.get('mode') == 'copies' else 'listings'} for {what} "
        f"({', '.join(result['models'])}; {how}; {result['timing_ms']['total']} ms)"
    )
    for w in result["warnings"]:
        print(f"WARNING: {clean(w)}")
    for r in result["results"]:
        price = f"{r['price']:.2f} {clean(r['currency'])}".strip() if r["price"] is not None else "-"
        title = clean(r["title"])[:60]
        score = (
            f"copy {r['copy_score']:.3f}" if "copy_score" in r else f"{r['n_models']}/{len(result['models'])} models"
        )
        print(
            f"{r['rank']:3d}. {r['listing_id']:>12}  {score}  {r['fused_score']:.4f}  {price:>12}  "
            f"{clean(r['shop_name'] or '-')[:20]:20s}  {title}"
        )
        print(f"      photo {r['matched_image_id']}  {clean(r['url'])}")
    m = result.get("market") or {}
    if m.get("price"):
        p = m["price"]
        print(
            f"market over {m['listings']} listings: price median {p['median']:.2f} {m['currency']} "
            f"(quartiles {p['q1']:.2f}-{p['q3']:.2f}), favorers {m['favorers']['total']}, views {m['views']['total']}"
        )
        for s in m["shops"][:3]:
            print(f"  shop {clean(s['shop_name'] or s['shop_id'])}: {s['listings']} of them")
        for g in m["top_gainers"][:3]:
            print(f"  gaining: listing {g['listing_id']} +{g['favorers_gained']} favorers in {g['days']} days")


def _serve(service: SearchService, args: argparse.Namespace) -> int:
    from imageselector.search.web import CacheBuilder, make_server

    try:
        server = make_server(service, args.host, args.port)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    service.indexes.refresh(force=True)
    threading.Thread(target=service.warm_up, name="warm-up", daemon=True).start()
    builder = None
    if not args.no_build:
        builder = CacheBuilder(service)
        builder.start()
    host, port = server.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: other machines on the network can use this search page", args.host)
    print(f"SEARCH READY http://{host}:{port}/", flush=True)
    log.info("search page at http://%s:%s/ (Ctrl-C or SIGTERM stops it)", host, port)

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping the search server", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        if builder is not None:
            builder.stop.set()
        server.server_close()
    log.info("search server stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    return guarded_main("search.py", lambda: _main(argv))


def _main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = load_settings()
    setup_logging("search", settings.home, secrets=settings.secrets())
    try:
        service = SearchService(settings, models_file=args.models_file, device=args.device, dtype=args.dtype)
    except SearchError as exc:  # a bad setting (SEARCH_CURRENCY, SEARCH_FX_RATES)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.serve:
            return _serve(service, args)
        if args.build_index:
            service.indexes.refresh(force=True)
            names = _models(args.models) or list(service.indexes.models)
            if args.rebuild:
                for name in names:
                    remove_index(settings.embeddings_dir, name)
                service.indexes.refresh(force=True)
            done = service.indexes.build_caches(names, tmp_dir=settings.tmp_dir)
            for name, m in service.indexes.models.items():
                print(
                    f"{name:18s} {m.count:>10,} vectors  {m.kind:4s}  {m.note}"
                    + (f"  (+{done[name]} added)" if done.get(name) else "")
                )
            return 0
        if args.status:
            print(json.dumps(service.status(), indent=2))
            return 0
        if args.copies and not (args.image or args.similar_to):
            raise SearchError("--copies needs --image PATH or --similar-to LISTING_ID:IMAGE_ID")
        models = _models(args.models)
        if args.copies and args.image:
            result = service.find_copies(image=read_path_image(args.image, service.limits), k=args.k, models=models)
        elif args.copies:
            result = service.find_copies(ref=parse_image_ref(args.similar_to), k=args.k, models=models)
        elif args.image:
            result = service.search_image(read_path_image(args.image, service.limits), args.k, models, args.weights)
        elif args.similar_to:
            result = service.search_similar(*parse_image_ref(args.similar_to), args.k, models, args.weights)
        else:
            result = service.search_text(args.text, args.k, models, args.weights)
    except SearchError as exc:
        if args.json:
            print(json.dumps({"error": str(exc)}))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        _print_table(result)
    return 0
