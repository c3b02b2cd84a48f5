"""Workers as an operator sees them: who is running, where, on which queues, how busy, and
since when, from the rows their heartbeats keep in ``pgtasks.workers`` (never by reaching
into a running worker).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from ..db import workers
from ..db.database import Database

WorkerState = Literal["alive", "gone", "stopped"]


@dataclass(frozen=True)
class WorkerInfo:
    """One worker process, as its heartbeats left it.

    Attributes:
        id: a new random id per run of a worker.
        host: the machine's host name.
        pid: the process id on that host.
        queues: the queues it serves.
        concurrency: how many jobs it runs at most at once.
        running: how many it ran at its last heartbeat.
        version: the pgtasks version it runs.
        heartbeat_interval: seconds between its heartbeats.
        stats: jobs by outcome since it started (succeeded, failed, retried, dead, ...).
        started_at: when it started.
        last_seen: its last heartbeat.
        stopped_at: when it stopped cleanly, else None.
        state: ``alive``; ``gone`` once it missed three heartbeats (crashed, killed, cut
            off from the database); ``stopped`` after a clean stop.
    """

    id: uuid.UUID
    host: str
    pid: int
    queues: tuple[str, ...]
    concurrency: int
    running: int
    version: str
    heartbeat_interval: float
    started_at: dt.datetime
    last_seen: dt.datetime
    state: WorkerState
    stopped_at: dt.datetime | None = None
    stats: Mapping[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``host:pid``, as the error history names workers."""
        return f"{self.host}:{self.pid}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "name": self.name,
            "host": self.host,
            "pid": self.pid,
            "queues": list(self.queues),
            "concurrency": self.concurrency,
            "running": self.running,
            "version": self.version,
            "heartbeat_interval": self.heartbeat_interval,
            "started_at": self.started_at,
            "last_seen": self.last_seen,
            "stopped_at": self.stopped_at,
            "state": self.state,
            "stats": dict(self.stats),
        }


def _epoch(value: float | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromtimestamp(value, dt.timezone.utc)


def from_json(item: Mapping[str, Any]) -> WorkerInfo:
    """A worker from the JSON form of its row (`db.workers.WORKERS_JSON`)."""
    started = _epoch(item["started_at"])
    seen = _epoch(item["last_seen"])
    assert started is not None
    assert seen is not None
    return WorkerInfo(
        id=uuid.UUID(item["id"]),
        host=item["host"],
        pid=item["pid"],
        queues=tuple(item["queues"]),
        concurrency=item["concurrency"],
        running=item["running"],
        version=item["version"],
        heartbeat_interval=item["heartbeat_interval"],
        started_at=started,
        last_seen=seen,
        stopped_at=_epoch(item["stopped_at"]),
        state=item["state"],
        stats=item["stats"] or {},
    )


async def list_workers(database: Database, *, everyone: bool = False) -> Sequence[WorkerInfo]:
    """The workers alive now, by host and pid; with ``everyone``, also those gone or
    stopped that `prune` has not deleted yet."""
    rows = await workers.workers_list(await database.pool(), everyone=everyone)
    return [
        WorkerInfo(
            id=r["id"],
            host=r["host"],
            pid=r["pid"],
            queues=tuple(r["queues"]),
            concurrency=r["concurrency"],
            running=r["running"],
            version=r["version"],
            heartbeat_interval=r["heartbeat_interval"],
            started_at=r["started_at"],
            last_seen=r["last_seen"],
            stopped_at=r["stopped_at"],
            state=r["state"],
            stats=orjson.loads(r["stats"]),
        )
        for r in rows
    ]
