"""Embedding with the image compute on a Ray cluster (`embed.py --ray ADDRESS`).

Each actor holds one `EmbedCompute` built by the same factory as the local runner's (compute.py), so the
vectors are the same. The stage process claims rows per model (as the local stage does), reads each
image's bytes once, ships them, and applies each answer with the local stage's own `settle_errors` and
`accept`: it alone adds vectors to the store, commits, and flags rows after the commit, exactly as
locally, so crash consistency is unchanged. Listing texts are encoded by the stage process at flush.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from imageselector import db
from imageselector.embedding.stage import EmbedStage, find_image, log
from imageselector.scaleout import RemoteStageRunner
from imageselector.worker import ClaimedBatch, run_loop


class _Round:
    """The per-model claims of one remote batch. Released on exit unless committed (handed to the stage)."""

    def __init__(self, conn: sqlite3.Connection, owner: str, rows: dict[str, list[sqlite3.Row]]) -> None:
        self.batches = {m: ClaimedBatch(conn, f"embed_{m}", owner, r) for m, r in rows.items()}
        self.committed = False

    def __len__(self) -> int:
        return sum(len(b) for b in self.batches.values())

    def __enter__(self) -> _Round:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.committed:
            for b in self.batches.values():
                b.__exit__(None, None, None)


class RemoteEmbed:
    """Claims and commits for `scaleout.RemoteStageRunner`, on top of a local `EmbedStage` (store, flags)."""

    def __init__(self, stage: EmbedStage) -> None:
        self.stage = stage

    def claim(self) -> tuple[_Round, dict[str, Any], dict[str, Any]] | None:
        st = self.stage
        rows = {}
        for m in st.encoders:
            got = db.claim_batch(st.conn, f"embed_{m}", st.owner, st.opts.batch_size)
            if got:
                rows[m] = got
        if not rows:
            return None
        rnd = _Round(st.conn, st.owner, rows)
        index: dict[int, int] = {}
        images: list[bytes] = []
        want: dict[str, list[int]] = {}
        keep: dict[str, list[sqlite3.Row]] = {}
        for m, batch in rnd.batches.items():
            want[m], keep[m] = [], []
            for r in batch.rows:
                gid = int(r["gid"])
                if gid not in index:
                    path = find_image(st.settings, r)
                    data = None
                    if path is not None:
                        try:
                            data = path.read_bytes()
                        except OSError:
                            data = None
                    index[gid] = len(images) if data is not None else -1
                    if data is not None:
                        images.append(data)
                if index[gid] < 0:
                    batch.fail(r["rid"], "image file missing")
                    continue
                want[m].append(index[gid])
                keep[m].append(r)
        return rnd, {"rows": keep, "want": want}, {"images": images, "want": want}

    def commit(self, rnd: _Round, ctx: dict[str, Any], result: dict[str, Any]) -> None:
        st = self.stage
        for m, batch in rnd.batches.items():
            idx_to_row = dict(zip(ctx["want"][m], ctx["rows"][m], strict=True))
            errors = [(idx_to_row[i], reason, permanent) for i, reason, permanent in result["errors"][m]]
            st.settle_errors(m, batch, errors)
            st.accept(m, batch, [idx_to_row[i] for i in result["ok"][m]], result["vectors"][m], failed=len(errors))
        rnd.committed = True
        st.maybe_flush()


def run_remote(stage: EmbedStage, pool: Any, heartbeat: Any = None) -> int:
    """`EmbedStage.run` with the image compute on Ray: same store, same flush-then-flag rule."""

    remote = RemoteEmbed(stage)
    runner = RemoteStageRunner(pool, remote.claim, remote.commit)

    def batch() -> int:
        n = runner.run_batch()
        if n == 0:
            stage.maybe_flush(force=stage.store.dirty() or any(stage.pending.values()))
        return n

    try:
        total = run_loop(batch, stage.stopper, watch=stage.opts.watch, heartbeat=heartbeat, logger=log)
        runner.drain()
        stage.flush()
    except BaseException:
        runner.abandon()
        try:
            stage.flush()  # vectors already back are valid: keep them if the files can be written
        except Exception as exc:  # noqa: BLE001
            log.error("could not flush at exit (%s); unflagged rows will be embedded again", exc)
        raise
    finally:
        stage.release_pending()
        for p in stage.progress.values():
            if p.done or p.failed:
                p.report(final=True)
        stage.store.close()
    return total
