"""Session-wide stand-in models for the embed tests (built once: about 4 s)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def standin_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from imageselector.models.standins import build_standins

    return build_standins(tmp_path_factory.mktemp("standins"))


@pytest.fixture(scope="session")
def standin_encoders(standin_registry: Path) -> dict:
    from imageselector.models.encoders import load_encoder
    from imageselector.models.registry import load_registry

    return {n: load_encoder(s, "cpu", "fp32") for n, s in load_registry(standin_registry).items()}
