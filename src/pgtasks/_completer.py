"""The completer: writes job outcomes to the database in batches.

Outcomes (ack, retry, release, dead letter) are queued by the executor and flushed every few
milliseconds, or at once when a batch is full, in one transaction with one statement per
(queue, kind). Every statement is guarded by the (msg_id, read_ct) the worker claimed, so an
outcome for a message whose lease was lost changes nothing. If the database is unreachable
the outcomes stay queued and the flush is retried with backoff; if they can never be written,
the messages reappear when their leases expire (at-least-once).
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import anyio
import asyncpg

from ._db import queries
from ._db.connect import CONNECTION_ERRORS, acquire_clean
from .context import JobEvent

logger = logging.getLogger("pgtasks")

OutcomeKind = Literal["ack", "retry", "release", "dead"]


@dataclass(slots=True)
class Outcome:
    kind: OutcomeKind
    queue: str
    msg_id: int
    read_ct: int
    archive: bool = True  # ack: archive, else delete
    delay: float = 0.0  # retry / release
    task: str | None = None  # dead
    reason: str = ""  # dead
    error: str | None = None  # dead: JSON text
    attempt_error: queries.AttemptError | None = None  # retry / dead: the failure to record
    event: JobEvent | None = None  # emitted once written


class Completer:
    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        key_retention: float,
        emit: Callable[[JobEvent], None],
        worker_id: str = "",
        requeued: Callable[[], None] = lambda: None,
        batch_size: int = 500,
        interval: float = 0.005,
    ) -> None:
        self._pool = pool
        self._key_retention = key_retention
        self._emit = emit
        self._requeued = requeued
        self._worker_id = worker_id
        self._batch_size = batch_size
        self._interval = interval
        self._pending: list[Outcome] = []
        self._flushing = anyio.Lock()  # the run loop's flush and drain's never overlap
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, outcome: Outcome) -> None:
        self._pending.append(outcome)
        self._idle.clear()
        self._wake.set()

    async def wait_idle(self) -> None:
        """Until every submitted outcome has been written (or given up on)."""
        await self._idle.wait()

    async def run(self) -> None:
        """Flush forever; cancel to stop (then call `drain`)."""
        backoff = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            if len(self._pending) < self._batch_size:
                await anyio.sleep(self._interval)
            try:
                async with self._flushing:
                    await self._flush()
                backoff = 0.05
            except CONNECTION_ERRORS as exc:
                logger.warning(
                    "could not write %d job outcome(s), retrying in %.1fs: %s",
                    len(self._pending),
                    backoff,
                    exc,
                )
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                self._wake.set()

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109
        """Write what is left (at shutdown), shielded from cancellation, within timeout."""
        with anyio.move_on_after(timeout, shield=True) as scope:
            # a flush in progress has taken its batch out of _pending: let it finish first,
            # or the run loop's cancellation would drop that batch
            async with self._flushing:
                while self._pending:
                    try:
                        await self._flush()
                    except CONNECTION_ERRORS as exc:
                        logger.warning("flushing outcomes at shutdown failed: %s", exc)
                        await anyio.sleep(0.2)
        if scope.cancelled_caught and self._pending:
            logger.error(
                "%d job outcome(s) were not written before shutdown; those messages "
                "become visible again when their leases expire",
                len(self._pending),
            )

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            self._idle.set()
            return
        groups: dict[tuple[OutcomeKind, str, bool], list[Outcome]] = defaultdict(list)
        for o in batch:
            groups[(o.kind, o.queue, o.archive if o.kind == "ack" else False)].append(o)
        written: set[tuple[str, int]] = set()
        try:
            # one statement (the common case: a batch of acks) needs no transaction of its own
            single = len(groups) == 1 and all(o.attempt_error is None for o in batch)
            async with (
                acquire_clean(self._pool) as conn,
                conn.transaction() if not single else nullcontext(),
            ):
                for (kind, queue, archive), items in groups.items():
                    done = await self._write(conn, kind, queue, archive, items)
                    written.update((queue, i) for i in done)
                    errors = [
                        o.attempt_error
                        for o in items
                        if o.attempt_error is not None and o.msg_id in done
                    ]
                    if errors:
                        await queries.attempt_errors_insert(conn, queue, self._worker_id, errors)
        except BaseException:
            self._pending[:0] = batch  # keep them for the next attempt
            raise
        for o in batch:
            if (o.queue, o.msg_id) in written:
                if o.event is not None:
                    self._emit(o.event)
            elif o.kind != "release":
                logger.warning(
                    "%s of message %d in queue %s not written: the message is no "
                    "longer held at attempt %d (its lease expired and another worker took it, "
                    "or it was removed)",
                    o.kind,
                    o.msg_id,
                    o.queue,
                    o.read_ct,
                )
        if any(o.kind in ("retry", "release") for o in batch):
            self._requeued()  # the fetcher's timer must learn of the new visibility times
        if not self._pending:
            self._idle.set()

    async def _write(
        self,
        conn: queries.Connection,
        kind: OutcomeKind,
        queue: str,
        archive: bool,
        items: list[Outcome],
    ) -> set[int]:
        owned = [(o.msg_id, o.read_ct) for o in items]
        if kind == "ack":
            return await queries.messages_ack(
                conn, queue, owned, archive=archive, key_retention=self._key_retention
            )
        if kind == "retry":
            return await queries.messages_set_vt(conn, queue, owned, [o.delay for o in items])
        if kind == "release":
            return await queries.messages_release(conn, queue, owned)
        return await queries.messages_dead_letter(
            conn,
            queue,
            owned,
            [o.task for o in items],
            [o.reason for o in items],
            [o.error for o in items],
        )
