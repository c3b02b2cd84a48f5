"""The SQL an operator browses jobs with (the dashboard): the jobs of one queue in one state,
newest or next first, optionally of one task; one job wherever it is (its queue, the
archive, the dead letters); the job an idempotency key names. The states are those of
``pgtasks.queue_status`` (migration 0006).
"""

from __future__ import annotations

from functools import lru_cache

import asyncpg

from .sql import Executor, table


def _failed(queue_param: str) -> str:
    """A message in its queue is retrying when the attempt it is on has failed (see 0006)."""
    return f"""m.read_ct > 0 AND EXISTS (
    SELECT 1 FROM pgtasks.attempt_errors AS e
    WHERE e.queue = {queue_param} AND e.msg_id = m.msg_id
      AND e.attempt = pgtasks.current_attempt(m.read_ct, m.headers)
      AND e.failed_at >= m.enqueued_at)"""


def _where(queue_param: str) -> dict[str, str]:
    failed = _failed(queue_param)
    return {
        "waiting": "m.vt <= clock_timestamp()",
        "scheduled": "m.vt > clock_timestamp() AND m.read_ct = 0",
        "running": f"m.vt > clock_timestamp() AND m.read_ct > 0 AND NOT ({failed})",
        "retrying": f"m.vt > clock_timestamp() AND {failed}",
    }


QUEUE_STATES = tuple(_where("$1"))
STATES = (*QUEUE_STATES, "succeeded")  # those `jobs_in_state` lists

_COLUMNS = """m.msg_id, m.read_ct, pgtasks.current_attempt(m.read_ct, m.headers) AS attempt,
       m.enqueued_at, m.vt, m.message ->> 'task' AS task,
       m.headers ->> 'idempotency_key' AS idempotency_key"""


@lru_cache(maxsize=256)
def _list_sql(queue: str, state: str) -> str:
    if state == "succeeded":
        return f"""
SELECT {_COLUMNS}, m.archived_at FROM pgmq.{table("a", queue)} AS m
WHERE ($2::text IS NULL OR m.message ->> 'task' = $2) AND $3::text IS NOT NULL  -- (unused)
ORDER BY m.archived_at DESC LIMIT $1
"""
    return f"""
SELECT {_COLUMNS}, NULL::timestamptz AS archived_at FROM pgmq.{table("q", queue)} AS m
WHERE {_where("$3")[state]} AND ($2::text IS NULL OR m.message ->> 'task' = $2)
  AND $3::text IS NOT NULL  -- the queue, for the states that need it
ORDER BY m.vt LIMIT $1
"""


async def jobs_in_state(
    conn: Executor, queue: str, state: str, task: str | None, limit: int
) -> list[asyncpg.Record]:
    """Jobs of ``queue`` in ``state`` (a queue state, or ``succeeded``: archived), next
    due first (succeeded: newest first); none when the queue does not exist."""
    try:
        return list(await conn.fetch(_list_sql(queue, state), limit, task, queue))
    except asyncpg.UndefinedTableError:
        return []


@lru_cache(maxsize=256)
def _get_sql(queue: str) -> str:
    states = " ".join(f"WHEN {where} THEN '{name}'" for name, where in _where("$2").items())
    q, a = table("q", queue), table("a", queue)
    return f"""
SELECT {_COLUMNS}, NULL::timestamptz AS archived_at, m.message::text AS body,
       m.headers::text AS headers, CASE {states} END AS state
FROM pgmq.{q} AS m WHERE m.msg_id = $1
UNION ALL
SELECT {_COLUMNS}, m.archived_at, m.message::text, m.headers::text, 'succeeded'
FROM pgmq.{a} AS m WHERE m.msg_id = $1
LIMIT 1
"""


async def job_get(conn: Executor, queue: str, msg_id: int) -> asyncpg.Record | None:
    """One message of ``queue``, waiting or done, with its state; None if it is in neither
    (look in the dead letters)."""
    try:
        return await conn.fetchrow(_get_sql(queue), msg_id, queue)
    except asyncpg.UndefinedTableError:
        return None


KEY_HOLDER = "SELECT queue, msg_id FROM pgtasks.idempotency_keys WHERE key = $1"


async def key_holder(conn: Executor, key: str) -> tuple[str, int] | None:
    """The job that holds (or held, until it expires) an idempotency key."""
    row = await conn.fetchrow(KEY_HOLDER, key)
    return None if row is None or row["msg_id"] is None else (row["queue"], row["msg_id"])


DEAD_OF_MESSAGE = """
SELECT id FROM pgtasks.dead_letters WHERE queue = $1 AND msg_id = $2 ORDER BY id DESC LIMIT 1
"""


async def dead_letter_of(conn: Executor, queue: str, msg_id: int) -> int | None:
    """The dead letter a message of ``queue`` became, if any."""
    value: int | None = await conn.fetchval(DEAD_OF_MESSAGE, queue, msg_id)
    return value
