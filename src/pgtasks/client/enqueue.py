"""Enqueueing: one job or many, on the caller's connection or a pooled one.

Everything goes through the SQL functions pgtasks.send / pgtasks.send_batch (keys, queue
creation and the wake-up NOTIFY ride in the same round trip), or, in the common case, a
prepared INSERT. Arguments are encoded and checked before anything is sent. Errors are
classified once (`pgtasks.db.errors`): transient ones (a broken connection, a deadlock)
become `DatabaseUnavailable`, saying whether the job may have been enqueued, and are
retried only where that cannot duplicate; the others become what a user can act on
(`SchemaMissing`, `PermissionDenied`, `DatabaseError`).

The app's enqueue hooks (`pgtasks.hooks`), if any, run around the send: one call per
``defer`` and per ``defer_many``, before anything is sent. With none, the only addition is
a check of an empty list.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from .._shared import Connection
from ..db.connect import acquire, connection_cause, mark_session_clean
from ..db.database import Database
from ..db.errors import ErrorKind, classify, sqlstate, translate
from ..db.send import (
    RecentQueues,
    message_insert,
    message_insert_batch,
    message_send,
    message_send_batch,
)
from ..exceptions import DatabaseUnavailable, PgTasksError
from ..hooks import EnqueueCall, EnqueueHook, Hooks, compose
from ..serialization import envelope
from ..serialization.envelope import HEADER_IDEMPOTENCY_KEY
from ..tasks import JobRef, Jobs, Signature

T = TypeVar("T")
logger = logging.getLogger("pgtasks")

BATCH_CHUNK = 5_000  # messages per send_batch call


class _Sending:
    """One attempt at an enqueue: on a pooled connection (else the caller's), and whether a
    failure may have reached the database (see `_on_connection`)."""

    __slots__ = ("ambiguous", "pooled")

    def __init__(self, pooled: bool) -> None:
        self.pooled = pooled
        self.ambiguous = False


class Enqueuer:
    """The producer side of a database: sends signatures (``defer_one``, ``defer_many``),
    through the enqueue hooks when there are any (``hooks``, read at every call)."""

    def __init__(
        self,
        database: Database,
        *,
        max_message_size: int,
        create_queues: bool = True,
        hooks: Hooks | None = None,
        jobs: Jobs | None = None,
    ) -> None:
        self._jobs = jobs  # what the refs it returns ask about their jobs
        self._pool = database.pool
        self._create_queues = create_queues
        self._pool_max_size = database.pool_max_size
        self._where = database.where
        self._max_message_size = max_message_size
        self._hooks: list[EnqueueHook] = hooks.enqueue if hooks is not None else []
        self._recent = RecentQueues(database.statement_cache_size)

    async def defer_one(self, sig: Signature) -> JobRef[Any]:
        if self._hooks:
            call = EnqueueCall((sig,), sig.options.connection)
            refs = await compose(self._hooks, self._send_call)(call)
            if len(refs) != 1:
                raise TypeError(
                    f"the around_enqueue hooks returned {len(refs)} job refs for one job; "
                    "a hook should return what next() returned"
                )
            return refs[0]
        return await self._send_one(sig)

    async def defer_many(
        self, signatures: Iterable[Signature], connection: Connection | None
    ) -> list[JobRef[Any]]:
        """Enqueue many jobs in one transaction, with one ``send_batch`` per queue (and
        delay); returns their refs in input order. Built with ``task.s(...)`` or
        ``task.options(...).s(...)``; a per-item ``connection`` option is ignored in favour
        of ``connection`` here."""
        if self._hooks:
            call = EnqueueCall(tuple(signatures), connection)
            return list(await compose(self._hooks, self._send_batch)(call))
        return await self._send_many(signatures, connection)

    async def _send_call(self, call: EnqueueCall) -> list[JobRef[Any]]:
        """The end of the hooks of a ``defer``: one job alone, else a batch."""
        if len(call.signatures) != 1:
            return await self._send_batch(call)
        sig = call.signatures[0]
        if sig.options.connection is not call.connection:  # a hook chose another
            sig = Signature(
                sig.task, sig.args, sig.kwargs, replace(sig.options, connection=call.connection)
            )
        return [await self._send_one(sig)]

    async def _send_batch(self, call: EnqueueCall) -> list[JobRef[Any]]:
        """The end of the hooks of a ``defer_many``."""
        return await self._send_many(call.signatures, call.connection)

    async def _send_one(self, sig: Signature) -> JobRef[Any]:
        opts = sig.options
        if opts.cursor is not None:
            raise _cursor_refused(sig.task.name, "defer()")
        body = sig.body(self._max_message_size)
        headers = sig.headers()

        async def send(conn: Connection, sending: _Sending) -> tuple[int, bool, str]:
            # with an idempotency key a repeat is deduplicated, so a retry is always safe
            sending.ambiguous = opts.idempotency_key is None
            if sending.pooled and opts.idempotency_key is None and self._recent.hot(sig.queue):
                # The common case, a third cheaper than pgtasks.send: a prepared INSERT into
                # the queue's table, for a queue deferred to lately (its statement is
                # cached; see RecentQueues). A queue that does not exist yet fails the
                # statement (nothing sent) and pgtasks.send below creates it (or, with queue
                # creation off, says so). Not on the caller's connection, where that failure
                # would abort their transaction.
                try:
                    msg_id = await message_insert(
                        conn, sig.queue, body, headers, opts.delay, opts.eta
                    )
                    return msg_id, False, sig.queue
                except asyncpg.UndefinedTableError:
                    pass
            sent = await message_send(
                conn, sig.queue, body, headers, opts.delay, opts.eta, self._create_queues
            )
            if sent.args_differ:
                warn_other_arguments(sig.task.name, opts.idempotency_key, sent.msg_id, sent.queue)
            return sent.msg_id, sent.deduplicated, sent.queue

        what = f"deferring {sig.task.name!r} to {sig.queue!r}"
        started = time.monotonic()
        msg_id, dedup, queue = await self._on_connection(opts.connection, send, what)
        ref: JobRef[Any] = JobRef(msg_id, queue, sig.task.name, dedup, jobs=self._jobs)
        if not dedup:  # a new job, which ends after this (a key holder may have ended)
            ref._sent_after = started
        return ref

    async def _send_many(
        self, signatures: Iterable[Signature], connection: Connection | None
    ) -> list[JobRef[Any]]:
        # One pass that keeps what is sent, not the signatures: a generator's items are
        # freed as they go, which spares the garbage collector thousands of live objects.
        calls: list[envelope.Call] = []
        headers: list[str | None] = []
        groups: dict[tuple[str, float, dt.datetime | None], list[int]] = defaultdict(list)
        first_with_key: dict[str, int] = {}
        # a later item with a key seen earlier -> the first, and the key
        repeats: dict[int, tuple[int, str]] = {}
        # the usual batch repeats one task and one options object (`task.s(...)` in a loop):
        # those items share the previous item's headers and group
        last_task: object = None
        last_opts: object = None
        last_headers: str | None = None
        last_group: list[int] = []
        for i, s in enumerate(signatures):
            task, opts = s.task, s.options
            if s.receives is not None:
                s.body(0)  # raises: it is one argument short
            calls.append((task.name, s.args, s.kwargs))
            if opts is last_opts and task is last_task:
                headers.append(last_headers)
                last_group.append(i)
                continue
            if opts.cursor is not None:  # sent on the pool, it would leave its transaction
                raise _cursor_refused(task.name, "defer_many()")
            key = opts.idempotency_key
            last_headers = s.headers()
            headers.append(last_headers)
            if key is not None:
                last_task = last_opts = None  # a key is one item's own
                if key in first_with_key:
                    repeats[i] = (first_with_key[key], key)
                    continue
                first_with_key[key] = i
            else:
                last_task, last_opts = task, opts
            last_group = groups[(opts.queue or task.queue, opts.delay, opts.eta)]
            last_group.append(i)
        # every batch is encoded (and so validated) before anything is sent
        batches = [
            _Batch.encode(
                queue,
                delay,
                eta,
                positions[start : start + BATCH_CHUNK],
                calls,
                headers,
                self._max_message_size,
            )
            for (queue, delay, eta), positions in groups.items()
            for start in range(0, len(positions), BATCH_CHUNK)
        ]
        n = len(calls)
        refs: list[JobRef[Any] | None] = [None] * n

        async def send(conn: Connection, sending: _Sending) -> None:
            if not sending.pooled and len(batches) == 1:
                # one statement in the caller's transaction (or autocommit): atomic as it is
                sending.ambiguous = True
                await batches[0].send(conn, refs, False, self._jobs, create=self._create_queues)
                return
            # Otherwise in a transaction, also for one statement on a pooled connection: a
            # connection that breaks before COMMIT (one killed while idle in the pool, say)
            # then certainly sent nothing, and the batch is retried on a fresh one.
            direct = sending.pooled and not first_with_key and len(batches) == 1
            try:
                await self._send_in_transaction(conn, batches, refs, direct, sending)
            except asyncpg.UndefinedTableError:
                if not direct:
                    raise
                # the queue does not exist yet (the prepared INSERT failed, the transaction
                # rolled back): again through pgtasks.send_batch, which creates it (or, with
                # queue creation off, says so)
                await self._send_in_transaction(conn, batches, refs, False, sending)

        if n:
            await self._on_connection(connection, send, f"deferring {n} jobs")
        for i, (first, key) in repeats.items():
            ref = refs[first]
            assert ref is not None
            refs[i] = ref._replace(deduplicated=True)
            if calls[i] != calls[first]:
                warn_other_arguments(calls[i][0], key, ref.id, ref.queue)
        return cast("list[JobRef[Any]]", refs)  # every position is set by now

    async def _send_in_transaction(
        self,
        conn: Connection,
        batches: Sequence[_Batch],
        refs: list[JobRef[Any] | None],
        direct: bool,
        sending: _Sending,
    ) -> None:
        async with conn.transaction():
            for batch in batches:
                await batch.send(conn, refs, direct, self._jobs, create=self._create_queues)
            sending.ambiguous = True  # only a failure from here on (COMMIT) is unsure

    async def _on_connection(
        self,
        connection: Connection | None,
        work: Callable[[Connection, _Sending], Awaitable[T]],
        what: str,
    ) -> T:
        """Run ``work`` on the caller's connection, else on a pooled one, turning transient
        failures into `DatabaseUnavailable` and the others into what `translate` makes of
        them. On a pooled connection (one killed while idle in the pool, say), a transient
        failure is retried on a fresh connection when that cannot duplicate jobs: nothing
        was sent yet, nothing was committed, or the job has an idempotency key. The caller's
        connection is never retried: its transaction is theirs."""
        if connection is not None:
            sending = _Sending(pooled=False)
            try:
                return await work(connection, sending)
            except Exception as exc:
                if (failure := self._failure(what, exc, sending)) is None:
                    raise
                raise failure from exc
        attempts = self._pool_max_size + 1  # every pooled connection may be a dead one
        for attempt in range(1, attempts + 1):
            sending = _Sending(pooled=True)
            pool = await self._pool()
            try:
                conn = await acquire(pool)
            except DatabaseUnavailable as exc:  # no connection can be opened now
                cause = exc.__cause__ or exc
                raise DatabaseUnavailable(
                    f"{what} failed: cannot connect to {self._where()} "
                    f"({connection_cause(cause)}); nothing was enqueued"
                ) from cause
            try:
                result = await work(conn, sending)
                mark_session_clean(conn)  # only our statements ran: no session reset
                return result
            except Exception as exc:
                transient = classify(exc) is ErrorKind.TRANSIENT
                if transient:
                    with contextlib.suppress(asyncpg.InterfaceError):  # already detached
                        conn.terminate()  # so the pool replaces it
                unsent = isinstance(exc, asyncpg.InternalClientError) or not sending.ambiguous
                if not transient or attempt == attempts or not unsent:
                    if (failure := self._failure(what, exc, sending)) is None:
                        raise
                    raise failure from exc
                logger.info("pgtasks: %s: connection failed (%r); retrying", what, exc)
            finally:
                # the work is done (or failed above): a connection that breaks while being
                # reset for the pool is dropped by the pool, and changes nothing here
                await _release(pool, conn)
        raise AssertionError("unreachable")

    def _failure(self, what: str, exc: Exception, sending: _Sending) -> PgTasksError | None:
        """The error to raise instead of ``exc`` (None: ``exc`` as it is): for a transient
        one `DatabaseUnavailable`, for a database error what `translate` makes of it."""
        if isinstance(exc, PgTasksError):
            return None
        if classify(exc) is not ErrorKind.TRANSIENT:
            return translate(exc, what)
        if _refused(exc):
            return DatabaseUnavailable(
                f"{what} failed: the database refused it for now ({type(exc).__name__}: {exc}); "
                "nothing was enqueued, try again"
            )
        unsure = (
            "; the connection broke while sending, so whether the job(s) were enqueued is "
            "unknown (idempotency keys make a retry safe)"
            if sending.ambiguous
            else "; nothing was enqueued"
        )
        return DatabaseUnavailable(
            f"{what} failed: lost the connection to {self._where()} "
            f"({type(exc).__name__}: {exc})" + unsure
        )


def _refused(exc: BaseException) -> bool:
    """Whether the server answered the statement with an error (a deadlock, a statement
    timeout, a lock not available), so that it had no effect, as opposed to a connection
    that broke, or was closed by the server, with the outcome unknown."""
    code = sqlstate(exc)
    return code is not None and code[:2] != "08" and not code.startswith("57P")


async def _release(pool: asyncpg.Pool, conn: PoolConnectionProxy) -> None:
    """Give ``conn`` back to the pool; a transient failure there (the connection broke
    while being reset) costs the pool that connection, and nothing else."""
    try:
        await pool.release(conn)
    except Exception as exc:
        if classify(exc) is not ErrorKind.TRANSIENT:
            raise


@dataclass(frozen=True)
class _Batch:
    """Jobs sent by one statement: same queue, same visibility time, at most BATCH_CHUNK."""

    queue: str
    delay: float
    eta: dt.datetime | None
    positions: list[int]  # in the input of defer_many
    names: list[str]
    bodies: str  # a JSON array of envelopes
    headers: list[str | None] | None

    @classmethod
    def encode(
        cls,
        queue: str,
        delay: float,
        eta: dt.datetime | None,
        positions: list[int],
        calls: Sequence[envelope.Call],
        headers: Sequence[str | None],
        max_size: int,
    ) -> _Batch:
        mine = [calls[i] for i in positions]
        hs = [headers[i] for i in positions]
        return cls(
            queue,
            delay,
            eta,
            positions,
            [name for name, _, _ in mine],
            envelope.encode_many(mine, max_size=max_size),
            hs if any(h is not None for h in hs) else None,
        )

    async def send(
        self,
        conn: Connection,
        refs: list[JobRef[Any] | None],
        direct: bool,
        jobs: Jobs | None,
        *,
        create: bool,
    ) -> None:
        """Send, filling in ``refs``. ``direct``: take the prepared INSERT (no item has a
        key), which raises `asyncpg.UndefinedTableError` when the queue does not exist.
        ``create``: the app's word on creating a missing queue."""
        if direct:
            ids = await message_insert_batch(
                conn, self.queue, self.bodies, self.headers, self.delay, self.eta
            )
            for i, name, msg_id in zip(self.positions, self.names, ids, strict=True):
                refs[i] = JobRef(msg_id, self.queue, name, jobs=jobs)
            return
        rows = await message_send_batch(
            conn, self.queue, self.bodies, self.headers, self.delay, self.eta, create
        )
        for n, (i, name, row) in enumerate(zip(self.positions, self.names, rows, strict=True)):
            msg_id, dedup, queue, differ = row
            refs[i] = JobRef(msg_id, queue, name, dedup, jobs=jobs)
            if differ:
                header = self.headers[n] if self.headers is not None else None
                key = orjson.loads(header).get(HEADER_IDEMPOTENCY_KEY) if header else None
                warn_other_arguments(name, key, msg_id, queue)


def warn_other_arguments(task: str, key: str | None, holder: int, queue: str) -> None:
    """A deduplicated defer whose arguments differ from those of the job that holds its
    key: nothing was sent, which is what the key is for, but likely not what was meant."""
    logger.warning(
        "deferring %r: idempotency key %r is held by job %d in queue %r, which was deferred "
        "with other arguments; nothing was sent (a key deduplicates whatever the arguments)",
        task,
        key,
        holder,
        queue,
    )


def _cursor_refused(task: str, call: str) -> TypeError:
    return TypeError(
        f"deferring {task!r}: options(cursor=...) is for defer_sync(), which sends on a "
        f"DB-API cursor; with {call} pass an asyncpg connection= instead"
    )
