"""The SQL of a job's life: enqueue, claim, and the outcomes of a run (admin.py holds the
statements for queues, dead letters and pruning).

Each statement is a named constant (or, where it names a queue's table, a cached builder)
beside one small typed function taking a connection or pool. No business logic here.

JSON crosses the wire as text (``$n::text::jsonb`` in, ``::text`` out): no codec is
registered, so a caller's own connection (transactional enqueue) behaves like ours.

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

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ..queues import check_queue_name
from ..serialization.envelope import HEADER_RELEASED

# Where a statement can run: a connection or the pool.
Executor: TypeAlias = "asyncpg.Connection | PoolConnectionProxy | asyncpg.Pool"

NOTIFY_CHANNEL = "pgtasks"

# A claim token: (msg_id, read_ct), the guard of every write to a claimed message.
Token: TypeAlias = tuple[int, int]


def table(prefix: str, queue: str) -> str:
    """The quoted name of a queue's table in schema pgmq: ``q`` (queue) or ``a`` (archive)."""
    return '"' + prefix + "_" + check_queue_name(queue) + '"'


# --- enqueue --------------------------------------------------------------------------------

MESSAGE_SEND = """
SELECT msg_id, deduplicated, queue
FROM pgtasks.send($1::text, $2::text::jsonb, $3::text::jsonb, $4::float8, $5::timestamptz)
"""

# Bodies arrive as one JSON array ($2), split here in order: one parameter instead of one
# array element per message (see envelope.encode_many).
MESSAGE_SEND_BATCH = """
SELECT msg_id, deduplicated, queue
FROM pgtasks.send_batch(
    $1::text,
    ARRAY(SELECT b.body FROM jsonb_array_elements($2::text::jsonb) WITH ORDINALITY AS b(body, i)
          ORDER BY b.i),
    $3::text[]::jsonb[], $4::float8, $5::timestamptz)
"""


async def message_send(
    conn: Executor,
    queue: str,
    body: str,
    headers: str | None,
    delay: float,
    eta: dt.datetime | None,
) -> tuple[int, bool, str]:
    """(msg_id, deduplicated, queue): a deduplicated job is the key holder, maybe in
    another queue."""
    row = await conn.fetchrow(MESSAGE_SEND, queue, body, headers, delay, eta)
    assert row is not None
    return row[0], row[1], row[2]


@lru_cache(maxsize=256)
def _insert_sql(queue: str) -> str:
    # pgmq.send's own INSERT, prepared once per connection (pgmq.send plans it anew on every
    # call through EXECUTE), with the wake-up NOTIFY in the same statement
    return f"""
WITH m AS (
    INSERT INTO pgmq.{table("q", queue)} (vt, message, headers)
    VALUES (coalesce($4::timestamptz, clock_timestamp() + make_interval(secs => $3::float8)),
            $1::text::jsonb, $2::text::jsonb)
    RETURNING msg_id
)
SELECT msg_id, pg_notify('{NOTIFY_CHANNEL}', $5::text) FROM m
"""


async def message_insert(
    conn: Executor,
    queue: str,
    body: str,
    headers: str | None,
    delay: float,
    eta: dt.datetime | None,
) -> int:
    """Send one message without an idempotency key straight into an existing queue's table,
    with the wake-up NOTIFY. Raises `asyncpg.UndefinedTableError` when the queue does not
    exist (`message_send` creates it)."""
    row = await conn.fetchrow(_insert_sql(queue), body, headers, delay, eta, queue)
    assert row is not None
    msg_id: int = row[0]
    return msg_id


@lru_cache(maxsize=256)
def _insert_batch_sql(queue: str) -> str:
    # pgmq.send_batch's INSERT (one vt for the batch), prepared; bodies as one JSON array as
    # in MESSAGE_SEND_BATCH. The ids come back as one array in input order (identity values
    # are drawn in insert order), with one NOTIFY.
    return f"""
WITH m AS (
    INSERT INTO pgmq.{table("q", queue)} (vt, message, headers)
    SELECT (SELECT coalesce($4::timestamptz,
                            clock_timestamp() + make_interval(secs => $3::float8))),
           t.body, t.headers::jsonb
    FROM ROWS FROM (jsonb_array_elements($1::text::jsonb), unnest($2::text[])) AS t(body, headers)
    RETURNING msg_id
)
SELECT array_agg(msg_id ORDER BY msg_id), pg_notify('{NOTIFY_CHANNEL}', $5::text) FROM m
"""


async def message_insert_batch(
    conn: Executor,
    queue: str,
    bodies: str,
    headers: Sequence[str | None] | None,
    delay: float,
    eta: dt.datetime | None,
) -> list[int]:
    """`message_insert` for many messages without keys, all visible at one time: ``bodies``
    is a JSON array of envelopes; returns their msg_ids in input order."""
    ids: list[int] | None = await conn.fetchval(
        _insert_batch_sql(queue), bodies, headers, delay, eta, queue
    )
    assert ids is not None  # bodies is never empty
    return ids


async def message_send_batch(
    conn: Executor,
    queue: str,
    bodies: str,
    headers: Sequence[str | None] | None,
    delay: float,
    eta: dt.datetime | None,
) -> list[asyncpg.Record]:
    """One (msg_id, deduplicated, queue) record per message, in input order."""
    rows: list[asyncpg.Record] = await conn.fetch(
        MESSAGE_SEND_BATCH, queue, bodies, headers, delay, eta
    )
    return rows


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


# --- failures -------------------------------------------------------------------------------

ATTEMPT_ERRORS_INSERT = """
INSERT INTO pgtasks.attempt_errors
    (queue, msg_id, task, attempt, error_type, message, traceback, worker)
SELECT $1::text, t.msg_id, t.task, t.attempt, t.error_type, t.message, t.traceback, $2::text
FROM unnest($3::bigint[], $4::text[], $5::integer[], $6::text[], $7::text[], $8::text[])
    AS t(msg_id, task, attempt, error_type, message, traceback)
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
