"""Jobs as an operator browses them (the dashboard): a queue's jobs in one state, one job
with its arguments, headers and every failed attempt, and the job an id, a task name or an
idempotency key points to. Read through `db.browse`, never from a worker.

States: ``waiting``, ``scheduled``, ``running`` and ``retrying`` (in the queue, as defined
for ``pgtasks status``), ``done`` (archived after success) and ``dead`` (in the dead
letters).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg
import orjson

from ..db import browse, dead_letters, queues
from ..db.attempt_errors import attempt_errors_of
from ..db.database import Database
from ..exceptions import JobNotFound
from ..queues import QUEUE_NAME
from .dead_letters import AttemptRecord

JobState = Literal["waiting", "scheduled", "running", "retrying", "done", "dead"]
STATES: tuple[JobState, ...] = ("waiting", "scheduled", "running", "retrying", "done", "dead")


@dataclass(frozen=True)
class JobSummary:
    """A job in a list: where it is, what it runs, and when."""

    queue: str
    id: int
    task: str | None
    state: JobState
    attempt: int
    enqueued_at: dt.datetime
    visible_at: dt.datetime | None  # in its queue: when it is (or was) due
    archived_at: dt.datetime | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class JobDetail:
    """One job in full. ``dead_letter`` is the id of the dead letter it became, if any."""

    summary: JobSummary
    body: Any
    headers: dict[str, Any] | None
    attempts: Sequence[AttemptRecord] = field(default_factory=list)
    dead_letter: int | None = None
    reason: str | None = None  # why it was dead-lettered


def _summary(row: asyncpg.Record, queue: str, state: str) -> JobSummary:
    return JobSummary(
        queue=queue,
        id=row["msg_id"],
        task=row["task"],
        state=state,  # type: ignore[arg-type]
        attempt=row["attempt"],
        enqueued_at=row["enqueued_at"],
        visible_at=row["vt"],
        archived_at=row["archived_at"],
        idempotency_key=row["idempotency_key"],
    )


def _loads(text: str | None) -> Any:
    return orjson.loads(text) if text else None


async def queue_names(database: Database) -> list[str]:
    """The queues (those pgtasks can name), by name."""
    return [q for q in await queues.queue_list(await database.pool()) if QUEUE_NAME.fullmatch(q)]


async def list_jobs(
    database: Database,
    queue: str,
    state: JobState,
    *,
    task: str | None = None,
    limit: int = 50,
) -> Sequence[JobSummary]:
    """Jobs of ``queue`` in ``state`` (of ``task``, if given), at most ``limit``: next due
    first in the queue, newest first when done or dead."""
    pool = await database.pool()
    if state == "dead":
        rows = await dead_letters.dead_list(pool, queue, task, limit)
        return [
            JobSummary(
                queue=r["queue"],
                id=r["msg_id"],
                task=r["task"],
                state="dead",
                attempt=r["read_ct"],
                enqueued_at=r["enqueued_at"],
                visible_at=None,
                archived_at=r["failed_at"],
            )
            for r in rows
        ]
    records = await browse.jobs_in_state(pool, queue, state, task, limit)
    return [_summary(r, queue, state) for r in records]


async def get_job(database: Database, queue: str, msg_id: int) -> JobDetail:
    """One job of ``queue``, wherever it is now, with every failed attempt. Raises
    `JobNotFound` when it is in neither its queue, the archive nor the dead letters."""
    pool = await database.pool()
    row = await browse.job_get(pool, queue, msg_id)
    history = [
        AttemptRecord(
            h["attempt"], h["error_type"], h["message"], h["traceback"], h["worker"], h["failed_at"]
        )
        for h in await attempt_errors_of(pool, queue, msg_id)
    ]
    if row is not None:
        return JobDetail(
            summary=_summary(row, queue, row["state"]),
            body=_loads(row["body"]),
            headers=_loads(row["headers"]),
            attempts=history,
        )
    dead_id = await browse.dead_letter_of(pool, queue, msg_id)
    if dead_id is None:
        raise JobNotFound(
            f"no job {msg_id} in queue {queue!r}: not waiting or running, not archived and "
            "not a dead letter (it may have been deleted after success, or pruned)"
        )
    dead, _ = await dead_letters.dead_get(pool, dead_id)
    assert dead is not None
    return JobDetail(
        summary=JobSummary(
            queue=queue,
            id=msg_id,
            task=dead["task"],
            state="dead",
            attempt=dead["read_ct"],
            enqueued_at=dead["enqueued_at"],
            visible_at=None,
            archived_at=dead["failed_at"],
        ),
        body=_loads(dead["message"]),
        headers=_loads(dead["headers"]),
        attempts=history,
        dead_letter=dead_id,
        reason=dead["reason"],
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
