#!/usr/bin/env python3
"""Download product photos from the Etsy CDN: `venv/bin/python scripts/image_downloader.py [--watch]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imageselector.download.cli import main  # noqa: E402
from imageselector.entry import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(main))
