"""`image_db.py`: how far the pipeline is."""

from __future__ import annotations

import argparse
import sys

from imageselector import db
from imageselector.config import load_settings
from imageselector.entry import run
from imageselector.status import figures as status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="image_db.py", description="Show pipeline progress from the status database.")
    ap.add_argument("--json", action="store_true", help="print the same data as JSON")
    ap.add_argument("--init", action="store_true", help="only create / migrate the database, then print status")
    args = ap.parse_args(argv)
    settings = load_settings()
    conn = db.connect(settings.db_path)
    try:
        data = status.collect(conn)
    finally:
        conn.close()
    print(status.to_json(data) if args.json else status.render(data))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
