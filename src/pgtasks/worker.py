"""The worker: wires the fetcher, executor, completer, lease keeper and listener together.

Two scopes. The *service* scope holds the background loops (listener, completer, lease
keeper). The *work* scope holds the fetch loop and the running jobs. A soft stop ends the
fetch loop and gives running jobs ``shutdown_timeout`` seconds; a hard stop then cancels the
work scope, and every cancelled job hands its message back at once (visible immediately).
Pending outcomes are flushed, shielded, before the service scope closes.

The library never installs signal handlers; the CLI does. Embedded use::

    async with app.worker(concurrency=20) as worker:   # returns once it is listening
        ...                                            # stops gracefully on exit
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
from collections import Counter
from collections.abc import Callable, Sequence
from types import TracebackType

import anyio
import asyncpg
from anyio.abc import TaskGroup, TaskStatus
from typing_extensions import Self

from ._completer import Completer, Outcome
from ._db import admin, queries
from ._db.connect import CONNECTION_ERRORS
from ._executor import Executor, Job
from ._fetcher import Fetcher
from ._leases import LeaseKeeper
from .app import App
from .context import JobEvent
from .exceptions import ConfigurationError
from .listener import Listener
from .queues import check_queue_name

logger = logging.getLogger("pgtasks")
# the fetch loop also survives server-side errors (a queue dropped under it, say)
_FETCH_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)


class Worker:
    """Runs the jobs of an `App`; create with `App.worker`.

    Args:
        app: the app whose tasks it runs.
        queues: the queues to serve; default every registered task's queue.
        concurrency: jobs run at once (and so messages claimed at most).
        burst: exit once the queues have no visible messages and nothing is running.
        shutdown_timeout: seconds running jobs get to finish after a stop.
        listen: wake on NOTIFY; False polls only (e.g. behind PgBouncer in transaction mode).
        poll_interval: the safety poll, in seconds.
    """

    def __init__(
        self,
        app: App,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 10,
        burst: bool = False,
        shutdown_timeout: float = 30.0,
        listen: bool = True,
        poll_interval: float = 5.0,
    ) -> None:
        if concurrency < 1:
            raise ConfigurationError(f"concurrency must be at least 1 (got {concurrency})")
        self.app = app
        self.queues = [check_queue_name(q) for q in (queues or app.queues)]
        if not self.queues:
            raise ConfigurationError(
                "the worker has no queues: register a task with @app.task or pass queues=[...]"
            )
        self.concurrency = concurrency
        self.burst = burst
        self.shutdown_timeout = shutdown_timeout
        self.listen = listen
        self.poll_interval = poll_interval
        self.stats: Counter[str] = Counter()
        self._subscribers: list[Callable[[JobEvent], None]] = []
        self._running: dict[tuple[str, int], Job] = {}
        self._stopping = anyio.Event()
        self._fetch_scope: anyio.CancelScope | None = None
        self._force = False
        self._fetcher: Fetcher | None = None
        self._completer: Completer | None = None
        self._tasks = app.tasks
        self._background: TaskGroup | None = None
        self._done = anyio.Event()
        self.listener: Listener | None = None

    # --- public ---------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[JobEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every job event; returns a function that unsubscribes.
        Callbacks run on the event loop and must not block; their errors are logged."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def stop(self, *, force: bool = False) -> None:
        """Stop fetching; running jobs get ``shutdown_timeout`` (none with ``force``)."""
        self._stopping.set()
        if self._fetch_scope is not None:
            self._fetch_scope.cancel()
        if force:
            self._force = True
            self._cancel_jobs()
            if self._fetcher is not None:
                self._fetcher.cancel_claim()
        if self._fetcher is not None:
            self._fetcher.wakeup.set()

    @property
    def running(self) -> int:
        """Jobs running now."""
        return len(self._running)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until stopped (or, with ``burst``, until there is nothing left to do)."""
        pool = await self.app.pool()
        await self._ensure_queues(pool)
        executor = Executor(
            self._tasks,
            self.app.defaults,
            pool,
            self._submit,
            self._emit,
            key_retention=self.app.key_retention.total_seconds(),
        )
        read_vt = {q: self._read_vt(executor, q) for q in self.queues}
        self._completer = Completer(
            pool,
            key_retention=self.app.key_retention.total_seconds(),
            emit=self._emit,
            worker_id=f"{socket.gethostname()}:{os.getpid()}",
            requeued=lambda: self._on_notify(None),
        )
        self._fetcher = Fetcher(
            pool,
            self.queues,
            read_vt,
            free_slots=lambda: self.concurrency - len(self._running),
            claimed=lambda q, msgs: self._start_jobs(executor, q, msgs, read_vt[q]),
            poll_interval=self.poll_interval,
        )
        # a lease is extended once a third of it has passed: tick often enough that even
        # the shortest lease of these queues is extended well before it runs out
        shortest = min(min(self._leases(executor, q)) for q in self.queues)
        leases = LeaseKeeper(
            pool, lambda: list(self._running.values()), self._emit, tick=min(1.0, shortest / 4)
        )
        try:
            async with anyio.create_task_group() as service:
                service.start_soon(self._completer.run)
                service.start_soon(leases.run)
                if self.listen:
                    self.listener = Listener(self.app.dsn, self._on_notify)
                    await service.start(self.listener.run)
                logger.info(
                    "worker started: queues %s, concurrency %d%s",
                    ", ".join(self.queues),
                    self.concurrency,
                    "" if self.listen else ", poll-only",
                )
                task_status.started()
                try:
                    await self._work()
                finally:  # also when cancelled from outside: releases must be written
                    await self._completer.drain(timeout=10.0)
                service.cancel_scope.cancel()
        finally:
            self._done.set()
            logger.info(
                "worker stopped: %d succeeded, %d failed attempts, %d retried, "
                "%d dead-lettered, %d released",
                self.stats["succeeded"],
                self.stats["failed"],
                self.stats["retried"],
                self.stats["dead"],
                self.stats["released"],
            )

    async def __aenter__(self) -> Self:
        self._background_cm = anyio.create_task_group()
        self._background = await self._background_cm.__aenter__()
        try:
            await self._background.start(self.run)
        except BaseException:
            await self._background_cm.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        self.stop(force=exc_type is not None and not issubclass(exc_type, Exception))
        return await self._background_cm.__aexit__(exc_type, exc, tb)

    # --- internals ------------------------------------------------------------------------

    async def _work(self) -> None:
        assert self._fetcher is not None
        try:
            with anyio.CancelScope() as fetch_scope:
                self._fetch_scope = fetch_scope
                if self._stopping.is_set():
                    fetch_scope.cancel()
                await self._fetch_loop()
            self._stopping.set()
            if not self._force:
                with anyio.move_on_after(self.shutdown_timeout):
                    while self._running:
                        await self._fetcher.wakeup.wait(0.1)
            if self._running:
                logger.warning(
                    "%d job(s) still running after %.1fs; cancelling them and "
                    "releasing their messages",
                    len(self._running),
                    0.0 if self._force else self.shutdown_timeout,
                )
        finally:
            # cancelled jobs queue the release of their messages on the way out
            tasks = self._cancel_jobs()
            if tasks:
                with anyio.CancelScope(shield=True):
                    await asyncio.wait(tasks)

    def _cancel_jobs(self) -> list[asyncio.Task[None]]:
        tasks = [job.task for job in self._running.values() if job.task is not None]
        for task in tasks:
            task.cancel()
        return tasks

    async def _fetch_loop(self) -> None:
        assert self._fetcher is not None
        assert self._completer is not None
        fetcher = self._fetcher
        backoff = 0.1
        while True:
            try:
                if self.concurrency - len(self._running) <= 0:
                    await fetcher.wait_for_slot()
                    continue
                claimed, drained = await fetcher.claim_pass()
                backoff = 0.1
                if claimed:
                    await asyncio.sleep(0)  # the new jobs start before the next query goes out
                if not drained:
                    # a backlog: let slots free up for a moment so the next claim is one
                    # batch rather than many single-message reads
                    await fetcher.gather_slots(self.concurrency // 2)
                    continue
                if self.burst and claimed == 0:
                    if not self._running and self._completer.pending == 0:
                        await self._completer.wait_idle()
                        claimed, drained = await fetcher.claim_pass()
                        if claimed == 0:
                            logger.info("burst: the queues are empty, stopping")
                            return
                        continue
                    await fetcher.wakeup.wait(0.05)
                    continue
                # drained: the claim got fewer than it asked for, so reading again now would
                # find nothing; a notification, a freed slot or the next vt wakes the loop
                await fetcher.idle_wait()
            except _FETCH_ERRORS as exc:
                logger.warning("fetching failed (%s); retrying in %.1fs", exc, backoff)
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    def _start_jobs(
        self, executor: Executor, queue: str, messages: list[queries.Message], read_vt: int
    ) -> None:
        loop = asyncio.get_running_loop()
        for msg in messages:
            job = Job(queue, msg, lease=float(read_vt))
            self._running[job.key] = job
            job.task = loop.create_task(self._run_job(executor, job))

    async def _run_job(self, executor: Executor, job: Job) -> None:
        try:
            await executor.run(job)
        except Exception:  # the executor handles every job error; this would be a bug
            logger.exception(
                "pgtasks failed to process message %d in queue %s; it becomes visible "
                "again when its lease expires",
                job.message.msg_id,
                job.queue,
            )
        finally:
            self._running.pop(job.key, None)
            fetcher = self._fetcher
            if fetcher is not None and (
                not self._running or self.concurrency - len(self._running) >= fetcher.wanted
            ):
                fetcher.wakeup.set()

    def _leases(self, executor: Executor, queue: str) -> list[float]:
        """The leases of this queue's tasks (the app's default for a queue of none)."""
        leases = [executor.lease_for(t.name) for t in self._tasks.values() if t.queue == queue]
        return leases or [executor.lease_for(None)]

    def _read_vt(self, executor: Executor, queue: str) -> int:
        return math.ceil(max(self._leases(executor, queue)))

    async def _ensure_queues(self, pool: asyncpg.Pool) -> None:
        existing = set(await admin.queue_list(pool))
        for queue in self.queues:
            if queue not in existing:
                await admin.queue_ensure(pool, queue)

    def _on_notify(self, queue: str | None) -> None:
        if (queue is None or queue in self.queues) and self._fetcher is not None:
            self._fetcher.wakeup.set()

    def _submit(self, outcome: Outcome) -> None:
        assert self._completer is not None
        if outcome.kind == "release":
            self.stats["released"] += 1
        self._completer.submit(outcome)

    def _emit(self, event: JobEvent) -> None:
        self.stats[event.kind] += 1
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                logger.exception("an event subscriber failed on %s", event.kind)
