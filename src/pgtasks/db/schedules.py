"""The SQL of ``pgtasks.schedules`` (migrations/0008_schedules.sql has the functions): what a
scheduler writes (its definitions, its passes) and what the operator reads and changes
(the listing, pause, resume, trigger, delete).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any, NamedTuple

import asyncpg

from ..periodic.schedule import Definition
from .sql import Executor

# --- the scheduler ------------------------------------------------------------------------

_DEFINITIONS = """
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::text[]::jsonb[], $9::text[]::jsonb[], $10::text[])
    AS d(name, task, queue, kind, expression, timezone, catch_up, message, headers, fingerprint)
"""

# At a scheduler's start: its definitions become the rows' (the process started last wins,
# which in a rolling deploy is the new code). A schedule whose timing changed starts over
# from now: the ticks of the old timing are not ticks of the new one.
_DEFINE = """
ON CONFLICT (name) DO UPDATE SET
    task = EXCLUDED.task, queue = EXCLUDED.queue, kind = EXCLUDED.kind,
    expression = EXCLUDED.expression, timezone = EXCLUDED.timezone,
    catch_up = EXCLUDED.catch_up, message = EXCLUDED.message, headers = EXCLUDED.headers,
    fingerprint = EXCLUDED.fingerprint,
    watermark = CASE
        WHEN (s.kind, s.expression, s.timezone)
             IS DISTINCT FROM (EXCLUDED.kind, EXCLUDED.expression, EXCLUDED.timezone)
        THEN greatest(s.watermark, now()) ELSE s.watermark END,
    updated_at = CASE WHEN s.fingerprint <> EXCLUDED.fingerprint THEN now()
                      ELSE s.updated_at END,
    orphaned_at = NULL,
    seen_at = now()
"""
SCHEDULES_DEFINE = f"""
INSERT INTO pgtasks.schedules AS s
    (name, task, queue, kind, expression, timezone, catch_up, message, headers, fingerprint)
{_DEFINITIONS}{_DEFINE}"""

# Every sync interval: "this process still defines these". A row deleted meanwhile is made
# again; a row that another running process defines differently is left to it, but one
# that nobody else defines any more (orphaned: that process is gone, as after a rollback,
# or an old process restarted during a deploy) is defined again by this one.
SCHEDULES_REFRESH = f"""{SCHEDULES_DEFINE}
WHERE s.fingerprint = EXCLUDED.fingerprint OR s.orphaned_at IS NOT NULL
"""

# Rows no running scheduler has defined for a while: marked, and no longer fired.
SCHEDULES_SWEEP = """
UPDATE pgtasks.schedules SET orphaned_at = now()
WHERE orphaned_at IS NULL AND seen_at < now() - make_interval(secs => $1::float8)
RETURNING name
"""


def _columns(definitions: Sequence[Definition]) -> list[list[Any]]:
    fields = (
        "name",
        "task",
        "queue",
        "kind",
        "expression",
        "timezone",
        "catch_up",
        "message",
        "headers",
        "fingerprint",
    )
    # in one order everywhere: schedulers writing the same rows at once lock them in the
    # same order, and cannot deadlock
    ordered = sorted(definitions, key=lambda d: d.name)
    return [[getattr(d, f) for d in ordered] for f in fields]


async def schedules_define(conn: Executor, definitions: Sequence[Definition]) -> None:
    """Write these definitions to their rows."""
    await conn.execute(SCHEDULES_DEFINE, *_columns(definitions))


async def schedules_refresh(conn: Executor, definitions: Sequence[Definition]) -> None:
    await conn.execute(SCHEDULES_REFRESH, *_columns(definitions))


async def schedules_sweep(conn: Executor, orphan_after: float) -> list[str]:
    """Mark the schedules not defined by any scheduler for ``orphan_after`` seconds."""
    rows = await conn.fetch(SCHEDULES_SWEEP, orphan_after)
    return [r[0] for r in rows]


class ScheduleState(NamedTuple):
    name: str
    fingerprint: str
    watermark: dt.datetime
    paused: bool
    orphaned: bool
    next_tick: dt.datetime | None  # as the row has it, for listings


SCHEDULES_STATE = """
WITH clock AS (SELECT clock_timestamp() AS now)
SELECT clock.now, s.name, s.fingerprint, s.watermark,
       s.paused_at IS NOT NULL, s.orphaned_at IS NOT NULL, s.next_tick
FROM clock LEFT JOIN pgtasks.schedules AS s ON s.name = ANY($1::text[])
"""


async def schedules_state(
    conn: Executor, names: Sequence[str]
) -> tuple[dt.datetime, dict[str, ScheduleState]]:
    """The database's clock, and the rows of these schedules (those that exist)."""
    rows = await conn.fetch(SCHEDULES_STATE, list(names))
    now: dt.datetime = rows[0][0]
    return now, {r[1]: ScheduleState(*r[1:]) for r in rows if r[1] is not None}


