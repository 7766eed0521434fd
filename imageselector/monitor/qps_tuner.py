"""AIMD tuning of the API rate that sync uses, from what sync reports in kv `sync_stats`.

Each interval the monitor compares the newest `sync_stats` with the previous one:
- any new 429s -> multiply the rate by `decrease` (fast back-off);
- requests flowing, no 429s, and the last `x-remaining-this-second` shows headroom (or the header is
  absent) -> add `increase` (slow probe upwards);
- otherwise (sync idle, stats stale, no headroom) -> hold.
The result stays within [min_qps, max_qps] and under the server's `x-limit-per-second`. The daily quota is
a rolling 24 h window (docs/etsy API notes), so what is left today is spread over `quota_horizon_s`
but never throttled below the sustainable rate `x-limit-per-day / 86400`, nor below min_qps (sync clamps
to it anyway; when the quota runs out, sync's own daily reserve pauses requests).
`decide()` is pure (no clock, no files) so the policy is unit-tested directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from imageselector import qps_config
from imageselector.qps_config import ABS_MIN_QPS

DAY_S = 86400.0


@dataclass(frozen=True)
class SyncStats:
    ts: float
    requests: int
    http_429: int
    limit_per_second: float | None = None
    remaining_this_second: float | None = None
    limit_per_day: float | None = None
    remaining_today: float | None = None


@dataclass(frozen=True)
class Policy:
    min_qps: float = qps_config.DEFAULT_MIN_QPS
    max_qps: float = qps_config.DEFAULT_MAX_QPS
    increase: float = 0.5
    decrease: float = 0.5
    headroom: float = 0.2
    stale_after_s: float = 120.0
    quota_horizon_s: float = 6 * 3600.0


@dataclass(frozen=True)
class Decision:
    qps: float
    reason: str
    changed: bool


def _num(raw: dict[str, Any], *names: str) -> float | None:
    for n in names:
        v = raw.get(n)
        if v is None:
            continue
        try:
            return float(v)
        except (TypeError, ValueError):
            return None
    return None


def parse_stats(text: str | None) -> SyncStats | None:
    """Read kv `sync_stats` (header names accepted with dashes or underscores). None when absent or bad."""
    if not text:
        return None
    try:
        raw = json.loads(text)
        headers = raw.get("headers") if isinstance(raw.get("headers"), dict) else {}
        merged = {**headers, **raw}
        return SyncStats(
            ts=float(raw["ts"]),
            requests=int(raw.get("requests", 0)),
            http_429=int(raw.get("http_429", 0)),
            limit_per_second=_num(merged, "x-limit-per-second", "x_limit_per_second", "limit_per_second"),
            remaining_this_second=_num(
                merged, "x-remaining-this-second", "x_remaining_this_second", "remaining_this_second"
            ),
            limit_per_day=_num(merged, "x-limit-per-day", "x_limit_per_day", "limit_per_day"),
            remaining_today=_num(merged, "x-remaining-today", "x_remaining_today", "remaining_today"),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def quota_cap(stats: SyncStats, policy: Policy) -> float | None:
    """The most the daily quota allows now, or None when sync has not seen the headers."""
    if stats.remaining_today is None:
        return None
    spread = max(0.0, stats.remaining_today) / policy.quota_horizon_s
    sustainable = (stats.limit_per_day or 0.0) / DAY_S
    return max(spread, sustainable, ABS_MIN_QPS)


def decide(current: float, prev: SyncStats | None, stats: SyncStats | None, policy: Policy, now: float) -> Decision:
    """Next qps for sync, and why. `prev` is what the previous call saw (None on the first call)."""
    new = current
    if stats is None:
        reason = "holding: sync has not reported stats yet"
    elif now - stats.ts > policy.stale_after_s:
        reason = f"holding: sync stats are {now - stats.ts:.0f}s old (sync not running?)"
    elif prev is None or stats.requests < prev.requests or stats.ts <= prev.ts:
        reason = "holding: first look at sync stats (or sync restarted)"
    else:
        d_req = stats.requests - prev.requests
        d_429 = max(0, stats.http_429 - prev.http_429)
        if d_429:
            new = current * policy.decrease
            reason = f"decrease: {d_429} of {d_req} requests got 429"
        elif d_req == 0:
            reason = "holding: sync made no requests"
        elif stats.limit_per_second and stats.remaining_this_second is not None:
            frac = stats.remaining_this_second / stats.limit_per_second
            if frac >= policy.headroom:
                new = current + policy.increase
                reason = (
                    f"increase: no 429s in {d_req} requests, {stats.remaining_this_second:g} of "
                    f"{stats.limit_per_second:g} left this second"
                )
            else:
                reason = f"holding: only {stats.remaining_this_second:g} of {stats.limit_per_second:g} left this second"
        else:
            new = current + policy.increase
            reason = f"increase: no 429s in {d_req} requests"
    top = policy.max_qps
    if stats is not None and stats.limit_per_second:
        top = min(top, stats.limit_per_second)
    cap = quota_cap(stats, policy) if stats is not None else None
    if cap is not None and new > cap:
        new = cap
        reason += f"; daily quota: {stats.remaining_today:,.0f} left -> at most {cap:.2f}/s"  # type: ignore[union-attr]
    new = min(max(new, policy.min_qps), max(top, policy.min_qps))
    new = round(max(new, ABS_MIN_QPS), 3)
    return Decision(new, reason, abs(new - current) > 1e-9)


def policy_from_file(cfg: qps_config.QpsConfig, base: Policy) -> Policy:
    """min_qps / max_qps edited by hand in qps_config.json win over the monitor's configured ones.

    `cfg` must be read with `base`'s bounds as fallbacks (`qps_config.read(path, min_qps=..., max_qps=...)`),
    so a missing or unusable bound in the file leaves the configured one.
    """
    return replace(base, min_qps=cfg.min_qps, max_qps=cfg.max_qps)
