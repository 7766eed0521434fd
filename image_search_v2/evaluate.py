#!/usr/bin/env python3
"""Retrieval quality per model and fusion: `venv/bin/python image_search_v2/evaluate.py [--sample N --seed S --json --fit-weights]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imageselector.entry import run  # noqa: E402
from imageselector.evaluation.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(main))
