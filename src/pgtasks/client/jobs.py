"""What a producer can learn about the jobs it deferred, and do to them: their status, their
results (awaited, pushed rather than polled), their cancellation.

Waiting: every statement that ends jobs of a queue (a worker's batch of acks or dead
letters, a cancellation) notifies channel ``pgtasks_done`` once, with the queue's name. One
`_Waiters` per app and event loop listens on a connection of its own and, for each queue
notified (and every second, in case a notification was missed), looks up every job still
awaited in that queue with one call of ``pgtasks.job_info`` on a pooled connection. A
thousand concurrent ``result()`` calls cost two connections, and a job is looked up as soon
as it ends.
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
from ..db.connect import acquire_clean, connect
from ..db.database import Database
from ..db.jobs import DONE_CHANNEL
from ..db.queues import messages_waiting
from ..db.results import JobInfo, job_info, jobs_cancel
from ..exceptions import (
    JobCancelled,
    JobExpired,
    JobFailed,
    JobNotFound,
    PgTasksError,
    ResultUnavailable,
)
from ..serialization.hints import load_value
from ..tasks import CancelOutcome, JobRef, JobStatus, Task
from ..tasks.handle import FINAL_STATES

R = TypeVar("R")
Lookup = Callable[[Sequence[int]], Awaitable[dict[int, Any]]]
logger = logging.getLogger("pgtasks")

SAFETY_POLL = 1.0  # seconds: a notification that was missed costs at most this much
IDLE_CLOSE = 30.0  # seconds without waiters before the listening connection is closed


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
        self._waiters: _Waiters | None = None
        # what a topic of waiting other than a queue's looks up (see `_Waiters`)
        self.lookups: dict[str, Lookup] = {}

    def ref(self, queue: str, msg_id: int, task: str = "") -> JobRef[Any]:
        return JobRef(msg_id, queue, task, jobs=self)

    async def info(self, queue: str, ids: Sequence[int]) -> list[JobInfo]:
        pool = await self._database.pool()
        async with acquire_clean(pool) as conn:
            return await job_info(conn, queue, ids)

    async def status(self, ref: JobRef[Any], /) -> JobStatus:
        (info,) = await self.info(ref.queue, [ref.id])
        return _status(info)

    async def result(self, ref: JobRef[R], /, *, timeout: float | None) -> R:  # noqa: ASYNC109
        if timeout is None:
            _warn_if_inside_own_queue(ref)
        with anyio.fail_after(timeout) if timeout is not None else contextlib.nullcontext():
            info = await self.wait(ref.queue, ref.id)
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

    def _waiters_here(self) -> _Waiters:
        loop = asyncio.get_running_loop()
        if self._waiters is None or self._waiters.loop is not loop:
            self._waiters = _Waiters(self._database, self._ended, loop)
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

    async def wait(self, topic: str, id: int) -> Any:
        """Until the thing ``id`` of ``topic`` (a job of a queue, or another topic with a
        lookup of its own) is over: what its lookup said of it."""
        return await self._waiters_here().wait(topic, id)

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
            message = f"{what} failed: {reason}" if reason else f"{what} failed"
            raise JobFailed(
                message,
                error_type=error.get("type"),
                error_message=error.get("message"),
                traceback=error.get("traceback"),
                reason=reason,
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
    return JobStatus(
        typing.cast(Any, info.state),
        info.task,
        info.attempts,
        info.enqueued_at,
        info.finished_at,
        orjson.loads(info.error) if info.error else None,
        info.cancel_requested,
    )


class _Waiters:
    """The jobs awaited in one event loop, and the task that finds out when they end."""

    def __init__(
        self,
        database: Database,
        ended: Callable[[str, Sequence[int]], Awaitable[dict[int, Any]]],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.loop = loop
        self._database = database
        self._ended = ended
        self._pending: dict[str, dict[int, list[asyncio.Future[Any]]]] = defaultdict(dict)
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None

    async def wait(self, queue: str, msg_id: int) -> Any:
        future: asyncio.Future[Any] = self.loop.create_future()
        self._pending[queue].setdefault(msg_id, []).append(future)
        self._dirty.add(queue)  # it may have ended already: look once it is listening
        self._wake.set()
        if self._pump is None or self._pump.done():
            # a task of the app's, not of the caller's: it outlives any one waiter
            self._pump = self.loop.create_task(self._run(), name="pgtasks-results")
        try:
            return await future
        finally:
            waiting = self._pending.get(queue, {}).get(msg_id, [])
            if future in waiting:
                waiting.remove(future)
                if not waiting:
                    del self._pending[queue][msg_id]

    async def close(self) -> None:
        pump, self._pump = self._pump, None
        if pump is not None and not pump.done():
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        # nothing will tell them now: the waiters hear it, rather than waiting for ever
        for topic, waiting in self._pending.items():
            for id, futures in waiting.items():
                # a queue's job, or a thing of another topic ("@workflows": a workflow)
                what = f"{topic[1:-1]} {id}" if topic[0] == "@" else f"job {id} in {topic!r}"
                for future in futures:
                    if not future.done():
                        future.set_exception(
                            PgTasksError(f"the app was closed (App.close) while waiting for {what}")
                        )

    async def _run(self) -> None:
        backoff = 0.1
        idle_since: float | None = None
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await self._listen()
                backoff = 0.1
                while True:
                    self._dirty.update(q for q, ids in self._pending.items() if ids)
                    await self._look()
                    if any(self._pending.values()):
                        idle_since = None
                    elif idle_since is None:
                        idle_since = self.loop.time()
                    elif self.loop.time() - idle_since > IDLE_CLOSE:
                        return  # nobody waits: the next waiter starts it again
                    with anyio.move_on_after(SAFETY_POLL):
                        await self._wake.wait()
                    self._wake.clear()
                    if conn.is_closed():
                        break
            except Exception as exc:  # a loop that restarts with backoff
                logger.warning("waiting for job results: %s; trying again in %.1fs", exc, backoff)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                if conn is not None and not conn.is_closed():
                    conn.terminate()

    async def _listen(self) -> asyncpg.Connection:
        conn = await connect(
            await self._database.dsn(),
            server_settings={"application_name": "pgtasks-results"},
        )

        def notified(_c: Any, _pid: int, _channel: str, payload: object) -> None:
            self._dirty.add(str(payload))
            self._wake.set()

        await conn.add_listener(DONE_CHANNEL, notified)
        conn.add_termination_listener(lambda _c: self._wake.set())
        return conn

    async def _look(self) -> None:
        """Look up the jobs awaited in the queues notified; resolve those that ended."""
        while self._dirty:
            queue = self._dirty.pop()
            waiting = self._pending.get(queue)
            if not waiting:
                continue
            for key, info in (await self._ended(queue, list(waiting))).items():
                for future in waiting.get(key, []):
                    if not future.done():
                        future.set_result(info)


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
