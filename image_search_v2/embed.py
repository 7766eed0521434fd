#!/usr/bin/env python3
"""Embed bg-removed images with the five models: `venv/bin/python image_search_v2/embed.py --model all --batch-size 8`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imageselector.embedding.cli import main  # noqa: E402
from imageselector.entry import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(main))
