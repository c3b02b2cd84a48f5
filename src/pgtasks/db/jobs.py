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
from .sql import Executor, table

# A claim token: (msg_id, read_ct), the guard of every write to a claimed message.
Token: TypeAlias = tuple[int, int]


# --- claim ----------------------------------------------------------------------------------


def _released(headers: str) -> str:
    """SQL for the attempts given back to a message (0 unless the header holds a small
    non-negative integer: a producer's garbage must not break the statement)."""
    value = f"({headers} ->> '{HEADER_RELEASED}')"
    return f"(CASE WHEN {value} ~ '^[0-9]{{1,6}}$' THEN {value}::integer ELSE 0 END)"


@dataclass(slots=True)  # not frozen: a claim makes one per job, and frozen costs 3x
class Message:
    """A claimed message: pgmq's columns, with two answers the claim computes alongside.

    ``body`` is None when the stored body is larger than the claim's size limit (``size``
    says how large): it is never loaded. ``key_holder`` is the id of another job that already
    succeeded with this message's idempotency key, if any.

    ``(msg_id, read_ct)`` is the claim token: ``read_ct`` only ever grows (a release gives
    the attempt back by counting it in the ``x-pgtasks-released`` header instead), so a
    token never repeats and every ownership guard can rely on it.
    """

    msg_id: int
    read_ct: int
    enqueued_at: dt.datetime
    vt: dt.datetime
    body: str | None
    size: int
    headers: str | None
    key_holder: int | None


@lru_cache(maxsize=256)
def _read_sql(queue: str) -> str:
    # pgmq.read's claim (lock what is visible, skip what another worker is locking, bump
    # read_ct and push vt out by the lease), prepared once per connection instead of planned
    # per call, and ordered by vt rather than msg_id: the vt index stops the scan after qty
    # visible rows, where msg_id order walks every invisible (delayed, leased) row ahead of
    # them. Jobs are claimed in the order they became due. Bodies over the size limit stay
    # on the server; the idempotency-key lookup runs only for messages that carry a key.
    q = table("q", queue)
    return f"""
WITH due AS (
    SELECT msg_id FROM pgmq.{q}
    WHERE vt <= clock_timestamp()
    ORDER BY vt
    LIMIT $2::integer
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE pgmq.{q} AS m
    SET last_read_at = clock_timestamp(),
        vt = clock_timestamp() + make_interval(secs => $1::integer),
        read_ct = m.read_ct + 1
    FROM due
    WHERE m.msg_id = due.msg_id
    RETURNING m.msg_id, m.read_ct, m.enqueued_at, m.vt, m.message::text AS body, m.headers
)
SELECT c.msg_id, c.read_ct, c.enqueued_at, c.vt,
       CASE WHEN octet_length(c.body) <= $3::integer THEN c.body END,
       octet_length(c.body),
       c.headers::text,
       CASE WHEN c.headers ? 'idempotency_key' THEN (
           SELECT k.msg_id FROM pgtasks.idempotency_keys AS k
           WHERE k.key = c.headers ->> 'idempotency_key' AND k.expires_at > now()
             AND NOT (k.queue = '{queue}' AND k.msg_id = c.msg_id)
       ) END
FROM claimed AS c
"""


async def message_read(
    conn: Executor, queue: str, vt: int, qty: int, max_size: int
) -> list[Message]:
    """Claim up to ``qty`` visible messages for ``vt`` seconds, as ``pgmq.read`` does;
    bodies over ``max_size`` bytes are not sent (see `Message`)."""
    rows = await conn.fetch(_read_sql(queue), vt, qty, max_size)
    return sorted((Message(*r) for r in rows), key=lambda m: m.msg_id)


@lru_cache(maxsize=256)
def _next_visible_sql(queues: tuple[str, ...]) -> str:
    parts = [f"SELECT min(vt) AS vt FROM pgmq.{table('q', q)}" for q in queues]
    return (
        "SELECT extract(epoch FROM min(vt) - clock_timestamp())::float8 "
        f"FROM ({' UNION ALL '.join(parts)}) AS t"
    )


async def queues_next_visible(conn: Executor, queues: Sequence[str]) -> float | None:
    """Seconds until the earliest message of these queues is visible (<= 0: one is visible
    now), or None when they are all empty. Uses pgmq's vt index."""
    value: float | None = await conn.fetchval(_next_visible_sql(tuple(queues)))
    return value


# --- outcomes (ownership-guarded) -----------------------------------------------------------


@lru_cache(maxsize=256)
def _ack_sql(queue: str, archive: bool) -> str:
    q, a = table("q", queue), table("a", queue)
    archived = (
        f""", archived AS (
    INSERT INTO pgmq.{a} (msg_id, read_ct, enqueued_at, last_read_at, vt, message, headers)
    SELECT msg_id, read_ct, enqueued_at, last_read_at, vt, message, headers FROM done
)"""
        if archive
        else ""
    )
    return f"""
WITH done AS (
    DELETE FROM pgmq.{q} AS m
    USING unnest($1::bigint[], $2::integer[]) AS t(id, ct)
    WHERE m.msg_id = t.id AND m.read_ct = t.ct
    RETURNING m.*
){archived}, keys AS (
    UPDATE pgtasks.idempotency_keys AS k
    SET expires_at = now() + make_interval(secs => $3::float8)
    FROM done
    WHERE k.key = done.headers ->> 'idempotency_key' AND k.msg_id = done.msg_id
      AND k.queue = $4::text
)
SELECT msg_id, read_ct FROM done
"""


