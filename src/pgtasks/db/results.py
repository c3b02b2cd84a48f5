"""The SQL of what a job became: its status, its result, its cancellation and its expiry.

A job ends in one of four places, each written in the statement that removes it from its
queue: the queue's archive (acked; `jobs.messages_ack`, which also keeps a result when there
is one), the dead letters (`jobs.messages_dead_letter`), or ``pgtasks.job_results`` with
state ``cancelled`` or ``expired`` (`messages_end`, here). A dead letter that is retried
leaves a record of state ``failed`` there, naming the job it was retried as
(`dead_letters.dead_retry`). ``pgtasks.job_info`` reads all of them (and the queue) in one
snapshot; ``pgtasks.cancel`` cancels jobs from anywhere (both in the 0004 migration).
Statements that end jobs notify `jobs.DONE_CHANNEL` once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import asyncpg
import orjson

from .jobs import _NOTIFY_DONE, RESULTS_INSERT, RESULTS_UPSERT, Token, _split
from .sql import Executor, table

CANCEL_CHANNEL = "pgtasks_cancel"
"""Told of a request to cancel a running job; the payload is ``queue:msg_id``."""


class JobInfo(NamedTuple):
    """A row of ``pgtasks.job_info``: where a job is, or what it became."""

    msg_id: int
    state: str
    task: str | None
    attempts: int | None
    enqueued_at: dt.datetime | None
    finished_at: dt.datetime | None
    result: str | None  # JSON text
    error: str | None  # JSON text
    cancel_requested: bool


def retried_as(error: dict[str, Any] | None) -> int | None:
    """From a failed job's ``error``: the job its dead letter was retried as, if it was
    (`dead_letters.dead_retry` records it)."""
    value = (error or {}).get("retried_as")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# A failed job's record (its dead letter was retried) keeps its attempts in its error.
JOB_INFO = """
SELECT msg_id, state, task,
       coalesce(attempts, CASE WHEN state = 'failed' THEN (error ->> 'attempts')::integer END),
       enqueued_at, finished_at, result::text, error::text, cancel_requested
FROM pgtasks.job_info($1::text, $2::bigint[])
"""


async def job_info(conn: Executor, queue: str, ids: Sequence[int]) -> list[JobInfo]:
    """Where each of these jobs of one queue is, or what it became (see the migration)."""
    return [JobInfo(*r) for r in await conn.fetch(JOB_INFO, queue, list(ids))]


@lru_cache(maxsize=256)
def _job_info_sql(queue: str) -> str:
    # pgtasks.job_info's query for an existing queue (0010), word for word but for the
    # table names, which the function splices in with EXECUTE format() and so plans anew on
    # every call, and for the ids: a JSON array rather than a bigint[]. Planning is most of
    # the cost (0.45 of 0.7 ms). A prepared statement is planned once (a generic plan) only
    # when that plan's estimate is no worse than a plan made for the values; unnest() of an
    # array estimates as many rows as the array has, against 10 for a generic plan, so it
    # would be planned on every call too. jsonb_array_elements_text() estimates 100 rows
    # whatever the array, so the generic plan wins from the sixth call (tested), and a
    # look-up costs about 0.3 ms. It reads the tables with the caller's privileges, not
    # the function's owner's.
    q, a = table("q", queue), table("a", queue)
    return f"""
SELECT msg_id, state, task,
       coalesce(attempts, CASE WHEN state = 'failed' THEN (error ->> 'attempts')::integer END),
       enqueued_at, finished_at, result::text, error::text, cancel_requested
