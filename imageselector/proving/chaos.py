"""Chaos run: the whole pipeline on the simulator with API and CDN faults, `kill -9` of random workers, then KILL.

After the stop, `imageselector.proving.verify` checks every flag against its artifact, ids, leases and row end states,
and the run checks that the monitor and every worker exited within the kill bound. Used by `bench/chaos.py`
(20 kills) and by the test suite (a few). Stand-in models keep it fast on a CPU.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imageselector import db
from imageselector.config import PROJECT_ROOT, load_settings
from imageselector.etsy.simulator import Faults, Simulator
from imageselector.fsutil import pid_alive
from imageselector.monitor.stage import STATE_FILE
from imageselector.proving.verify import VerifyReport, verify
from imageselector.status import figures

API_FAULTS = "api_429=0.05,api_5xx=0.05,api_timeout=0.02,timeout_s=2"
CDN_FAULTS = "cdn_404=0.03,cdn_truncated=0.05,cdn_not_image=0.03,cdn_5xx=0.03"


@dataclass
class ChaosOptions:
    home: Path
    listings: int = 150
    kills: int = 20
    kill_every_s: float = 3.0
    faults: str = f"{API_FAULTS},{CDN_FAULTS}"
    seed: int = 7
    kill_timeout_s: float = 30.0
    settle_timeout_s: float = 300.0
    embed_models: str = "all"


@dataclass
class ChaosResult:
    kills: int = 0
    killed: dict[str, int] = field(default_factory=dict)
    restarts: int = 0
    rows: int = 0
    done: dict[str, int] = field(default_factory=dict)
    parked: dict[str, int] = field(default_factory=dict)
    unfinished: int = 0
    stuck_leases: int = 0
    orphan_vectors: int = 0  # proving.verify's definition (vectors of parked or unknown rows)
    inconsistencies: list[str] = field(default_factory=list)
    stop_s: float = 0.0
    exits: dict[str, Any] = field(default_factory=dict)
    survivors: list[int] = field(default_factory=list)
    settled: bool = False
    settle_s: float = 0.0  # monitor start -> backlog done (or given up)
    wall_s: float = 0.0
    sim_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def problems(self) -> list[str]:
        out = list(self.inconsistencies)
        if self.stuck_leases:
            out.append(f"{self.stuck_leases} stuck leases")
        if self.unfinished:
            out.append(f"{self.unfinished} stage-rows neither done nor parked")
        if self.survivors:
            out.append(f"processes still alive after the stop: {self.survivors}")
        for name, ex in self.exits.items():
            if ex.get("how") not in ("exited",) and not str(ex.get("how", "")).startswith("not running"):
                out.append(f"{name} did not exit by itself within the bound: {ex}")
        return out

    def tally(self) -> str:
        lines = [
            f"kills (SIGKILL):     {self.kills}  ({', '.join(f'{k} {v}' for k, v in sorted(self.killed.items()))})",
            f"restarts:            {self.restarts}",
            f"rows:                {self.rows}",
            "rows done:           " + ", ".join(f"{k} {v}" for k, v in self.done.items()),
            "rows parked:         " + ", ".join(f"{k} {v}" for k, v in self.parked.items() if v),
            f"unfinished:          {self.unfinished}",
            f"stuck leases:        {self.stuck_leases}",
            f"orphan vectors:      {self.orphan_vectors}",
            f"stop after KILL:     {self.stop_s:.1f} s  ("
            + ", ".join(
                f"{k} {v.get('how')}{' ' + str(v['after_s']) + ' s' if 'after_s' in v else ''}"
                for k, v in self.exits.items()
            )
            + ")",
            f"backlog settled:     {self.settled} after {self.settle_s:.0f} s",
            f"wall time:           {self.wall_s:.0f} s",
            f"inconsistencies:     {len(self.problems)}",
        ]
        lines += [f"  - {p}" for p in self.problems[:30]]
        return "\n".join(lines)


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        try:
            return subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True).stdout
        except OSError:
            return ""


def _state(home: Path) -> dict[str, Any]:
    try:
        return json.loads((home / ".run" / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def prepare_models(home: Path) -> tuple[Path, Path]:
    """Stand-in embedding models and u2net, built once per home."""

    from imageselector.background.standins import build_standin_u2net
    from imageselector.models.standins import build_standins

    out = home / "models" / "standin"
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)
    try:
        registry = build_standins(out / "embedding")
    finally:
        root.setLevel(level)
    return registry, build_standin_u2net(out / "u2net_standin.onnx")


def monitor_config(opts: ChaosOptions, registry: Path, u2net: Path) -> dict[str, Any]:
    return {
        "stages": {
            "sync": {"args": ["--once"], "restart_on_success_s": None},
            "download": {"args": ["--watch", "--poll", "1", "--timeout", "3", "--progress-interval", "5"]},
            "bg": {"args": ["--watch", "--poll", "1", "--model-path", str(u2net)]},
            "embed": {
                "args": [
                    "--model",
                    opts.embed_models,
                    "--batch-size",
                    "8",
                    "--watch",
                    "--models-file",
                    str(registry),
                    "--flush-seconds",
                    "2",
                    "--workers",
                    "1",
                ]
            },
        },
        "tick_s": 0.5,
        "kill_timeout_s": opts.kill_timeout_s,
        "backoff_base_s": 0.5,
        "backoff_max_s": 4.0,
        "crash_loop_max": opts.kills + 10,  # the kills are ours; a real crash loop would show as restarts >> kills
        "crash_loop_window_s": 600,
        "hang_timeout_s": 120,
        "startup_timeout_s": 120,
        "status_interval_s": 10,
        "qps": {"interval_s": 5, "initial_qps": 8.0, "max_qps": 10.0},
    }


def backlog_done(conn, home: Path) -> bool:  # type: ignore[no-untyped-def]
    st = _state(home).get("stages", {})
    if st.get("sync", {}).get("state") not in ("finished", "failed"):
        return False
    data = figures.collect(conn)
    return data["total"] > 0 and all(s["backlog"] == 0 and s["leased"] == 0 for s in data["stages"].values())


def run(opts: ChaosOptions, log=print) -> ChaosResult:  # type: ignore[no-untyped-def]

    t_start = time.time()
    home = opts.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    res = ChaosResult()
    rng = random.Random(opts.seed)
    registry, u2net = prepare_models(home)
    cfg_path = home / "chaos_monitor.json"
    cfg_path.write_text(json.dumps(monitor_config(opts, registry, u2net), indent=2))
    faults = Faults.parse(opts.faults)
    with Simulator(listings=opts.listings, seed=opts.seed, qps=10, qpd=100_000_000, faults=faults) as sim:
        env = {
            **os.environ,
            "IMAGESELECTOR_HOME": str(home),
            "ETSY_API_BASE": sim.api_base,
            "ETSY_CDN_BASE": sim.cdn_base,
            "ETSY_API_KEY": sim.api_key,
            "ETSY_SHARED_SECRET": sim.shared_secret,
            "ETSY_TIMEOUT_S": "2",
            "ETSY_LOG_INTERVAL_S": "5",
            "ETSY_IDLE_POLL_S": "2",
            "HF_HUB_OFFLINE": "1",
            "IMAGESELECTOR_MODELS_FILE": str(registry),
        }
        cmd = [sys.executable, str(PROJECT_ROOT / "scripts" / "pipeline_monitor.py"), "--config", str(cfg_path)]
        with open(home / "pipeline.log", "ab") as out:
            mon = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        t_mon = time.time()
        seen_pids: set[int] = set()
        conn = db.connect(home / "etsy_data.db")
        try:
            _chaos_loop(opts, res, rng, home, mon, seen_pids, log)
            log(f"kills done ({res.kills}); waiting up to {opts.settle_timeout_s:.0f}s for the backlog to finish")
            end = time.time() + opts.settle_timeout_s
            while time.time() < end and mon.poll() is None:
                _note_pids(home, seen_pids)
                if backlog_done(conn, home):
                    res.settled = True
                    break
                time.sleep(1.0)
            res.settle_s = time.time() - t_mon
            log("touching KILL")
            t_kill = time.time()
            (home / "KILL").touch()
            try:
                mon.wait(timeout=opts.kill_timeout_s + 30)
            except subprocess.TimeoutExpired:
                res.inconsistencies.append("monitor did not exit after KILL")
                mon.kill()
                mon.wait()
            res.stop_s = time.time() - t_kill
            if mon.returncode != 0:
                res.inconsistencies.append(f"monitor exit code {mon.returncode}")
            if res.stop_s > opts.kill_timeout_s + 5:
                res.inconsistencies.append(f"monitor took {res.stop_s:.1f}s to stop (bound {opts.kill_timeout_s:.0f}s)")
        finally:
            conn.close()
            if mon.poll() is None:
                mon.kill()
        res.sim_stats = sim.stats.snapshot()
    state = _state(home)
    res.exits = state.get("shutdown", {})
    res.restarts = sum(s.get("restarts", 0) for s in state.get("stages", {}).values())
    res.survivors = sorted(p for p in seen_pids if pid_alive(p))
    rep: VerifyReport = verify(load_settings(home))
    res.rows = rep.rows
    res.done, res.parked = rep.done, rep.parked
    res.unfinished = sum(rep.unfinished.values())
    res.stuck_leases = rep.stuck_leases
    res.orphan_vectors = rep.orphan_vectors  # also listed among rep.inconsistencies, so a problem
    res.inconsistencies += rep.inconsistencies
    res.wall_s = time.time() - t_start
    return res


def _note_pids(home: Path, seen: set[int]) -> dict[str, int]:
    running = {
        n: s["pid"] for n, s in _state(home).get("stages", {}).items() if s.get("pid") and s.get("state") == "running"
    }
    seen.update(running.values())
    return running


def _chaos_loop(opts, res, rng, home, mon, seen_pids, log) -> None:  # type: ignore[no-untyped-def]
    scripts = {"sync": "sync_data.py", "download": "image_downloader.py", "bg": "bg_remover.py", "embed": "embed.py"}
    time.sleep(opts.kill_every_s)
    while res.kills < opts.kills and mon.poll() is None:
        running = _note_pids(home, seen_pids)
        if not running:
            time.sleep(0.3)
            continue
        name = rng.choice(sorted(running))
        pid = running[name]
        if scripts.get(name, "?") not in _command_line(pid):
            time.sleep(0.2)
            continue
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        res.kills += 1
        res.killed[name] = res.killed.get(name, 0) + 1
        log(f"kill -9 {name} (pid {pid}) [{res.kills}/{opts.kills}]")
        time.sleep(opts.kill_every_s * rng.uniform(0.5, 1.5))


def to_json(res: ChaosResult) -> str:
    return json.dumps({**asdict(res), "problems": res.problems}, indent=2, default=str)
