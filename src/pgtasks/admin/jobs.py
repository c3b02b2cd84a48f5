"""Jobs as an operator sees them: one job in full (``pgtasks job show``), the newest jobs of a
queue by state or task (``pgtasks job list``), and cancelling jobs (``pgtasks cancel``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..db import attempt_errors, results
from ..db.connect import acquire_clean
from ..db.database import Database
from ..queues import check_queue_name


@dataclass(frozen=True)
class JobSummary:
    """One line of ``job list``."""

    queue: str
    id: int
    state: str
    task: str | None
    attempts: int | None
    enqueued_at: dt.datetime | None
    finished_at: dt.datetime | None


@dataclass(frozen=True)
class Attempt:
    """A failed attempt of a job."""

    attempt: int
    error_type: str
    message: str
    traceback: str | None
    worker: str
    failed_at: dt.datetime


@dataclass(frozen=True)
class JobDetail(JobSummary):
    """``job show``: a job's place or fate, its message, every failed attempt, and what it
    returned (as JSON, when kept) or why it ended."""

    message: Any = None
    headers: dict[str, Any] | None = None
    result: Any = None
    error: dict[str, Any] | None = None
    cancel_requested: bool = False
    attempts_failed: list[Attempt] = field(default_factory=list)


def _loads(text: str | None) -> Any:
    return orjson.loads(text) if text else None


async def job_list(
    database: Database,
    queue: str,
    *,
    state: str | None = None,
    task: str | None = None,
    limit: int = 50,
) -> list[JobSummary]:
    """The newest jobs of ``queue`` (in ``state``, of ``task``), at most ``limit``."""
    if state is not None and state not in results.STATE_SOURCES:
        known = ", ".join(s for s in results.STATE_SOURCES if s)
        raise ValueError(f"unknown state {state!r} (one of: {known})")
    pool = await database.pool()
    async with acquire_clean(pool) as conn:
        infos = await results.jobs_list(
            conn, check_queue_name(queue), state=state, task=task, limit=limit
        )
    return [
        JobSummary(queue, i.msg_id, i.state, i.task, i.attempts, i.enqueued_at, i.finished_at)
        for i in infos
    ]


async def job_show(database: Database, queue: str, msg_id: int) -> JobDetail:
    """Everything known of one job."""
    check_queue_name(queue)
    pool = await database.pool()
    async with acquire_clean(pool) as conn:
        (info,) = await results.job_info(conn, queue, [msg_id])
        body, headers = await results.job_message(conn, queue, msg_id)
        history = await attempt_errors.attempt_errors_of(conn, queue, msg_id)
    return JobDetail(
        queue,
        msg_id,
        info.state,
        info.task,
        info.attempts,
        info.enqueued_at,
        info.finished_at,
        message=_loads(body),
        headers=_loads(headers),
        result=_loads(info.result),
        error=_loads(info.error),
        cancel_requested=info.cancel_requested,
        attempts_failed=[
            Attempt(
                h["attempt"],
                h["error_type"],
                h["message"],
                h["traceback"],
                h["worker"],
                h["failed_at"],
            )
            for h in history
        ],
    )


async def cancel(database: Database, queue: str, ids: Sequence[int], ttl: float) -> list[str]:
    """Cancel jobs of one queue (see `pgtasks.JobRef.cancel`); an outcome per id."""
    pool = await database.pool()
    async with acquire_clean(pool) as conn:
        outcomes = dict(await results.jobs_cancel(conn, check_queue_name(queue), ids, ttl))
    return [outcomes[i] for i in ids]
