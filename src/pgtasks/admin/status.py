"""What ``pgtasks status``, the metrics and the dashboard show: every queue's jobs by state,
its oldest waiting job, what was done and what failed in the last minute and hour, its dead
letters, and the workers. One statement per snapshot (`db.status`).

The states of a job in its queue (precise definitions in docs/operations.md, "Status"):
*waiting* (visible, no worker holds it), *scheduled* (deferred for later, never claimed),
*running* (claimed, under a lease, its attempt has not failed) and *retrying* (its attempt
failed; it waits out the backoff). Counts stop after ``cap`` rows of an index; beyond it a
number is estimated or a lower bound, and says which.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..db import status as status_sql
from ..db.database import Database
from .workers import WorkerInfo, from_json

DEFAULT_CAP = status_sql.DEFAULT_CAP

COUNTS = (
    "waiting",
    "scheduled",
    "running",
    "retrying",
    "dead_letters",
    "done_1m",
    "done_1h",
    "failed_1m",
    "failed_1h",
)


@dataclass(frozen=True)
class QueueState:
    """One queue at one moment.

    Attributes:
        queue: its name.
        waiting: visible now, held by no worker.
        scheduled: deferred for later (a delay or an eta), never claimed yet.
        running: claimed by a worker, under its lease.
        retrying: its last attempt failed; visible again after the backoff.
        dead_letters: in the dead letters.
        oldest_waiting_seconds: how long the first waiting job in line has been due; None
            when nothing waits.
        done_1m: jobs archived after success in the last minute (none are counted for
            tasks with ``on_success="delete"``, which leave no archive).
        done_1h: the same, in the last hour.
        failed_1m: failed attempts (and jobs dead-lettered without running) in the last
            minute.
        failed_1h: the same, in the last hour.
        workers: workers alive now that serve this queue.
        estimated: the fields that are estimates (their count went past the cap).
        at_least: the fields that are lower bounds (the count stopped at the cap).
    """

    queue: str
    waiting: int
    scheduled: int
    running: int
    retrying: int
    dead_letters: int
    oldest_waiting_seconds: float | None
    done_1m: int
    done_1h: int
    failed_1m: int
    failed_1h: int
    workers: int = 0
    estimated: frozenset[str] = frozenset()
    at_least: frozenset[str] = frozenset()

    def exact(self, name: str) -> bool:
        """Whether that field is an exact count."""
        return name not in self.estimated and name not in self.at_least

    def to_json(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            **{name: getattr(self, name) for name in COUNTS},
            "oldest_waiting_seconds": self.oldest_waiting_seconds,
            "workers": self.workers,
            "estimated": sorted(self.estimated),
            "at_least": sorted(self.at_least),
        }


@dataclass(frozen=True)
class Status:
    """A snapshot: every queue, the workers, and when it was taken (the database's clock)."""

    at: dt.datetime
    queues: Sequence[QueueState]
    workers: Sequence[WorkerInfo] = field(default_factory=list)

    @property
    def dead_letters(self) -> int:
        """Dead letters of every queue."""
        return sum(q.dead_letters for q in self.queues)

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "queues": [q.to_json() for q in self.queues],
            "workers": [w.to_json() for w in self.workers],
            "dead_letters": self.dead_letters,
        }


def _queue(row: Mapping[str, Any], workers: Sequence[WorkerInfo]) -> QueueState:
    name = row["queue"]
    return QueueState(
        queue=name,
        waiting=row["waiting"],
        scheduled=row["scheduled"],
        running=row["running"],
        retrying=row["retrying"],
        dead_letters=row["dead_letters"],
        oldest_waiting_seconds=row["oldest_waiting_s"],
        done_1m=row["done_1m"],
        done_1h=row["done_1h"],
        failed_1m=row["failed_1m"],
        failed_1h=row["failed_1h"],
        workers=sum(1 for w in workers if w.state == "alive" and name in w.queues),
        estimated=frozenset(row["estimated"] or ()),
        at_least=frozenset(row["at_least"] or ()),
    )


async def status(database: Database, *, cap: int = DEFAULT_CAP, everyone: bool = False) -> Status:
    """A snapshot of every queue and the workers alive (``everyone``: also those gone or
    stopped, until pruned), in one statement; counts walk at most ``cap`` index rows."""
    queues, workers, at = await status_sql.status_snapshot(
        await database.pool(), cap=cap, everyone=everyone
    )
    infos = [from_json(w) for w in workers]
    return Status(
        at=dt.datetime.fromtimestamp(at, dt.timezone.utc),
        queues=[_queue(q, infos) for q in queues],
        workers=infos,
    )
