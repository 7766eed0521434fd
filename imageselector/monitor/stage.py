"""`scripts/pipeline_monitor.py`: run the four stages, restart what crashes or hangs, tune the QPS, stop on KILL.

One `StageRunner` per worker. Each tick (1 s) the monitor:
- polls every child: a crash is restarted after an exponential backoff; `crash_loop_max` crashes within
  `crash_loop_window_s` stop that stage (logged loudly) while the others keep running; a clean exit with
  the stage's kill file present waits for the file to go; exit code 2 (bad usage/config) is not retried;
- checks heartbeats (`<home>/.run/*.heartbeat` carrying the child's pid): none for `hang_timeout_s`
  means hung -> SIGTERM, then SIGKILL after `term_grace_s`, then restart like a crash;
- every `qps.interval_s` adjusts qps_config.json (imageselector/monitor/qps_tuner.py);
- every `status_interval_s` logs one line per stage: state, rate, backlog, restarts.
On `KILL` (or SIGTERM/SIGINT to the monitor) it writes KILL_DL, KILL_BG, KILL_EMBED, gives every worker
`kill_timeout_s` (30 s) to exit, then SIGTERM, then SIGKILL; logs what each did and exits 0.
The monitor owns `pipeline.log` (imageselector/logs.py writes and rotates it; under `nohup ... >> pipeline.log`
its stdout/stderr follow the current file). Children log to `<home>/<log>.log` themselves; their stdout/stderr
go to the same file for tracebacks, through an O_APPEND descriptor that each child re-points at its current
log whenever it rotates it, so nothing is written over a backup.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imageselector import db, qps_config
from imageselector.config import PROJECT_ROOT, HomeError, Settings, load_settings
from imageselector.fsutil import atomic_write_text, clean_home_tmp, instance_lock, lock_holder, pid_alive
from imageselector.logs import fmt_duration, setup_logging
from imageselector.monitor import config as monitor_config
from imageselector.monitor import qps_tuner
from imageselector.monitor.config import MonitorConfig, StageSpec
from imageselector.monitor.diskspace import DiskGuard
from imageselector.status import figures, health
from imageselector.stopping import (
    EXIT_NO_SPACE,
    KILL,
    STAGE_KILL_FILES,
    Stopper,
    remove_kill_files,
    split_kill_files,
)
from imageselector.worker import Heartbeat

log = logging.getLogger("pipeline")

# The status-database stages whose leases each supervised worker holds (freed when it dies).
DB_STAGES: dict[str, tuple[str, ...]] = {
    "download": ("download",),
    "bg": ("bg",),
    "embed": tuple(f"embed_{m}" for m in db.EMBED_MODELS),
}
STATE_FILE = "pipeline_monitor.state.json"  # under .run/: what the monitor is doing, for the demo, chaos, humans
OLD_STATE_FILE = "pipeline_monitor.json"  # its name before 2026-11 (clashed with the config file's)
LOCK_NAME = "pipeline_monitor"  # .run/pipeline_monitor.lock: one monitor per data home


def describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit code {rc}"


@dataclass
class StageRunner:
    """Supervises one worker: start, watch, restart with backoff, give up on a crash loop."""

    spec: StageSpec
    cfg: MonitorConfig
    home: Path
    state: str = "waiting"  # waiting | running | held | finished | failed
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    next_start: float = 0.0
    starts: int = 0
    consecutive: int = 0
    crashes: collections.deque[float] = field(default_factory=collections.deque)
    delays: list[float] = field(default_factory=list)
    hangs: int = 0
    last_exit: str = ""
    last_beat: float | None = None
    term_sent_at: float | None = None
    hang_reason: str | None = None
    held_logged: bool = False
    retry_at: float | None = None  # a crash-looped stage gets another chance after the cool-down
    just_exited: bool = False  # set on every exit; the monitor frees the dead worker's leases and clears it
    paused: bool = False  # the disk is (nearly) full: stopped gracefully and not started until space returns
    paused_at: float = 0.0
    pause_killed: bool = False
    reported_full: bool = False  # it exited with EXIT_NO_SPACE: the monitor pauses everything

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)

    @property
    def log_path(self) -> Path:
        return self.home / f"{self.spec.log_name}.log"

    def kill_file_present(self) -> str | None:
        for name in (self.spec.kill_file,) if self.spec.kill_file else ():
            if (self.home / name).exists():
                return name
        return None

    # ------------------------------------------------------------------ starting

    def command(self) -> list[str]:
        script = Path(self.spec.script)
        if not script.is_absolute():
            script = PROJECT_ROOT / script
        return [sys.executable, str(script), *self.spec.args]

    def start(self, now: float) -> None:
        cmd = self.command()
        env = {**os.environ, **self.spec.env, "IMAGESELECTOR_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=str(PROJECT_ROOT),
                env=env,
                start_new_session=True,  # the monitor alone decides how its children stop
            )
        self.starts += 1
        self.started_at = now
        self.last_beat = None
        self.term_sent_at = None
        self.hang_reason = None
        self.state = "running"
        pid_file = self.home / ".run" / f"{self.name}.pid"
        try:
            atomic_write_text(pid_file, json.dumps({"pid": self.proc.pid, "started": now, "cmd": cmd}))
        except OSError as exc:  # only used to find orphans after a hard monitor kill
            log.warning("%s: could not write %s: %s", self.name, pid_file, exc)
        what = "started" if self.starts == 1 else f"restarted (restart #{self.restarts})"
        log.info("%s %s: pid %d, %s, log %s", self.name, what, self.proc.pid, " ".join(cmd[1:]), self.log_path.name)

    # ------------------------------------------------------------------ each tick

    def tick(self, now: float, beats: list[dict[str, Any]]) -> None:
        if self.state == "running":
            assert self.proc is not None
            rc = self.proc.poll()
            if rc is None:
                if self.paused:
                    self._check_pause_stop(now)
                else:
                    self._check_hang(now, beats)
            else:
                self._on_exit(rc, now)
        if self.state == "failed" and self.retry_at is not None and now >= self.retry_at:
            log.warning("%s: cool-down after its crash loop is over; trying it again", self.name)
            self.crashes.clear()
            self.consecutive, self.retry_at, self.state, self.next_start = 0, None, "waiting", now
        if self.state == "held" and self.kill_file_present() is None:
            log.info("%s: %s removed; starting it again", self.name, self.spec.kill_file)
            self.state, self.next_start, self.held_logged = "waiting", now, False
        if self.paused and self.state == "waiting":
            self.state = "paused"
        if self.state == "waiting" and now >= self.next_start:
            found = self.kill_file_present()
            if found:
                self.state = "held"
                if not self.held_logged:
                    log.warning("%s: %s present; not starting it until the file is removed", self.name, found)
                    self.held_logged = True
            else:
                self.start(now)

    def _beat_ts(self, beats: list[dict[str, Any]]) -> float | None:
        assert self.proc is not None
        newest = None
        for hb in beats:
            ts = hb.get("ts")
            if not isinstance(ts, int | float) or ts < self.started_at:
                continue
            if hb.get("pid") == self.proc.pid or hb.get("_name") == self.spec.heartbeat:
                newest = ts if newest is None else max(newest, ts)
        return newest

    def _check_hang(self, now: float, beats: list[dict[str, Any]]) -> None:
        assert self.proc is not None
        if self.term_sent_at is not None:
            if now - self.term_sent_at >= self.cfg.term_grace_s:
                log.error(
                    "%s: pid %d ignored SIGTERM for %.0fs; sending SIGKILL",
                    self.name,
                    self.proc.pid,
                    now - self.term_sent_at,
                )
                self._signal(signal.SIGKILL)
                self.term_sent_at = float("inf")
            return
        if self.spec.heartbeat is None:
            return
        beat = self._beat_ts(beats)
        if beat is not None:
            self.last_beat = beat
        if self.last_beat is None:
            silent, limit, what = now - self.started_at, self.cfg.startup_timeout_s, "no heartbeat since start"
        else:
            silent, limit, what = now - self.last_beat, self.cfg.hang_timeout_s, "no heartbeat"
        if silent > limit:
            self.hangs += 1
            self.hang_reason = f"hung: {what} for {silent:.0f}s (limit {limit:.0f}s)"
            log.error("%s (pid %d) %s; sending SIGTERM", self.name, self.proc.pid, self.hang_reason)
            self._signal(signal.SIGTERM)
            self.term_sent_at = now

    # ------------------------------------------------------------------ disk-space pause

    def pause(self, now: float) -> None:
        """Stop gracefully (SIGTERM: finish or hand back the batch) and do not start until `resume`."""
        if self.paused:
            return
        self.paused, self.paused_at, self.pause_killed = True, now, False
        if self.state == "running" and self.proc is not None:
            log.warning("%s (pid %d): pausing for disk space: SIGTERM (graceful stop)", self.name, self.proc.pid)
            self._signal(signal.SIGTERM)
        elif self.state == "waiting":
            self.state = "paused"

    def resume(self, now: float) -> None:
        if not self.paused:
            return
        self.paused = False
        if self.state == "paused":
            self.state, self.next_start, self.consecutive = "waiting", now, 0

    def _check_pause_stop(self, now: float) -> None:
        if not self.pause_killed and now - self.paused_at > self.cfg.kill_timeout_s + self.cfg.term_grace_s:
            log.error("%s (pid %d) did not stop for the disk-space pause: SIGKILL", self.name, self.proc.pid)  # type: ignore[union-attr]
            self._signal(signal.SIGKILL)
            self.pause_killed = True

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def _on_exit(self, rc: int, now: float) -> None:
        ran = now - self.started_at
        how = self.hang_reason or describe_exit(rc)
        self.last_exit = f"{how} after {fmt_duration(ran)}"
        self.proc = None
        self.just_exited = True
        if self.paused or (self.hang_reason is None and rc == EXIT_NO_SPACE):
            self.reported_full = not self.paused
            self.state = "paused" if self.paused else "waiting"
            log.warning(
                "%s stopped (%s)%s; it starts again when there is disk space",
                self.name,
                self.last_exit,
                " for the disk-space pause" if self.paused else ": the disk is full",
            )
            return
        if self.hang_reason is None and rc == 0:
            found = self.kill_file_present()
            if found:
                log.info("%s stopped by %s (exit 0); waiting for %s to be removed", self.name, found, found)
                self.state, self.held_logged = "held", True
            elif self.spec.restart_on_success_s is None:
                log.info("%s finished (exit 0 after %s); not restarting it", self.name, fmt_duration(ran))
                self.state = "finished"
            else:
                log.info(
                    "%s finished (exit 0 after %s); next run in %s",
                    self.name,
                    fmt_duration(ran),
                    fmt_duration(self.spec.restart_on_success_s),
                )
                self.consecutive = 0
                self.state, self.next_start = "waiting", now + self.spec.restart_on_success_s
            return
        if self.hang_reason is None and rc == 2:
            self._give_up(
                f"exited with code 2 (bad usage or configuration); restarting at once will not help. "
                f"See {self.log_path.name}",
                cooldown=self.cfg.crash_loop_cooldown_s,
            )
            return
        if ran >= self.cfg.stable_after_s:
            self.consecutive = 0
        self.crashes.append(now)
        while self.crashes and now - self.crashes[0] > self.cfg.crash_loop_window_s:
            self.crashes.popleft()
        if len(self.crashes) >= self.cfg.crash_loop_max:
            self._give_up(
                f"CRASH LOOP: {len(self.crashes)} crashes within {fmt_duration(self.cfg.crash_loop_window_s)} "
                f"(last: {self.last_exit}). See {self.log_path.name}",
                cooldown=self.cfg.crash_loop_cooldown_s,
            )
            return
        delay = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * (2**self.consecutive))
        self.consecutive += 1
        self.delays.append(delay)
        self.state, self.next_start = "waiting", now + delay
        log.warning(
            "%s %s (%s); restarting in %s (crash %d of %d allowed within %s)",
            self.name,
            "hung" if self.hang_reason else "crashed",
            self.last_exit,
            fmt_duration(delay) if delay >= 1 else f"{delay:.1f}s",
            len(self.crashes),
            self.cfg.crash_loop_max,
            fmt_duration(self.cfg.crash_loop_window_s),
        )

    def _give_up(self, why: str, cooldown: float | None) -> None:
        self.state = "failed"
        self.retry_at = None if cooldown is None else time.time() + cooldown
        later = "" if cooldown is None else f" (one more try in {fmt_duration(cooldown)})"
        bar = "!" * 78
        log.critical(bar)
        log.critical("%s STOPPED, NOT RESTARTING%s: %s", self.name, later, why)
        log.critical(
            "the other stages keep running; fix the cause, then restart the monitor (touch KILL; start it again)"
        )
        log.critical(bar)

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "state": self.state,
            "pid": self.proc.pid if self.proc is not None else None,
            "starts": self.starts,
            "restarts": self.restarts,
            "crashes_in_window": len(self.crashes),
            "hangs": self.hangs,
            "backoff_delays": self.delays[-20:],
            "last_exit": self.last_exit,
            "up_s": round(now - self.started_at, 1) if self.proc is not None else None,
            "next_start_in_s": round(self.next_start - now, 1) if self.state == "waiting" else None,
        }


class Monitor:
    """The supervisor loop. `run()` returns the exit code (0 after a graceful stop)."""

    def __init__(self, settings: Settings, cfg: MonitorConfig, *, install_signals: bool = True) -> None:
        self.settings = settings
        self.home = settings.home
        self.cfg = cfg
        self.run_dir = settings.run_dir
        self.stopper = Stopper(self.home, [KILL], install_signals=install_signals)
        self.runners = [StageRunner(s, cfg, self.home) for s in cfg.enabled_stages()]
        self.conn = None
        self.qps_prev: qps_tuner.SyncStats | None = None
        self.sync_prev_requests: tuple[float, int] | None = None
        self.shutdown_report: dict[str, Any] = {}
        self._last_state = ""
        self.disk = DiskGuard.from_config(settings, cfg.min_free_mb, cfg.resume_free_mb, cfg.min_pause_s)
        self.next_disk_check = 0.0
        self.last_exit_at: float | None = None  # the previous monitor's exit (kill files older than it are stale)
        self.exited_at: float | None = None
        self._honoured_kill_mtime: float | None = None  # a KILL touched since the last exit, honoured at start
        self._qps_warned: tuple[str, ...] = ()

    # ------------------------------------------------------------------ start-up

    def _stop_orphans(self) -> None:
        """Workers left running by a monitor that was killed hard would otherwise run twice."""
        for r in self.runners:
            pid_file = self.run_dir / f"{r.name}.pid"
            try:
                info = json.loads(pid_file.read_text())
                pid = int(info["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if not pid_alive(pid) or Path(r.spec.script).name not in _command_of(pid):
                continue
            log.warning("%s: pid %d from an earlier monitor is still running; stopping it (SIGTERM)", r.name, pid)
            _terminate_pid(pid, self.cfg.kill_timeout_s)

    def _read_qps(self) -> qps_config.QpsConfig | None:
        """qps_config.json as sync will read it (clamped), warnings said once per change. None: missing or unreadable."""
        q = self.cfg.qps
        try:
            cfg = qps_config.read(self.settings.qps_config_path, min_qps=q.min_qps, max_qps=q.max_qps)
        except qps_config.QpsConfigError as exc:
            cfg, warnings = None, (str(exc),)
        else:
            warnings = cfg.warnings if cfg is not None else ()
        if warnings != self._qps_warned:
            for w in warnings:
                log.warning("%s: %s", qps_config.FILE_NAME, w)
            self._qps_warned = warnings
        return cfg

    def _init_qps(self) -> None:
        q = self.cfg.qps
        cur = self._read_qps()
        if cur is not None:
            log.info("%s: qps %.2f (min %g, max %g)", qps_config.FILE_NAME, cur.qps, cur.min_qps, cur.max_qps)
            return
        try:
            qps_config.write(
                self.settings.qps_config_path, q.initial_qps, q.min_qps, q.max_qps, "initial value", self.settings.tmp_dir
            )
        except OSError as exc:
            log.warning("could not write %s: %s", qps_config.FILE_NAME, exc)
            return
        log.info("%s written: qps %.2f (min %.2f, max %.2f)", qps_config.FILE_NAME, q.initial_qps, q.min_qps, q.max_qps)

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        """Exit code: 0 after a graceful stop, 2 when another monitor already runs on this data home."""
        with instance_lock(self.run_dir, LOCK_NAME) as mine:
            if not mine:
                log.error(
                    "another pipeline monitor is running on %s (pid %s, holds .run/%s.lock); "
                    "stop it first (touch KILL)",
                    self.home,
                    lock_holder(self.run_dir, LOCK_NAME),
                    LOCK_NAME,
                )
                return 2
            self.last_exit_at = self._previous_exit()
            try:
                return self._run()
            finally:
                # A KILL honoured at start is consumed by this exit: record an exit no earlier than its mtime, so
                # the next start takes it as stale even when its mtime is ahead of this clock (a skewed volume, or
                # an exit within the same instant).
                self.exited_at = max(time.time(), self._honoured_kill_mtime or 0.0)
                self._write_state(self.exited_at, final=True)  # its exit time tells the next start which KILL is new
                if self.conn is not None:
                    self.conn.close()

    def _drop_old_state_file(self) -> None:
        """The state file used to be `.run/pipeline_monitor.json`, the config file's name too: retire it once."""
        old = self.run_dir / OLD_STATE_FILE
        try:
            json.loads(old.read_text())["stages"]
        except (OSError, ValueError, KeyError, TypeError):
            return  # absent, or not a state file we wrote: leave it alone
        old.unlink(missing_ok=True)
        log.info("state file renamed: .run/%s -> .run/%s", OLD_STATE_FILE, STATE_FILE)

    def _previous_exit(self) -> float | None:
        """When the last monitor exited, from its state file (the old name once, for a monitor before the rename)."""
        for name in (STATE_FILE, OLD_STATE_FILE):
            try:
                state = json.loads((self.run_dir / name).read_text())
                break
            except (OSError, ValueError):
                continue
        else:
            return None
        ts = state.get("exited_at") or state.get("last_exit_at") if isinstance(state, dict) else None
        return float(ts) if isinstance(ts, int | float) else None

    def _kill_files_at_start(self) -> bool:
        """Clear kill files left by the last stop; honour those touched since it. False: stop at once (KILL)."""
        stale, fresh = split_kill_files(self.home, self.last_exit_at)
        removed = remove_kill_files(self.home, stale)
        if removed:
            log.info("removed stale kill files from the last stop: %s", " ".join(removed))
        if KILL in fresh:
            self._honoured_kill_mtime = (self.home / KILL).stat().st_mtime
            when = time.strftime("%H:%M:%S", time.localtime(self._honoured_kill_mtime))
            last = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.last_exit_at or 0))
            log.warning(
                "KILL was touched at %s, after the last monitor exit (%s): stopping at once, as asked; nothing "
                "was started. To run: rm KILL, then start again",
                when,
                last,
            )
            return False
        for name in fresh:
            log.warning("%s was touched after the last monitor exit: its stage is held until it is removed", name)
        return True

    def _run(self) -> int:
        if not self._kill_files_at_start():
            self.stopper.request("KILL present at start")
            return 0
        cleaned = clean_home_tmp(self.home)
        if cleaned:
            log.info("removed %d temp file(s) left in .tmp/ and .run/ by writers that are gone", cleaned)
        names = ", ".join(r.name for r in self.runners) or "none"
        log.info("pipeline monitor started (pid %d) in %s; stages: %s", os.getpid(), self.home, names)
        self.conn = db.connect(self.settings.db_path)
        warning = db.kv_get(self.conn, db.KV_STATUS_WARNING)
        for w in [warning, health.images_missing(self.settings, self.conn)]:
            if w:
                log.warning("!" * 78)
                log.warning("WARNING: %s", w)
                log.warning("!" * 78)
        self._stop_orphans()
        self._drop_old_state_file()
        self._write_state(time.time())  # replace the last run's state at once: readers must not see it as ours
        if self.cfg.qps.enabled and any(r.name == "sync" for r in self.runners):
            self._init_qps()
        try:
            self._loop()
        except BaseException as exc:  # never leave the workers unsupervised: stop them, then fail loudly
            log.critical("monitor error: %r; stopping the workers", exc, exc_info=True)
            self.shutdown(f"monitor error: {exc!r}")
            raise
        self.shutdown(self.stopper.reason or "stop requested")
        return 0

    def _loop(self) -> None:
        now = time.time()
        next_qps = now + self.cfg.qps.interval_s
        next_status = now + min(self.cfg.status_interval_s, 60.0)
        tune = self.cfg.qps.enabled and any(r.name == "sync" for r in self.runners)
        while not self.stopper.should_stop():
            now = time.time()
            beats = Heartbeat.scan(self.run_dir)
            for r in self.runners:
                try:
                    r.tick(now, beats)
                except OSError as exc:  # e.g. no memory or file descriptors to start a child: retry later
                    log.error("%s: could not start or check it: %s; trying again in 60s", r.name, exc)
                    r.state, r.next_start = "waiting", now + 60.0
                if r.just_exited:
                    r.just_exited = False
                    self.reclaim(r)
            try:
                self._check_disk(now)
            except Exception as exc:  # noqa: BLE001 - a failed statvfs must never stop the monitor
                log.warning("free-space check failed: %s", exc)
            if tune and now >= next_qps:
                try:
                    self._tune_qps(now)
                except OSError as exc:  # e.g. ENOSPC writing qps_config.json: keep the old value, keep running
                    log.warning("qps tuning: could not write %s: %s", self.settings.qps_config_path.name, exc)
                next_qps = now + self.cfg.qps.interval_s
            if now >= next_status:
                self.log_status(now)
                next_status = now + self.cfg.status_interval_s
            self._write_state(now)
            self.stopper.wait(self.cfg.tick_s)

    # ------------------------------------------------------------------ free space

    def _check_disk(self, now: float) -> None:
        full = [r.name for r in self.runners if r.reported_full]
        for r in self.runners:
            r.reported_full = False
        if not self.disk.paused:
            reason = f"{', '.join(full)} stopped: no space left on the disk" if full else None
            if reason is None and now >= self.next_disk_check:
                self.next_disk_check = now + self.cfg.disk_check_s
                reason = self.disk.should_pause()
            if reason:
                self._pause_all(reason, now)
        elif now >= self.next_disk_check:
            self.next_disk_check = now + self.cfg.disk_check_s
            if self.disk.may_resume(now):
                self._resume_all(now)

    def _pause_all(self, reason: str, now: float) -> None:
        self.disk.pause(reason, now)
        bar = "!" * 78
        log.critical(bar)
        log.critical("DISK SPACE: %s", reason)
        log.critical(
            "pausing every stage (graceful stop, nothing lost) until %s MB are free; free space under %s "
            "(e.g. cleanup_images.py, old logs); they resume by themselves",
            f"{self.disk.resume_free_mb:,.0f}",
            self.home,
        )
        log.critical(bar)
        for r in self.runners:
            r.pause(now)

    def _resume_all(self, now: float) -> None:
        log.warning(
            "disk space is back (%s MB free, resume level %s MB): resuming the stages after a pause of %s",
            f"{self.disk.last_free_mb:,.0f}",
            f"{self.disk.resume_free_mb:,.0f}",
            fmt_duration(now - (self.disk.paused_since or now)),
        )
        self.disk.resume()
        for r in self.runners:
            if r.proc is None:
                self.reclaim(r)  # leases a worker could not hand back while the disk was full
            r.resume(now)

    def reclaim(self, r: StageRunner) -> None:
        """A worker is gone: free its leases now instead of after the lease expires (up to 15 min)."""
        for stage_name in DB_STAGES.get(r.name, ()):
            try:
                n = db.reclaim_dead(self.conn, stage_name)  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - never let bookkeeping stop the monitor
                log.warning("%s: could not free leases of %s: %s", r.name, stage_name, exc)
                continue
            if n:
                log.info("%s: freed %d row(s) leased by the exited worker (%s)", r.name, n, stage_name)

    # ------------------------------------------------------------------ QPS

    def _tune_qps(self, now: float) -> None:
        try:
            stats = qps_tuner.parse_stats(db.kv_get(self.conn, db.KV_SYNC_STATS))  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - a status read must never stop the monitor
            log.warning("qps tuning: could not read sync_stats: %s", exc)
            return
        current = self._read_qps()
        qps = current.qps if current is not None else self.cfg.qps.initial_qps
        policy = qps_tuner.policy_from_file(current, self.cfg.qps) if current is not None else self.cfg.qps
        decision = qps_tuner.decide(float(qps), self.qps_prev, stats, policy, now)
        if stats is not None:
            self.qps_prev = stats
        if decision.changed:
            qps_config.write(
                self.settings.qps_config_path,
                decision.qps,
                policy.min_qps,
                policy.max_qps,
                decision.reason,
                self.settings.tmp_dir,
            )
            log.info("qps %.2f -> %.2f (%s)", qps, decision.qps, decision.reason)
        else:
            log.debug("qps stays %.2f (%s)", qps, decision.reason)

    # ------------------------------------------------------------------ status

    def status_lines(self, now: float) -> list[str]:
        try:
            data = figures.collect(self.conn, now)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001
            return [f"status unavailable: {exc}"]
        lines = []
        for r in self.runners:
            proc = f"running pid {r.proc.pid}, up {fmt_duration(now - r.started_at)}" if r.proc else r.state
            lines.append(f"{r.name:<8} {proc} | {self._stage_work(r.name, data, now)} | restarts {r.restarts}")
        return lines

    def _stage_work(self, name: str, data: dict[str, Any], now: float) -> str:
        stages = data["stages"]
        if name == "sync":
            stats = qps_tuner.parse_stats(db.kv_get(self.conn, db.KV_SYNC_STATS))  # type: ignore[arg-type]
            current = self._read_qps()
            qps = f"{current.qps:g}" if current is not None else "?"
            if stats is None:
                return f"no sync stats yet, qps {qps}, {data['total']:,} images known"
            rate = "?"
            prev = self.sync_prev_requests
            if prev and stats.ts > prev[0] and stats.requests >= prev[1]:
                rate = f"{(stats.requests - prev[1]) / (stats.ts - prev[0]):.2f}"
            self.sync_prev_requests = (stats.ts, stats.requests)
            pending = self.conn.execute(  # type: ignore[union-attr]
                "SELECT COUNT(*) FROM listings WHERE images_fetched_at IS NULL"
            ).fetchone()[0]
            return (
                f"{rate} requests/s, qps {qps}, {stats.requests:,} requests, {stats.http_429:,} 429s | "
                f"backlog {pending:,} listings without images | {data['total']:,} images known"
            )
        if name == "embed":
            models = {k: v for k, v in stages.items() if k.startswith("embed_")}
            if not models:
                return "no embed stages"
            slow = min(models, key=lambda k: models[k]["per_min_10m"])
            most = max(models, key=lambda k: models[k]["backlog"])
            parked = sum(v["parked"] for v in models.values())
            return (
                f"{models[slow]['per_min_10m']:.1f}/min (slowest model, {slow[6:]}) | "
                f"backlog {models[most]['backlog']:,} (largest, {most[6:]}) | parked {parked:,}"
            )
        key = {"download": "download", "bg": "bg"}.get(name)
        if key is None or key not in stages:
            return "-"
        s = stages[key]
        return f"{s['per_min_10m']:.1f}/min | backlog {s['backlog']:,} | parked {s['parked']:,}"

    def log_status(self, now: float) -> None:
        for line in self.status_lines(now):
            log.info("status: %s", line)

    def _write_state(self, now: float, final: bool = False) -> None:
        body = {r.name: r.snapshot(now) for r in self.runners}
        sig = json.dumps(
            {k: {kk: vv for kk, vv in v.items() if kk not in ("up_s", "next_start_in_s")} for k, v in body.items()}
        ) + str(self.disk.paused)
        if sig == self._last_state and not final:
            return
        state = {
            "pid": os.getpid(),
            "updated_at": now,
            "stages": body,
            "stopping": final,
            "shutdown": self.shutdown_report,
            "disk": self.disk.state(),
            "last_exit_at": self.last_exit_at,
        }
        if self.exited_at is not None:
            state["exited_at"] = self.exited_at
        try:
            atomic_write_text(self.run_dir / STATE_FILE, json.dumps(state, indent=1))
            self._last_state = sig  # only once written: after a full disk it is written again
        except OSError as exc:
            if self._last_state != "unwritable":
                log.warning("could not write %s: %s", STATE_FILE, exc)
            self._last_state = "unwritable"

    # ------------------------------------------------------------------ stopping

    def shutdown(self, reason: str) -> None:
        t0 = time.time()
        log.info("stopping (%s): writing %s and asking every worker to exit", reason, ", ".join(STAGE_KILL_FILES))
        for name in STAGE_KILL_FILES:
            try:
                (self.home / name).touch()
            except OSError as exc:  # the bound below still applies: SIGTERM after kill_timeout_s
                log.error("could not write %s: %s", name, exc)
        running = {r.name: r for r in self.runners if r.proc is not None and r.proc.poll() is None}
        for r in self.runners:
            if r.proc is not None and r.name not in running:  # exited on KILL itself before this tick saw it
                rc = r.proc.returncode
                log.info("%s had already exited (%s)", r.name, describe_exit(rc))
                self.shutdown_report[r.name] = {"how": "exited", "code": rc, "after_s": 0.0}
                r.state, r.proc, r.just_exited = "stopped", None, True
        if not (self.home / KILL).exists():
            for r in running.values():
                if r.spec.kill_file is None:
                    log.info(
                        "%s stops on KILL, which is absent (monitor was signalled): sending SIGTERM (graceful)", r.name
                    )
                    r._signal(signal.SIGTERM)
        for r in self.runners:
            if r.name not in running and r.name not in self.shutdown_report:
                self.shutdown_report[r.name] = {"how": f"not running ({r.state})"}
        deadline = t0 + self.cfg.kill_timeout_s
        self._wait(running, deadline, t0, "exited")
        if running:
            for r in running.values():
                log.warning(
                    "%s (pid %d) still running after %.0fs: sending SIGTERM", r.name, r.proc.pid, time.time() - t0
                )  # type: ignore[union-attr]
                r._signal(signal.SIGTERM)
            self._wait(running, time.time() + self.cfg.term_grace_s, t0, "exited after SIGTERM")
        if running:
            for r in running.values():
                log.error("%s (pid %d) ignored SIGTERM: sending SIGKILL (last resort)", r.name, r.proc.pid)  # type: ignore[union-attr]
                r._signal(signal.SIGKILL)
            self._wait(running, time.time() + 10.0, t0, "killed with SIGKILL")
        for r in running.values():
            log.critical("%s (pid %d) survived SIGKILL; giving up on it", r.name, r.proc.pid)  # type: ignore[union-attr]
        for r in self.runners:
            if r.proc is None:
                self.reclaim(r)
        log.info(
            "pipeline monitor stopped after %.1fs; restarts: %s",
            time.time() - t0,
            ", ".join(f"{r.name} {r.restarts}" for r in self.runners) or "none",
        )
        self._write_state(time.time(), final=True)

    def _wait(self, running: dict[str, StageRunner], deadline: float, t0: float, how: str) -> None:
        while running:
            for name, r in list(running.items()):
                rc = r.proc.poll()  # type: ignore[union-attr]
                if rc is not None:
                    after = time.time() - t0
                    log.info("%s %s (%s) after %.1fs", name, how, describe_exit(rc), after)
                    self.shutdown_report[name] = {"how": how, "code": rc, "after_s": round(after, 2)}
                    r.state, r.proc = "stopped", None
                    del running[name]
            if not running or time.time() >= deadline:
                return
            time.sleep(0.1)