async def messages_ack(
    conn: Executor,
    queue: str,
    owned: Sequence[Token],
    *,
    archive: bool,
    key_retention: float,
) -> set[Token]:
    """Archive (or delete) the messages still held at these (msg_id, read_ct) tokens; mark
    their idempotency keys succeeded, in the same statement. Returns the tokens acked."""
    ids, cts = _split(owned)
    rows = await conn.fetch(_ack_sql(queue, archive), ids, cts, key_retention, queue)
    return {(r[0], r[1]) for r in rows}


@lru_cache(maxsize=256)
def _set_vt_sql(queue: str) -> str:
    return f"""
UPDATE pgmq.{table("q", queue)} AS m
SET vt = clock_timestamp() + make_interval(secs => t.delay)
FROM unnest($1::bigint[], $2::integer[], $3::float8[]) AS t(id, ct, delay)
WHERE m.msg_id = t.id AND m.read_ct = t.ct
RETURNING m.msg_id, m.read_ct
"""


@lru_cache(maxsize=256)
def _release_sql(queue: str) -> str:
    return f"""
UPDATE pgmq.{table("q", queue)} AS m
SET vt = least(m.enqueued_at, clock_timestamp()),
    headers = CASE WHEN t.give_back THEN jsonb_set(
        coalesce(m.headers, '{{}}'::jsonb), '{{{HEADER_RELEASED}}}',
        to_jsonb({_released("m.headers")} + 1))
        ELSE m.headers END
FROM unnest($1::bigint[], $2::integer[], $3::boolean[]) AS t(id, ct, give_back)
WHERE m.msg_id = t.id AND m.read_ct = t.ct
RETURNING m.msg_id, m.read_ct
"""


async def messages_release(
    conn: Executor, queue: str, owned: Sequence[Token], give_back: Sequence[bool]
) -> set[Token]:
    """Hand back messages still held at (msg_id, read_ct), visible at once; where
    ``give_back``, the attempt is given back (counted in the ``x-pgtasks-released`` header,
    since ``read_ct`` must keep growing): a run cancelled by a worker shutdown did not fail.
    The vt goes back to the time the job was enqueued, so, claims being in vt order, it
    keeps its place in line instead of queueing behind every job that became due while it
    ran."""
    ids, cts = _split(owned)
    rows = await conn.fetch(_release_sql(queue), ids, cts, list(give_back))
    return {(r[0], r[1]) for r in rows}


async def messages_set_vt(
    conn: Executor, queue: str, owned: Sequence[Token], delays: Sequence[float]
) -> set[Token]:
    """Make messages still held at (msg_id, read_ct) visible after ``delays`` seconds: a
    lease extension or a retry after backoff. Returns the tokens still held."""
    ids, cts = _split(owned)
    rows = await conn.fetch(_set_vt_sql(queue), ids, cts, list(delays))
    return {(r[0], r[1]) for r in rows}


@lru_cache(maxsize=256)
def _dead_letter_sql(queue: str) -> str:
    return f"""
WITH t AS (
    SELECT * FROM unnest($1::bigint[], $2::integer[], $3::text[], $4::text[], $5::text[]::jsonb[])
        AS t(id, ct, task, reason, error)
), gone AS (
    DELETE FROM pgmq.{table("q", queue)} AS m
    USING t
    WHERE m.msg_id = t.id AND m.read_ct = t.ct
    RETURNING m.*, t.task, t.reason, t.error
), keys AS (
    DELETE FROM pgtasks.idempotency_keys AS k
    USING gone
    WHERE k.key = gone.headers ->> 'idempotency_key' AND k.msg_id = gone.msg_id
      AND k.queue = $6::text
), moved AS (
    INSERT INTO pgtasks.dead_letters
        (queue, msg_id, task, message, headers, read_ct, enqueued_at, reason, error)
    SELECT $6::text, msg_id, task, message, headers, read_ct - {_released("headers")},
           enqueued_at, reason, error
    FROM gone
)
SELECT msg_id, read_ct FROM gone
"""


async def messages_dead_letter(
    conn: Executor,
    queue: str,
    owned: Sequence[Token],
    tasks: Sequence[str | None],
    reasons: Sequence[str],
    errors: Sequence[str | None],
) -> set[Token]:
    """Move messages still held at (msg_id, read_ct) to pgtasks.dead_letters, releasing
    their idempotency keys, in one statement. Returns the tokens moved."""
    ids, cts = _split(owned)
    rows = await conn.fetch(
        _dead_letter_sql(queue), ids, cts, list(tasks), list(reasons), list(errors), queue
    )
    return {(r[0], r[1]) for r in rows}


def _split(owned: Sequence[Token]) -> tuple[list[int], list[int]]:
    return [i for i, _ in owned], [c for _, c in owned]
