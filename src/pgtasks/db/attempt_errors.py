"""The SQL of ``pgtasks.attempt_errors``: the error of every failed attempt, written by the
completer with the retry or dead letter it belongs to, read back for a dead letter's
history, and pruned when old (a dead letter keeps its history).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from .sql import Executor

ATTEMPT_ERRORS_INSERT = """
INSERT INTO pgtasks.attempt_errors
    (queue, msg_id, task, attempt, error_type, message, traceback, worker)
SELECT $1::text, t.msg_id, t.task, t.attempt, t.error_type, t.message, t.traceback, $2::text
FROM unnest($3::bigint[], $4::text[], $5::integer[], $6::text[], $7::text[], $8::text[])
    AS t(msg_id, task, attempt, error_type, message, traceback)
WHERE NOT EXISTS (  -- a write replayed after its reply was lost records nothing twice
    SELECT 1 FROM pgtasks.attempt_errors AS e
    WHERE e.queue = $1::text AND e.msg_id = t.msg_id AND e.attempt = t.attempt
)
"""


@dataclass(frozen=True, slots=True)
class AttemptError:
    """A failed attempt, as recorded in pgtasks.attempt_errors."""

    msg_id: int
    task: str | None
    attempt: int
    error_type: str
    message: str
    traceback: str | None


async def attempt_errors_insert(
    conn: Executor, queue: str, worker: str, errors: Sequence[AttemptError]
) -> None:
    await conn.execute(
        ATTEMPT_ERRORS_INSERT,
        queue,
        worker,
        [e.msg_id for e in errors],
        [e.task for e in errors],
        [e.attempt for e in errors],
        [e.error_type for e in errors],
        [e.message for e in errors],
        [e.traceback for e in errors],
    )


ATTEMPT_ERRORS_OF = """
SELECT msg_id, task, attempt, error_type, message, traceback, worker, failed_at
FROM pgtasks.attempt_errors WHERE queue = $1 AND msg_id = $2 ORDER BY attempt, id
"""


async def attempt_errors_of(conn: Executor, queue: str, msg_id: int) -> list[asyncpg.Record]:
    """The errors of every attempt of one message, oldest first."""
    return list(await conn.fetch(ATTEMPT_ERRORS_OF, queue, msg_id))


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
