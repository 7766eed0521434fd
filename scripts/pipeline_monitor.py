#!/usr/bin/env python3
"""Run and supervise the whole pipeline: `nohup venv/bin/python scripts/pipeline_monitor.py >> pipeline.log 2>&1 &`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imageselector.entry import run  # noqa: E402
from imageselector.monitor.stage import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run(main))