FROM (
    SELECT i.id,
           CASE
               WHEN r.state IS NOT NULL THEN r.state
               WHEN q.msg_id IS NOT NULL THEN
                   CASE
                       WHEN q.attempts > 0 AND EXISTS (
                           SELECT 1 FROM pgtasks.attempt_errors AS e
                           WHERE e.queue = $1::text AND e.msg_id = q.msg_id
                             AND e.attempt = q.attempts
                             AND e.failed_at >= q.enqueued_at) THEN 'retrying'
                       WHEN q.vt > clock_timestamp() AND q.attempts = 0 THEN 'scheduled'
                       WHEN q.vt > clock_timestamp() THEN 'running'
                       ELSE 'waiting'
                   END
               WHEN a.msg_id IS NOT NULL THEN 'succeeded'
               WHEN d.msg_id IS NOT NULL THEN 'failed'
               ELSE 'unknown'
           END,
           coalesce(r.task, q.message ->> 'task', a.message ->> 'task', d.task),
           coalesce(q.attempts, pgtasks.attempts_of(a.read_ct, a.headers), d.read_ct),
           coalesce(r.enqueued_at, q.enqueued_at, a.enqueued_at, d.enqueued_at),
           coalesce(r.finished_at, a.archived_at, d.failed_at),
           r.result,
           coalesce(r.error, CASE WHEN d.msg_id IS NOT NULL THEN
               coalesce(d.error, '{{}}') || jsonb_build_object('reason', d.reason) END),
           q.msg_id IS NOT NULL AND pgtasks.cancel_requested($1::text, i.id, q.enqueued_at)
    FROM (SELECT e::bigint FROM jsonb_array_elements_text($2::text::jsonb) AS e) AS i(id)
    LEFT JOIN LATERAL (
        SELECT m.msg_id, m.vt, m.enqueued_at, m.message,
               pgtasks.attempts_of(m.read_ct, m.headers) AS attempts
        FROM pgmq.{q} AS m WHERE m.msg_id = i.id
    ) AS q ON true
    LEFT JOIN pgmq.{a} AS a ON q.msg_id IS NULL AND a.msg_id = i.id
    LEFT JOIN pgtasks.job_results AS r0 ON r0.queue = $1::text AND r0.msg_id = i.id
    LEFT JOIN LATERAL (
        SELECT * FROM pgtasks.dead_letters AS x
        WHERE x.queue = $1::text AND x.msg_id = i.id ORDER BY x.id DESC LIMIT 1
    ) AS d0 ON q.msg_id IS NULL AND a.msg_id IS NULL
    CROSS JOIN LATERAL (
        SELECT coalesce(q.enqueued_at, a.enqueued_at,
                        greatest(r0.enqueued_at, d0.enqueued_at)) AS enq
    ) AS w
    LEFT JOIN pgtasks.job_results AS r
        ON r.queue = r0.queue AND r.msg_id = r0.msg_id AND r0.enqueued_at = w.enq
    LEFT JOIN pgtasks.dead_letters AS d
        ON d.id = d0.id AND d0.enqueued_at = w.enq AND r.state IS NULL
) AS j(msg_id, state, task, attempts, enqueued_at, finished_at, result, error,
       cancel_requested)
"""


async def job_info_direct(conn: Executor, queue: str, ids: Sequence[int]) -> list[JobInfo]:
    """`job_info` as a prepared statement over the queue's tables: the same rows, several
    times cheaper, for a role that may read those tables and pgtasks' own (the worker's,
    the owner's). A role that may not gets `asyncpg.InsufficientPrivilegeError`, and a queue
    that does not exist `asyncpg.UndefinedTableError`: `job_info` answers both."""
    rows = await conn.fetch(_job_info_sql(queue), queue, orjson.dumps(list(ids)).decode())
    return [JobInfo(*r) for r in rows]


JOBS_CANCEL = "SELECT msg_id, outcome FROM pgtasks.cancel($1::text, $2::bigint[], $3::float8)"


async def jobs_cancel(
    conn: Executor, queue: str, ids: Sequence[int], ttl: float
) -> list[tuple[int, str]]:
    """Cancel jobs of one queue: (msg_id, outcome) with outcome ``cancelled`` (removed,
    recorded), ``requested`` (running: its worker is told), ``finished`` or ``unknown``."""
    rows = await conn.fetch(JOBS_CANCEL, queue, list(ids), ttl)
    return [(r[0], r[1]) for r in rows]


@lru_cache(maxsize=256)
def _end_sql(queue: str) -> str:
    return f"""
