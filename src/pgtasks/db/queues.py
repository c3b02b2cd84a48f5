"""The SQL about queues as wholes: which exist, their depths, what waits for later, which
of some messages are still in them, creating one, and pruning its archive.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from functools import lru_cache

import asyncpg

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


@lru_cache(maxsize=256)
def _archive_prune_sql(queue: str) -> str:
    return f"""
WITH gone AS (
    DELETE FROM pgmq.{table("a", queue)} WHERE archived_at < now() - $1::interval RETURNING 1
) SELECT count(*) FROM gone
"""


async def archive_prune(conn: Executor, queue: str, older_than: dt.timedelta) -> int:
    """Delete archived (succeeded) messages older than this from one queue's archive."""
    count: int = await conn.fetchval(_archive_prune_sql(queue), older_than)
    return count
