"""The SQL of a job's life once it is in its queue: the claim, and the outcomes of a run
(ack, retry, release, dead letter) and lease extensions, each for a batch of jobs of one
queue. (Enqueueing is `send`; the error history `attempt_errors`.)

pgmq's ``delete``/``archive``/``set_vt`` do not check who holds a message. Acks, releases
and lease extensions therefore go straight to the queue table, guarded by ``msg_id`` AND the
``read_ct`` we claimed: a worker that lost its lease changes nothing.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeAlias

from ..serialization.envelope import HEADER_RELEASED
from .sql import NOTIFY_CHANNEL, Executor, table

# A claim token: (msg_id, read_ct, enqueued_at), the guard of every write to a claimed
# message. read_ct only grows, so a token never repeats within a queue; enqueued_at tells a
# queue dropped and created again (its msg_ids and read_cts start again) from the old one.
Token: TypeAlias = "tuple[int, int, dt.datetime]"


# --- claim ----------------------------------------------------------------------------------


def _released(headers: str, read_ct: str) -> str:
    """SQL for the attempts given back to a message: the header's count when it is a
    number below the claims made (what pgtasks itself writes), else 0, so that a
    producer's garbage or forgery can neither break the statement nor buy extra runs.
    `worker.job.attempt_of` is the same rule in Python."""
    value = f"({headers} ->> '{HEADER_RELEASED}')"
    return (
        f"(CASE WHEN {value} ~ '^[0-9]{{1,9}}$' AND {value}::bigint < {read_ct} "
        f"THEN {value}::integer ELSE 0 END)"
    )


@dataclass(slots=True)  # not frozen: a claim makes one per job, and frozen costs 3x
class Message:
    """A claimed message: pgmq's columns, with two answers the claim computes alongside.

    ``body`` and ``headers`` are None when together they are larger than the claim's size
    limit (``size`` says how large): they are never loaded. ``key_holder`` is the id of
    another job that already succeeded with this message's idempotency key, if any.
    ``cancel_requested``: someone asked to cancel this job while an earlier claim of it
    ran (that worker stopped or died before it heard): it must end as cancelled, unrun.

    ``(msg_id, read_ct, enqueued_at)`` is the claim token (`Token`): ``read_ct`` only ever
    grows (a release gives the attempt back by counting it in the ``x-pgtasks-released``
    header instead), so a token never repeats and every ownership guard can rely on it.
    """

    @property
    def token(self) -> Token:
        return (self.msg_id, self.read_ct, self.enqueued_at)

    msg_id: int
    read_ct: int
    enqueued_at: dt.datetime
    vt: dt.datetime
    body: str | None
    size: int
    headers: str | None
    key_holder: int | None
    cancel_requested: bool


@lru_cache(maxsize=256)
def _read_sql(queue: str) -> str:
    # pgmq.read's claim (lock what is visible, skip what another worker is locking, bump
    # read_ct and push vt out by the lease), prepared once per connection instead of planned
    # per call, and ordered by vt rather than msg_id: the vt index stops the scan after qty
    # visible rows, where msg_id order walks every invisible (delayed, leased) row ahead of
    # them. Jobs are claimed in the order they became due. Bodies over the size limit stay
    # on the server; the idempotency-key lookup runs only for messages that carry a key,
    # and the look-up of a pending cancel request only when this queue has one (the
    # uncorrelated EXISTS is evaluated once per statement, on an index of a table that is
    # nearly always empty).
    # The clock is read once, in a subquery (an InitPlan), so that it bounds the vt index
    # scan: compared row by row (clock_timestamp() is volatile) it was only a filter, and a
    # claim asking for more rows than were due walked every invisible row behind them (a
    # million jobs scheduled ahead: 200 ms a claim, issue 18). The UPDATE takes the ids as
    # an array for the same reason: joined to the CTE, a generic plan (a prepared statement
    # after five runs) merge-joined the whole primary key.
    q = table("q", queue)
    return f"""
