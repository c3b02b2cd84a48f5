"""The SQL about queues as wholes: which exist, their depths, what waits for later, which
of some messages are still in them, creating one, its tables' storage settings, and pruning
its archive.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from functools import lru_cache

import asyncpg

from ..queues import QUEUE_NAME
from .sql import Executor, table


@lru_cache(maxsize=256)
def _waiting_sql(queue: str) -> str:
    return f"SELECT msg_id FROM pgmq.{table('q', queue)} WHERE msg_id = ANY($1::bigint[])"


async def messages_waiting(conn: Executor, queue: str, ids: Sequence[int]) -> set[int]:
    """Which of these messages are still in the queue (waiting, delayed or running); none
    when the queue does not exist."""
    try:
        rows = await conn.fetch(_waiting_sql(queue), ids)
    except asyncpg.UndefinedTableError:
        return set()
    return {r[0] for r in rows}


QUEUE_LIST = "SELECT queue_name::text FROM pgmq.meta ORDER BY queue_name"


async def queue_list(conn: Executor) -> list[str]:
    return [r[0] for r in await conn.fetch(QUEUE_LIST)]


QUEUE_METRICS = """
SELECT queue_name::text AS queue, queue_length AS waiting, queue_visible_length AS visible,
       oldest_msg_age_sec AS oldest_seconds
FROM pgmq.metrics_all() ORDER BY queue_name
"""


async def queue_metrics(conn: Executor) -> list[asyncpg.Record]:
    """Per queue: messages in it (waiting, delayed, running), visible now, oldest's age."""
    return list(await conn.fetch(QUEUE_METRICS))


@lru_cache(maxsize=64)
def _later_sql(queues: tuple[str, ...]) -> str:
    union = " UNION ALL ".join(
        f"SELECT vt FROM pgmq.{table('q', q)} WHERE vt > clock_timestamp()" for q in queues
    )
    return f"""
SELECT count(*), min(vt), extract(epoch FROM min(vt) - clock_timestamp())::float8
FROM ({union}) AS later
"""


async def messages_later(
    conn: Executor, queues: Sequence[str]
) -> tuple[int, dt.datetime | None, float | None]:
    """Messages of these queues that are not visible yet (delayed, retrying, or leased):
    how many, when the first becomes visible, and in how many seconds."""
    row = await conn.fetchrow(_later_sql(tuple(queues)))
    assert row is not None
    return row[0], row[1], row[2]


QUEUE_ENSURE = "SELECT pgtasks.ensure_queue($1::text)"


async def queue_ensure(conn: Executor, queue: str) -> None:
    """Create the queue unless it exists (validating its name)."""
    await conn.execute(QUEUE_ENSURE, queue)


async def queues_ensure(conn: Executor, queues: Sequence[str]) -> None:
    """Create those of these queues that do not exist."""
    existing = set(await queue_list(conn))
    for queue in queues:
        if queue not in existing:
            await queue_ensure(conn, queue)


QUEUE_STORAGE = "SELECT pgtasks.queue_storage($1::text, $2::boolean)"
QUEUE_STORAGE_PRESENT = "SELECT to_regprocedure('pgtasks.queue_storage(text,boolean)') IS NOT NULL"


async def queue_storage(conn: Executor, queue: str, *, dry_run: bool = False) -> list[str]:
    """Set pgtasks' storage settings (``pgtasks.queue_storage_options``, migration 0013) on
    this queue's tables that have none; returns those tables (with ``dry_run``: those it
    would set). A table whose lock it cannot get within 2 s is left for the next time."""
    tables: list[str] = await conn.fetchval(QUEUE_STORAGE, queue, dry_run)
    return tables


# the queues with pgtasks' names (queue_storage refuses others) whose tables have none
QUEUES_STORAGE_PENDING = """
SELECT m.queue_name::text, t.tables
FROM pgmq.meta AS m,
     LATERAL (SELECT pgtasks.queue_storage(m.queue_name, true) AS tables) AS t
WHERE m.queue_name ~ ('^(' || $1::text || ')$') AND cardinality(t.tables) > 0
ORDER BY 1
"""


async def queues_storage_pending(conn: Executor) -> list[tuple[str, list[str]]]:
    """The queues whose tables have no storage settings, with those tables: what
    `queue_storage` would set."""
    rows = await conn.fetch(QUEUES_STORAGE_PENDING, QUEUE_NAME.pattern)
    return [(r[0], list(r[1])) for r in rows]


ARCHIVE_BATCH = 10_000
"""Archived messages one retention statement deletes at most: each batch is its own short
transaction, so the first prune of a huge archive never holds one giant one."""

AGO = "SELECT now() - $1::interval"


async def ago(conn: Executor, older_than: dt.timedelta) -> dt.datetime:
    """The instant ``older_than`` ago, on the database's clock: a prune's cutoff, taken once
    when it starts, so that it ends while rows keep coming."""
    cutoff: dt.datetime = await conn.fetchval(AGO, older_than)
    return cutoff


@lru_cache(maxsize=256)
def _archive_prune_sql(queue: str) -> str:
    # oldest first through the archived_at index; SKIP LOCKED: two workers pruning the
    # same queue share the rows instead of waiting for each other
    a = table("a", queue)
    return f"""
WITH gone AS (
    DELETE FROM pgmq.{a} WHERE msg_id IN (
        SELECT msg_id FROM pgmq.{a} WHERE archived_at < $1::timestamptz
        ORDER BY archived_at LIMIT $2::integer FOR UPDATE SKIP LOCKED
    ) RETURNING 1
) SELECT count(*) FROM gone
"""


async def archive_prune(
    conn: Executor, queue: str, before: dt.datetime, batch: int = ARCHIVE_BATCH
) -> int:
    """Delete at most ``batch`` of one queue's archived (succeeded) messages archived
    before ``before``, the oldest first; returns how many."""
    count: int = await conn.fetchval(_archive_prune_sql(queue), before, batch)
    return count
