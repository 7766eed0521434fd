#!/usr/bin/env python3
"""Background removal: `venv/bin/python scripts/bg_remover.py --watch --gpu` (stop: touch KILL_BG)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imageselector.background.cli import main  # noqa: E402
from imageselector.entry import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(main))
