"""What a producer can learn about the jobs it deferred, and do to them: their status, their
results (awaited, pushed rather than polled), their cancellation.

Waiting: every statement that ends jobs of a queue (a worker's batch of acks or dead
letters, a cancellation) notifies channel ``pgtasks_done`` once, with the queue's name. One
`Waiters` per app and event loop listens on a connection of its own and, for each queue
notified (and every second, in case a notification was missed), looks up every job still
awaited in that queue with one statement on a pooled connection: ``pgtasks.job_info``'s
query prepared over the queue's tables (`db.results.job_info_direct`), or, for a role that
may not read them, the function itself. A thousand concurrent ``result()`` calls cost two
connections, and a job is looked up as soon as it ends. A new waiter is looked up at once
(its job may have ended already), unless its job was sent by this app after the connection
listened and nothing was heard of its queue since: its end is then certain to notify. A
look-up that fails for a transient reason is tried again; one that cannot succeed (a
missing function, a privilege) fails the waits it serves, with the error, rather than
leaving them waiting forever. Closing the app fails every wait with `AppClosed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import typing
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import anyio
import asyncpg
import orjson

from ..context import current_job
from ..db.connect import acquire_clean
from ..db.database import Database
from ..db.queues import messages_waiting
from ..db.results import JobInfo, job_info, job_info_direct, jobs_cancel, retried_as
from ..exceptions import (
    JobCancelled,
    JobExpired,
    JobFailed,
    JobNotFound,
    ResultUnavailable,
)
from ..serialization.hints import load_value
from ..tasks import CancelOutcome, JobRef, JobStatus, Task
from ..tasks.handle import FINAL_STATES
from .waiters import Waiters

R = TypeVar("R")
Lookup = Callable[[Sequence[int]], Awaitable[dict[int, Any]]]
logger = logging.getLogger("pgtasks")


class JobClient:
    """An app's `tasks.Jobs`: what its `JobRef`s ask."""

    def __init__(
        self,
        database: Database,
        tasks: Callable[[], Mapping[str, Task[Any, Any]]],
        *,
        record_ttl: float,
    ) -> None:
        self._database = database
        self._tasks = tasks
        self._record_ttl = record_ttl
        self._waiters: Waiters | None = None
        # look jobs up with the prepared statement of `job_info_direct`, until the role
        # turns out not to be allowed to
        self._direct = True
        # what a topic of waiting other than a queue's looks up (see `Waiters`)
        self.lookups: dict[str, Lookup] = {}

    def ref(self, queue: str, msg_id: int, task: str = "") -> JobRef[Any]:
        return JobRef(msg_id, queue, task, jobs=self)

    async def info(self, queue: str, ids: Sequence[int]) -> list[JobInfo]:
        pool = await self._database.pool()
        async with acquire_clean(pool) as conn:
            if self._direct:
                try:
                    return await job_info_direct(conn, queue, ids)
                except asyncpg.InsufficientPrivilegeError:
                    # a producer's role reads jobs only through the function: from now on
                    # this client asks it alone
                    self._direct = False
                except asyncpg.UndefinedTableError:
                    pass  # no such queue (any more): the function says what became of them
            return await job_info(conn, queue, ids)

    async def status(self, ref: JobRef[Any], /) -> JobStatus:
        (info,) = await self.info(ref.queue, [ref.id])
        return _status(info)

    async def result(self, ref: JobRef[R], /, *, timeout: float | None) -> R:  # noqa: ASYNC109
        if timeout is None:
            _warn_if_inside_own_queue(ref)
        with anyio.fail_after(timeout) if timeout is not None else contextlib.nullcontext():
            info = await self.wait(ref.queue, ref.id, sent_after=ref._sent_after)
        value: R = self._unpack(ref, info)
        return value

    async def cancel(self, refs: Sequence[JobRef[Any]], /) -> list[CancelOutcome]:
        by_queue: dict[str, list[int]] = defaultdict(list)
        for ref in refs:
            by_queue[ref.queue].append(ref.id)
        outcomes: dict[tuple[str, int], str] = {}
        pool = await self._database.pool()
        async with acquire_clean(pool) as conn:
            for queue, ids in by_queue.items():
                for msg_id, outcome in await jobs_cancel(conn, queue, ids, self._record_ttl):
                    outcomes[(queue, msg_id)] = outcome
        return [typing.cast(CancelOutcome, outcomes[(r.queue, r.id)]) for r in refs]

    async def close(self) -> None:
        waiters, self._waiters = self._waiters, None
        if waiters is not None:
            await waiters.close()

    def _waiters_here(self) -> Waiters:
        loop = asyncio.get_running_loop()
        if self._waiters is None or self._waiters.loop is not loop:
            self._waiters = Waiters(self._database, self._ended, loop)
        return self._waiters

    async def _ended(self, topic: str, ids: Sequence[int]) -> dict[int, Any]:
        """The jobs (or, for another topic, the things) of these ids that are over."""
        lookup = self.lookups.get(topic)
        if lookup is not None:
            return await lookup(ids)
        return {
            i.msg_id: i
            for i in await self.info(topic, ids)
            if i.state in FINAL_STATES or i.state == "unknown"
        }

    async def wait(self, topic: str, id: int, *, sent_after: float | None = None) -> Any:
        """Until the thing ``id`` of ``topic`` (a job of a queue, or another topic with a
        lookup of its own) is over: what its lookup said of it. ``sent_after``: the job was
        sent after this monotonic time (see `Waiters.wait`)."""
        return await self._waiters_here().wait(topic, id, sent_after)

    def _unpack(self, ref: JobRef[Any], info: JobInfo) -> Any:
        what = f"job {ref.id} in queue {ref.queue!r}"
        state = info.state
        error = orjson.loads(info.error) if info.error else {}
        if state == "succeeded":
            if info.result is not None:
                return load_value(info.result, self._return_hint(info.task or ref.task))
            if error:
                raise ResultUnavailable(f"{what} succeeded; {error.get('message', error)}")
            return self._no_result(what, info.task or ref.task)
        if state == "failed":
            reason = error.get("reason")
            again = retried_as(error)
            message = f"{what} failed: {reason}" if reason else f"{what} failed"
            if again is not None:
                message += f"; it was retried as job {again}"
            raise JobFailed(
                message,
                error_type=error.get("type"),
                error_message=error.get("message"),
                traceback=error.get("traceback"),
                reason=reason,
                retried_as=again,
            )
        if state == "cancelled":
            raise JobCancelled(f"{what} was cancelled ({error.get('reason', 'no reason')})")
        if state == "expired":
            raise JobExpired(f"{what} {error.get('reason', 'expired')}")
        raise JobNotFound(f"no {what} (it never existed, or its record was pruned)")

    def _return_hint(self, task_name: str) -> Any:
        task = self._tasks().get(task_name)
        return task.returns if task is not None else Any

    def _no_result(self, what: str, task_name: str) -> Any:
        """A succeeded job with no result kept: None when that is what the task returns,
        else the reason there is none."""
        task = self._tasks().get(task_name)
        if task is None or task.returns is None or task.returns is Any:
            return None  # -> None, unannotated (None is not kept), or a task unknown here
        if task.config.keep_result is False:
            raise ResultUnavailable(f"{what} succeeded; task {task_name!r} keeps no results")
        raise ResultUnavailable(
            f"{what} succeeded, and no result of it is kept any more (its record outlived "
            "result_ttl and was pruned, or the job was skipped: its idempotency key had "
            "succeeded with another job)"
        )


