"""`python -m imageselector.proving.demo [--home DIR] [--listings N]`: the whole pipeline end to end, in a home of its own.

Without ETSY_API_KEY it starts the local Etsy simulator (a few hundred listings, real photos from
scikit-image) and points the workers at it; with a key it crawls the real API (a bounded crawl).
It runs `scripts/pipeline_monitor.py` over all four stages until the backlog is done, then touches KILL,
waits for a clean stop, prints `image_db.py` and how to search. Real models where their weights are
reachable, else stand-ins with random weights (a loud warning in the log, image_db.py and the search page).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from imageselector import db
from imageselector.config import PROJECT_ROOT, load_settings
from imageselector.logs import fmt_duration, setup_logging
from imageselector.monitor.stage import STATE_FILE
from imageselector.proving import demo_models
from imageselector.status import figures

DEFAULT_HOME = PROJECT_ROOT / "demo_home"
SIM_READY = "SIMULATOR READY"
OK_REASONS = ("backlog done", "sync found no images")


def start_simulator(listings: int, seed: int, extra: list[str], log_path: Path, timeout: float = 90.0):  # type: ignore[no-untyped-def]
    """Start `python -m imageselector.etsy.simulator` and parse its READY line. Returns (proc, api_base, cdn_base)."""
    cmd = [sys.executable, "-m", "imageselector.etsy.simulator", "--listings", str(listings), "--seed", str(seed)]
    cmd += extra
    err = open(log_path, "ab")  # noqa: SIM115 - lives as long as the simulator
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, cwd=str(PROJECT_ROOT), text=True
    )
    err.close()
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"simulator exited with code {proc.returncode}; see {log_path}")
            continue
        if line.startswith(SIM_READY):
            fields = dict(tok.split("=", 1) for tok in line.split()[2:] if "=" in tok)
            return proc, fields["api_base"], fields["cdn_base"]
    proc.kill()
    raise RuntimeError(f"simulator did not get ready within {timeout:.0f}s")


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def monitor_state(home: Path) -> dict[str, Any]:
    try:
        return json.loads((home / ".run" / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def pipeline_done(data: dict[str, Any], state: dict[str, Any]) -> tuple[bool, str]:
    """Done when sync has finished (or given up) and no stage has work it could do now."""
    failed = [n for n, s in state.get("stages", {}).items() if s.get("state") == "failed"]
    if failed:
        return True, f"stage(s) {', '.join(failed)} stopped after failing (see pipeline.log and their logs)"
    sync = state.get("stages", {}).get("sync", {})
    if sync.get("state") != "finished":
        return False, "sync still crawling"
    if data["total"] == 0:
        return True, "sync found no images"
    for name, s in data["stages"].items():
        waiting_retry = s["failing"]
        if s["backlog"] - waiting_retry > 0 or s["leased"] > 0:
            return False, f"{name}: {s['backlog']:,} to do"
    return True, "backlog done"


def progress_line(data: dict[str, Any], state: dict[str, Any], t0: float) -> str:
    emb = [data["stages"][f"embed_{m}"]["done"] for m in db.EMBED_MODELS]
    restarts = sum(s.get("restarts", 0) for s in state.get("stages", {}).values())
    sync = state.get("stages", {}).get("sync", {}).get("state", "?")
    return (
        f"[{fmt_duration(time.time() - t0):>6}] sync {sync}: {data['total']:,} images | downloaded "
        f"{data['download_done']:,} | backgrounds {data['bg_removed']:,} | embedded {min(emb):,}-{max(emb):,} "
        f"(5 models) | restarts {restarts}"
    )


def default_listings(choice: demo_models.ModelChoice) -> int:
    """300 listings take ~2 min with stand-ins; the real five models on a CPU embed ~1 image/s, so use fewer."""
    if not (choice.real_embed or choice.real_bg):
        return 300
    import torch

    accel = torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())
    return 300 if accel else 60


def write_monitor_config(home: Path, *, sync_args: list[str], bg_args: list[str], models_file: Path | None) -> Path:
    embed_args = ["--model", "all", "--batch-size", "8", "--watch"]
    if models_file is not None:
        embed_args += ["--models-file", str(models_file)]
    cfg = {
        "stages": {
            "sync": {"args": sync_args, "restart_on_success_s": None},
            "download": {"args": ["--watch", "--poll", "2"]},
            "bg": {"args": ["--watch", "--gpu", "--poll", "2", *bg_args]},
            "embed": {"args": embed_args},
        },
        "status_interval_s": 30,
        "hang_timeout_s": 300,
        "startup_timeout_s": 300,
        "backoff_base_s": 2,
        "qps": {"initial_qps": 5.0, "interval_s": 10},
    }
    path = home / "pipeline_monitor.json"
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def set_home_env(home: Path, updates: dict[str, str | None]) -> None:
    """Keep the demo home's .env (read by every later command with IMAGESELECTOR_HOME=<home>) in step."""
    path = home / ".env"
    lines = path.read_text().splitlines() if path.exists() else []
    keep = [ln for ln in lines if ln.split("=", 1)[0].strip() not in updates]
    keep += [f"{k}={v}" for k, v in updates.items() if v is not None]
    path.write_text("\n".join(keep) + "\n")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m imageselector.proving.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", type=Path, default=DEFAULT_HOME, help=f"data home for the demo (default {DEFAULT_HOME})")
    ap.add_argument(
        "--listings",
        type=int,
        help="simulated listings, ~2.7 images each (default 300; 60 with real models and no GPU, to stay near 10 min)",
    )
    ap.add_argument("--seed", type=int, default=1, help="simulator seed (default 1)")
    ap.add_argument(
        "--models",
        choices=["auto", "real", "standin"],
        default="auto",
        help="auto: real weights where reachable, else stand-ins (default)",
    )
    ap.add_argument("--fresh", action="store_true", help="delete the demo home first (default: resume it)")
    ap.add_argument("--timeout", type=float, default=1200.0, help="stop the pipeline after this many seconds")
    ap.add_argument("--faults", default="", help="simulator faults, e.g. api_429=0.05,cdn_404=0.02")
    ap.add_argument("--max-listings", type=int, default=100, help="with ETSY_API_KEY: about how many listings to crawl")
    ap.add_argument(
        "--keywords", default="ceramic mug", help="with ETSY_API_KEY: what to crawl (default 'ceramic mug')"
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    home = args.home.expanduser().resolve()
    if args.fresh and home.exists():
        if home == PROJECT_ROOT:
            print("refusing to delete the project root", file=sys.stderr)
            return 2
        shutil.rmtree(home)
    home.mkdir(parents=True, exist_ok=True)
    os.environ["IMAGESELECTOR_HOME"] = str(home)
    settings = load_settings(home)
    log = setup_logging("demo", home, secrets=settings.secrets())
    t0 = time.time()
    real_api = bool(settings.api_key) and not settings.api_key.startswith("sim-")
    log.info("demo home: %s (%s)", home, "real Etsy API" if real_api else "offline simulator")

    choice = demo_models.choose(settings, args.models, home / "models" / "standin")
    for why in choice.why:
        log.info("models: %s", why)
    conn = db.connect(settings.db_path)
    if choice.warning:
        bar = "#" * 100
        for line in (bar, f"WARNING: {choice.warning}", bar):
            log.warning(line)
        db.kv_set(conn, db.KV_STATUS_WARNING, choice.warning)
    else:
        db.kv_set(conn, db.KV_STATUS_WARNING, "")
    set_home_env(
        home,
        {
            "IMAGESELECTOR_MODELS_FILE": str(choice.registry) if choice.registry else None,
            "U2NET_HOME": str(choice.u2net_home) if choice.u2net_home else None,
            "HF_HUB_OFFLINE": "1" if not choice.real_embed else None,
        },
    )

    child_env = dict(os.environ)
    sim = None
    try:
        if real_api:
            # A bounded crawl: one keyword, no catalogue-wide pass; sync is stopped at --max-listings.
            sync_args = ["--once"]
            child_env.setdefault("ETSY_KEYWORDS", args.keywords)
            child_env.setdefault("ETSY_CRAWL_ALL", "0")
            child_env.setdefault("ETSY_SPLIT_PARTITIONS", "0")  # no price splitting: one query's pages only
            child_env.setdefault("ETSY_CRAWL_SHOPS", "0")
        else:
            sim_extra = ["--qpd", "100000000"] + (["--faults", args.faults] if args.faults else [])
            listings = args.listings or default_listings(choice)
            sim, api_base, cdn_base = start_simulator(listings, args.seed, sim_extra, home / "simulator.log")
            log.info("simulator ready: %s (%d listings)", api_base, listings)
            child_env.update(
                ETSY_API_BASE=api_base,
                ETSY_CDN_BASE=cdn_base,
                ETSY_API_KEY="sim-keystring",
                ETSY_SHARED_SECRET="sim-secret",
            )
            sync_args = ["--once"]
        if choice.registry:
            child_env["IMAGESELECTOR_MODELS_FILE"] = str(choice.registry)
        if not choice.real_embed:
            child_env["HF_HUB_OFFLINE"] = "1"
        if choice.u2net_home:
            child_env["U2NET_HOME"] = str(choice.u2net_home)
        bg_args = ["--model-path", str(choice.bg_model_path)] if choice.bg_model_path else []
        cfg = write_monitor_config(home, sync_args=sync_args, bg_args=bg_args, models_file=choice.registry)
        rc = run_monitor(home, cfg, child_env, args.timeout, log, t0, args.max_listings if real_api else None)
    finally:
        if sim is not None:
            stop_process(sim)
            log.info("simulator stopped")
        conn.close()
    print_summary(home, choice, child_env, rc, t0)
    return rc


def stop_sync_at(conn, state: dict[str, Any], max_listings: int, log) -> bool:  # type: ignore[no-untyped-def]
    """A bounded crawl of the real API: once `max_listings` are known, SIGTERM sync (a graceful stop, exit 0).

    Returns True once sync was asked to stop (the monitor then counts it as finished)."""
    sync = state.get("stages", {}).get("sync", {})
    if sync.get("state") != "running" or not sync.get("pid"):
        return False
    n = conn.execute("SELECT COUNT(*) FROM listings").fetchone()[0]
    if n < max_listings:
        return False
    log.info("%d listings known (--max-listings %d): asking sync to stop (SIGTERM, graceful)", n, max_listings)
    try:
        os.kill(int(sync["pid"]), signal.SIGTERM)
    except ProcessLookupError:
        pass
    return True


def run_monitor(
    home: Path, cfg: Path, env: dict[str, str], timeout: float, log, t0: float, max_listings: int | None = None
) -> int:  # type: ignore[no-untyped-def]
    """Run the monitor until the backlog is done (or `timeout`), then stop it with KILL. Returns its exit code."""
    (home / "KILL").unlink(missing_ok=True)
    (home / ".run" / STATE_FILE).unlink(missing_ok=True)  # the last run's "sync finished" must not end this one
    cmd = [sys.executable, str(PROJECT_ROOT / "scripts" / "pipeline_monitor.py"), "--config", str(cfg)]
    with open(home / "pipeline.log", "ab") as out:
        mon = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(PROJECT_ROOT)
        )
    log.info("pipeline monitor started (pid %d); follow it with: tail -f %s", mon.pid, home / "pipeline.log")
    conn = db.connect(home / "etsy_data.db")
    last_print = 0.0
    reason = "timeout"
    try:
        while mon.poll() is None:
            time.sleep(2.0)
            data, state = figures.collect(conn), monitor_state(home)
            if state.get("pid") != mon.pid:
                continue
            if max_listings and stop_sync_at(conn, state, max_listings, log):
                max_listings = None
            done, why = pipeline_done(data, state)
            if time.time() - last_print >= 15 or done:
                log.info("%s", progress_line(data, state, t0))
                last_print = time.time()
            if done:
                reason = why
                break
            if time.time() - t0 > timeout:
                log.warning("time limit of %s reached (%s); stopping the pipeline", fmt_duration(timeout), why)
                break
        else:
            log.error("the pipeline monitor exited early (code %s); see %s", mon.returncode, home / "pipeline.log")
            return mon.returncode or 1
        (log.info if reason in OK_REASONS else log.error)("%s: touching KILL to stop the pipeline", reason)
        (home / "KILL").touch()
        try:
            rc = mon.wait(timeout=120)
        except subprocess.TimeoutExpired:
            log.error("monitor did not stop within 120 s; killing it")
            mon.kill()
            rc = mon.wait()
        log.info("pipeline monitor exited with code %d", rc)
        return rc if reason in OK_REASONS else 1
    finally:
        conn.close()
        if mon.poll() is None:
            mon.kill()


def print_summary(home: Path, choice: demo_models.ModelChoice, env: dict[str, str], rc: int, t0: float) -> None:
    out = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "image_db.py")],
        env={**env, "IMAGESELECTOR_HOME": str(home)},
        capture_output=True,
        text=True,
        cwd=str(PROJECT_ROOT),
    )
    print()
    print(out.stdout.rstrip() or out.stderr.rstrip())
    py = "venv/bin/python"
    h = f"IMAGESELECTOR_HOME={home}"
    print()
    print(f"Demo finished in {fmt_duration(time.time() - t0)} (monitor exit code {rc}). Logs: {home}/*.log")
    if choice.warning:
        print(f"WARNING: {choice.warning}")
    print("Search what was built:")
    print(f'  {h} {py} image_search_v2/search.py --text "ceramic mug"')
    example = next(iter(sorted((home / "images").glob("*/*.jpg"))), None)
    print(f"  {h} {py} image_search_v2/search.py --image {example or home / 'images/<dir>/<file>.jpg'}")
    print(f"  {h} {py} image_search_v2/search.py --serve      # then open the printed address")
    print(f"Status again: {h} {py} image_db.py")


if __name__ == "__main__":
    sys.exit(main())