# For listings only: a pass that fires nothing (a schedule not due yet since its start or its
# resume) still says when it ticks next. Nothing else of the row moves.
SCHEDULE_NEXT_TICK = """
UPDATE pgtasks.schedules SET next_tick = $3::timestamptz
WHERE name = $1::text AND fingerprint = $2::text AND next_tick IS DISTINCT FROM $3::timestamptz
"""


async def schedule_next_tick(
    conn: Executor, name: str, fingerprint: str, next_tick: dt.datetime | None
) -> None:
    await conn.execute(SCHEDULE_NEXT_TICK, name, fingerprint, next_tick)


SCHEDULE_FIRE = """
SELECT state, tick, msg_id, deduplicated
FROM pgtasks.schedule_fire($1::text, $2::text, $3::timestamptz[], $4::timestamptz,
                           $5::timestamptz)
"""


class Fired(NamedTuple):
    state: str  # fired, nothing, early, paused, orphaned, changed, missing
    sent: list[tuple[dt.datetime, int, bool]]  # (tick, msg_id, deduplicated)


async def schedule_fire(
    conn: Executor,
    name: str,
    fingerprint: str,
    ticks: Sequence[dt.datetime],
    advance_to: dt.datetime,
    next_tick: dt.datetime | None,
) -> Fired:
    """Enqueue these ticks of a schedule (those still after its watermark) and move the
    watermark to ``advance_to``, in one transaction; see ``pgtasks.schedule_fire``."""
    rows = await conn.fetch(SCHEDULE_FIRE, name, fingerprint, list(ticks), advance_to, next_tick)
    state: str = rows[0][0]
    return Fired(state, [(r[1], r[2], r[3]) for r in rows if r[1] is not None])


# --- the operator -------------------------------------------------------------------------


class ScheduleRow(NamedTuple):
    name: str
    task: str
    queue: str
    kind: str
    expression: str
    timezone: str
    catch_up: str
    watermark: dt.datetime
    next_tick: dt.datetime | None
    last_tick: dt.datetime | None
    last_msg_id: int | None
    last_queue: str | None
    last_job: str | None  # waiting, running, retrying, succeeded, dead, or None
    paused_at: dt.datetime | None
    orphaned_at: dt.datetime | None
    seen_at: dt.datetime
    created_at: dt.datetime
    updated_at: dt.datetime
    now: dt.datetime


SCHEDULES_LIST = """
SELECT name, task, queue, kind, expression, timezone, catch_up, watermark, next_tick,
       last_tick, last_msg_id, last_queue,
       pgtasks.schedule_job_state(last_queue, last_msg_id, last_key),
       paused_at, orphaned_at, seen_at, created_at, updated_at, clock_timestamp()
FROM pgtasks.schedules
WHERE $1::text IS NULL OR name = $1::text
ORDER BY name
"""


async def schedules_list(conn: Executor, name: str | None = None) -> list[ScheduleRow]:
    rows = await conn.fetch(SCHEDULES_LIST, name)
    return [ScheduleRow(*r) for r in rows]


SCHEDULE_PAUSE = """
UPDATE pgtasks.schedules SET paused_at = coalesce(paused_at, now())
WHERE name = $1::text RETURNING name
"""

# The ticks of the pause are not caught up: the schedule goes on from now.
SCHEDULE_RESUME = """
UPDATE pgtasks.schedules
SET paused_at = NULL,
    watermark = CASE WHEN paused_at IS NOT NULL THEN greatest(watermark, now())
                     ELSE watermark END
WHERE name = $1::text RETURNING name
"""

SCHEDULE_DELETE = "DELETE FROM pgtasks.schedules WHERE name = $1::text RETURNING name"


async def schedule_pause(conn: Executor, name: str) -> bool:
    """False when there is no such schedule."""
    return await conn.fetchval(SCHEDULE_PAUSE, name) is not None


async def schedule_resume(conn: Executor, name: str) -> bool:
    return await conn.fetchval(SCHEDULE_RESUME, name) is not None


async def schedule_delete(conn: Executor, name: str) -> bool:
    return await conn.fetchval(SCHEDULE_DELETE, name) is not None


SCHEDULE_TRIGGER = """
SELECT tick, msg_id, deduplicated, queue, task FROM pgtasks.schedule_trigger($1::text)
"""


async def schedule_trigger(conn: Executor, name: str) -> asyncpg.Record:
    """Enqueue the schedule's job once, now: (tick, msg_id, deduplicated, queue, task). Raises
    `asyncpg.NoDataFoundError` for no such schedule, and
    `asyncpg.ObjectNotInPrerequisiteStateError` for an orphaned one."""
    row = await conn.fetchrow(SCHEDULE_TRIGGER, name)
    assert row is not None
    return row
