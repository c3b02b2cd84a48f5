"""The completer: the one writer of this worker's message rows.

Every write a worker makes to a message it claimed goes through here, in submission order:
acks, retries, releases, dead letters, and the lease keeper's extensions. (The one
exception is a transactional job's ack, which must commit in the job's own transaction; the
job's state keeps the two apart, see `job.py`.) Outcomes are flushed at most every 10 ms
while they keep coming, at once when a batch is full or when one comes after a quiet spell
(2.5 ms without any), with one statement per (kind, queue), in one transaction
when there is more than one statement. Every statement is guarded by the claim token, so an
outcome for a message this worker no longer holds changes nothing, and says so.

An extension is dropped at flush time when its job's outcome is already decided, so a
stale extension can never overwrite a retry's delay; an extension whose row did not come
back means the lease was lost, and the job is cancelled for that reason, unless its outcome
was decided meanwhile (a transactional job that committed its own ack).

Failures are classified once (`db.errors.classify`). Transient ones keep the batch and
retry it after a short backoff. Anything else is isolated: the batch is written statement by
statement, then item by item; an item the database refuses is written in a reduced form
(without the task's text) and, if even that fails, given up on with an error in the log: its
message becomes visible again when its lease runs out. The loop never ends on an error.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, nullcontext

import anyio
import asyncpg

from ..db import attempt_errors, jobs, results, workflows
from ..db.errors import LOCK_NOT_AVAILABLE, ErrorKind, classify, sqlstate
from .connection import OwnConnection
from .events import JobEvent
from .job import CancelReason, Job
from .outcome import Outcome, OutcomeKind

logger = logging.getLogger("pgtasks")

_Group = tuple[OutcomeKind, str, bool, bool]  # kind, queue, archive, keeps results


class _Interrupted(Exception):
    """A transient failure in the middle of an isolated flush."""


class Completer:
    def __init__(
        self,
        conn: OwnConnection,
        *,
        key_retention: float,
        emit: Callable[[JobEvent], None],
        worker_id: str = "",
        requeued: Callable[[str], None] = lambda _: None,
        batch_size: int = 500,
        interval: float = 0.01,
    ) -> None:
        self._conn = conn
        self._key_retention = key_retention
        self._emit = emit
        self._requeued = requeued
        self._worker_id = worker_id
        self._batch_size = batch_size
        self._interval = interval
        self._quiet = interval / 4
        self._last_submit = -math.inf
        # ends the wait for the interval: an outcome after a quiet spell, or a full batch
        self._urgent = asyncio.Event()
        self._pending: list[Outcome] = []
        self._flushing = anyio.Lock()  # the run loop's flush and drain's never overlap
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.closed = False

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, outcome: Outcome) -> None:
        if self.closed:  # after the final drain: nothing can be written any more
            logger.warning(
                "%s of %s arrived after the worker stopped writing; not written",
                outcome.kind,
                outcome.job,
            )
            return
        now = time.monotonic()
        pending = self._pending
        pending.append(outcome)
        if now - self._last_submit >= self._quiet or len(pending) >= self._batch_size:
            self._urgent.set()
        self._last_submit = now
        self._idle.clear()
        self._wake.set()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """The completer's connection between two flushes, for a small write of the
        worker's own (its heartbeat): not the app's pool, and no connection more."""
        async with self._flushing, self._conn.use() as conn:
            yield conn

    async def wait_idle(self) -> None:
        """Until every submitted outcome has been written (or given up on)."""
        await self._idle.wait()

    async def run(self) -> None:
        """Flush forever; cancel to stop (then call `drain`)."""
        backoff = 0.05
        last = -math.inf
        while True:
            await self._wake.wait()
            self._wake.clear()
            # At most one flush per interval while outcomes keep coming, so that a busy
            # worker writes them in batches (and wakes its event loop with few replies:
            # see `slots.py`); an outcome that comes after a quarter of the interval without
            # any is written at once (a waiter for a result hears of it without the
            # interval's delay).
            if not self._pending:  # written by the flush that was running
                continue
            wait = last + self._interval - time.monotonic()
            if wait > 0 and len(self._pending) < self._batch_size:
                with anyio.move_on_after(wait):
                    await self._urgent.wait()  # at once if it is set already
            self._urgent.clear()
            last = time.monotonic()
            try:
                async with self._flushing:
                    await self._flush()
                backoff = 0.05
            except _Interrupted as exc:
                cause = exc.__cause__ or exc
                logger.warning(
                    "could not write %d job outcome(s), retrying in %.2fs: %s",
                    len(self._pending),
                    backoff,
                    cause,
                )
                await anyio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, 1.0)
                self._wake.set()

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109
        """Write what is left (at shutdown), shielded from cancellation, within timeout;
        later submissions are refused."""
        with anyio.move_on_after(timeout, shield=True) as scope:
            # a flush in progress has taken its batch out of _pending: let it finish first,
            # or the run loop's cancellation would drop that batch
            async with self._flushing:
                while self._pending:
                    try:
                        await self._flush()
                    except _Interrupted as exc:
                        logger.warning("flushing outcomes at shutdown failed: %s", exc.__cause__)
                        await anyio.sleep(0.2)
        self.closed = True
        if scope.cancelled_caught and self._pending:
            logger.error(
                "%d job outcome(s) were not written before shutdown; those messages "
                "become visible again when their leases expire",
                len(self._pending),
            )

    # --- one flush -----------------------------------------------------------------------

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        batch = _without_stale_extensions(batch)
        if not batch:
            if not self._pending:
                self._idle.set()
            return
        groups = _group(batch)
        started = time.monotonic()  # no later than any write below
        written: set[int] = set()  # id() of the outcomes written
        given_up: set[int] = set()
        try:
            try:
                await self._write_together(groups, written)
            except Exception as exc:
                if classify(exc) is ErrorKind.TRANSIENT and not _locked(exc):
                    raise _Interrupted from exc
                logger.warning(
                    "writing %d job outcome(s) together failed (%s: %s); writing them "
                    "queue by queue, then one by one, to find what the database refuses",
                    len(batch),
                    type(exc).__name__,
                    exc,
                )
                written.clear()
                await self._write_isolated(groups, written, given_up)
            await self._confirm_replays(batch, written)
        except BaseException:
            # keep what was not written for the next attempt, in order
            kept = [o for o in batch if id(o) not in written and id(o) not in given_up]
            for o in kept:
                o.tries += 1  # it may have been written all the same (a lost reply)
            self._pending[:0] = kept
            self._settle(
                [o for o in batch if id(o) in written or id(o) in given_up],
                written,
                given_up,
                started,
            )
            raise
        self._settle(batch, written, given_up, started)
        for queue in {o.job.queue for o in batch if o.kind in ("retry", "release")}:
            self._requeued(queue)  # the fetcher must learn of the new visibility times
        if not self._pending:
            self._idle.set()

    async def _write_together(self, groups: dict[_Group, list[Outcome]], written: set[int]) -> None:
        # one statement (the common case: a batch of acks) needs no transaction of its own
        single = len(groups) == 1 and all(
            o.attempt_error is None and o.step_end is None
            for items in groups.values()
            for o in items
        )
        async with self._conn.use() as conn, conn.transaction() if not single else nullcontext():
            done: list[Outcome] = []
            for key, items in groups.items():
                done += await self._write(conn, key, items)
        written.update(id(o) for o in done)  # only once the transaction committed

    async def _write_isolated(
        self, groups: dict[_Group, list[Outcome]], written: set[int], given_up: set[int]
    ) -> None:
        locked: _Interrupted | None = None
        for key, items in groups.items():
            try:
                written.update(id(o) for o in await self._write_one(key, items))
                continue
            except _Interrupted as exc:
                if not _locked(exc.__cause__):
                    raise
                locked = exc  # this queue's table is locked: the others go on
                continue
            except Exception:
                pass  # one of these items: find it
            for item in items:
                outcome: Outcome | None = item
                while outcome is not None:
                    try:
                        if await self._write_one(key, [outcome]):
                            written.add(id(item))
                        break
                    except _Interrupted:
                        raise
                    except Exception as exc:
                        outcome = self._reduce(outcome, exc, given_up, item)
        if locked is not None:
            raise locked  # what waits on the lock is kept, and tried again after a pause

    async def _confirm_replays(self, batch: Sequence[Outcome], written: set[int]) -> None:
        """An ack tried again after a failure may have been written by that earlier try (it
        committed, and the reply was lost): its row is then gone from the queue and the
        retry finds nothing. The archive tells; such an ack counts as written."""
        by_queue: dict[str, list[Outcome]] = defaultdict(list)
        for o in batch:
            if o.kind == "ack" and o.archive and o.tries and id(o) not in written:
                by_queue[o.queue].append(o)
        for queue, items in by_queue.items():
            try:
                async with self._conn.use() as conn:
                    tokens = [o.job.token for o in items]
                    archived = await jobs.messages_archived(conn, queue, tokens)
            except Exception as exc:
                # as for the writes: a transient failure keeps these acks for another try,
                # anything else must not end the loop (they count as not written)
                if classify(exc) is ErrorKind.TRANSIENT:
                    raise _Interrupted from exc
                logger.warning(
                    "could not tell whether %d ack(s) tried again on %s were written (%s: %s)",
                    len(items),
                    queue,
                    type(exc).__name__,
                    exc,
                )
                continue
            written.update(id(o) for o in items if o.job.token in archived)

    def _reduce(
        self, outcome: Outcome, exc: Exception, given_up: set[int], item: Outcome
    ) -> Outcome | None:
        reduced = outcome.reduced()
        job = item.job
        if reduced is not None:
            logger.error(
                "the database refused the %s of %s (%s: %s); writing it without the "
                "task's error text",
                outcome.kind,
                job,
                type(exc).__name__,
                exc,
            )
            return reduced
        logger.error(
            "the database refused the %s of %s (%s: %s); giving up on it: the message "
            "becomes visible again when its lease runs out",
            outcome.kind,
            job,
            type(exc).__name__,
            exc,
        )
        given_up.add(id(item))
        return None

    async def _write_one(self, key: _Group, items: list[Outcome]) -> list[Outcome]:
        """One group in a transaction of its own; transient failures interrupt."""
        try:
            async with self._conn.use() as conn, conn.transaction():
                return await self._write(conn, key, items)
        except Exception as exc:
            if classify(exc) is ErrorKind.TRANSIENT:
                raise _Interrupted from exc
            raise

    async def _write(
        self, conn: asyncpg.Connection, key: _Group, items: list[Outcome]
    ) -> list[Outcome]:
        """One statement for a group (plus its attempt errors); the outcomes it wrote."""
        kind, queue, archive, keeps_results = key
        owned = [o.job.token for o in items]
        held: list[int]
        if kind == "ack":
            held = await jobs.messages_ack(
                conn,
                queue,
                owned,
                archive=archive,
                key_retention=self._key_retention,
                results=[(o.result, o.result_error, o.ttl) for o in items]
                if keeps_results
                else None,
            )
        elif kind == "extend":
            extended = await results.messages_extend(conn, queue, owned, [o.delay for o in items])
            for i, requested in extended:
                if requested:  # heard here by workers that do not listen, or missed it
                    items[i].cancel_requested = True
            held = [i for i, _ in extended]
        elif kind == "retry":
            held = await jobs.messages_set_vt(conn, queue, owned, [o.delay for o in items])
        elif kind in ("cancel", "expire"):
            held = await results.messages_end(
                conn,
                queue,
                owned,
                "cancelled" if kind == "cancel" else "expired",
                [o.error for o in items],
                [o.ttl for o in items],
            )
        elif kind == "release":
            held = await jobs.messages_release(conn, queue, owned, [o.give_back for o in items])
        else:
            held = await jobs.messages_dead_letter(
                conn,
                queue,
                owned,
                [o.job.task_name for o in items],
                [o.reason for o in items],
                [o.error for o in items],
            )
        done = [items[i] for i in held]
        errors = [o.attempt_error for o in done if o.attempt_error is not None]
        if errors:
            await attempt_errors.attempt_errors_insert(conn, queue, self._worker_id, errors)
        ends = [o.step_end for o in done if o.step_end is not None]
        if ends:  # in this transaction: a workflow moves on exactly when its step's end is written
            await workflows.steps_ended(conn, ends)
        # a message too large to load: its headers too are unread, so its row names its step
        unread = [o for o in done if o.kind == "dead" and o.step_end is None and o.job.unread]
        if unread:
            await workflows.steps_failed_unread(
                conn, queue, [o.job.msg_id for o in unread], [o.reason for o in unread]
            )
        return done

    # --- after a flush ---------------------------------------------------------------------

    def _settle(
        self, batch: Iterable[Outcome], written: set[int], given_up: set[int], started: float
    ) -> None:
        for o in batch:
            job = o.job
            if o.kind == "extend":
                job.extension_pending = False
                if id(o) in written:
                    job.extended_at = started
                    if o.cancel_requested and job.request_cancel():
                        logger.info("%s: cancelling, as requested", job)
                elif not job.decided:
                    self._lost(job, "given up" if id(o) in given_up else "not held")
                continue
            if id(o) in written:
                job.done()
                if o.event is not None:
                    self._emit(o.event)
                continue
            job.done()
            if id(o) not in given_up and o.kind != "release":
                logger.warning(
                    "%s of %s not written: the message is no longer held by this claim (its "
                    "lease expired and another worker took it, or it was removed)",
                    o.kind,
                    job,
                )

    def _lost(self, job: Job, why: str) -> None:
        if not job.cancel(CancelReason.LOST_LEASE):
            return
        logger.warning(
            "lost the lease on %s (%s): another worker may run it now; cancelling this "
            "run, which will not be acked",
            job,
            why,
        )
        self._emit(JobEvent("lost", job.queue, job.msg_id, job.attempt, job.task_name))


def _locked(exc: BaseException | None) -> bool:
    """A statement that gave up waiting for a lock (the loops' connections set
    lock_timeout): one queue's table is locked, which must not hold back the others."""
    return exc is not None and sqlstate(exc) == LOCK_NOT_AVAILABLE


def _without_stale_extensions(batch: Sequence[Outcome]) -> list[Outcome]:
    """Extensions of jobs whose outcome is decided are dropped (their flag cleared)."""
    kept: list[Outcome] = []
    for o in batch:
        if o.kind == "extend" and (o.job.decided or o.job.cancel_reason is CancelReason.LOST_LEASE):
            o.job.extension_pending = False
            continue
        kept.append(o)
    return kept


def _group(batch: Sequence[Outcome]) -> dict[_Group, list[Outcome]]:
    """One group per statement; within a group, rows in msg_id order, so that every
    statement of every worker locks rows in the same order."""
    groups: dict[_Group, list[Outcome]] = defaultdict(list)
    for o in batch:
        ack = o.kind == "ack"
        groups[(o.kind, o.queue, ack and o.archive, ack and o.keeps_result)].append(o)
    for items in groups.values():
        items.sort(key=lambda o: o.job.msg_id)
    return groups