_warned_inside = False


def _warn_if_inside_own_queue(ref: JobRef[Any]) -> None:
    """Waiting, inside a task, with no timeout, on a job of the task's own queue is how a
    worker deadlocks: when every slot waits, nothing runs the jobs they wait for. It is
    allowed (another worker may serve the queue), and said once per process."""
    global _warned_inside
    if _warned_inside:
        return
    try:
        running = current_job()
    except RuntimeError:
        return
    if running.queue == ref.queue:
        _warned_inside = True
        logger.warning(
            "%r waits, with no timeout, for the result of job %d of its own queue %r: a "
            "worker whose slots all wait like this runs nothing; pass a timeout, or chain "
            "the jobs instead",
            running.task,
            ref.id,
            ref.queue,
        )


def _status(info: JobInfo) -> JobStatus:
    error = orjson.loads(info.error) if info.error else None
    return JobStatus(
        typing.cast(Any, info.state),
        info.task,
        info.attempts,
        info.enqueued_at,
        info.finished_at,
        error,
        info.cancel_requested,
        retried_as(error) if info.state == "failed" else None,
    )


async def wait_for(database: Database, refs: Iterable[JobRef[Any]], *, poll: float = 0.05) -> None:
    """Wait until every one of these jobs has left its queue (see `App.wait_for`)."""
    waiting: dict[str, set[int]] = {}
    for ref in refs:
        waiting.setdefault(ref.queue, set()).add(ref.id)
    pool = await database.pool()
    while waiting:
        async with acquire_clean(pool) as conn:
            for queue, ids in list(waiting.items()):
                left = await messages_waiting(conn, queue, sorted(ids))
                if left:
                    waiting[queue] = left
                else:
                    del waiting[queue]
        if waiting:
            await anyio.sleep(poll)
