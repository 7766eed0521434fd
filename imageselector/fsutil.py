"""Durable, atomic file writes: temp file, fsync, rename, fsync of the directory.

On macOS `os.fsync` does not flush the drive's cache; F_FULLFSYNC does, so it is used where it exists.
Temp files live in the data home's `.tmp/` (same filesystem), never beside the final file, so a
`kill -9` can leave debris only in `.tmp/`, which `clean_tmp()` clears at start-up.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl

    _F_FULLFSYNC = getattr(fcntl, "F_FULLFSYNC", None)
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
    _F_FULLFSYNC = None


def full_fsync(fd: int) -> None:
    """Flush a file descriptor all the way to stable storage."""
    if _F_FULLFSYNC is not None and fcntl is not None:
        try:
            fcntl.fcntl(fd, _F_FULLFSYNC)
            return
        except OSError:
            pass
    os.fsync(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        full_fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_path(final: Path, tmp_dir: Path | None) -> Path:
    directory = tmp_dir if tmp_dir is not None else final.parent
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"


@contextlib.contextmanager
def atomic_writer(final: Path, tmp_dir: Path | None = None) -> Iterator[BinaryIO]:
    """Yield a binary file; on clean exit it is fsynced and renamed onto `final`, else removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(final, tmp_dir)
    f = open(tmp, "wb")  # noqa: SIM115 - closed explicitly before the rename
    try:
        yield f
        f.flush()
        full_fsync(f.fileno())
        f.close()
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        # Cleanup must not raise again: on a full disk close() itself fails (flushing its buffer), and
        # an exception here would skip the unlink and leave the temp file behind.
        with contextlib.suppress(OSError):
            f.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(final: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write `data` to `final` so that readers see the old file or the whole new one, never a part."""
    with atomic_writer(final, tmp_dir) as f:
        f.write(data)


def atomic_write_text(final: Path, text: str, tmp_dir: Path | None = None) -> None:
    atomic_write_bytes(final, text.encode("utf-8"), tmp_dir)


def clean_tmp(tmp_dir: Path, older_than_s: float = 0.0) -> int:
    """Remove temp files left by writers whose pid is gone (never a live writer's). Returns how many."""
    removed = 0
    if not tmp_dir.is_dir():
        return 0
    now = time.time()
    for p in tmp_dir.iterdir():
        if not p.name.endswith(".tmp"):
            continue
        parts = p.name.rsplit(".", 3)
        pid = int(parts[1]) if len(parts) == 4 and parts[1].isdigit() else None
        if pid is not None and _pid_alive(pid):
            continue
        try:
            if now - p.stat().st_mtime >= older_than_s:
                p.unlink()
                removed += 1
        except OSError:  # gone meanwhile, or not ours to remove: never a reason to stop a start-up
            pass
    return removed


def clean_home_tmp(home: Path) -> int:
    """At start-up: temp files of dead writers in `<home>/.tmp` and `<home>/.run` (heartbeats, pid files)."""
    return clean_tmp(Path(home) / ".tmp") + clean_tmp(Path(home) / ".run")


# --------------------------------------------------------------------------------------------------
# Free space: a full disk is the machine's problem, never a row's
# --------------------------------------------------------------------------------------------------

_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether an error means "no space left" (ENOSPC, a quota, SQLite's 'database or disk is full')."""
    seen = 0
    while exc is not None and seen < 8:  # also look at the cause chain (wrapped errors)
        if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
            return True
        if isinstance(exc, sqlite3.Error):
            code = getattr(exc, "sqlite_errorcode", None)
            if code == sqlite3.SQLITE_FULL or "database or disk is full" in str(exc):
                return True
        if "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def free_mb(*paths: Path) -> float:
    """The least free space, in MB, among the filesystems holding `paths` (missing paths: their parent)."""
    least = float("inf")
    for p in paths:
        p = Path(p)
        while not p.exists() and p != p.parent:
            p = p.parent
        try:
            least = min(least, shutil.disk_usage(p).free / 1e6)
        except OSError:
            continue
    return least


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


pid_alive = _pid_alive


@contextlib.contextmanager
def file_lock(path: Path, *, blocking: bool = True) -> Iterator[bool]:
    """flock on a lock file; released by the kernel even on kill -9. Yields False if non-blocking and busy.

    Holds one writer per resource (a model's index files, the cleanup mover, ...); the file carries the pid.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield True
    finally:
        os.close(fd)


def instance_lock(run_dir: Path, name: str) -> contextlib.AbstractContextManager[bool]:
    """The one "only one of me per data home" lock: `<home>/.run/<name>.lock`, held for the `with` block.

    A flock, so the kernel releases it when the process dies, even by kill -9: no stale pid file to judge.
    Yields False when another live process holds it. Used by sync, the monitor and cleanup; the embed
    store holds the same kind of lock per model index.
    """
    return file_lock(Path(run_dir) / f"{name}.lock", blocking=False)


def lock_holder(run_dir: Path, name: str) -> int | None:
    """The pid written in an instance lock (for messages); None when unknown."""
    try:
        return int((Path(run_dir) / f"{name}.lock").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
