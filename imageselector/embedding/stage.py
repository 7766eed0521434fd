"""The embed stage: claim bg-removed images per model, decode each once, embed, store, flag when durable.

One process may run several models (`--model all`). Each model is its own stage (`embed_<model>`) with
its own claims, flags and failures. A prefetch thread claims a round (up to a batch per model), decodes
every distinct image once in worker threads and preprocesses it for each model that claimed it, so the
models run while the next round is being read (on a GPU; on the CPU, whose cores the forward already fills,
the main thread makes each round itself between forwards). The main thread runs the models, appends vectors to the
store writer's buffer, and periodically commits (store.py: one new segment + manifest per model) and
only then sets the flags.

Crash consistency, per model m (its store has one writer, held by a lock):
- flags are set only after the segment and the manifest that name those vectors are durable, so a
  flag of 1 never lies unless the files are later lost;
- at start, an old-format `{m}.faiss` is migrated first (migrate.py, resumable), then `reconcile`
  repairs both gaps a crash (or a restored backup) can leave: a gid in the store whose flag is 0
  (killed between the manifest rename and the flag commit) is adopted, i.e. flagged, since the vector
  is this model's output for that very image; if the row is gone, parked or no longer ready, the
  vector is deleted instead (a tombstone). A flag of 1 whose vector is not in the store is reset to 0
  (the image is embedded again). Store gids == rows flagged 1, exactly, before any new work starts;
- a vector is never stored twice: claimed rows have flag 0, flag-0 rows are not in the store after
  reconcile, and a key committed again replaces the old copy in every snapshot (newest segment wins).
- memory: reconcile holds two sorted int64 arrays per model for a moment (8 bytes per vector each);
  nothing per vector is kept while embedding.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imageselector import db
from imageselector.config import Settings
from imageselector.embedding.compute import DECODE_ERRORS, EmbedCompute
from imageselector.layout import image_path, locate_image
from imageselector.logs import Progress
from imageselector.models.encoders import Encoder
from imageselector.vectorstore.migrate import UNKNOWN_SOURCE, drop_image_index, migrate_index
from imageselector.vectorstore.store import TEXT_SUFFIX, CompactionPolicy, StoreWriter, read_store_manifest
from imageselector.worker import ClaimedBatch, Heartbeat, run_loop

log = logging.getLogger("embed")

STANDIN_WARNING = "stand-in models with random weights"
_CHUNK = 500


@dataclass
class Options:
    batch_size: int = 8
    watch: bool = False
    workers: int = 2
    prefetch: int = 2
    # decode the next round while the models run. None: yes on a GPU; on the CPU no (lockstep, between
    # forwards), since torch's threads already fill every core: decoding in the background then mostly
    # starves and slows the forward (bench/embed.py, docs/embedding.md). True on the CPU: background
    # priority (Linux), the caller making a round itself whenever none is ready.
    overlap: bool | None = None
    flush_every: int = 1024
    flush_s: float = 60.0
    flush_growth: float = 0.0  # unused since the segment store (a flush writes only new vectors)
    flush_max_s: float = 1800.0
    poll_s: float = 10.0
    progress_s: float = 10.0


@dataclass
class Round:
    """One prefetched unit of work: per model, the claimed rows, their tensors, and the rows that failed."""

    rows: dict[str, list[sqlite3.Row]] = field(default_factory=dict)
    ok: dict[str, list[sqlite3.Row]] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: dict[str, list[tuple[sqlite3.Row, str, bool | str]]] = field(default_factory=dict)
    images: int = 0

    @property
    def empty(self) -> bool:
        return not self.rows


REDOWNLOAD = "redownload"  # in Round.errors: the input file is gone or undecodable, back to the download stage

BACKGROUND_NICE = 19  # the decode threads' priority where SCHED_IDLE is refused


def can_lower_thread_priority() -> bool:
    """Linux sets a scheduling policy or nice value per thread id; elsewhere it would renice the whole process."""
    return sys.platform.startswith("linux") and hasattr(os, "setpriority")


def lower_thread_priority() -> None:
    """Run the calling thread in the background: SCHED_IDLE (any other thread that wakes preempts it at
    once: measured ahead of nice 19 in 7 of 9 paired runs, docs/embedding.md), else nice 19."""
    if not can_lower_thread_priority():
        return
    tid = threading.get_native_id()
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        return
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, tid, BACKGROUND_NICE)
    except OSError as exc:  # e.g. a sandbox that forbids it: decoding still works, at normal priority
        log.debug("could not lower the decode threads' priority: %s", exc)


def single_threaded_torch() -> None:
    """Keep the torch ops of the calling (decode) thread on that thread. Left alone, a decode thread's first
    large op (the antialiased resize) opens an OpenMP team of its own, and with more OpenMP threads than
    cores libgomp cuts every thread's spin-wait from ~300,000 to 100 spins: the forward's barriers then
    sleep in the kernel (~130 voluntary context switches per ViT-B-32 batch of 8, against none), and
    waking a sleeping thread is slow (here, on a VM). Measured in docs/embedding.md. The count is per
    thread; the main thread's stays as it was set (EmbedStage.run restores the process-wide default when
    the stage ends)."""
    torch.set_num_threads(1)


def decode_thread_init(background: bool) -> Callable[[], None]:
    """The initializer of a decode pool's threads: one torch thread each, and background priority if asked."""

    def init() -> None:
        single_threaded_torch()
        if background:
            lower_thread_priority()

    return init


