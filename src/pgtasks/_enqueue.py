"""Enqueueing: one job or many, on the caller's connection or a pooled one.

Everything goes through the SQL functions pgtasks.send / pgtasks.send_batch (keys, queue
creation and the wake-up NOTIFY ride in the same round trip). Arguments are encoded and
checked before anything is sent. Connection failures become `DatabaseUnavailable`, saying
whether the job may have been enqueued; a retry happens only where it cannot duplicate.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

import asyncpg

from ._db import queries
from ._db.connect import CONNECTION_ERRORS, mark_session_clean
from ._db.queries import Connection
from .exceptions import DatabaseUnavailable
from .tasks import JobRef, Signature

T = TypeVar("T")
logger = logging.getLogger("pgtasks")

BATCH_CHUNK = 5_000  # messages per send_batch call


class _Sending:
    """Whether a failed enqueue may have reached the database (see `_on_connection`)."""

    ambiguous = False


class Enqueuer:
    def __init__(
        self,
        pool: Callable[[], Awaitable[asyncpg.Pool]],
        where: Callable[[], str],
        max_message_size: int,
        pool_max_size: int,
    ) -> None:
        self._pool = pool
        self._pool_max_size = pool_max_size
        self._where = where
        self._max_message_size = max_message_size

    async def defer_one(self, sig: Signature) -> JobRef:
        body = sig.body(self._max_message_size)
        headers = sig.headers()
        opts = sig.options

        async def send(conn: queries.Connection, sending: _Sending) -> tuple[int, bool, str]:
            # with an idempotency key a repeat is deduplicated, so a retry is always safe
            sending.ambiguous = opts.idempotency_key is None
            return await queries.message_send(conn, sig.queue, body, headers, opts.delay, opts.eta)

        what = f"deferring {sig.task.name!r} to {sig.queue!r}"
        msg_id, dedup, queue = await self._on_connection(opts.connection, send, what)
        return JobRef(msg_id, queue, sig.task.name, dedup)

    async def defer_many(
        self, signatures: Iterable[Signature], connection: Connection | None
    ) -> list[JobRef]:
        """Enqueue many jobs in one transaction, with one ``send_batch`` per queue (and
        delay); returns their refs in input order. Built with ``task.s(...)`` or
        ``task.options(...).s(...)``; a per-item ``connection`` option is ignored in favour
        of ``connection`` here."""
        sigs = list(signatures)
        bodies = [s.body(self._max_message_size) for s in sigs]  # validate all before sending
        groups: dict[tuple[str, float, dt.datetime | None], list[int]] = defaultdict(list)
        first_with_key: dict[str, int] = {}
        repeats: dict[int, int] = {}  # a later item with a key seen earlier -> the first
        for i, s in enumerate(sigs):
            key = s.options.idempotency_key
            if key is not None and key in first_with_key:
                repeats[i] = first_with_key[key]
                continue
            if key is not None:
                first_with_key[key] = i
            groups[(s.queue, s.options.delay, s.options.eta)].append(i)
        refs: list[JobRef | None] = [None] * len(sigs)

        async def send(conn: queries.Connection, sending: _Sending) -> None:
            async with conn.transaction():
                await self._send_groups(conn, sigs, bodies, groups, refs)
                sending.ambiguous = True  # only a failure from here on (COMMIT) is unsure

        await self._on_connection(connection, send, f"deferring {len(sigs)} jobs")
        for i, first in repeats.items():
            ref = refs[first]
            assert ref is not None
            refs[i] = JobRef(ref.id, ref.queue, ref.task, deduplicated=True)
        return [r for r in refs if r is not None]

    async def _on_connection(
        self,
        connection: Connection | None,
        work: Callable[[queries.Connection, _Sending], Awaitable[T]],
        what: str,
    ) -> T:
        """Run ``work`` on the caller's connection, else on a pooled one, turning connection
        failures into `DatabaseUnavailable`. On a pooled connection (one killed while idle
        in the pool, say), a failure is retried on a fresh connection when that cannot
        duplicate jobs: nothing was sent yet, nothing was committed, or the job has an
        idempotency key. The caller's connection is never retried: its transaction is
        theirs."""
        sending = _Sending()
        if connection is not None:
            try:
                return await work(connection, sending)
            except CONNECTION_ERRORS as exc:
                raise self._unavailable(what, exc, sending) from exc
        attempts = self._pool_max_size + 1  # every pooled connection may be a dead one
        for attempt in range(1, attempts + 1):
            sending = _Sending()
            pool = await self._pool()
            try:
                conn = await pool.acquire()
            except CONNECTION_ERRORS as exc:  # no connection can be opened now
                raise self._unavailable(what, exc, sending) from exc
            try:
                result = await work(conn, sending)
                mark_session_clean(conn)  # only our statements ran: no session reset
                return result
            except CONNECTION_ERRORS as exc:
                with contextlib.suppress(asyncpg.InterfaceError):  # already detached
                    conn.terminate()  # so the pool replaces it
                unsent = isinstance(exc, asyncpg.InternalClientError) or not sending.ambiguous
                if attempt == attempts or not unsent:
                    raise self._unavailable(what, exc, sending) from exc
                logger.info("pgtasks: %s: connection failed (%s); retrying", what, exc)
            finally:
                # the work is done (or failed above): a connection that breaks while being
                # reset for the pool is dropped by the pool, and changes nothing here
                with contextlib.suppress(*CONNECTION_ERRORS):
                    await pool.release(conn)
        raise AssertionError("unreachable")

    async def _send_groups(
        self,
        conn: queries.Connection,
        sigs: Sequence[Signature],
        bodies: Sequence[str],
        groups: dict[tuple[str, float, dt.datetime | None], list[int]],
        refs: list[JobRef | None],
    ) -> None:
        for (queue, delay, eta), positions in groups.items():
            for start in range(0, len(positions), BATCH_CHUNK):
                chunk = positions[start : start + BATCH_CHUNK]
                headers = [sigs[i].headers() for i in chunk]
                results = await queries.message_send_batch(
                    conn,
                    queue,
                    [bodies[i] for i in chunk],
                    headers if any(h is not None for h in headers) else None,
                    delay,
                    eta,
                )
                for i, (msg_id, dedup, holder_queue) in zip(chunk, results, strict=True):
                    refs[i] = JobRef(msg_id, holder_queue, sigs[i].task.name, dedup)

    def _unavailable(self, what: str, exc: BaseException, sending: _Sending) -> DatabaseUnavailable:
        if isinstance(exc, DatabaseUnavailable):
            return exc
        where = self._where()
        unsure = (
            "; the connection broke while sending, so whether the job(s) were enqueued is "
            "unknown (idempotency keys make a retry safe)"
            if sending.ambiguous
            else "; nothing was enqueued"
        )
        return DatabaseUnavailable(
            f"{what} failed: lost the connection to {where} ({type(exc).__name__}: {exc})" + unsure
        )