def _command_of(pid: int) -> str:
    try:
        return subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _terminate_pid(pid: int, wait_s: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.time() + wait_s
    while time.time() < end and pid_alive(pid):
        time.sleep(0.2)
    if pid_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def build_config(args: argparse.Namespace, home: Path, base: MonitorConfig | None = None) -> MonitorConfig:
    cfg = monitor_config.load(home, Path(args.config) if args.config else None, base)
    if args.stages:
        cfg = monitor_config.only_stages(cfg, [s.strip() for s in args.stages.split(",") if s.strip()])
    overrides: dict[str, Any] = {}
    if args.kill_timeout is not None:
        overrides["kill_timeout_s"] = args.kill_timeout
    if args.status_interval is not None:
        overrides["status_interval_s"] = args.status_interval
    if args.hang_timeout is not None:
        overrides["hang_timeout_s"] = args.hang_timeout
    if args.no_qps_tuning:
        overrides["qps"] = {"enabled": False}
    if args.min_free_mb is not None:
        overrides["min_free_mb"] = args.min_free_mb
    return monitor_config.from_dict(overrides, cfg) if overrides else cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="scripts/pipeline_monitor.py",
        description="Run sync, downloader, background remover and embedder; restart them on crash or hang; "
        "tune qps_config.json; stop everything gracefully on `touch KILL`. Config: <home>/pipeline_monitor.json "
        "(see docs/monitor.md).",
    )
    ap.add_argument("--home", help="data home (default: IMAGESELECTOR_HOME or the project root)")
    ap.add_argument("--config", help="config file (default: <home>/pipeline_monitor.json when present)")
    ap.add_argument("--stages", help="comma-separated stages to run, e.g. download,bg,embed (default: all enabled)")
    ap.add_argument("--kill-timeout", type=float, help="seconds each worker gets to exit after KILL (default 30)")
    ap.add_argument("--hang-timeout", type=float, help="seconds without a heartbeat before a worker counts as hung")
    ap.add_argument("--status-interval", type=float, help="seconds between status lines in pipeline.log")
    ap.add_argument("--no-qps-tuning", action="store_true", help="leave qps_config.json alone")
    ap.add_argument(
        "--min-free-mb", type=float, help="pause every stage below this much free disk space (default 2048; MIN_FREE_MB)"
    )
    ap.add_argument("--print-config", action="store_true", help="print the effective config as JSON and exit")
    args = ap.parse_args(argv)
    try:
        settings = load_settings(args.home, create=False)
        db.check_file(settings.db_path)
        if not args.print_config:
            settings.require_writable()
    except HomeError as exc:
        print(f"pipeline_monitor: {exc}", file=sys.stderr)
        return 2
    try:
        cfg = build_config(args, settings.home, monitor_config.base_from_settings(settings.get))
    except ValueError as exc:
        print(f"pipeline_monitor: bad configuration: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_json())
        return 0
    setup_logging("pipeline", settings.home, secrets=settings.secrets())
    try:
        return Monitor(settings, cfg).run()
    except HomeError as exc:  # the database turned out unusable after all (e.g. corrupt beyond its header)
        log.error("%s", exc)
        return 2