WITH due AS (
    SELECT msg_id FROM pgmq.{q}
    WHERE vt <= (SELECT clock_timestamp()) AND read_ct < 2147483647  -- +1 must fit
    ORDER BY vt
    LIMIT $2::integer
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE pgmq.{q} AS m
    SET last_read_at = clock_timestamp(),
        vt = clock_timestamp() + make_interval(secs => $1::integer),
        read_ct = m.read_ct + 1
    WHERE m.msg_id = ANY (ARRAY(SELECT msg_id FROM due))
    RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.vt, m.message::text AS body, m.headers
)
SELECT c.msg_id, c.read_ct, c.enqueued_at, c.vt,
       CASE WHEN x.size <= $3::integer THEN c.body END,
       x.size,
       CASE WHEN x.size <= $3::integer THEN h.text END,
       CASE WHEN c.headers ? 'idempotency_key' THEN (
           SELECT k.msg_id FROM pgtasks.idempotency_keys AS k
           WHERE k.key = c.headers ->> 'idempotency_key' AND k.expires_at > now()
             AND NOT (k.queue = '{queue}' AND k.msg_id = c.msg_id)
       ) END,
       CASE WHEN EXISTS (SELECT 1 FROM pgtasks.cancel_requests WHERE queue = '{queue}')
            THEN pgtasks.cancel_requested('{queue}', c.msg_id, c.enqueued_at)
            ELSE false END
FROM claimed AS c,
     LATERAL (SELECT c.headers::text AS text) AS h,
     LATERAL (SELECT octet_length(c.body) + coalesce(octet_length(h.text), 0) AS size) AS x
"""


async def message_read(
    conn: Executor, queue: str, vt: int, qty: int, max_size: int
) -> list[Message]:
    """Claim up to ``qty`` visible messages for ``vt`` seconds, as ``pgmq.read`` does;
    bodies over ``max_size`` bytes are not sent (see `Message`)."""
    rows = await conn.fetch(_read_sql(queue), vt, qty, max_size)
    return sorted((Message(*r) for r in rows), key=lambda m: m.msg_id)


@lru_cache(maxsize=1024)
def _next_visible_sql(queues: tuple[str, ...]) -> str:
    # one sub-select per queue, each the first entry of pgmq's vt index
    parts = ",\n       ".join(
        f"(SELECT extract(epoch FROM min(vt) - clock_timestamp())::float8 "
        f"FROM pgmq.{table('q', q)})"
        for q in queues
    )
    return f"SELECT ARRAY[{parts}]::float8[]"


async def queues_next_visible(conn: Executor, queues: Sequence[str]) -> list[float | None]:
    """For each queue, in order: seconds until its earliest message is visible (<= 0: one
    is visible now; delayed jobs, retries and leases that will lapse all count), or None
    when it is empty. One statement (prepared once for this tuple of queues), one index
    probe per queue."""
    values: list[float | None] = await conn.fetchval(_next_visible_sql(tuple(queues)))
    return values


# --- outcomes (ownership-guarded) -----------------------------------------------------------


DONE_CHANNEL = "pgtasks_done"
"""Told once per statement that ends jobs of a queue (acked, dead-lettered, cancelled,
expired); the payload is the queue's name. Waiters for results listen to it."""

# Every statement that ends jobs notifies the waiters once: a CTE referenced by the final
# SELECT (so it runs) that calls pg_notify once when anything ended.
_NOTIFY_DONE = f"""notified AS (
    SELECT pg_notify('{DONE_CHANNEL}', $4::text) FROM (SELECT 1 FROM done LIMIT 1) AS one
)"""


@lru_cache(maxsize=256)
def _ack_sql(queue: str, archive: bool, results: bool) -> str:
    q, a = table("q", queue), table("a", queue)
    archived = (
        f""", archived AS (
    INSERT INTO pgmq.{a} (msg_id, read_ct, enqueued_at, last_read_at, vt, message, headers)
    SELECT msg_id, read_ct, enqueued_at, last_read_at, vt, message, headers FROM done
)"""
        if archive
        else ""
    )
    # a batch that keeps results writes them in the same statement as the ack; one that
    # keeps none (a task annotated -> None) does not pay for it
    kept = (
        f""", kept AS (
    {RESULTS_INSERT}
    SELECT $4::text, d.msg_id, d.enqueued_at, 'succeeded', d.message ->> 'task',
           x.result::jsonb, x.error::jsonb, now() + make_interval(secs => x.ttl)
    FROM done AS d
    JOIN unnest($6::text[], $7::text[], $8::float8[]) WITH ORDINALITY
        AS x(result, error, ttl, i) ON x.i = d.i
    WHERE x.result IS NOT NULL OR x.error IS NOT NULL
    {RESULTS_UPSERT}
)"""
        if results
        else ""
    )
    return f"""
WITH done AS (
    DELETE FROM pgmq.{q} AS m
    USING unnest($1::bigint[], $2::integer[], $5::timestamptz[]) WITH ORDINALITY
        AS t(id, ct, enq, i)
    WHERE m.msg_id = t.id AND m.read_ct = t.ct AND m.enqueued_at = t.enq
    RETURNING m.*, t.i
){archived}{kept}, keys AS (
    UPDATE pgtasks.idempotency_keys AS k
    SET expires_at = now() + make_interval(secs => $3::float8)
    FROM done
    WHERE k.key = done.headers ->> 'idempotency_key' AND k.msg_id = done.msg_id
      AND k.queue = $4::text
), {_NOTIFY_DONE}
SELECT done.i FROM done LEFT JOIN notified ON true
"""


