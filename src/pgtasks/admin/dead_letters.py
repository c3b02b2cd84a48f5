"""Dead letters: jobs that will not be run again unless someone decides so.

A message lands in ``pgtasks.dead_letters`` when its retries run out, when it raises `Fail`,
when it cannot be decoded or does not fit its task's signature, or when it was claimed more
often than its policy allows (runs that crashed the worker). The move is one statement with
the removal from the queue, guarded by ownership, and it releases the job's idempotency key.
Every failed attempt's error stays in ``pgtasks.attempt_errors`` for `DeadLetters.get`.

``app.dead_letters`` is the API; ``python -m pgtasks dead list|show|retry|purge`` the CLI.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from ..db import dead_letters
from ..db.database import Database
from ..exceptions import JobNotFound
from ..tasks import JobRef, Jobs


@dataclass(frozen=True)
class AttemptRecord:
    """One failed attempt of a job."""

    attempt: int
    error_type: str
    message: str
    traceback: str | None
    worker: str
    failed_at: dt.datetime


@dataclass(frozen=True)
class DeadLetter:
    """A dead-lettered job. ``message``, ``headers``, ``error`` and ``history`` are filled by
    `DeadLetters.get` only."""

    id: int
    queue: str
    msg_id: int
    task: str | None
    attempts: int
    enqueued_at: dt.datetime
    failed_at: dt.datetime
    reason: str
    message: Any = None
    headers: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    history: list[AttemptRecord] = field(default_factory=list)


def _loads(text: str | None) -> Any:
    return orjson.loads(text) if text else None


def _summary(row: asyncpg.Record, **extra: Any) -> DeadLetter:
    return DeadLetter(
        id=row["id"],
        queue=row["queue"],
        msg_id=row["msg_id"],
        task=row["task"],
        attempts=row["read_ct"],
        enqueued_at=row["enqueued_at"],
        failed_at=row["failed_at"],
        reason=row["reason"],
        **extra,
    )


def _not_found(ids: Sequence[int], queue: str | None, *, retried: bool = False) -> str:
    where = f" in queue {queue!r}" if queue else ""
    text = (
        f"no dead letter with id {ids[0]}{where}"
        if len(ids) == 1
        else f"no dead letters with ids {', '.join(map(str, ids))}{where}"
    )
    return text + ("; nothing was retried" if retried else "")


class DeadLetters:
    """The dead letters of an app's database; get it as ``app.dead_letters``.

    ``jobs`` is what the refs `retry` returns ask (the app's job client: they are handles
    like those ``defer`` returns); ``record_ttl`` how long, in seconds, the record of a
    retried dead letter's job (failed, retried as a new job) is kept.
    """

    def __init__(self, database: Database, jobs: Jobs, *, record_ttl: float) -> None:
        self._database = database
        self._jobs = jobs
        self._record_ttl = record_ttl

    async def list(
        self,
        *,
        queue: str | None = None,
        task: str | None = None,
        limit: int = 100,
        before: int | None = None,
    ) -> Sequence[DeadLetter]:
        """The newest dead letters, optionally of one queue or task (and with an id below
        ``before``: the next page of a list, after its last id)."""
        pool = await self._database.pool()
        rows = await dead_letters.dead_list(pool, queue, task, limit, before)
        return [_summary(r) for r in rows]

    async def get(self, dead_id: int) -> DeadLetter:
        """One dead letter with its payload and the error of every attempt."""
        row, history = await dead_letters.dead_get(await self._database.pool(), dead_id)
        if row is None:
            raise JobNotFound(_not_found([dead_id], None))
        return _summary(
            row,
            message=_loads(row["message"]),
            headers=_loads(row["headers"]),
            error=_loads(row["error"]),
            history=[
                AttemptRecord(
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

    async def retry(self, ids: Sequence[int], *, queue: str | None = None) -> Sequence[JobRef[Any]]:
        """Enqueue these dead letters again, as new jobs with fresh attempts, and remove
        them from the dead letters, in one transaction; the refs (handles on the new jobs)
        are in the order of the dead letters' ids. The job each dead letter was still
        answers ``failed``, and names the new job (`JobStatus.retried_as`). Raises
        `JobNotFound`, naming them, if any id is not a dead letter (of ``queue``, if given);
        nothing is retried then."""
        return [ref for _, ref in await self.retry_by_id(ids, queue=queue)]

    async def retry_all(self, *, queue: str | None = None) -> Sequence[JobRef[Any]]:
        """`retry` every dead letter (of ``queue``, if given)."""
        return [ref for _, ref in await self.retry_by_id(None, queue=queue)]

    async def retry_by_id(
        self, ids: Sequence[int] | None, *, queue: str | None = None
    ) -> Sequence[tuple[int, JobRef[Any]]]:
        """`retry` (with ``ids=None``, `retry_all`), returning each dead letter's id with
        the job it became."""
        ids = None if ids is None else list(ids)
        pool = await self._database.pool()
        async with pool.acquire() as conn, conn.transaction():
            rows = await dead_letters.dead_retry(conn, ids, queue, self._record_ttl)
            if ids is not None:
                missing = sorted(set(ids) - {r["id"] for r in rows})
                if missing:  # rolls the others back: all or nothing
                    raise JobNotFound(_not_found(missing, queue, retried=len(rows) > 0))
        return [
            (
                r["id"],
                JobRef(
                    r["msg_id"], r["queue"], r["task"] or "", r["deduplicated"], jobs=self._jobs
                ),
            )
            for r in rows
        ]

    async def count(self, *, queue: str | None = None) -> int:
        """How many dead letters there are (of ``queue``, if given)."""
        return await dead_letters.dead_count(await self._database.pool(), queue)

    async def delete(self, ids: Sequence[int]) -> Sequence[int]:
        """Delete these dead letters (the dashboard's "purge selected"); returns the ids
        that existed. Ids that are not dead letters are skipped."""
        return await dead_letters.dead_delete(await self._database.pool(), ids)

    async def purge(
        self, *, older_than: dt.timedelta | None = None, queue: str | None = None
    ) -> int:
        """Delete dead letters (failed before ``older_than`` ago, of ``queue``); returns how
        many."""
        return await dead_letters.dead_purge(await self._database.pool(), older_than, queue)
