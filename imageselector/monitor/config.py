"""What the pipeline monitor runs and how patiently: defaults, then `<home>/pipeline_monitor.json`, then CLI flags.

The defaults are the guide's four commands. The JSON file only needs the keys it changes, e.g.
`{"stages": {"bg": {"enabled": false}}, "hang_timeout_s": 1800}`; `--print-config` shows the full result.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from imageselector import qps_config
from imageselector.monitor.qps_tuner import Policy

CONFIG_NAME = "pipeline_monitor.json"


@dataclass(frozen=True)
class StageSpec:
    """One supervised worker.

    `kill_file` is the stage's own kill file (None: the worker stops on KILL only, like sync).
    `heartbeat` names `<home>/.run/<heartbeat>.heartbeat`; any heartbeat file carrying the child's pid
    counts too, so per-model heartbeats of embed.py also prove it alive. None disables hang detection.
    `restart_on_success_s`: a clean exit (code 0) with no kill file present is a finished run; start it
    again after this many seconds (None: leave it finished, as the demo does with sync).
    """

    name: str
    script: str
    args: tuple[str, ...] = ()
    kill_file: str | None = None
    heartbeat: str | None = None
    log: str = ""
    enabled: bool = True
    restart_on_success_s: float | None = 600.0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def log_name(self) -> str:
        return self.log or Path(self.script).stem


DEFAULT_STAGES: dict[str, StageSpec] = {
    "sync": StageSpec("sync", "sync_data.py", (), None, "sync", "sync_data"),
    "download": StageSpec(
        "download", "scripts/image_downloader.py", ("--watch",), "KILL_DL", "download", "image_downloader"
    ),
    "bg": StageSpec("bg", "scripts/bg_remover.py", ("--watch", "--gpu"), "KILL_BG", "bg", "bg_remover"),
    "embed": StageSpec(
        "embed",
        "image_search_v2/embed.py",
        ("--model", "all", "--batch-size", "8", "--watch"),
        "KILL_EMBED",
        "embed",
        "embed",
    ),
}


@dataclass(frozen=True)
class QpsTuning(Policy):
    """AIMD settings for qps_config.json: the policy (imageselector/monitor/qps_tuner.py) plus when to apply it."""

    enabled: bool = True
    interval_s: float = 30.0
    initial_qps: float = qps_config.DEFAULT_QPS


@dataclass(frozen=True)
class MonitorConfig:
    stages: dict[str, StageSpec] = field(default_factory=lambda: dict(DEFAULT_STAGES))
    tick_s: float = 1.0
    kill_timeout_s: float = 30.0
    term_grace_s: float = 10.0
    hang_timeout_s: float = 900.0
    startup_timeout_s: float = 900.0
    backoff_base_s: float = 5.0
    backoff_max_s: float = 600.0
    stable_after_s: float = 600.0
    crash_loop_max: int = 5
    crash_loop_window_s: float = 900.0
    crash_loop_cooldown_s: float | None = 3600.0  # then one more try (a network outage heals); None = never
    status_interval_s: float = 300.0
    min_free_mb: float = 2048.0  # free-space floor: below it every stage is paused (setting MIN_FREE_MB)
    resume_free_mb: float | None = None  # resume at or above this (default: the floor + 25%, at least + 16 MB)
    disk_check_s: float = 5.0  # how often free space is measured
    min_pause_s: float = 30.0  # shortest pause: a worker that hit ENOSPC is not restarted in a tight loop
    qps: QpsTuning = field(default_factory=QpsTuning)

    def enabled_stages(self) -> list[StageSpec]:
        return [s for s in self.stages.values() if s.enabled]

    def to_json(self) -> str:
        d = asdict(self)
        for s in d["stages"].values():
            s["args"] = list(s["args"])
        return json.dumps(d, indent=2)


def _merge_stage(base: StageSpec | None, name: str, raw: dict[str, Any]) -> StageSpec:
    known = {f.name for f in fields(StageSpec)}
    bad = set(raw) - known
    if bad:
        raise ValueError(f"stage {name!r}: unknown keys {sorted(bad)}; known: {sorted(known)}")
    if base is None:
        if "script" not in raw:
            raise ValueError(f"new stage {name!r} needs a 'script'")
        base = StageSpec(name, raw["script"])
    upd = dict(raw)
    if "args" in upd:
        upd["args"] = tuple(str(a) for a in upd["args"])
    return replace(base, **upd)


def from_dict(raw: dict[str, Any], base: MonitorConfig | None = None) -> MonitorConfig:
    """Overlay a (partial) config dict on `base` (default: the built-in config). Unknown keys are errors."""
    base = base or MonitorConfig()
    raw = dict(raw)
    stages = dict(base.stages)
    for name, spec in (raw.pop("stages", None) or {}).items():
        stages[name] = _merge_stage(stages.get(name), name, spec)
    qps = base.qps
    if "qps" in raw:
        qraw = raw.pop("qps")
        bad = set(qraw) - {f.name for f in fields(QpsTuning)}
        if bad:
            raise ValueError(f"qps: unknown keys {sorted(bad)}")
        qps = replace(qps, **qraw)
    bad = set(raw) - {f.name for f in fields(MonitorConfig)}
    if bad:
        raise ValueError(f"unknown config keys {sorted(bad)}")
    return replace(base, stages=stages, qps=qps, **raw)


def load(home: Path, path: Path | None = None, base: MonitorConfig | None = None) -> MonitorConfig:
    """`base` (default: built-in defaults) overlaid with the config file (`path`, else `<home>/pipeline_monitor.json`
    if present)."""
    p = path or (Path(home) / CONFIG_NAME)
    if not p.is_file():
        if path is not None:
            raise ValueError(f"config file {p} not found")
        return base or MonitorConfig()
    try:
        raw = json.loads(p.read_text())
    except ValueError as exc:
        raise ValueError(f"{p}: not valid JSON: {exc}") from exc
    return from_dict(raw, base)


def base_from_settings(get) -> MonitorConfig:  # type: ignore[no-untyped-def]
    """Defaults with the MIN_FREE_MB setting (.env / environment) applied; the config file still wins."""
    raw = get("MIN_FREE_MB")
    if raw in (None, ""):
        return MonitorConfig()
    try:
        return replace(MonitorConfig(), min_free_mb=float(raw))
    except ValueError:
        raise ValueError(f"setting MIN_FREE_MB={raw!r} is not a number of megabytes") from None


def only_stages(cfg: MonitorConfig, names: list[str]) -> MonitorConfig:
    """Enable exactly `names` (the --stages flag)."""
    unknown = [n for n in names if n not in cfg.stages]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known: {', '.join(cfg.stages)}")
    stages = {n: replace(s, enabled=n in names) for n, s in cfg.stages.items()}
    return replace(cfg, stages=stages)
