#!/usr/bin/env python3
"""First run on a new machine: fetch every model's weights and check each loads: `venv/bin/python scripts/fetch_models.py`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imageselector.fetch_models import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
