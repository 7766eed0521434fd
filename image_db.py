#!/usr/bin/env python3
"""Pipeline status: `venv/bin/python image_db.py [--json]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from imageselector.entry import run  # noqa: E402
from imageselector.status.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(main))
