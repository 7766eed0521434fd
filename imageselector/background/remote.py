"""Background removal with the compute on a Ray cluster (`bg_remover.py --ray ADDRESS`).

Each actor holds one `BgCompute` built by the same factory as the local runner's (compute.py), so the
files are the same. This process claims and reads with `BgWriter`, ships the bytes, and applies each
answer with `BgWriter.settle`, exactly as locally: it alone writes files (atomically) and sets `bg_removed`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from imageselector.background.stage import BgWriter, Item
from imageselector.scaleout import RayPool, RayUnavailable, RemoteStageRunner
from imageselector.stage_entry import Context, FatalStageError, StageJob
from imageselector.worker import ClaimedBatch, run_loop


class RayBgRunner(StageJob):
    """Several claimed batches in flight on the pool; results written and flagged as they come back."""

    def __init__(self, writer: BgWriter, pool: RayPool, fallback: Callable[[BgWriter], StageJob] | None) -> None:
        """`fallback` builds the local runner when the cluster is lost mid-run (`--ray-fallback local`);
        None: exit 1 so the monitor restarts the stage (`--ray-fallback wait`)."""
        self.writer = writer
        self.pool = pool
        self.fallback = fallback
        self.runner = RemoteStageRunner(pool, self.claim, self.commit)

    def claim(self) -> tuple[ClaimedBatch, list[Item], list[bytes]] | None:
        batch = self.writer.claim()
        if batch is None:
            return None
        items = []
        for row in batch.rows:
            item = self.writer.read(row)
            if item.error is not None:
                self.writer.settle_input_error(batch, item)
            else:
                items.append(item)
        return batch, items, [it.data for it in items]  # type: ignore[misc]

    def commit(self, batch: ClaimedBatch, items: list[Item], results: list[tuple[str, Any]]) -> None:
        written = []
        for item, (kind, value) in zip(items, results, strict=True):
            item.data = None
            if self.writer.settle(batch, item, kind, value):
                written.append(item.rid)
        self.writer.flag_written(batch, written)

    def run(self, ctx: Context, *, watch: bool, poll_s: float) -> None:
        try:
            run_loop(
                self.runner.run_batch, ctx.stopper, watch=watch, heartbeat=ctx.heartbeat, poll_s=poll_s, logger=ctx.log
            )
            self.runner.drain()
        except RayUnavailable as exc:
            self.close()
            if self.fallback is None:
                raise FatalStageError(
                    f"{exc}; released the batches in flight; exiting so the monitor restarts the stage"
                ) from exc
            ctx.log.warning("%s; released the batches in flight and continuing locally", exc)
            local = self.fallback(self.writer)
            try:
                local.run(ctx, watch=watch, poll_s=poll_s)
            finally:
                local.close()

    def close(self) -> None:
        self.runner.abandon()  # a no-op after drain(); after an error, the batches in flight are released
        self.pool.close()

    def summary(self) -> Iterator[str]:
        return self.writer.summary()