WITH done AS (
    DELETE FROM pgmq.{table("q", queue)} AS m
    USING unnest($1::bigint[], $2::integer[], $3::timestamptz[], $5::text[], $6::float8[])
        WITH ORDINALITY AS t(id, ct, enq, error, ttl, i)
    WHERE m.msg_id = t.id AND m.read_ct = t.ct AND m.enqueued_at = t.enq
    RETURNING m.msg_id, m.enqueued_at, m.message, m.headers, t.error, t.ttl, t.i
), keys AS (
    DELETE FROM pgtasks.idempotency_keys AS k
    USING done
    WHERE k.key = done.headers ->> 'idempotency_key' AND k.msg_id = done.msg_id
      AND k.queue = $4::text
), requests AS (
    DELETE FROM pgtasks.cancel_requests AS c
    USING done
    WHERE c.queue = $4::text AND c.msg_id = done.msg_id
      AND (c.enqueued_at IS NULL OR c.enqueued_at = done.enqueued_at)
), recorded AS (
    {RESULTS_INSERT}
    SELECT $4::text, msg_id, enqueued_at, $7::text, message ->> 'task', NULL, error::jsonb,
           now() + make_interval(secs => ttl)
    FROM done
    {RESULTS_UPSERT}
), {_NOTIFY_DONE}
SELECT done.i FROM done LEFT JOIN notified ON true
"""


async def messages_end(
    conn: Executor,
    queue: str,
    owned: Sequence[Token],
    state: str,
    errors: Sequence[str | None],
    ttls: Sequence[float],
) -> list[int]:
    """End messages still held at these tokens as ``cancelled`` or ``expired``: removed
    from the queue and recorded, their keys released, in one statement. Returns the
    positions (in ``owned``) of the messages ended."""
    ids, cts, enqs = _split(owned)
    rows = await conn.fetch(_end_sql(queue), ids, cts, enqs, queue, list(errors), list(ttls), state)
    return [r[0] - 1 for r in rows]


@lru_cache(maxsize=256)
def _extend_sql(queue: str) -> str:
    return f"""
UPDATE pgmq.{table("q", queue)} AS m
SET vt = clock_timestamp() + make_interval(secs => t.delay)
FROM unnest($1::bigint[], $2::integer[], $3::float8[], $4::timestamptz[]) WITH ORDINALITY
    AS t(id, ct, delay, enq, i)
