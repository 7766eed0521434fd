"""The one place settings are read: the data home, `.env` (python-dotenv) and the environment.

Precedence: real environment variables, then `<home>/.env`, then `<project root>/.env`, then defaults.
Every runtime file (database, images, embeddings, qps_config.json, logs, kill files) lives under the
data home: the project root by default, or `IMAGESELECTOR_HOME`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import dotenv_values

PROJECT_ROOT = Path(__file__).resolve().parent.parent

DB_NAME = "etsy_data.db"
# The original guide's .env held only ETSY_API_KEY; said by sync and by the upgrade.
SHARED_SECRET_MISSING = (
    "ETSY_API_KEY is set but ETSY_SHARED_SECRET is not: since February 2026 Etsy requires both (sent as "
    'x-api-key: keystring:shared_secret). Copy the "Shared secret" shown next to your app\'s keystring at '
    "https://www.etsy.com/developers/your-apps into .env as ETSY_SHARED_SECRET=..., then start again"
)
DEFAULT_API_BASE = "https://openapi.etsy.com/v3/application"


DEFAULT_CDN_BASE = "https://i.etsystatic.com"
HOME_ENV = "IMAGESELECTOR_HOME"


class HomeError(Exception):
    """This data home cannot be used. Entry points print the message as one line and exit 2
    (`entry.run`, `stopping.guarded_main`, and through it `stage_entry.run_stage`)."""


class HomeMissing(HomeError):
    """The data home does not exist (a typo, or the disk holding it is not mounted)."""


class HomeReadOnly(HomeError):
    """The data home cannot be written (a worker needs to); reading tools open it read-only instead."""


class DatabaseUnreadable(HomeError):
    """etsy_data.db is not a SQLite database, is corrupt, or is missing where one is required."""


class NewerSchema(HomeError):
    """etsy_data.db was written by a newer version of this code."""


class BadSetting(HomeError):
    """A setting that can never work (e.g. an API key with a newline in it)."""


# db imports the exceptions above, so they come first; with this order either module may be imported first.
from imageselector import db  # noqa: E402


def _env() -> dict[str, str]:
    """Merge .env files under the real environment (which always wins)."""
    merged: dict[str, str] = {}
    root_env = PROJECT_ROOT / ".env"
    if root_env.is_file():
        merged.update({k: v for k, v in dotenv_values(root_env).items() if v is not None})
    home = os.environ.get("IMAGESELECTOR_HOME") or merged.get("IMAGESELECTOR_HOME")
    if home:
        home_env = Path(home).expanduser() / ".env"
        if home_env.is_file() and home_env.resolve() != root_env.resolve():
            merged.update({k: v for k, v in dotenv_values(home_env).items() if v is not None})
    merged.update(os.environ)
    return merged


@dataclass(frozen=True)
class Settings:
    """Resolved settings. Build with `load_settings()`; never read os.environ elsewhere for these."""

    home: Path
    api_base: str = DEFAULT_API_BASE
    api_key: str = ""
    shared_secret: str = ""
    cdn_base: str = DEFAULT_CDN_BASE
    extra: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def db_path(self) -> Path:
        return self.home / DB_NAME

    @property
    def images_dir(self) -> Path:
        return self.home / "images"

    @property
    def embeddings_dir(self) -> Path:
        return self.home / "embeddings"

    @property
    def tmp_dir(self) -> Path:
        """Scratch space on the same filesystem as images/, so renames into place are atomic."""
        return self.home / ".tmp"

    @property
    def run_dir(self) -> Path:
        """Heartbeats and other per-process runtime state."""
        return self.home / ".run"

    @property
    def qps_config_path(self) -> Path:
        return self.home / "qps_config.json"

    def get(self, name: str, default: str | None = None) -> str | None:
        """Any other setting (optional ones listed in .env.example), environment first."""
        return self.extra.get(name, default)

    def get_float(self, name: str, default: float) -> float:
        raw = self.extra.get(name)
        if raw in (None, ""):
            return default
        try:
            return float(raw)
        except ValueError as exc:
            raise SystemExit(f"setting {name}={raw!r} is not a number") from exc

    def get_int(self, name: str, default: int) -> int:
        return int(self.get_float(name, default))

    def writable(self) -> bool:
        """Whether the home can be written: permission bits and a read-only mount (which binds root too)."""
        try:
            ro_mount = bool(os.statvfs(self.home).f_flag & os.ST_RDONLY)
        except (OSError, AttributeError):
            ro_mount = False
        return not ro_mount and os.access(self.home, os.W_OK)

    def require_writable(self) -> None:
        if not self.writable():
            raise HomeReadOnly(
                f"data home {self.home} is read-only; this program writes there (status and search work read-only)"
            )

    def check_credentials(self) -> None:
        """ETSY_API_KEY / ETSY_SHARED_SECRET must be printable ASCII: a newline or a stray byte can never work."""
        for name, value in (("ETSY_API_KEY", self.api_key), ("ETSY_SHARED_SECRET", self.shared_secret)):
            bad = [c for c in value if not (32 < ord(c) < 127)]
            if bad:
                raise BadSetting(
                    f"{name} contains {len(bad)} invalid character(s) (first {bad[0]!r} at position "
                    f"{value.index(bad[0])}); it must be printable ASCII without spaces: check .env for "
                    "a pasted newline or quote"
                )

    def secrets(self) -> list[str]:
        """Values that must never reach a log."""
        return [s for s in (self.api_key, self.shared_secret) if s]


def load_settings(
    home: str | os.PathLike[str] | None = None, *, create: bool | None = None, check_home: bool = True
) -> Settings:
    """Read settings once per process. `home` overrides IMAGESELECTOR_HOME (tests, the demo).

    A home that does not exist is created only when asked (`create=True`), or by default when the
    caller names it in code (tests, benches, the demo). A home named by the environment or a command
    line that does not exist raises HomeMissing: creating it would start an empty pipeline beside the
    real one (a typo, or the data disk not mounted).

    A home still holding the original pipeline's database raises `db.LegacyHomeError` here, before any
    entry point writes a log line, a lock or a heartbeat into it (`entry.run` turns it into exit 2).
    Only the upgrade passes `check_home=False`.
    """
    env = _env()
    raw = home or env.get(HOME_ENV) or PROJECT_ROOT
    home_path = Path(raw).expanduser().resolve()
    if create is None:
        create = home is not None
    if not home_path.is_dir():
        if home_path.exists():
            raise HomeMissing(f"data home {home_path} is not a directory")
        if not create:
            origin = f"IMAGESELECTOR_HOME={home_path}" if not home and env.get(HOME_ENV) else f"data home {home_path}"
            raise HomeMissing(
                f"{origin} does not exist (a typo, or its disk is not mounted?); "
                f"create it first (mkdir -p {home_path}) or fix the path"
            )
    if check_home:
        db.check_home(home_path / DB_NAME)
    home_path.mkdir(parents=True, exist_ok=True)
    return Settings(
        home=home_path,
        api_base=(env.get("ETSY_API_BASE") or DEFAULT_API_BASE).rstrip("/"),
        api_key=env.get("ETSY_API_KEY", ""),
        shared_secret=env.get("ETSY_SHARED_SECRET", ""),
        cdn_base=(env.get("ETSY_CDN_BASE") or DEFAULT_CDN_BASE).rstrip("/"),
        extra=dict(env),
    )
