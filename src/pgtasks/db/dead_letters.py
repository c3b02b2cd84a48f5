"""The SQL of ``pgtasks.dead_letters``: listing, counting, reading (with the attempts'
errors), retrying (re-enqueued through pgtasks.send, and the job that failed recorded as
such, in one statement) and purging. The move of a job into the dead letters is part of its
life (`jobs.messages_dead_letter`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import asyncpg

from .attempt_errors import attempt_errors_of
from .sql import Executor

# A message that could not be decoded was dead-lettered without a task; its body may still
# name one, which is what an operator looks for.
_TASK = """coalesce(task, CASE WHEN jsonb_typeof(message -> 'task') = 'string'
                          THEN message ->> 'task' END) AS task"""

DEAD_LIST = f"""
SELECT id, queue, msg_id, {_TASK}, read_ct, enqueued_at, failed_at, reason
FROM pgtasks.dead_letters
WHERE ($1::text IS NULL OR queue = $1)
  AND ($2::text IS NULL OR task = $2 OR (task IS NULL AND message ->> 'task' = $2))
  AND ($4::bigint IS NULL OR id < $4)
ORDER BY id DESC
LIMIT $3
"""

DEAD_COUNT = "SELECT count(*) FROM pgtasks.dead_letters WHERE $1::text IS NULL OR queue = $1"


async def dead_count(conn: Executor, queue: str | None = None) -> int:
    count: int = await conn.fetchval(DEAD_COUNT, queue)
    return count


async def dead_list(
    conn: Executor, queue: str | None, task: str | None, limit: int, before: int | None = None
) -> list[asyncpg.Record]:
    return list(await conn.fetch(DEAD_LIST, queue, task, limit, before))


DEAD_GET = f"""
SELECT id, queue, msg_id, {_TASK}, message::text AS message, headers::text AS headers, read_ct,
       enqueued_at, failed_at, reason, error::text AS error
FROM pgtasks.dead_letters WHERE id = $1
"""


async def dead_get(
    conn: Executor, dead_id: int
) -> tuple[asyncpg.Record | None, list[asyncpg.Record]]:
    """A dead letter and the errors of every attempt of its message."""
    row = await conn.fetchrow(DEAD_GET, dead_id)
    if row is None:
        return None, []
    return row, await attempt_errors_of(conn, row["queue"], row["msg_id"])


DEAD_RETRY = """
WITH picked AS (
    DELETE FROM pgtasks.dead_letters
    WHERE ($1::bigint[] IS NULL OR id = ANY($1)) AND ($2::text IS NULL OR queue = $2)
    RETURNING id, queue, msg_id, task, message, headers, read_ct, enqueued_at, failed_at,
              reason, error
), sent AS (
    SELECT p.*, s.msg_id AS new_id, s.deduplicated
    FROM picked AS p, LATERAL pgtasks.send(p.queue, p.message, p.headers) AS s
), recorded AS (
    INSERT INTO pgtasks.job_results AS r
        (queue, msg_id, enqueued_at, state, task, error, finished_at, expires_at)
    SELECT DISTINCT ON (queue, msg_id)
           queue, msg_id, enqueued_at, 'failed', task,
           coalesce(error, '{}') || jsonb_build_object(
               'reason', reason, 'attempts', read_ct, 'retried_as', new_id),
           failed_at, now() + make_interval(secs => $3)
    FROM sent
    ORDER BY queue, msg_id, id DESC
    ON CONFLICT (queue, msg_id) DO UPDATE SET
        enqueued_at = EXCLUDED.enqueued_at, state = EXCLUDED.state, task = EXCLUDED.task,
        result = NULL, error = EXCLUDED.error, finished_at = EXCLUDED.finished_at,
        expires_at = EXCLUDED.expires_at
)
SELECT id, queue, task, new_id AS msg_id, deduplicated FROM sent ORDER BY id
"""


async def dead_retry(
    conn: Executor, ids: Sequence[int] | None, queue: str | None, record_ttl: float
) -> list[asyncpg.Record]:
    """Re-enqueue dead letters (as new messages with fresh attempts) and remove them, in one
    statement; ``ids=None`` takes every dead letter (of ``queue``, if given). The job each
    one was is recorded in ``pgtasks.job_results`` as failed, for ``record_ttl`` seconds,
    its error that of the dead letter plus ``reason``, ``attempts`` and ``retried_as`` (the
    id of the new job)."""
    return list(await conn.fetch(DEAD_RETRY, None if ids is None else list(ids), queue, record_ttl))


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


DEAD_DELETE = """
WITH gone AS (
    DELETE FROM pgtasks.dead_letters WHERE id = ANY($1::bigint[]) RETURNING id
) SELECT array_agg(id ORDER BY id) FROM gone
"""


async def dead_delete(conn: Executor, ids: Sequence[int]) -> list[int]:
    """Delete these dead letters; returns the ids that were there."""
    deleted: list[int] | None = await conn.fetchval(DEAD_DELETE, list(ids))
    return deleted or []
