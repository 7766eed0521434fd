"""`sync_data.py`: crawl the Etsy API into the status database until `KILL` (or one pass with `--once`).

Exit codes: 0 after a graceful stop or a finished `--once` pass, 2 for a key the API refuses or missing
settings. Logs go to `<home>/sync_data.log`; the key and secret are masked in every line.
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
import sys
import threading
import time
from typing import Any

from imageselector import db
from imageselector.config import SHARED_SECRET_MISSING, Settings
from imageselector.etsy.client import AuthError, EtsyClient, RetriesExhausted, StatsPublisher
from imageselector.etsy.crawl import CrawlConfig, Crawler
from imageselector.etsy.pacing import Pacer, StopRequested
from imageselector.logs import Progress
from imageselector.stage_entry import Context, Entry, StageJob, UsageError, run_stage
from imageselector.stopping import KILL, Stopper
from imageselector.worker import Heartbeat

SCRIPT = "sync_data"
LOCK_NAME = "sync"  # .run/sync.lock: two syncs on one key would share its rate limit and cause each other 429s
# a newline or stray byte in the key can never work: BadSetting (exit 2) before a log line or lock is written
ENTRY = Entry(script=SCRIPT, stage="sync", kill_files=(KILL,), lock=LOCK_NAME, preflight=Settings.check_credentials)


def build_client(settings: Settings, stopper: Stopper | None) -> EtsyClient:
    """The client with its pacer and stats publisher, configured from settings (shared with the bench)."""
    pacer = Pacer(
        settings.qps_config_path,
        tmp_dir=settings.tmp_dir,
        margin=settings.get_float("ETSY_PACING_MARGIN", 0.01),
        skew=settings.get_float("ETSY_PACING_SKEW_S", 0.25),
        daily_reserve=settings.get_int("ETSY_DAILY_RESERVE", 200),
        quota_recheck_s=settings.get_float("ETSY_QUOTA_RECHECK_S", 600.0),
        stopper=stopper,
    )
    publisher = StatsPublisher(settings.db_path, interval=settings.get_float("ETSY_STATS_INTERVAL_S", 5.0))
    bad_conn: dict[str, Any] = {}
    bad_lock = threading.Lock()

    def bad_record(kind: str, ref: str, detail: str) -> None:
        """Called from client threads: one shared connection, one writer at a time."""
        with bad_lock:
            c = bad_conn.get("c")
            if c is None:
                c = bad_conn["c"] = sqlite3.connect(
                    settings.db_path, isolation_level=None, timeout=10.0, check_same_thread=False
                )
            db.record_bad(c, kind, ref, detail)

    return EtsyClient(
        settings.api_base,
        settings.api_key,
        settings.shared_secret,
        pacer,
        timeout=settings.get_float("ETSY_TIMEOUT_S", 15.0),
        max_retries=settings.get_int("ETSY_MAX_RETRIES", 5),
        backoff_base=settings.get_float("ETSY_BACKOFF_BASE_S", 1.0),
        concurrency=settings.get_int("ETSY_CONCURRENCY", 8),
        publish=publisher,
        bad_record=bad_record,
    )


class Reporter:
    """Every `interval` seconds: a Progress line for listings, one line for requests/images/quota, a heartbeat."""

    def __init__(self, log: logging.Logger, crawler: Crawler, heartbeat: Heartbeat, interval: float) -> None:
        self.log = log
        self.crawler = crawler
        self.heartbeat = heartbeat
        self.interval = interval
        self.progress = Progress(log, "new listings", interval=interval)
        self._seen = 0
        self._last = time.monotonic()
        self._last_beat = 0.0
        self.started = time.monotonic()

    def tick(self, force: bool = False) -> None:
        c = self.crawler.counters
        if c.listings_new > self._seen:  # Progress logs listings/s (now and average) on its own interval
            self.progress.add(c.listings_new - self._seen)
            self._seen = c.listings_new
        now = time.monotonic()
        if force or now - self._last_beat >= 2.0:
            self._last_beat = now
            self.heartbeat.beat(**c.as_dict(), requests=self.crawler.client.stats["requests"])
        if not force and now - self._last < self.interval:
            return
        self._last = now
        self.line(final=force)

    def line(self, final: bool = False) -> None:
        c = self.crawler.counters
        st = self.crawler.client.snapshot()
        minutes = max((time.monotonic() - self.started) / 60.0, 1e-9)
        left = st.get("x-remaining-today")
        limit = st.get("x-limit-per-day")
        quota = f"{left:,}/{limit:,}" if isinstance(left, int) and isinstance(limit, int) else "unknown"
        work = self.crawler.open_work()
        self.log.info(
            "%s%s requests (%.2f/s, %d http 429), %s new listings (%.0f/min), %s new images, %s shops crawled,"
            " %s reviews; daily quota left %s; open: %s partitions, %s shops, %s listings without images",
            "finished: " if final else "",
            f"{st['requests']:,}",
            st["requests"] / (minutes * 60.0),
            st["http_429"],
            f"{c.listings_new:,}",
            c.listings_new / minutes,
            f"{c.images_new:,}",
            f"{c.shops_crawled:,}",
            f"{c.reviews_new:,}",
            quota,
            f"{work['partitions_open']:,}",
            f"{work['shops_pending']:,}",
            f"{work['listings_without_images']:,}",
        )


def run_sync(
    settings: Settings,
    stopper: Stopper,
    *,
    once: bool,
    log: logging.Logger,
    client: EtsyClient | None = None,
    log_interval: float | None = None,
) -> int:
    """Ping, then crawl until stopped (or one pass with `once`). Returns the exit code."""
    client = client or build_client(settings, stopper)
    conn = db.connect(settings.db_path)
    heartbeat = Heartbeat(settings.run_dir, "sync")
    crawler = Crawler(conn, client, CrawlConfig.from_settings(settings))
    interval = log_interval if log_interval is not None else settings.get_float("ETSY_LOG_INTERVAL_S", 10.0)
    reporter = Reporter(log, crawler, heartbeat, interval)
    # Runs on whichever thread waits for the daily quota: only thread-safe work (no database connection).
    client.pacer.on_wait = lambda: (
        heartbeat.beat(**crawler.counters.as_dict(), waiting_for="daily quota"),
        client.publish_stats(force=True),
    )
    idle_s = settings.get_float("ETSY_IDLE_POLL_S", 60.0)
    try:
        pong = client.ping()
        log.info(
            "connected to %s (application %s); pacing at %.2f QPS from %s",
            settings.api_base,
            pong.get("application_id"),
            client.pacer.qps,
            settings.qps_config_path.name,
        )
        crawler.seed_partitions()
        while not stopper.should_stop():
            did = crawler.step()
            reporter.tick()
            if did:
                continue
            if once:
                log.info("pass complete: nothing left to discover, crawl or fetch")
                break
            if crawler.reopen_partitions():
                continue
            client.publish_stats(force=True)
            stopper.wait(idle_s)
    except AuthError as exc:
        log.error("%s. Check ETSY_API_KEY and ETSY_SHARED_SECRET (keystring:shared_secret).", exc)
        return 2
    except StopRequested:
        pass
    except RetriesExhausted as exc:
        log.error("the API kept failing: %s; exiting so the monitor can restart sync later", exc)
        return 1
    finally:
        if stopper.reason:
            log.info("stopping: %s", stopper.reason)
        reporter.tick(force=True)
        heartbeat.beat(**crawler.counters.as_dict(), stopped=True)
        client.close()
        conn.close()
    return 0


class SyncJob(StageJob):
    """The crawl under run_stage: its own loop (`run_sync`), since it pages an API rather than claiming rows."""

    def __init__(self, ctx: Context, once: bool) -> None:
        settings, log = ctx.settings, ctx.log
        if settings.api_key and not settings.shared_secret:
            raise UsageError(SHARED_SECRET_MISSING)
        if not settings.api_key or not settings.shared_secret:
            raise UsageError(
                "ETSY_API_KEY and ETSY_SHARED_SECRET must both be set (in .env or the environment); "
                "for an offline run start the simulator: venv/bin/python -m imageselector.etsy.simulator --port 8765"
            )
        try:
            crawl_cfg = CrawlConfig.from_settings(settings)
        except (SystemExit, ValueError) as exc:
            raise UsageError(f"bad sync settings: {exc}") from exc
        log.info(
            "sync starting (pid in heartbeat): %s; %d keywords, %d taxonomy roots, offset cap %s%s",
            settings.api_base,
            len(crawl_cfg.keywords),
            len(crawl_cfg.taxonomy_ids),
            f"{crawl_cfg.max_offset:,}",
            ", single pass" if once else "",
        )
        self.once = once

    def run(self, ctx: Context, *, watch: bool, poll_s: float) -> None:
        self.exit_code = run_sync(ctx.settings, ctx.stopper, once=self.once, log=ctx.log)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="sync_data.py",
        description="Crawl the Etsy Open API v3 into etsy_data.db (listings, shops, reviews, images to download). "
        "Runs until the KILL file appears; paces itself from qps_config.json.",
    )
    ap.add_argument("--once", action="store_true", help="one pass: stop when nothing is left to discover or fetch")
    args = ap.parse_args(argv)
    return run_stage(ENTRY, lambda ctx: SyncJob(ctx, args.once))


if __name__ == "__main__":
    sys.exit(main())
