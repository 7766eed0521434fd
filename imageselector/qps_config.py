"""`qps_config.json`, the API rate sync paces at: the one owner of its name, defaults, read and write.

Sync reads it at every request window (pacing.py); the monitor's AIMD tuner rewrites it (monitor/qps_tuner.py);
a person may edit it by hand. The file:

    {"qps": 5.0, "min_qps": 1.0, "max_qps": 10.0, "updated_at": 1700000000.0, "reason": "..."}

A hand-edited value must never crash or stall sync: `parse` turns whatever the file holds into usable
numbers. `min_qps`/`max_qps` outside [ABS_MIN_QPS, ABS_MAX_QPS] (or missing, non-numbers, NaN, or
min > max) fall back to the defaults; `qps` outside [min_qps, max_qps] is clamped to them, and a `qps`
that is not a number at all becomes the default (clamped too). Each correction comes with a warning.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imageselector.fsutil import atomic_write_text

FILE_NAME = "qps_config.json"
DEFAULT_QPS = 5.0  # the guide's starting rate
DEFAULT_MIN_QPS = 1.0
DEFAULT_MAX_QPS = 10.0  # Etsy's default per-second limit
ABS_MIN_QPS = 0.01  # never 0: sync paces by 1/qps
ABS_MAX_QPS = 1000.0  # a sanity bound; the server's own x-limit-per-second caps the rate anyway


class QpsConfigError(ValueError):
    """The file exists but is not a JSON object (the caller keeps its current rate)."""


@dataclass(frozen=True)
class QpsConfig:
    """Usable values (always finite, ABS_MIN_QPS <= min_qps <= qps <= max_qps <= ABS_MAX_QPS) and what was fixed."""

    qps: float
    min_qps: float
    max_qps: float
    reason: str = ""
    updated_at: float | None = None
    warnings: tuple[str, ...] = ()


def path(home: Path) -> Path:
    return Path(home) / FILE_NAME


def _number(value: Any) -> float | None:
    """A real, finite number or None (bools, strings, NaN and infinities are not rates)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def parse(raw: dict[str, Any], *, min_qps: float = DEFAULT_MIN_QPS, max_qps: float = DEFAULT_MAX_QPS) -> QpsConfig:
    """Validate and clamp the file's values; `min_qps`/`max_qps` are the bounds used when the file's are unusable."""
    warnings: list[str] = []
    bounds = {}
    for key, default in (("min_qps", min_qps), ("max_qps", max_qps)):
        value = raw.get(key)
        num = _number(value)
        if value is not None and (num is None or not ABS_MIN_QPS <= num <= ABS_MAX_QPS):
            warnings.append(f"{key}={value!r} is not a rate in [{ABS_MIN_QPS:g}, {ABS_MAX_QPS:g}]; using {default:g}")
            num = None
        bounds[key] = default if num is None else num
    lo, hi = bounds["min_qps"], bounds["max_qps"]
    if lo > hi:
        warnings.append(f"min_qps {lo:g} > max_qps {hi:g}; using {min_qps:g}..{max_qps:g}")
        lo, hi = min_qps, max_qps
    value = raw.get("qps")
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        qps = min(max(DEFAULT_QPS, lo), hi)
        warnings.append(f"qps={value!r} is not a number; using {qps:g}")
    else:
        qps = min(max(float(value), lo), hi)
        if qps != value:
            warnings.append(f"qps={value!r} is outside [{lo:g}, {hi:g}]; clamped to {qps:g}")
    updated = _number(raw.get("updated_at"))
    return QpsConfig(qps, lo, hi, str(raw.get("reason") or ""), updated, tuple(warnings))


def read(file: Path, **bounds: float) -> QpsConfig | None:
    """The file's values, validated (see `parse`). None when the file is missing; QpsConfigError when unreadable."""
    try:
        text = Path(file).read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise QpsConfigError(f"cannot read {Path(file).name}: {exc}") from exc
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise QpsConfigError(f"{Path(file).name} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise QpsConfigError(f"{Path(file).name} is not a JSON object")
    return parse(raw, **bounds)


def write(
    file: Path,
    qps: float,
    min_qps: float = DEFAULT_MIN_QPS,
    max_qps: float = DEFAULT_MAX_QPS,
    reason: str = "",
    tmp_dir: Path | None = None,
) -> dict[str, Any]:
    """Atomically replace the file (sync and the monitor read it at any moment). Returns what was written."""
    data = {
        "qps": round(qps, 3),
        "min_qps": min_qps,
        "max_qps": max_qps,
        "updated_at": round(time.time(), 3),
        "reason": reason,
    }
    atomic_write_text(Path(file), json.dumps(data, indent=2) + "\n", tmp_dir)
    return data


def ensure(file: Path, tmp_dir: Path | None = None, reason: str = "default (created by sync)") -> bool:
    """Create the file with the defaults when it is missing. True if created."""
    if Path(file).exists():
        return False
    write(file, DEFAULT_QPS, DEFAULT_MIN_QPS, DEFAULT_MAX_QPS, reason, tmp_dir)
    return True
