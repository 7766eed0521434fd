"""`image_db.py`: how far the pipeline is.

It refuses (one line, exit 2) a home or database that does not exist unless `--init` is given: printing
zeros for a mistyped IMAGESELECTOR_HOME, or for a data disk that is not mounted, hides the mistake.
A read-only home is read read-only.
"""

from __future__ import annotations

import argparse
import sys

from imageselector import db
from imageselector.config import DatabaseUnreadable, HomeReadOnly, load_settings
from imageselector.entry import run
from imageselector.status import figures, health
from imageselector.stopping import guarded_main


def main(argv: list[str] | None = None) -> int:
    return guarded_main("image_db.py", lambda: _main(argv))


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="image_db.py", description="Show pipeline progress from the status database.")
    ap.add_argument("--json", action="store_true", help="print the same data as JSON")
    ap.add_argument(
        "--init", action="store_true", help="create the home and an empty database if missing, then print status"
    )
    args = ap.parse_args(argv)
    settings = load_settings(create=args.init)
    db.check_file(settings.db_path)
    if not settings.db_path.is_file() and not args.init:
        raise DatabaseUnreadable(
            f"no database at {settings.db_path}: nothing has run in this home (wrong IMAGESELECTOR_HOME?); "
            f"sync_data.py creates it, or image_db.py --init creates an empty one"
        )
    if settings.writable():
        conn = db.connect(settings.db_path)
    elif args.init:
        raise HomeReadOnly(f"data home {settings.home} is read-only: --init cannot create the database")
    else:
        conn = db.connect(settings.db_path, readonly=True)
    try:
        data = figures.collect(conn)
        data["warnings"] = list(dict.fromkeys([*health.home_warnings(settings, conn), *data.get("warnings", [])]))
    finally:
        conn.close()
    print(figures.to_json(data) if args.json else figures.render(data))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