RESULTS_INSERT = """INSERT INTO pgtasks.job_results AS r
        (queue, msg_id, enqueued_at, state, task, result, error, expires_at)"""
"""The head of a job's terminal record (see `db.results` and the 0004 migration)."""

RESULTS_UPSERT = """ON CONFLICT (queue, msg_id) DO UPDATE SET
        enqueued_at = EXCLUDED.enqueued_at, state = EXCLUDED.state, task = EXCLUDED.task,
        result = EXCLUDED.result, error = EXCLUDED.error, finished_at = now(),
        expires_at = EXCLUDED.expires_at"""
"""A queue dropped and created again restarts its ids: its new job's record replaces the
old one's."""


async def messages_ack(
    conn: Executor,
    queue: str,
    owned: Sequence[Token],
    *,
    archive: bool,
    key_retention: float,
    results: Sequence[tuple[str | None, str | None, float]] | None = None,
) -> list[int]:
    """Archive (or delete) the messages still held at these tokens; mark their idempotency
    keys succeeded and, with ``results`` (per message: the result as JSON text, or an
    error as JSON text saying why none was kept, and how many seconds to keep the record),
    keep their results, all in one statement. Returns the positions (in ``owned``) of the
    messages acked."""
    ids, cts, enqs = _split(owned)
    if results is None:
        sql = _ack_sql(queue, archive, False)
        rows = await conn.fetch(sql, ids, cts, key_retention, queue, enqs)
    else:
        sql = _ack_sql(queue, archive, True)
        values = [r[0] for r in results]
        errors = [r[1] for r in results]
        ttls = [r[2] for r in results]
        rows = await conn.fetch(sql, ids, cts, key_retention, queue, enqs, values, errors, ttls)
    return [r[0] - 1 for r in rows]


@lru_cache(maxsize=256)
def _archived_sql(queue: str) -> str:
    q = table("a", queue)
    return f"SELECT msg_id, read_ct, enqueued_at FROM pgmq.{q} WHERE msg_id = ANY($1::bigint[])"


async def messages_archived(conn: Executor, queue: str, owned: Sequence[Token]) -> set[Token]:
    """Which of these claims are in the queue's archive (acked)."""
    rows = await conn.fetch(_archived_sql(queue), [t[0] for t in owned])
    return {(r[0], r[1], r[2]) for r in rows}


@lru_cache(maxsize=256)
def _set_vt_sql(queue: str) -> str:
    return f"""
UPDATE pgmq.{table("q", queue)} AS m
SET vt = clock_timestamp() + make_interval(secs => t.delay)
FROM unnest($1::bigint[], $2::integer[], $3::float8[], $4::timestamptz[]) WITH ORDINALITY
    AS t(id, ct, delay, enq, i)
WHERE m.msg_id = t.id AND m.read_ct = t.ct AND m.enqueued_at = t.enq
RETURNING t.i
"""


