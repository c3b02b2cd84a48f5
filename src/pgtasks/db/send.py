"""The SQL of enqueueing: pgtasks.send / send_batch (keys, queue creation and the wake-up
NOTIFY in one round trip), and the prepared INSERT of the common case (a pooled defer
without a key into a queue that exists).

The six-argument send / send_batch (migration 0007) take the app's ``create_queues``: a
missing queue is created unless the app or the database (``pgtasks.settings``) says no,
and then they raise SQLSTATE ``PGQ01`` (`errors.QUEUE_NOT_FOUND`). Each result row also says, for a
deduplicated message, whether its arguments differ from the key holder's (``args_differ``,
computed only then).
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import asyncpg

from .sql import NOTIFY_CHANNEL, Executor, table

MESSAGE_SEND = """
SELECT msg_id, deduplicated, queue, args_differ
FROM pgtasks.send($1::text, $2::text::jsonb, $3::text::jsonb, $4::float8, $5::timestamptz,
                  $6::boolean)
"""

# Bodies arrive as one JSON array ($2), split here in order: one parameter instead of one
# array element per message (see envelope.encode_many).
MESSAGE_SEND_BATCH = """
SELECT msg_id, deduplicated, queue, args_differ
FROM pgtasks.send_batch(
    $1::text,
    ARRAY(SELECT b.body FROM jsonb_array_elements($2::text::jsonb) WITH ORDINALITY AS b(body, i)
          ORDER BY b.i),
    $3::text[]::jsonb[], $4::float8, $5::timestamptz, $6::boolean)
"""


class Sent(NamedTuple):
    """What pgtasks.send answers for one message: its msg_id (a deduplicated one's is the
    key holder's, maybe in another queue), and for a deduplicated one whether its arguments
    differ from the holder's (None: unknown, or not deduplicated)."""

    msg_id: int
    deduplicated: bool
    queue: str
    args_differ: bool | None


async def message_send(
    conn: Executor,
    queue: str,
    body: str,
    headers: str | None,
    delay: float,
    eta: dt.datetime | None,
    create_queue: bool = True,
) -> Sent:
    """Send one message through pgtasks.send; a missing queue is created unless
    ``create_queue`` or the database's setting is off (SQLSTATE `QUEUE_NOT_FOUND`)."""
    row = await conn.fetchrow(MESSAGE_SEND, queue, body, headers, delay, eta, create_queue)
    assert row is not None
    return Sent(row[0], row[1], row[2], row[3])


@lru_cache(maxsize=256)
def _insert_sql(queue: str) -> str:
    # pgmq.send's own INSERT, prepared once per connection (pgmq.send plans it anew on every
    # call through EXECUTE), with the wake-up NOTIFY in the same statement
    return f"""
WITH m AS (
    INSERT INTO pgmq.{table("q", queue)} (vt, message, headers)
    VALUES (coalesce($4::timestamptz, clock_timestamp() + make_interval(secs => $3::float8)),
            $1::text::jsonb, $2::text::jsonb)
    RETURNING msg_id
)
SELECT msg_id, pg_notify('{NOTIFY_CHANNEL}', $5::text) FROM m
"""


class RecentQueues:
    """The queues a producer deferred to lately: those whose prepared INSERT is worth
    sending (`message_insert`).

    Each queue's INSERT is a statement of its own, prepared per connection and kept in
    asyncpg's statement cache (``statement_cache_size`` statements, least recently used
    out). A producer that rotates over more queues than that finds none cached: every
    defer prepares its statement, closes the one evicted and only then executes, three
    round trips where ``pgtasks.send`` (one statement for every queue, cached once) takes
    one. So a queue gets the INSERT only while it is among the last ``size`` distinct queues
    deferred to (half the cache, leaving room for the other statements); the first defer to
    a queue, and every defer of a wider rotation, goes through the function. With no cache
    (``statement_cache_size=0``) every statement is prepared anyway and the INSERT is used
    always."""

    __slots__ = ("_queues", "_size")

    def __init__(self, statement_cache_size: int) -> None:
        self._size = statement_cache_size // 2
        self._queues: OrderedDict[str, None] = OrderedDict()

    def hot(self, queue: str) -> bool:
        """Whether ``queue`` was deferred to lately (and note that it is now)."""
        if self._size == 0:
            return True
        if queue in self._queues:
            self._queues.move_to_end(queue)
            return True
        self._queues[queue] = None
        if len(self._queues) > self._size:
            self._queues.popitem(last=False)
        return False


async def message_insert(
    conn: Executor,
    queue: str,
    body: str,
    headers: str | None,
    delay: float,
    eta: dt.datetime | None,
) -> int:
    """Send one message without an idempotency key straight into an existing queue's table,
    with the wake-up NOTIFY. Raises `asyncpg.UndefinedTableError` when the queue does not
    exist (`message_send` creates it)."""
    row = await conn.fetchrow(_insert_sql(queue), body, headers, delay, eta, queue)
    assert row is not None
    msg_id: int = row[0]
    return msg_id


@lru_cache(maxsize=256)
def _insert_batch_sql(queue: str) -> str:
    # pgmq.send_batch's INSERT (one vt for the batch), prepared; bodies as one JSON array as
    # in MESSAGE_SEND_BATCH. The ids come back as one array in input order (identity values
    # are drawn in insert order), with one NOTIFY.
    return f"""
WITH m AS (
    INSERT INTO pgmq.{table("q", queue)} (vt, message, headers)
    SELECT (SELECT coalesce($4::timestamptz,
                            clock_timestamp() + make_interval(secs => $3::float8))),
           t.body, t.headers::jsonb
    FROM ROWS FROM (jsonb_array_elements($1::text::jsonb), unnest($2::text[])) AS t(body, headers)
    RETURNING msg_id
)
SELECT array_agg(msg_id ORDER BY msg_id), pg_notify('{NOTIFY_CHANNEL}', $5::text) FROM m
"""


async def message_insert_batch(
    conn: Executor,
    queue: str,
    bodies: str,
    headers: Sequence[str | None] | None,
    delay: float,
    eta: dt.datetime | None,
) -> list[int]:
    """`message_insert` for many messages without keys, all visible at one time: ``bodies``
    is a JSON array of envelopes; returns their msg_ids in input order."""
    ids: list[int] | None = await conn.fetchval(
        _insert_batch_sql(queue), bodies, headers, delay, eta, queue
    )
    assert ids is not None  # bodies is never empty
    return ids


async def message_send_batch(
    conn: Executor,
    queue: str,
    bodies: str,
    headers: Sequence[str | None] | None,
    delay: float,
    eta: dt.datetime | None,
    create_queue: bool = True,
) -> list[asyncpg.Record]:
    """One (msg_id, deduplicated, queue, args_differ) record per message, in input order."""
    rows: list[asyncpg.Record] = await conn.fetch(
        MESSAGE_SEND_BATCH, queue, bodies, headers, delay, eta, create_queue
    )
    return rows
