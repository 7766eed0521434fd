"""Shared fixtures. Every test runs in a temporary data home, never the checkout."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _keep_signal_handlers() -> Iterator[None]:
    """Code under test installs SIGINT/SIGTERM handlers (the graceful stop); give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh data home, exported as IMAGESELECTOR_HOME for the code and any subprocess."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("IMAGESELECTOR_HOME", str(h))
    for var in ("ETSY_API_KEY", "ETSY_SHARED_SECRET", "ETSY_API_BASE", "ETSY_CDN_BASE"):
        monkeypatch.delenv(var, raising=False)
    yield h


@pytest.fixture
def settings(home: Path):
    from imageselector.config import load_settings

    return load_settings(home)


@pytest.fixture
def conn(settings):
    from imageselector import db

    c = db.connect(settings.db_path)
    yield c
    c.close()


def venv_python() -> str:
    """The interpreter running the tests (the project venv under ./run.sh test)."""
    return sys.executable