WHERE m.msg_id = t.id AND m.read_ct = t.ct AND m.enqueued_at = t.enq
RETURNING t.i, pgtasks.cancel_requested($5::text, m.msg_id, m.enqueued_at)
"""


async def messages_extend(
    conn: Executor, queue: str, owned: Sequence[Token], leases: Sequence[float]
) -> list[tuple[int, bool]]:
    """Extend the leases of messages still held at these tokens; per message extended, its
    position (in ``owned``) and whether cancelling it was requested (a worker that does not
    listen learns of requests this way, within a third of a lease)."""
    ids, cts, enqs = _split(owned)
    rows = await conn.fetch(_extend_sql(queue), ids, cts, list(leases), enqs, queue)
    return [(r[0] - 1, r[1]) for r in rows]


RESULTS_PRUNE = """
WITH gone AS (
    DELETE FROM pgtasks.job_results WHERE expires_at < now() RETURNING 1
) SELECT count(*) FROM gone
"""


async def results_prune(conn: Executor) -> int:
    """Delete the records of jobs whose retention has passed."""
    count: int = await conn.fetchval(RESULTS_PRUNE)
    return count


CANCEL_REQUESTS_PRUNE = """
WITH gone AS (
    DELETE FROM pgtasks.cancel_requests AS c
    WHERE NOT pgtasks.message_exists(c.queue, c.msg_id)
    RETURNING 1
) SELECT count(*) FROM gone
"""


async def cancel_requests_prune(conn: Executor) -> int:
    """Delete requests to cancel jobs that ended meanwhile without hearing of them (the
    worker deletes the request with a cancelled job's record; a job that succeeded first
    leaves it behind)."""
    count: int = await conn.fetchval(CANCEL_REQUESTS_PRUNE)
    return count


@lru_cache(maxsize=256)
def _candidates_sql(queue: str, sources: tuple[str, ...]) -> str:
    """The newest ids of one queue's jobs, from the places that can hold a job in the
    states asked for; ``pgtasks.job_info`` then says which state each is in."""
    q, a = table("q", queue), table("a", queue)
    parts = {
        "queue": f"(SELECT msg_id FROM pgmq.{q} WHERE $1::text IS NULL "
        "OR message ->> 'task' = $1 ORDER BY msg_id DESC LIMIT $2)",
        "archive": f"(SELECT msg_id FROM pgmq.{a} WHERE $1::text IS NULL "
        "OR message ->> 'task' = $1 ORDER BY msg_id DESC LIMIT $2)",
        "dead": "(SELECT msg_id FROM pgtasks.dead_letters WHERE queue = $3 AND "
        "($1::text IS NULL OR task = $1) ORDER BY id DESC LIMIT $2)",
        "records": "(SELECT msg_id FROM pgtasks.job_results WHERE queue = $3 AND "
        "($1::text IS NULL OR task = $1) ORDER BY finished_at DESC LIMIT $2)",
    }
    union = " UNION ".join(parts[s] for s in sources)
    # ($3, the queue, is named here too: not every source needs it, every call passes it)
    return f"SELECT DISTINCT msg_id FROM ({union}) AS c WHERE $3::text IS NOT NULL ORDER BY 1 DESC"


STATE_SOURCES: dict[str | None, tuple[str, ...]] = {
    None: ("queue", "archive", "dead", "records"),
    "scheduled": ("queue",),
    "waiting": ("queue",),
    "running": ("queue",),
    "retrying": ("queue",),
    "succeeded": ("archive", "records"),
    "failed": ("dead", "records"),  # records: those retried as a new job
    "cancelled": ("records",),
    "expired": ("records",),
}


async def jobs_list(
    conn: Executor, queue: str, *, state: str | None, task: str | None, limit: int
) -> list[JobInfo]:
    """The newest jobs of one queue (in ``state``, of ``task``), at most ``limit``. A state
    of the queue itself (waiting, running...) looks at the newest ``20 * limit`` messages."""
    sources = STATE_SOURCES[state]
    scan = limit * 20 if sources == ("queue",) else limit
    ids = [r[0] for r in await conn.fetch(_candidates_sql(queue, sources), task, scan, queue)]
    infos = await job_info(conn, queue, ids) if ids else []
    return [i for i in infos if state is None or i.state == state][:limit]


@lru_cache(maxsize=256)
def _message_sql(queue: str) -> str:
    q, a = table("q", queue), table("a", queue)
    return f"""
SELECT message::text, headers::text FROM pgmq.{q} WHERE msg_id = $1
UNION ALL SELECT message::text, headers::text FROM pgmq.{a} WHERE msg_id = $1
UNION ALL (SELECT message::text, headers::text FROM pgtasks.dead_letters
           WHERE queue = $2 AND msg_id = $1 ORDER BY id DESC LIMIT 1)
LIMIT 1
"""


async def job_message(conn: Executor, queue: str, msg_id: int) -> tuple[str | None, str | None]:
    """A job's body and headers (JSON text), wherever it is; (None, None) when gone."""
    try:
        row = await conn.fetchrow(_message_sql(queue), msg_id, queue)
    except asyncpg.UndefinedTableError:  # the queue was dropped
        return None, None
    return (row[0], row[1]) if row is not None else (None, None)
