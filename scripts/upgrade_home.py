#!/usr/bin/env python3
"""Upgrade a home built by the original pipeline, in place: `venv/bin/python scripts/upgrade_home.py [--dry-run]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imageselector.entry import run  # noqa: E402
from imageselector.upgrade.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(main))
