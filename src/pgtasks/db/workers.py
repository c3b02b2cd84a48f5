"""The SQL of ``pgtasks.workers``: a worker's heartbeat (one upsert every few seconds, never
per job), its last word when it stops, the list of workers with their state, and pruning.

A worker is *alive* while its last heartbeat is younger than three of its intervals, *gone*
after that (it crashed, was killed or lost the database), and *stopped* once it said so.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence

import asyncpg
import orjson

from .sql import Executor

GONE_AFTER_BEATS = 3
"""A worker that missed this many heartbeats in a row is shown as gone."""

WORKER_BEAT = """
INSERT INTO pgtasks.workers AS w
    (id, host, pid, queues, concurrency, running, version, heartbeat_interval, stats)
VALUES ($1::uuid, $2::text, $3::integer, $4::text[], $5::integer, $6::integer, $7::text,
        $8::float8, $9::text::jsonb)
ON CONFLICT (id) DO UPDATE
SET running = excluded.running, stats = excluded.stats, last_seen = now(), stopped_at = NULL
"""


async def worker_beat(
    conn: Executor,
    worker_id: uuid.UUID,
    *,
    host: str,
    pid: int,
    queues: Sequence[str],
    concurrency: int,
    running: int,
    version: str,
    interval: float,
    stats: Mapping[str, int],
) -> None:
    """Register the worker, or record that it is alive (a row pruned meanwhile comes back)."""
    await conn.execute(
        WORKER_BEAT,
        worker_id,
        host,
        pid,
        list(queues),
        concurrency,
        running,
        version,
        interval,
        orjson.dumps(dict(stats)).decode(),
    )


WORKER_STOPPED = """
UPDATE pgtasks.workers
SET stopped_at = now(), last_seen = now(), running = 0, stats = $2::text::jsonb
WHERE id = $1::uuid
"""


async def worker_stopped(conn: Executor, worker_id: uuid.UUID, stats: Mapping[str, int]) -> None:
    await conn.execute(WORKER_STOPPED, worker_id, orjson.dumps(dict(stats)).decode())


# The state of a worker, on the database's clock (the same expression in WORKERS_JSON).
_STATE = f"""CASE WHEN w.stopped_at IS NOT NULL THEN 'stopped'
     WHEN w.last_seen < now() - make_interval(secs => {GONE_AFTER_BEATS} * w.heartbeat_interval)
     THEN 'gone' ELSE 'alive' END"""

WORKERS_LIST = f"""
SELECT w.id, w.host, w.pid, w.queues, w.concurrency, w.running, w.version,
       w.heartbeat_interval, w.stats::text AS stats, w.started_at, w.last_seen, w.stopped_at,
       {_STATE} AS state
FROM pgtasks.workers AS w
WHERE $1::boolean OR (w.stopped_at IS NULL
                      AND w.last_seen >= now() - make_interval(
                          secs => {GONE_AFTER_BEATS} * w.heartbeat_interval))
ORDER BY w.host, w.pid, w.started_at
"""


async def workers_list(conn: Executor, *, everyone: bool) -> list[asyncpg.Record]:
    """The workers alive now (``everyone``: also those gone or stopped, until pruned)."""
    return list(await conn.fetch(WORKERS_LIST, everyone))


# The same rows as JSON (timestamps as epoch seconds), for the one-statement status.
WORKERS_JSON = f"""
SELECT coalesce(json_agg(json_build_object(
           'id', w.id, 'host', w.host, 'pid', w.pid, 'queues', w.queues,
           'concurrency', w.concurrency, 'running', w.running, 'version', w.version,
           'heartbeat_interval', w.heartbeat_interval, 'stats', w.stats,
           'started_at', extract(epoch FROM w.started_at),
           'last_seen', extract(epoch FROM w.last_seen),
           'stopped_at', extract(epoch FROM w.stopped_at),
           'state', {_STATE}) ORDER BY w.host, w.pid, w.started_at), '[]')
FROM pgtasks.workers AS w
WHERE $2::boolean OR (w.stopped_at IS NULL
                      AND w.last_seen >= now() - make_interval(
                          secs => {GONE_AFTER_BEATS} * w.heartbeat_interval))
"""

WORKERS_PRUNE = """
WITH gone AS (
    DELETE FROM pgtasks.workers
    WHERE last_seen < now() - $1::interval
      AND (stopped_at IS NOT NULL
           OR last_seen < now() - make_interval(secs => 3 * heartbeat_interval))
    RETURNING 1
) SELECT count(*) FROM gone
"""


async def workers_prune(conn: Executor, older_than: dt.timedelta) -> int:
    """Delete the rows of workers stopped or gone, last seen more than this long ago."""
    count: int = await conn.fetchval(WORKERS_PRUNE, older_than)
    return count
