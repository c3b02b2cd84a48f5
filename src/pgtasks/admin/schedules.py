"""Schedules as an operator sees them (``pgtasks schedules``): the list, with each one's
state, next and last tick and the state of its last job; pause, resume, trigger (run now,
once) and delete. And the built-in prune task that ``app.schedule_prune`` schedules.

These work on the rows alone (``pgtasks.schedules``), so they need no app code: a
schedule's row holds the message it sends.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from ..db import schedules as sql
from ..db.database import Database
from ..exceptions import ScheduleNotFound
from ..tasks import JobRef, Task
from .maintenance import ERRORS_OLDER_THAN, WORKERS_OLDER_THAN, WORKFLOWS_OLDER_THAN

PRUNE_TASK = "pgtasks.prune"


@dataclass(frozen=True)
class ScheduleInfo:
    """One schedule's row, as the listing shows it.

    ``state`` is ``active``, ``paused`` or ``orphaned`` (no running scheduler has defined it
    for a while: it does not fire); ``next_tick`` is None unless it is active. ``last_job``
    is the state of the job of its last tick or trigger: ``waiting``, ``running``,
    ``retrying``, ``succeeded``, ``dead``, or None (none yet, or no longer known: pruned,
    deleted by hand); ``last_job_id`` and ``last_job_queue`` say which job that is (its
    queue is the schedule's, unless the schedule moved to another queue since).
    """

    name: str
    task: str
    queue: str
    kind: str
    expression: str
    timezone: str
    catch_up: str
    state: str
    next_tick: dt.datetime | None
    last_tick: dt.datetime | None
    last_job: str | None
    last_job_id: int | None
    last_job_queue: str | None
    seen_at: dt.datetime
    paused_at: dt.datetime | None
    orphaned_at: dt.datetime | None

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.task,
            "queue": self.queue,
            "kind": self.kind,
            "expression": self.expression,
            "timezone": self.timezone,
            "catch_up": self.catch_up,
            "state": self.state,
            "next_tick": self.next_tick,
            "last_tick": self.last_tick,
            "last_job": self.last_job,
            "last_job_id": self.last_job_id,
            "last_job_queue": self.last_job_queue,
            "seen_at": self.seen_at,
            "paused_at": self.paused_at,
            "orphaned_at": self.orphaned_at,
        }


def _info(row: sql.ScheduleRow, orphan_after: float) -> ScheduleInfo:
    stale = row.seen_at < row.now - dt.timedelta(seconds=orphan_after)
    if row.orphaned_at is not None or stale:
        state = "orphaned"
    elif row.paused_at is not None:
        state = "paused"
    else:
        state = "active"
    return ScheduleInfo(
        name=row.name,
        task=row.task,
        queue=row.queue,
        kind=row.kind,
        expression=row.expression,
        timezone=row.timezone,
        catch_up=row.catch_up,
        state=state,
        next_tick=row.next_tick if state == "active" else None,
        last_tick=row.last_tick,
        last_job=row.last_job,
        last_job_id=row.last_msg_id,
        last_job_queue=row.last_queue,
        seen_at=row.seen_at,
        paused_at=row.paused_at,
        orphaned_at=row.orphaned_at,
    )


async def list_schedules(database: Database, *, orphan_after: float = 300.0) -> list[ScheduleInfo]:
    """Every schedule in the database, by name. A schedule whose schedulers stopped
    defining it more than ``orphan_after`` seconds ago shows as orphaned even before a
    scheduler marks it."""
    rows = await sql.schedules_list(await database.pool())
    return [_info(r, orphan_after) for r in rows]


async def pause(database: Database, name: str) -> None:
    """Stop enqueueing this schedule's ticks (until `resume`)."""
    if not await sql.schedule_pause(await database.pool(), name):
        raise ScheduleNotFound(f"no schedule named {name!r}")


async def resume(database: Database, name: str) -> None:
    """Enqueue this schedule's ticks again, from now on: the ticks of the pause are not
    caught up."""
    if not await sql.schedule_resume(await database.pool(), name):
        raise ScheduleNotFound(f"no schedule named {name!r}")


async def delete(database: Database, name: str) -> None:
    """Forget a schedule's row (its history: last tick, last job). Meant for orphaned
    schedules: the schedulers that still define one write its row again."""
    if not await sql.schedule_delete(await database.pool(), name):
        raise ScheduleNotFound(f"no schedule named {name!r}")


async def trigger(database: Database, name: str) -> JobRef[Any]:
    """Enqueue the schedule's job once, now (its ``scheduled_at`` is the database's now);
    the schedule's own ticks are not affected."""
    try:
        row = await sql.schedule_trigger(await database.pool(), name)
    except asyncpg.NoDataFoundError:
        raise ScheduleNotFound(f"no schedule named {name!r}") from None
    except asyncpg.ObjectNotInPrerequisiteStateError as exc:
        raise ScheduleNotFound(f"{exc}; it cannot be triggered") from None
    return JobRef(row["msg_id"], row["queue"], row["task"], row["deduplicated"])


def prune_task(
    prune: Callable[..., Awaitable[dict[str, int]]], queue: str
) -> Task[..., dict[str, int]]:
    """The task ``app.schedule_prune`` schedules: ``prune`` (`App.prune`), with its ages in
    seconds (no ``archive_older_than``: the app's ``archive_retention``, on its queues).
    ``workers_older_than`` and ``workflows_older_than`` come as keywords, and only when
    not the default: a schedule that does not set them keeps the arguments a worker of an
    earlier version accepts."""

    async def prune_job(
        errors_older_than: float = ERRORS_OLDER_THAN.total_seconds(),
        archive_older_than: float | None = None,
        *,
        workers_older_than: float = WORKERS_OLDER_THAN.total_seconds(),
        workflows_older_than: float = WORKFLOWS_OLDER_THAN.total_seconds(),
    ) -> dict[str, int]:
        return await prune(
            errors_older_than=dt.timedelta(seconds=errors_older_than),
            archive_older_than=(
                dt.timedelta(seconds=archive_older_than) if archive_older_than is not None else None
            ),
            workers_older_than=dt.timedelta(seconds=workers_older_than),
            workflows_older_than=dt.timedelta(seconds=workflows_older_than),
        )

    return Task(prune_job, name=PRUNE_TASK, queue=queue)