def _chunks(seq: Sequence[Any], n: int = _CHUNK) -> list[Sequence[Any]]:
    return [seq[i : i + n] for i in range(0, len(seq), n)]


def find_image(settings: Settings, row: Any) -> Path | None:
    """The file of a row: images/, else (archived) the backup location via layout.locate_image."""
    p = image_path(settings.images_dir, row["listing_id"], row["image_id"])
    if p.is_file():
        return p
    return locate_image(settings, row)


# --------------------------------------------------------------------------------------------------
# Prefetch: claim + decode once + preprocess per model, ahead of the models
# --------------------------------------------------------------------------------------------------


class Prefetcher(threading.Thread):
    """Makes rounds ahead of the models on its own thread (`run`, `get`), or on the caller's (`next_round`).

    `background`: the prefetch thread and its decode pool run at background priority (on a CPU the forward
    already fills every core; decoding then takes only the cycles torch's threads leave, and the caller
    makes a round itself, at normal priority, whenever none is ready: `ready_round`)."""

    def __init__(
        self,
        settings: Settings,
        owner: str,
        compute: EmbedCompute,
        opts: Options,
        stopper: Any,
        background: bool = False,
    ) -> None:
        super().__init__(name="embed-prefetch", daemon=True)
        self.settings = settings
        self.owner = owner
        self.compute = compute
        self.encoders = compute.encoders
        self.opts = opts
        self.stopper = stopper
        self.background = background
        self.q: queue.Queue[Round | BaseException] = queue.Queue(maxsize=max(1, opts.prefetch))
        self.halt = threading.Event()
        workers = max(1, opts.workers)
        self.pool = ThreadPoolExecutor(
            workers, thread_name_prefix="embed-decode", initializer=decode_thread_init(background)
        )
        # the caller's rounds (lockstep, or a starved background): normal priority
        self.fg_pool = ThreadPoolExecutor(
            workers, thread_name_prefix="embed-decode-fg", initializer=decode_thread_init(False)
        )
        self._conn: sqlite3.Connection | None = None  # the caller's rounds' (next_round)
        self.rounds_by_caller = 0  # rounds with work that the caller decoded itself (logged at the end)

    def _stop_now(self) -> bool:
        return self.halt.is_set() or self.stopper.should_stop()

    def run(self) -> None:
        decode_thread_init(self.background)()  # as its decode pool: it stacks each round's tensors
        conn = db.connect(self.settings.db_path)
        try:
            while not self._stop_now():
                rnd = self.make_round(conn, self.pool)
                while not self.halt.is_set():
                    try:
                        self.q.put(rnd, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                else:
                    self._release(conn, rnd)
                    break
                if rnd.empty and (not self.opts.watch or self.halt.wait(self.opts.poll_s)):
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which logs and exits
            self.q.put(exc)
        finally:
            conn.close()
            self.pool.shutdown(wait=True)

    def _release(self, conn: sqlite3.Connection, rnd: Round) -> None:
        for m, rows in rnd.rows.items():
            db.release(conn, f"embed_{m}", self.owner, [r["rid"] for r in rows])

    def make_round(self, conn: sqlite3.Connection, pool: ThreadPoolExecutor) -> Round:
        rnd = Round()
        for m in self.encoders:
            rows = db.claim_batch(conn, f"embed_{m}", self.owner, self.opts.batch_size)
            if rows:
                rnd.rows[m] = rows
        if rnd.empty:
            return rnd
        wanted: dict[int, list[str]] = {}
        by_gid: dict[int, sqlite3.Row] = {}
        for m, rows in rnd.rows.items():
            for r in rows:
                wanted.setdefault(r["gid"], []).append(m)
                by_gid[r["gid"]] = r
        gids = list(by_gid)
        results = list(pool.map(lambda g: self._load(by_gid[g], wanted[g]), gids))
        rnd.images = len(gids)
        per_gid = dict(zip(gids, results, strict=True))
        for m, rows in rnd.rows.items():
            ok, tens, errs = [], [], []
            for r in rows:
                res = per_gid[r["gid"]]
                if isinstance(res, tuple):
                    errs.append((r, res[0], res[1]))
                elif isinstance(res[m], str):
                    errs.append((r, res[m], True))
                else:
                    ok.append(r)
                    tens.append(res[m])
            rnd.ok[m], rnd.errors[m] = ok, errs
            if tens:
                rnd.tensors[m] = torch.stack(tens)
        return rnd

    def _load(self, row: sqlite3.Row, models: list[str]) -> tuple[str, bool] | dict[str, Any]:
        """Decode once, preprocess for each model (EmbedCompute.prepare). Returns (error, permanent) or
        {model: tensor | error}."""
        path = find_image(self.settings, row)
        archived = row["archived_at"] is not None  # its file lives on the backup disk: never fetched again
        if path is None:
            return ("image file missing", False if archived else REDOWNLOAD)
        try:
            img = self.compute.decode(path)
        except DECODE_ERRORS as exc:
            return (f"undecodable image: {type(exc).__name__}: {exc}", True if archived else REDOWNLOAD)
        return self.compute.prepare(img, models)

    def next_round(self) -> Round:
        """Claim and decode the next round now, for the caller (lockstep, or a starved background), with the
        normal-priority pool; its own connection, as when the round is made on the prefetch thread."""
        if self._conn is None:
            self._conn = db.connect(self.settings.db_path)
        rnd = self.make_round(self._conn, self.fg_pool)
        self.rounds_by_caller += not rnd.empty
        return rnd

    def ready_round(self) -> Round:
        """Background mode: a queued round if there is one, else one made now by the caller. Only when the
        caller finds nothing left to claim does it wait for the prefetch thread (whose claimed round, if
        any, must still be embedded before a one-shot run ends)."""
        if self.q.empty():  # only the prefetch thread adds: an item seen here is taken at once below
            rnd = self.next_round()
            if not rnd.empty:
                return rnd
        return self.get()

    def get(self) -> Round:
        while True:
            try:
                item = self.q.get(timeout=0.5)
            except queue.Empty:
                if not self.is_alive() and self.q.empty():
                    return Round()
                continue
            if isinstance(item, BaseException):
                raise item
            return item

    def shutdown(self, conn: sqlite3.Connection) -> None:
        """Stop claiming; hand back every round still queued."""
        self.halt.set()
        self.fg_pool.shutdown(wait=True)
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self.ident is None:  # lockstep: never started, nothing queued
            self.pool.shutdown(wait=True)
            return
        while self.is_alive() or not self.q.empty():
            try:
                item = self.q.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(item, Round):
                self._release(conn, item)
        self.join()


# --------------------------------------------------------------------------------------------------
# Listing text for the CLIP text indexes
# --------------------------------------------------------------------------------------------------


def listing_text(title: str | None, tags: str | None) -> str:
    """Title and tags, the way the text index sees a listing. Tags may be a JSON list or comma-separated."""
    tag_list: list[str] = []
    if tags:
        try:
            parsed = json.loads(tags)
            tag_list = [str(t) for t in parsed] if isinstance(parsed, list) else [str(parsed)]
        except ValueError:
            tag_list = [t.strip() for t in tags.split(",")]
    tag_list = [t for t in tag_list if t]
    parts = [p for p in ((title or "").strip(), ", ".join(tag_list)) if p]
    return ". ".join(parts)


def listing_texts(conn: sqlite3.Connection, listing_ids: Sequence[int]) -> dict[int, str]:
    out: dict[int, str] = {}
    for chunk in _chunks(list(listing_ids)):
        q = ",".join("?" * len(chunk))
        for r in conn.execute(f"SELECT listing_id, title, tags FROM listings WHERE listing_id IN ({q})", tuple(chunk)):
            text = listing_text(r["title"], r["tags"])
            if text:
                out[int(r["listing_id"])] = text
    return out


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------


class EmbedStage:
    def __init__(
        self,
        settings: Settings,
        conn: sqlite3.Connection,
        compute: EmbedCompute | dict[str, Encoder],
        opts: Options,
        stopper: Any,
        owner: str | None = None,
    ) -> None:
        """`compute`: from `make_embed_compute` (or the encoders to wrap in one); the local runner uses it."""
        self.settings = settings
        self.conn = conn
        self.compute = compute if isinstance(compute, EmbedCompute) else EmbedCompute(compute)
        self.encoders = encoders = self.compute.encoders
        self.opts = opts
        self.stopper = stopper
        self.owner = owner or db.make_owner("embed")
        # EMBED_STORE_FANOUT: segments merged at once (default 16; tests lower it to exercise compaction).
        policy = CompactionPolicy(fanout=settings.get_int("EMBED_STORE_FANOUT", CompactionPolicy.fanout))
        self.store = StoreWriter(settings.embeddings_dir, settings.tmp_dir, policy=policy)
        self.pending: dict[str, list[tuple[ClaimedBatch, list[int]]]] = {m: [] for m in encoders}
        self.since_flush = 0
        self.last_flush = time.monotonic()
        self.oldest_pending: float | None = None
        self.forward_s: dict[str, float] = dict.fromkeys(encoders, 0.0)
        self.forwarded: dict[str, int] = dict.fromkeys(encoders, 0)  # images through each model, this run
        self._cost_recorded: dict[str, tuple[float, int]] = dict.fromkeys(encoders, (0.0, 0))
        self.progress = {
            m: Progress(log, f"{m} images", interval=opts.progress_s, remaining=self._remaining_fn(m)) for m in encoders
        }
        self.prefetcher: Prefetcher | None = None
        self.overlap: bool | None = None  # set by run() from Options.overlap and the devices
        self.repairs: dict[str, dict[str, int]] = {}
        self.pending_texts: dict[str, set[int]] = {m: set() for m in encoders}

    def _remaining_fn(self, m: str) -> Callable[[], int]:
        return lambda: db.backlog(self.conn, f"embed_{m}")

    # ---- start-up ------------------------------------------------------------------------------
    def open(self) -> None:
        """Lock every model's store, migrate old files, refuse a source change, reconcile flags and store."""
        emb = self.settings.embeddings_dir
        for m, enc in self.encoders.items():
            self.store.lock_model(m)
            for name in (m, f"{m}{TEXT_SUFFIX}") if enc.has_text else (m,):
                migrate_index(emb, self.settings.tmp_dir, name, writer=self.store)
            rec = read_store_manifest(emb, m)
            source = enc.spec.describe()
            known = rec.get("source") not in (None, UNKNOWN_SOURCE) if rec else False  # migrated without a record
            if rec and rec.get("count") and ((known and rec["source"] != source) or int(rec["dim"]) != enc.dim):
                raise RuntimeError(
                    f"{m}: embeddings/{m}/ was built with {rec.get('source')} (dim {rec.get('dim')}), "
                    f"now loading {source} (dim {enc.dim}); the vectors would not be comparable. "
                    f"Use the same model, or move embeddings/{m}/ away to start that store afresh."
                )
            self.store.open_model(m, enc.dim, text=enc.has_text, source=source, standin=enc.spec.standin)
            db.reclaim_dead(self.conn, f"embed_{m}")
        drop_image_index(emb)
        for m in self.encoders:
            self.repairs[m] = self.reconcile(m)
            if self.encoders[m].has_text:
                self.backfill_texts(m)
        self.store.commit()
        self.store.write_summary()
        self._status_warning()

    def _status_warning(self) -> None:
        standins = [m for m, e in self.encoders.items() if e.spec.standin]
        current = db.kv_get(self.conn, db.KV_STATUS_WARNING) or ""
        if standins:
            msg = f"{STANDIN_WARNING} ({', '.join(standins)}): search results are meaningless"
            if current != msg:
                db.kv_set(self.conn, db.KV_STATUS_WARNING, msg)
        elif current.startswith(STANDIN_WARNING):
            db.kv_set(self.conn, db.KV_STATUS_WARNING, "")

    def _sorted_ids(self, sql: str) -> np.ndarray:
        """A one-column query as an ascending unique int64 array (8 bytes a row, not a Python set)."""
        cur = self.conn.execute(sql)
        return np.unique(np.fromiter((r[0] for r in cur), dtype=np.int64))

    def reconcile(self, m: str) -> dict[str, int]:
        """Make store gids == rows flagged 1 for model m (see the module docstring). Returns repair counts."""
        st = db.stage(f"embed_{m}")
        stored = self.store.live_keys(m)
        flagged = self._sorted_ids(f"SELECT gid FROM image_status WHERE {st.done_col}=1")
        extra = np.setdiff1d(stored, flagged, assume_unique=True).tolist()
        missing = np.setdiff1d(flagged, stored, assume_unique=True).tolist()
        del stored, flagged
        adopted = removed = reset = 0
        if extra:
            adopt: list[int] = []
            for chunk in _chunks(extra):
                q = ",".join("?" * len(chunk))
                ready = {
                    int(r[0])
                    for r in self.conn.execute(
                        f"SELECT gid FROM image_status WHERE gid IN ({q}) AND {st.ready_sql} AND {st.parked_col}=0",
                        tuple(chunk),
                    )
                }
                adopt += [g for g in chunk if g in ready]
                gone = [g for g in chunk if g not in ready]
                self.store.remove(m, np.asarray(gone, np.int64))
                removed += len(gone)
            if removed:
                self.store.commit()  # the tombstones are durable before any flag moves
            adopted = self._adopt(st, adopt)
        for chunk in _chunks(missing):
            q = ",".join("?" * len(chunk))
            reset += db.reset_rows(self.conn, st.name, f"{st.done_col}=1 AND gid IN ({q})", tuple(chunk))
        counts = {"adopted": adopted, "removed": removed, "reset": reset, "vectors": self.store.count(m)}
        if adopted or removed or reset:
            log.warning(
                "%s: reconciled store and flags: %d vector(s) flagged (written before a crash), "
                "%d stray vector(s) removed, %d flag(s) without a vector reset to 0",
                m,
                adopted,
                removed,
                reset,
            )
        else:
            log.info("%s: store and flags agree (%d vectors)", m, self.store.count(m))
        return counts

    @db.retry_on_lock
    def _adopt(self, st: db.Stage, gids: list[int]) -> int:
        n = 0
        with db.Transaction(self.conn):
            for chunk in _chunks(gids):
                q = ",".join("?" * len(chunk))
                n += self.conn.execute(
                    f"UPDATE image_status SET {st.done_col}=1, {st.claim_col}=NULL, {st.not_before_col}=0,"
                    f" {st.error_col}=NULL WHERE gid IN ({q}) AND {st.done_col}=0",
                    tuple(chunk),
                ).rowcount
        return n

    def backfill_texts(self, m: str) -> int:
        """Text vectors for every listing with an embedded image that lacks one (e.g. after a crash)."""
        st = db.stage(f"embed_{m}")
        have = self.store.live_keys(f"{m}{TEXT_SUFFIX}")
        listings = self._sorted_ids(f"SELECT DISTINCT listing_id FROM image_status WHERE {st.done_col}=1")
        todo = np.setdiff1d(listings, have, assume_unique=True)
        del have, listings
        added = 0
        for s in range(0, len(todo), 4096):  # bounded: a big backfill commits as it goes
            added += self._add_texts(m, todo[s : s + 4096].tolist())
            self.store.commit()
        if added:
            log.info("%s: added %d missing listing text vector(s)", m, added)
        return added

    def _add_texts(self, m: str, listing_ids: Sequence[int]) -> int:
        name = f"{m}{TEXT_SUFFIX}"
        cand = np.unique(np.asarray(listing_ids, dtype=np.int64))
        todo = cand[~self.store.contains(name, cand)].tolist() if len(cand) else []
        if not todo:
            return 0
        texts = listing_texts(self.conn, todo)
        keys = [k for k in todo if k in texts]
        added = 0
        for i in range(0, len(keys), 64):
            chunk = keys[i : i + 64]
            self.store.append(
                name, np.asarray(chunk, np.int64), self.encoders[m].encode_texts([texts[k] for k in chunk])
            )
            added += len(chunk)
        return added

    # ---- the loop ------------------------------------------------------------------------------
    def run_batch(self) -> int:
        assert self.prefetcher is not None
        pf = self.prefetcher
        rnd = (pf.ready_round() if pf.background else pf.get()) if self.overlap else pf.next_round()
        if rnd.empty:
            self.maybe_flush(force=self.store.dirty() or any(self.pending.values()))
            return 0
        handled = 0
        for m, rows in rnd.rows.items():
            batch = ClaimedBatch(self.conn, f"embed_{m}", self.owner, rows)
            # If the model raises, the batch is deliberately not released: its attempts stay counted, so rows
            # that crash the model again and again get parked (reclaim_dead frees the leases at the next start).
            self.settle_errors(m, batch, rnd.errors.get(m, []))
            ok = rnd.ok.get(m, [])
            vecs = None
            if ok:
                t0 = time.perf_counter()
                vecs = self.compute.encode(m, rnd.tensors[m])
                self.forward_s[m] += time.perf_counter() - t0
                self.forwarded[m] += len(ok)
            self.accept(m, batch, ok, vecs, failed=len(rnd.errors.get(m, [])))
            handled += len(rows)
        self.maybe_flush()
        return handled

    def settle_errors(self, m: str, batch: ClaimedBatch, errors: Sequence[tuple[sqlite3.Row, str, bool | str]]) -> None:
        """Record the rows the compute could not embed: sent back to download, retried later, or parked."""
        for row, reason, permanent in errors:
            if permanent == REDOWNLOAD:
                local = image_path(self.settings.images_dir, row["listing_id"], row["image_id"])
                parked = batch.send_back(row["rid"], reason, local, self.settings.tmp_dir)
                outcome = "parked in download (broken after every download)" if parked else "sent back to download"
            else:
                parked = batch.fail(row["rid"], reason, permanent=bool(permanent))
                outcome = "parked" if parked else "will retry"
            log.warning("%s: image %s/%s %s: %s", m, row["listing_id"], row["image_id"], outcome, reason)

    def accept(
        self, m: str, batch: ClaimedBatch, ok: Sequence[sqlite3.Row], vecs: np.ndarray | None, failed: int
    ) -> None:
        """Buffer the vectors of a batch's `ok` rows; the batch's flags wait for the next durable flush."""
        if ok:
            assert vecs is not None
            self.add_vectors(m, ok, vecs)
        self.pending[m].append((batch, [r["rid"] for r in ok]))
        if self.oldest_pending is None:
            self.oldest_pending = time.monotonic()
        self.since_flush += len(ok)
        self.progress[m].add(len(ok), failed=failed)

    def add_vectors(self, m: str, rows: Sequence[sqlite3.Row], vecs: np.ndarray) -> None:
        gids = np.asarray([int(r["gid"]) for r in rows], dtype=np.int64)
        self.store.append(m, gids, vecs)
        if f"{m}{TEXT_SUFFIX}" in self.store.stores:
            self.pending_texts[m].update(int(r["listing_id"]) for r in rows)  # encoded in big batches at flush

    def maybe_flush(self, force: bool = False) -> None:
        """Flush when due: every `flush_every` vectors or `flush_s` seconds, never spending more than ~10% of
        the time writing. A flush writes only the new vectors (a small segment per model), whatever the
        store's size; compaction bounds the bytes rewritten later (store.py)."""
        now = time.monotonic()
        if not force:
            if not self.since_flush:
                return
            self._renew_leases(now)
            age = now - self.last_flush
            due = self.since_flush >= self.opts.flush_every or age >= self.opts.flush_s
            too_soon = age < 10 * self.store.last_write_s
            if too_soon or not (due or age >= self.opts.flush_max_s):
                return
        self.flush()

    def _renew_leases(self, now: float) -> None:
        """Rows waiting for a flush keep their leases (else they would be claimed again)."""
        if self.oldest_pending is None or now - self.oldest_pending < self._lease_s() / 3:
            return
        for m, items in self.pending.items():
            rids = [rid for _, rids in items for rid in rids]
            if rids:
                db.renew(self.conn, f"embed_{m}", self.owner, rids)
        self.oldest_pending = now

    def _lease_s(self) -> float:
        return min(db.stage(f"embed_{m}").lease_s for m in self.encoders)

    def flush(self) -> None:
        """Write the segments, then flag exactly the rows whose vectors they hold."""
        done: dict[str, int] = {}

        def on_durable(m: str) -> None:
            if m not in self.pending:
                return  # a text store
            n = 0
            for batch, rids in self.pending[m]:
                n += len(batch.complete(rids)) if rids else 0
                batch.__exit__(None, None, None)
            self.pending[m] = []
            done[m] = n

        for m, listings in self.pending_texts.items():  # text segments are committed first: encode them now
            if listings:
                self._add_texts(m, sorted(listings))
                listings.clear()
        took = self.store.commit(on_durable)
        self._record_cost()
        self.since_flush = 0
        self.last_flush = time.monotonic()
        self.oldest_pending = None
        if done and any(done.values()):
            log.info(
                "flushed in %.2fs; flagged %s",
                took,
                ", ".join(f"{m} {n}" for m, n in done.items() if n),
            )

    def _record_cost(self) -> None:
        """Model seconds per image for evaluation's cost column (kv `embed_cost`), added at each flush."""
        spent = {}
        for m, (s0, n0) in self._cost_recorded.items():
            if self.forwarded[m] > n0:
                spent[m] = (self.forward_s[m] - s0, self.forwarded[m] - n0)
                self._cost_recorded[m] = (self.forward_s[m], self.forwarded[m])
        if spent:
            try:
                db.add_embed_cost(self.conn, spent)
            except sqlite3.Error as exc:  # bookkeeping only: never lose a flush over it
                log.warning("embedding cost not recorded: %s", exc)

    def release_pending(self) -> None:
        for m, items in self.pending.items():
            for batch, _ in items:
                batch.__exit__(None, None, None)
            self.pending[m] = []

    def run(self, heartbeat: Heartbeat | None = None) -> int:

        on_cpu = all(getattr(e, "device", "cpu") == "cpu" for e in self.compute.encoders.values())
        self.overlap = self.opts.overlap
        if self.overlap is None:
            self.overlap = not on_cpu
        background = bool(self.overlap and on_cpu)
        torch_threads = torch.get_num_threads()  # also fixes this thread's count before any decode thread sets its own
        self.prefetcher = Prefetcher(self.settings, self.owner, self.compute, self.opts, self.stopper, background)
        if not self.overlap:
            log.info("decoding in lockstep, between forwards")
        elif background:
            log.info("decoding during the forwards in background threads (the main thread decodes when none is ready)")
        else:
            log.info("decoding during the forwards")
        if self.overlap:
            self.prefetcher.start()
        total = 0
        try:
            total = run_loop(self.run_batch, self.stopper, watch=self.opts.watch, heartbeat=heartbeat, logger=log)
            self.flush()
        except BaseException:
            try:
                self.flush()  # the vectors computed so far are valid: keep them if the files can be written
            except Exception as exc:  # noqa: BLE001
                log.error("could not flush at exit (%s); unflagged rows will be embedded again", exc)
            raise
        finally:
            try:
                self.release_pending()
                self.prefetcher.shutdown(self.conn)
            finally:
                torch.set_num_threads(torch_threads)  # the default for threads started later, as it was
            if background and self.prefetcher.rounds_by_caller:
                log.info(
                    "%d round(s) decoded by the main thread (none was ready from the background decoders)",
                    self.prefetcher.rounds_by_caller,
                )
            for m, p in self.progress.items():
                if p.done or p.failed:
                    p.report(final=True)
                    log.info(
                        "%s: model time %.1fs (%.1f images/s in the model)",
                        m,
                        self.forward_s[m],
                        p.done / self.forward_s[m] if self.forward_s[m] else 0.0,
                    )
            self.store.close()
        return total
