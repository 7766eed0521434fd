#!/usr/bin/env python3
"""Move embedded non-primary images to the backup disk: `venv/bin/python scripts/cleanup_images.py [--dry-run|--watch]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imageselector.cleanup.cli import main  # noqa: E402
from imageselector.entry import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(main))
