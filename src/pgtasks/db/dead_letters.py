"""The SQL for the schema's state, queues, dead letters and pruning: what the CLI, `App`,
`schema` and `DeadLetters` run, off the hot path. Same conventions as `queries` (a named
statement, or a cached builder where it names a queue's table, beside one small typed
function)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import asyncpg

from .._shared import Connection
from .jobs import Executor, table

# --- the schema and the roles -------------------------------------------------------------

SCHEMA_PRESENT = """
SELECT to_regclass('pgmq.meta') IS NOT NULL AND to_regclass('pgtasks.migrations') IS NOT NULL
"""
SCHEMA_VERSION = "SELECT coalesce(max(version), 0) FROM pgtasks.migrations"


async def schema_version(conn: Executor) -> int | None:
    """The newest pgtasks migration applied, or None when pgmq or the pgtasks schema is
    missing."""
    if not await conn.fetchval(SCHEMA_PRESENT):
        return None
    version: int = await conn.fetchval(SCHEMA_VERSION)
    return version


ROLES_STATE = """
SELECT count(*) = cardinality($1::text[]) AS exist,
       (SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user) AS can_create
FROM pg_roles WHERE rolname = ANY($1::text[])
"""
# what grant_roles() gives, in one probe per side
ROLES_GRANTED = """
SELECT has_table_privilege($1::text, 'pgtasks.idempotency_keys', 'INSERT')
   AND has_function_privilege($1::text, 'pgtasks.ensure_queue(text)', 'EXECUTE')
   AND has_table_privilege($2::text, 'pgtasks.dead_letters', 'DELETE')
"""


class RolesState(NamedTuple):
    exist: bool
    can_create: bool
    granted: bool


async def roles_state(conn: Connection, roles: Sequence[str], *, granted_probe: bool) -> RolesState:
    """Whether the group roles (producer first, worker last) exist, whether the current role
    may create roles, and (only with ``granted_probe``, which needs the schema) whether they
    hold their privileges in this database."""
    row = await conn.fetchrow(ROLES_STATE, list(roles))
    assert row is not None
    granted = False
    if row["exist"] and granted_probe:
        granted = bool(await conn.fetchval(ROLES_GRANTED, roles[0], roles[-1]))
    return RolesState(bool(row["exist"]), bool(row["can_create"]), granted)


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

# A message that could not be decoded was dead-lettered without a task; its body may still
# name one, which is what an operator looks for.
_TASK = """coalesce(task, CASE WHEN jsonb_typeof(message -> 'task') = 'string'
                          THEN message ->> 'task' END) AS task"""

DEAD_LIST = f"""
SELECT id, queue, msg_id, {_TASK}, read_ct, enqueued_at, failed_at, reason
FROM pgtasks.dead_letters
WHERE ($1::text IS NULL OR queue = $1)
  AND ($2::text IS NULL OR task = $2 OR (task IS NULL AND message ->> 'task' = $2))
ORDER BY id DESC
LIMIT $3
"""

DEAD_COUNT = "SELECT count(*) FROM pgtasks.dead_letters WHERE $1::text IS NULL OR queue = $1"


async def dead_count(conn: Executor, queue: str | None = None) -> int:
    count: int = await conn.fetchval(DEAD_COUNT, queue)
    return count


async def dead_list(
    conn: Executor, queue: str | None, task: str | None, limit: int
) -> list[asyncpg.Record]:
    return list(await conn.fetch(DEAD_LIST, queue, task, limit))


DEAD_GET = f"""
SELECT id, queue, msg_id, {_TASK}, message::text AS message, headers::text AS headers, read_ct,
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
