"""The SQL for queues, dead letters and pruning: what the CLI, `App` and `DeadLetters` run,
off the hot path. Same conventions as `queries` (a named statement, or a cached builder
where it names a queue's table, beside one small typed function)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import asyncpg

from .queries import Executor, table

# --- queues and keys -----------------------------------------------------------------------


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


QUEUE_ENSURE = "SELECT pgtasks.ensure_queue($1::text)"


async def queue_ensure(conn: Executor, queue: str) -> None:
    """Create the queue unless it exists (validating its name)."""
    await conn.execute(QUEUE_ENSURE, queue)


KEYS_PRUNE = """
WITH gone AS (
    DELETE FROM pgtasks.idempotency_keys WHERE expires_at < now() RETURNING 1
) SELECT count(*) FROM gone
"""


async def keys_prune(conn: Executor) -> int:
    """Delete idempotency keys whose retention after success has passed."""
    count: int = await conn.fetchval(KEYS_PRUNE)
    return count


KEY_GET = """
SELECT key, queue, msg_id, created_at, expires_at FROM pgtasks.idempotency_keys WHERE key = $1
"""


async def key_get(conn: Executor, key: str) -> asyncpg.Record | None:
    row: Any = await conn.fetchrow(KEY_GET, key)
    return row  # type: ignore[no-any-return]


# --- dead letters and pruning -------------------------------------------------------------

DEAD_LIST = """
SELECT id, queue, msg_id, task, read_ct, enqueued_at, failed_at, reason
FROM pgtasks.dead_letters
WHERE ($1::text IS NULL OR queue = $1) AND ($2::text IS NULL OR task = $2)
ORDER BY id DESC
LIMIT $3
"""


async def dead_list(
    conn: Executor, queue: str | None, task: str | None, limit: int
) -> list[asyncpg.Record]:
    return list(await conn.fetch(DEAD_LIST, queue, task, limit))


DEAD_GET = """
SELECT id, queue, msg_id, task, message::text AS message, headers::text AS headers, read_ct,
       enqueued_at, failed_at, reason, error::text AS error
FROM pgtasks.dead_letters WHERE id = $1
"""

ATTEMPT_ERRORS_OF = """
SELECT msg_id, task, attempt, error_type, message, traceback, worker, failed_at
FROM pgtasks.attempt_errors WHERE queue = $1 AND msg_id = $2 ORDER BY attempt, id
"""


async def dead_get(
    conn: Executor, dead_id: int
) -> tuple[asyncpg.Record | None, list[asyncpg.Record]]:
    """A dead letter and the errors of every attempt of its message."""
    row = await conn.fetchrow(DEAD_GET, dead_id)
    if row is None:
        return None, []
    history = await conn.fetch(ATTEMPT_ERRORS_OF, row["queue"], row["msg_id"])
    return row, list(history)


DEAD_RETRY = """
WITH picked AS (
    DELETE FROM pgtasks.dead_letters
    WHERE ($1::bigint[] IS NULL OR id = ANY($1)) AND ($2::text IS NULL OR queue = $2)
    RETURNING id, queue, task, message, headers
)
SELECT p.id, p.queue, p.task, s.msg_id, s.deduplicated
FROM picked AS p, LATERAL pgtasks.send(p.queue, p.message, p.headers) AS s
ORDER BY p.id
"""


async def dead_retry(
    conn: Executor, ids: Sequence[int] | None, queue: str | None
) -> list[asyncpg.Record]:
    """Re-enqueue dead letters (as new messages with fresh attempts) and remove them, in one
    statement; ``ids=None`` takes every dead letter (of ``queue``, if given)."""
    return list(await conn.fetch(DEAD_RETRY, None if ids is None else list(ids), queue))


DEAD_PURGE = """
WITH gone AS (
    DELETE FROM pgtasks.dead_letters
    WHERE ($1::interval IS NULL OR failed_at < now() - $1) AND ($2::text IS NULL OR queue = $2)
    RETURNING 1
) SELECT count(*) FROM gone
"""


async def dead_purge(conn: Executor, older_than: dt.timedelta | None, queue: str | None) -> int:
    count: int = await conn.fetchval(DEAD_PURGE, older_than, queue)
    return count


ERRORS_PRUNE = """
WITH gone AS (
    DELETE FROM pgtasks.attempt_errors AS e
    WHERE e.failed_at < now() - $1::interval
      AND NOT EXISTS (SELECT 1 FROM pgtasks.dead_letters AS d
                      WHERE d.queue = e.queue AND d.msg_id = e.msg_id)
    RETURNING 1
) SELECT count(*) FROM gone
"""


async def errors_prune(conn: Executor, older_than: dt.timedelta) -> int:
    """Delete the error history of attempts older than this, except for dead letters."""
    count: int = await conn.fetchval(ERRORS_PRUNE, older_than)
    return count


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
