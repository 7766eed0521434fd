#!/usr/bin/env python3
"""Crawl the Etsy API into etsy_data.db: `venv/bin/python sync_data.py [--once]` (stop with `touch KILL`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from imageselector.entry import run  # noqa: E402
from imageselector.etsy.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(main))