@lru_cache(maxsize=256)
def _release_sql(queue: str) -> str:
    # the wake-up NOTIFY tells every worker serving the queue (a worker claims only from the
    # queues that may hold work: without it, another worker would find the message at its
    # next sweep)
    return f"""
WITH released AS (
    UPDATE pgmq.{table("q", queue)} AS m
    SET vt = least(m.enqueued_at, clock_timestamp()),
        headers = CASE
            WHEN t.give_back AND m.headers IS NULL
                THEN jsonb_build_object('{HEADER_RELEASED}', 1)
            WHEN t.give_back AND jsonb_typeof(m.headers) = 'object'
                THEN m.headers || jsonb_build_object(
                    '{HEADER_RELEASED}', {_released("m.headers", "m.read_ct")} + 1)
            ELSE m.headers END  -- headers that are not an object: the attempt is not given back
    FROM unnest($1::bigint[], $2::integer[], $3::boolean[], $4::timestamptz[])
        WITH ORDINALITY AS t(id, ct, give_back, enq, i)
    WHERE m.msg_id = t.id AND m.read_ct = t.ct AND m.enqueued_at = t.enq
      -- still leased: a release replayed after its first try committed (the reply was
      -- lost) finds the message visible already, and gives nothing back twice
      AND m.vt > clock_timestamp()
    RETURNING t.i
), notified AS (
    SELECT pg_notify('{NOTIFY_CHANNEL}', '{queue}') FROM (SELECT 1 FROM released LIMIT 1) AS one
)
SELECT released.i FROM released LEFT JOIN notified ON true
"""


async def messages_release(
    conn: Executor, queue: str, owned: Sequence[Token], give_back: Sequence[bool]
) -> list[int]:
    """Hand back messages still held at (msg_id, read_ct), visible at once; where
    ``give_back``, the attempt is given back (counted in the ``x-pgtasks-released`` header,
    since ``read_ct`` must keep growing): a run cancelled by a worker shutdown did not fail.
    The vt goes back to the time the job was enqueued, so, claims being in vt order, it
    keeps its place in line instead of queueing behind every job that became due while it
    ran."""
    ids, cts, enqs = _split(owned)
    rows = await conn.fetch(_release_sql(queue), ids, cts, list(give_back), enqs)
    return [r[0] - 1 for r in rows]


async def messages_set_vt(
    conn: Executor, queue: str, owned: Sequence[Token], delays: Sequence[float]
) -> list[int]:
    """Make messages still held at (msg_id, read_ct) visible after ``delays`` seconds: a
    lease extension or a retry after backoff. Returns the positions (in ``owned``) of the
    messages still held."""
    ids, cts, enqs = _split(owned)
    rows = await conn.fetch(_set_vt_sql(queue), ids, cts, list(delays), enqs)
    return [r[0] - 1 for r in rows]


@lru_cache(maxsize=256)
def _dead_letter_sql(queue: str) -> str:
    return f"""
WITH t AS (
    SELECT * FROM unnest($1::bigint[], $2::integer[], $3::text[], $4::text[],
                         $5::text[]::jsonb[], $7::timestamptz[]) WITH ORDINALITY
        AS t(id, ct, task, reason, error, enq, i)
), gone AS (
    DELETE FROM pgmq.{table("q", queue)} AS m
    USING t
    WHERE m.msg_id = t.id AND m.read_ct = t.ct AND m.enqueued_at = t.enq
    RETURNING m.*, t.task, t.reason, t.error, t.i
), keys AS (
    DELETE FROM pgtasks.idempotency_keys AS k
    USING gone
    WHERE k.key = gone.headers ->> 'idempotency_key' AND k.msg_id = gone.msg_id
      AND k.queue = $6::text
), moved AS (
    INSERT INTO pgtasks.dead_letters
        (queue, msg_id, task, message, headers, read_ct, enqueued_at, reason, error)
    SELECT $6::text, msg_id, task, message, headers,
           read_ct - {_released("headers", "read_ct")}, enqueued_at, reason, error
    FROM gone
), {_NOTIFY_DONE.replace("$4::text", "$6::text").replace("FROM done", "FROM gone")}
SELECT gone.i FROM gone LEFT JOIN notified ON true
"""


async def messages_dead_letter(
    conn: Executor,
    queue: str,
    owned: Sequence[Token],
    tasks: Sequence[str | None],
    reasons: Sequence[str],
    errors: Sequence[str | None],
) -> list[int]:
    """Move messages still held at (msg_id, read_ct) to pgtasks.dead_letters, releasing
    their idempotency keys, in one statement. Returns the positions (in ``owned``) of the
    messages moved."""
    ids, cts, enqs = _split(owned)
    rows = await conn.fetch(
        _dead_letter_sql(queue), ids, cts, list(tasks), list(reasons), list(errors), queue, enqs
    )
    return [r[0] - 1 for r in rows]


def _split(owned: Sequence[Token]) -> tuple[list[int], list[int], list[dt.datetime]]:
    return [t[0] for t in owned], [t[1] for t in owned], [t[2] for t in owned]
