"""Jobs as an operator sees them, on the command line (``pgtasks job show``, ``job list``,
``cancel``) and in the dashboard: the jobs of a queue in one state, one job in full (its
arguments, headers, every failed attempt, what it returned or why it ended, and the
workflow it is a step of), the jobs a search names. Cancelling is the app's (`App.cancel`).

States are those of `pgtasks.JobState`: ``scheduled``, ``waiting``, ``running`` and
``retrying`` (in the queue, as ``pgtasks status`` counts them), ``succeeded`` (archived, or
recorded with its result), ``failed`` (in the dead letters, or recorded when its dead letter
was retried as a new job), ``cancelled`` and ``expired``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from ..db import browse, dead_letters, queues, results
from ..db.attempt_errors import attempt_errors_of
from ..db.database import Database
from ..db.workflows import WorkflowPlace, workflow_of_job
from ..exceptions import JobNotFound
from ..queues import QUEUE_NAME, check_queue_name
from .dead_letters import AttemptRecord

# The states a queue's jobs can be listed by, in the order the dashboard offers them.
STATES: tuple[str, ...] = (
    "waiting",
    "scheduled",
    "running",
    "retrying",
    "succeeded",
    "failed",
    "cancelled",
    "expired",
)


@dataclass(frozen=True)
class JobSummary:
    """A job in a list: where it is, what it runs, and when. ``visible_at`` is when a job in
    its queue is (or was) due; ``finished_at`` when it ended."""

    queue: str
    id: int
    task: str | None
    state: str
    attempt: int | None
    enqueued_at: dt.datetime | None
    visible_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class JobDetail:
    """One job in full. ``result`` is what it returned (as JSON) when kept; ``error`` why it
    ended when it did not succeed; ``dead_letter`` the id of the dead letter it became;
    ``retried_as`` the id of the job that dead letter was retried as."""

    summary: JobSummary
    body: Any = None
    headers: dict[str, Any] | None = None
    attempts: Sequence[AttemptRecord] = field(default_factory=list)
    result: Any = None
    error: dict[str, Any] | None = None
    cancel_requested: bool = False
    dead_letter: int | None = None
    reason: str | None = None  # why it was dead-lettered
    workflow: WorkflowPlace | None = None  # the workflow it is a step of
    retried_as: int | None = None


def _loads(text: str | None) -> Any:
    return orjson.loads(text) if text else None


def _from_browse(row: asyncpg.Record, queue: str, state: str) -> JobSummary:
    return JobSummary(
        queue=queue,
        id=row["msg_id"],
        task=row["task"],
        state=state,
        attempt=row["attempt"],
        enqueued_at=row["enqueued_at"],
        visible_at=row["vt"],
        finished_at=row["archived_at"],
        idempotency_key=row["idempotency_key"],
    )


def _from_info(info: results.JobInfo, queue: str) -> JobSummary:
    return JobSummary(
        queue=queue,
        id=info.msg_id,
        task=info.task,
        state=info.state,
        attempt=info.attempts,
        enqueued_at=info.enqueued_at,
        finished_at=info.finished_at,
    )


async def queue_names(database: Database) -> list[str]:
    """The queues (those pgtasks can name), by name."""
    return [q for q in await queues.queue_list(await database.pool()) if QUEUE_NAME.fullmatch(q)]


async def list_jobs(
    database: Database,
    queue: str,
    state: str | None = None,
    *,
    task: str | None = None,
    limit: int = 50,
) -> Sequence[JobSummary]:
    """Jobs of ``queue`` in ``state`` (any state when None; of ``task``, if given), at most
    ``limit``: next due first in the queue, newest first once over."""
    check_queue_name(queue)
    if state is not None and state not in STATES:
        raise ValueError(f"unknown state {state!r} (one of: {', '.join(STATES)})")
    pool = await database.pool()
    if state in browse.STATES:
        records = await browse.jobs_in_state(pool, queue, state, task, limit)
        return [_from_browse(r, queue, state) for r in records]
    # Any state, or one the dead letters and the job records know (failed, cancelled,
    # expired).
    infos = await results.jobs_list(pool, queue, state=state, task=task, limit=limit)
    return [_from_info(i, queue) for i in infos]


async def get_job(database: Database, queue: str, msg_id: int) -> JobDetail:
    """One job of ``queue``, wherever it is now, with every failed attempt and its outcome.
    Raises `JobNotFound` when nothing is known of it (never enqueued, or pruned)."""
    check_queue_name(queue)
    pool = await database.pool()
    (info,) = await results.job_info(pool, queue, [msg_id])
    history = [
        AttemptRecord(
            h["attempt"], h["error_type"], h["message"], h["traceback"], h["worker"], h["failed_at"]
        )
        for h in await attempt_errors_of(pool, queue, msg_id)
    ]
    outcome: dict[str, Any] = {
        "attempts": history,
        "result": _loads(info.result),
        "error": _loads(info.error),
        "cancel_requested": info.cancel_requested,
        "workflow": await workflow_of_job(pool, queue, msg_id),
    }
    known = info.state != "unknown"
    row = await browse.job_get(pool, queue, msg_id)
    if row is not None:
        summary = _from_browse(row, queue, info.state if known else row["state"])
        return JobDetail(summary, _loads(row["body"]), _loads(row["headers"]), **outcome)
    dead_id = await browse.dead_letter_of(pool, queue, msg_id)
    if dead_id is not None:
        dead, _ = await dead_letters.dead_get(pool, dead_id)
        assert dead is not None
        summary = JobSummary(
            queue=queue,
            id=msg_id,
            task=dead["task"],
            state=info.state if known else "failed",
            attempt=dead["read_ct"],
            enqueued_at=dead["enqueued_at"],
            finished_at=dead["failed_at"],
        )
        body, headers = _loads(dead["message"]), _loads(dead["headers"])
        return JobDetail(
            summary, body, headers, dead_letter=dead_id, reason=dead["reason"], **outcome
        )
    again = results.retried_as(outcome["error"]) if info.state == "failed" else None
    if again is not None:  # its dead letter was retried: the new job has the same message
        body, headers = await results.job_message(pool, queue, again)
        summary = _from_info(info, queue)
        return JobDetail(summary, _loads(body), _loads(headers), retried_as=again, **outcome)
    if known:  # deleted from its queue, but recorded (cancelled, expired, or its result kept)
        return JobDetail(_from_info(info, queue), **outcome)
    raise JobNotFound(
        f"no job {msg_id} in queue {queue!r}: not waiting or running, not archived, not a "
        "dead letter and not recorded (it may have been deleted after success, or pruned)"
    )


async def find(database: Database, text: str) -> list[JobSummary]:
    """The jobs a search names: an idempotency key, or a job id (in every queue where a
    job has it). Searching by task is `list_jobs` with ``task``."""
    text = text.strip()
    found: list[JobSummary] = []
    pool = await database.pool()
    holder = await browse.key_holder(pool, text)
    if holder is not None:
        with contextlib.suppress(JobNotFound):
            found.append((await get_job(database, *holder)).summary)
    if text.isdigit() and len(text) < 19:
        for queue in await queue_names(database):
            try:
                found.append((await get_job(database, queue, int(text))).summary)
            except JobNotFound:
                continue
    return found
