#!/usr/bin/env python3
"""Ensemble search: `venv/bin/python image_search_v2/search.py --image PATH | --text "..." | --serve` (see --help)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imageselector.entry import run  # noqa: E402
from imageselector.search.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(main))
