"""What a running job knows about itself: `current_job` and its `JobContext`.

`JobContext` is set in a context variable for the duration of one run, so task code (and
anything it calls) can read ``pgtasks.current_job().attempt`` without threading it through.
(The events a worker emits about jobs are `worker.events.JobEvent`.)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, NamedTuple

from ._shared import Connection


class JobControl:
    """What changes about a running job while it runs: whether its run has been asked to
    stop, and why. The worker also cancels an ``async def`` run at its next ``await``; a
    task that computes in long loops, and a plain ``def`` task (a thread cannot be
    interrupted), checks `cancel_requested` to stop early."""

    __slots__ = ("cancel_reason", "cancel_requested")

    def __init__(self) -> None:
        self.cancel_requested = False
        self.cancel_reason: str | None = None


_NO_CONTROL = JobControl()


class JobContext(NamedTuple):
    """The job being run (immutable: a named tuple, as the worker makes one per job).

    Attributes:
        id: the pgmq message id.
        queue: the queue it was claimed from.
        task: the task name.
        attempt: pgmq's ``read_ct``: 1 on the first run, 2 on the first retry, ...
        enqueued_at: when the message was sent (the sender's transaction start).
        idempotency_key: the key it was deferred with, if any.
        headers: the message's pgmq headers.
        connection: for a ``transactional=True`` task, the connection whose open
            transaction also acks the job: write through it and your writes commit with
            the ack, or not at all.
        scheduled_at: for a job a schedule enqueued, the tick it is for (on the database
            clock, UTC), so that a job that runs late still processes its own period;
            None for other jobs.
        control: what changes while the job runs (see `cancel_requested`).
    """

    id: int
    queue: str
    task: str
    attempt: int
    enqueued_at: dt.datetime
    idempotency_key: str | None = None
    headers: Mapping[str, Any] = MappingProxyType({})
    connection: Connection | None = None
    scheduled_at: dt.datetime | None = None
    control: JobControl = _NO_CONTROL

    @property
    def cancel_requested(self) -> bool:
        """Whether this run has been asked to stop: someone cancelled the job
        (``ref.cancel()``, ``pgtasks cancel``), its ``timeout`` passed, the worker is
        stopping, or the worker lost its lease; `cancel_reason` says which. An ``async def``
        task is also cancelled at its next ``await``; a plain ``def`` task runs in a thread,
        which cannot be interrupted, and should poll this and return soon."""
        return self.control.cancel_requested

    @property
    def cancel_reason(self) -> str | None:
        """Why the run was asked to stop: ``"requested"``, ``"timeout"``, ``"stop"`` (the
        worker is stopping) or ``"lost_lease"``; None while it was not."""
        return self.control.cancel_reason


_current: ContextVar[JobContext] = ContextVar("pgtasks_current_job")


def current_job() -> JobContext:
    """The job this code runs in. Raises RuntimeError outside a job run by a worker."""
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError(
            "pgtasks.current_job() was called outside a job run by a pgtasks worker"
        ) from None
