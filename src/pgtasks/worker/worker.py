"""The worker: wires the fetcher, executor, completer, lease keeper and listener together.

Connections: the fetcher and the completer each own one connection, outside the app's
pool, and the listener has its own; task code (and transactional jobs) use the app's pool.
So the worker's loops never wait behind task code for a connection. Transactional jobs run
at most ``pool_max_size - 1`` at a time, leaving a pooled connection for everything else
(a ``defer()`` from inside one of them, say).

Two scopes. The *service* scope holds the background loops (listener, completer, lease
keeper; the scheduler of the app's periodic jobs, on a connection of its own; archive
retention, on a connection of its own for each pass, `retention.py`; in burst mode one
pass, once the queues are drained). The *work*
scope holds the fetch loop and the running jobs. A soft stop ends the fetch loop and gives
running jobs ``shutdown_timeout`` seconds; then every job still running
is cancelled for the reason "stop" and hands its message back at once. A job that ignores
the cancellation is given a few seconds more, then its message is handed back anyway (its
attempt counted) and the worker returns without it; except a plain ``def`` job whose thread
still runs: nothing is written for it, and its lease lapses (`threads.py`). Pending
outcomes are flushed, shielded and bounded, before the service scope closes.

The library never installs signal handlers; the CLI does. Embedded use::

    async with app.worker(concurrency=20) as worker:   # returns once it is listening
        ...                                            # stops gracefully on exit
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus
from typing_extensions import Self, Unpack

from ..db import jobs, queues, schema
from ..db.database import Database
from ..hooks import Hooks
from ..periodic.schedule import Schedule
from ..tasks import Task
from .completer import Completer
from .connection import OwnConnection
from .events import Events, JobEvent
from .executor import Executor
from .fetcher import Fetcher
from .heartbeat import HEARTBEAT_INTERVAL, Heartbeat
from .job import CancelReason, Job
from .leases import LeaseKeeper
from .listener import Listener
from .outcome import Outcome
from .retention import BURST_PASS_BUDGET, Retention
from .scheduler import Scheduler
from .settings import (
    WORKER_OPTIONS,
    WorkerOptions,
    WorkerSettings,
    checked_queues,
    transactional_slots,
)
from .slots import Slots
from .threads import Threads

logger = logging.getLogger("pgtasks")

CANCEL_GRACE = 3.0  # seconds a cancelled job gets to unwind before it is left behind
FLUSH_BUDGET = 7.0  # seconds the last outcomes get to be written at shutdown


class Worker:
    """Runs the jobs of an `App`; create with `App.worker`.

    Args:
        database: the database it claims from (`App.database`).
        tasks: the tasks it runs, by name (`App.tasks`).
        settings: the app-wide settings it runs them with (task defaults, key retention,
            message size limit).
        hooks: the hooks to run around every job (`App.hooks`).
        schedules: the schedules whose ticks it enqueues (`App.schedules`), with a
            `Scheduler` in its service scope when the ``schedule`` option is on (not in
            ``burst`` mode).
        **options: the worker options (`WorkerOptions`): ``queues``, ``concurrency``,
            ``threads``, ``burst``, ``shutdown_timeout``, ``listen``, ``poll_interval``,
            ``schedule``, ``retention_interval``; see
            [Configuration](configuration.md#worker-options) for each one's meaning,
            default and range.
    """

    def __init__(
        self,
        database: Database,
        tasks: Mapping[str, Task[Any, Any]],
        settings: WorkerSettings,
        *,
        hooks: Hooks | None = None,
        schedules: Sequence[Schedule] = (),
        **options: Unpack[WorkerOptions],
    ) -> None:
        opts = WORKER_OPTIONS.resolve(options, "worker")
        self._database = database
        self._settings = settings
        self._hooks = hooks
        self._tasks = dict(tasks)
        self.queues: list[str] = checked_queues(opts["queues"], self._tasks)
        self.concurrency: int = opts["concurrency"]
        self.threads: int = (
            opts["threads"] if opts["threads"] is not None else min(self.concurrency, 40)
        )
        self.burst: bool = opts["burst"]
        self.shutdown_timeout: float = opts["shutdown_timeout"]
        self.listen: bool = opts["listen"]
        self.poll_interval: float = opts["poll_interval"]
        self.schedule: bool = opts["schedule"]
        self.retention_interval: float | None = opts["retention_interval"]
        self._events = Events()
        self.stats = self._events.stats
        self._jobs: set[Job] = set()  # held: running, or claimed and waiting for a slot
        self._slots = Slots(self.concurrency, start=self._launch, dispose=self._withdrawn)
        self._stopping = anyio.Event()
        self._fetch_scope: anyio.CancelScope | None = None
        self._force = False
        self._fetcher: Fetcher | None = None
        self._completer: Completer | None = None
        self._executor: Executor | None = None
        self._background: TaskGroup | None = None
        self._done = anyio.Event()
        self.listener: Listener | None = None
        self.abandoned = 0  # jobs that ignored cancellation at the last stop (threads too)
        self.id = uuid.uuid4()
        """This worker's id in ``pgtasks.workers`` (see `pgtasks.admin.workers`)."""
        self.heartbeat_interval = HEARTBEAT_INTERVAL
        """Seconds between heartbeats; set before `run`. Readers show a worker that missed
        three as gone."""
        self.scheduler: Scheduler | None = None
        if schedules and self.schedule and not self.burst:
            self.scheduler = Scheduler(
                database, schedules, max_message_size=settings.max_message_size
            )
        self.retention: Retention | None = None
        """Deletes the archived messages of its queues past the app's ``archive_retention``
        (none with ``retention_interval=None``): every interval, or in ``burst`` mode once,
        when the queues are drained."""
        interval, keep = self.retention_interval, settings.archive_retention
        if interval is not None and keep is not None:
            self.retention = Retention(database, self.queues, keep, interval)

    # --- public ---------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[JobEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every job event; returns a function that unsubscribes.
        Callbacks run on the event loop and must not block; their errors are logged."""
        return self._events.subscribe(callback)

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
        """Jobs running now (not counting those claimed ahead, waiting for a slot)."""
        return self._slots.busy

    @property
    def failed_queues(self) -> dict[str, str]:
        """Queues this worker cannot claim from (a dropped queue, a missing grant), with the
        last error; empty when every queue is served."""
        return self._fetcher.failed_queues if self._fetcher is not None else {}

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until stopped (or, with ``burst``, until there is nothing left to do)."""
        await self._database.dsn()  # resolved (or the embedded server started) up front
        open_connection = self._database.connect
        fetch_conn, complete_conn = OwnConnection(open_connection), OwnConnection(open_connection)
        try:
            await self._serve(fetch_conn, complete_conn, task_status)
        finally:
            fetch_conn.close()
            complete_conn.close()

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

    async def _serve(
        self, fetch_conn: OwnConnection, complete_conn: OwnConnection, task_status: TaskStatus[None]
    ) -> None:
        async with fetch_conn.use() as conn:
            await schema.check_installed(conn)  # one line "run migrate", not a traceback
            await queues.queues_ensure(conn, self.queues)
        settings = self._settings
        executor = Executor(
            self._tasks,
            settings.defaults,
            self._submit,
            self._events.emit,
            pool=self._database.pool,
            transactional_slots=transactional_slots(
                self._tasks, self.queues, self._database.pool_max_size
            ),
            key_retention=settings.key_retention.total_seconds(),
            max_message_size=settings.max_message_size,
            max_result_size=settings.max_result_size,
            hooks=self._hooks.execute if self._hooks is not None else None,
            threads=Threads(self.threads),
        )
        self._executor = executor
        read_vt = {q: self._read_vt(executor, q) for q in self.queues}
        self._completer = Completer(
            complete_conn,
            key_retention=settings.key_retention.total_seconds(),
            emit=self._events.emit,
            worker_id=f"{socket.gethostname()}:{os.getpid()}",
            requeued=self._on_notify,
        )
        self._fetcher = Fetcher(
            fetch_conn,
            self.queues,
            read_vt,
            free_slots=self._free_capacity,
            claimed=lambda q, msgs: self._start_jobs(executor, q, msgs, read_vt[q]),
            poll_interval=self.poll_interval,
            max_message_size=settings.max_message_size,
            timed=self._slots.claimed,
        )
        # a lease is extended once a third of it has passed: tick often enough that even
        # the shortest lease of these queues is extended well before it runs out
        shortest = min(min(self._leases(executor, q)) for q in self.queues)
        leases = LeaseKeeper(lambda: self._jobs, self._completer, tick=min(1.0, shortest / 4))
        heartbeat = Heartbeat(
            self._completer.connection,
            worker_id=self.id,
            queues=self.queues,
            concurrency=self.concurrency,
            running=lambda: self._slots.busy,
            stats=lambda: self.stats,
            interval=self.heartbeat_interval,
        )
        try:
            async with anyio.create_task_group() as service:
                service.start_soon(self._completer.run)
                service.start_soon(leases.run)
                service.start_soon(self._slots.watch)
                await heartbeat.beat()  # registered before it says it started
                service.start_soon(heartbeat.run)
                if self.scheduler is not None:
                    service.start_soon(self.scheduler.run)
                if self.retention is not None and not self.burst:
                    service.start_soon(self.retention.run)
                if self.listen:
                    self.listener = Listener(
                        self._database.dsn, self._on_notify, on_cancel=self._on_cancel
                    )
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
                    await self._completer.drain(timeout=FLUSH_BUDGET)
                    await heartbeat.stopped()
                service.cancel_scope.cancel()
        finally:
            executor.threads.shutdown()
            self._done.set()
            logger.info("worker stopped: %s", self._events.summary())

    async def _work(self) -> None:
        assert self._fetcher is not None
        try:
            with anyio.CancelScope() as fetch_scope:
                self._fetch_scope = fetch_scope
                if self._stopping.is_set():
                    fetch_scope.cancel()
                await self._fetch_loop()
            self._stopping.set()
            self._slots.hand_back_all()  # claimed ahead, never started: back at once
            if not self._force:
                with anyio.move_on_after(self.shutdown_timeout):
                    while self._jobs:
                        await self._fetcher.wakeup.wait(0.1)
            if self._jobs:
                logger.warning(
                    "%d job(s) still running after %.1fs; cancelling them and "
                    "releasing their messages",
                    len(self._jobs),
                    0.0 if self._force else self.shutdown_timeout,
                )
        finally:
            # cancelled jobs queue the release of their messages on the way out
            await self._cancel_and_wait()

    async def _cancel_and_wait(self) -> None:
        tasks = self._cancel_jobs()
        if not tasks:
            return
        with anyio.CancelScope(shield=True):
            _, pending = await asyncio.wait(tasks, timeout=CANCEL_GRACE)
        left = [job for job in self._jobs if job.task in pending]
        threads = self._executor.threads if self._executor is not None else None
        for job in left:  # it ignores cancellation: hand its message back without it
            if threads is not None and threads.leave(job, CANCEL_GRACE):
                self._jobs.discard(job)  # nothing written: its lease lapses
                continue
            logger.error(
                "%s ignored cancellation for %.0fs; its message is handed back (the attempt "
                "counts) while it may still be running in this process",
                job,
                CANCEL_GRACE,
            )
            if job.finish():
                self._submit(Outcome("release", job, give_back=False))
            self._jobs.discard(job)
        self.abandoned = len(left)

    def _cancel_jobs(self) -> list[asyncio.Task[None]]:
        self._slots.hand_back_all()
        tasks = []
        for job in self._jobs:
            job.cancel(CancelReason.STOP)
            if job.task is not None and not job.task.done():
                tasks.append(job.task)
        return tasks

    async def _fetch_loop(self) -> None:
        assert self._fetcher is not None
        assert self._completer is not None
        fetcher = self._fetcher
        backoff = 0.05
        failing_since: float | None = None
        while True:
            try:
                if self._free_capacity() <= 0:
                    await fetcher.wait_for_slot()
                    continue
                claimed, drained = await fetcher.claim_pass()
                if failing_since is not None:
                    logger.info(
                        "claiming works again after %.1fs", anyio.current_time() - failing_since
                    )
                    failing_since = None
                backoff = 0.05
                if claimed:
                    await asyncio.sleep(0)  # the new jobs start before the next query goes out
                if not drained:
                    # a backlog: let capacity free up for a moment so the next claim is one
                    # batch rather than many single-message reads; with a prefetch, the
                    # jobs still waiting in line cover the claim's round trip (`slots.py`)
                    slots = self._slots
                    if slots.prefetch:
                        await fetcher.gather_slots(slots.batch, max(0.002, 2 * slots.gather))
                    else:
                        await fetcher.gather_slots(self.concurrency // 2)
                    continue
                if self.burst and claimed == 0:
                    if not self._jobs and self._completer.pending == 0:
                        await self._completer.wait_idle()
                        await fetcher.sweep()
                        claimed, drained = await fetcher.claim_pass()
                        if claimed == 0:
                            self._burst_done()
                            if self.retention is not None:
                                # a worker that only ever runs in bursts (from cron, say)
                                # bounds its queues' archives too
                                await self.retention.prune_once(BURST_PASS_BUDGET)
                            return
                        continue
                    await fetcher.wakeup.wait(0.05)
                    continue
                # no queue is ready: reading again now would find nothing; a notification,
                # freed capacity, a due time or the safety poll wakes the loop
                await fetcher.idle_wait()
            except Exception as exc:  # claim_pass raises transient errors only
                if failing_since is None:
                    failing_since = anyio.current_time()
                    logger.warning("claiming failed (%s); retrying", exc)
                else:
                    logger.debug("claiming failed (%s); retrying in %.2fs", exc, backoff)
                # short and jittered: claims resume within about a second of the
                # database's return, without every worker retrying in step
                await anyio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, 1.0)

    def _burst_done(self) -> None:
        failed = self.failed_queues
        if failed:
            logger.error(
                "burst: stopping; %d queue(s) could not be served: %s",
                len(failed),
                "; ".join(f"{q}: {e}" for q, e in failed.items()),
            )
        else:
            logger.info("burst: the queues are empty, stopping")

    def _start_jobs(
        self, executor: Executor, queue: str, messages: list[jobs.Message], read_vt: int
    ) -> None:
        for msg in messages:
            job = executor.new_job(queue, msg, float(read_vt))
            self._jobs.add(job)
            self._slots.add(job)

    def _launch(self, job: Job) -> None:
        """Run a job that has its slot."""
        task = asyncio.get_running_loop().create_task(self._run(job))
        job.task = task
        if job.began and job.cancel_reason is not None and not task.done():
            # an eager task factory ran its first step inside create_task, where a
            # cancellation found no task to cancel yet
            task.cancel()

    async def _run(self, job: Job) -> None:
        """A job's task: its run, then its slot to the next job, in the same step as the
        run's end (the next job's first step is then the loop's next round, not the one
        after a done callback's)."""
        assert self._executor is not None
        began = time.monotonic()
        job.began = True
        try:
            if job.cancel_reason is not None:  # cancelled between its launch and this step
                self._executor.withdrawn(job)
            else:
                await self._executor.run(job)  # never raises: the job boundary
        finally:  # a bug that got past the boundary must not hold the slot for ever
            self._jobs.discard(job)
            if job.task is None:
                # the whole run was its first step, taken inside create_task (an eager
                # task factory): the slot goes to the next job from the loop, not from
                # this frame, or a line of such jobs would start each other ever deeper
                # (RecursionError)
                asyncio.get_running_loop().call_soon(self._ended, time.monotonic() - began)
            else:
                self._ended(time.monotonic() - began)

    def _ended(self, run_time: float) -> None:
        self._slots.finished(run_time)
        self._freed()

    def _withdrawn(self, job: Job) -> None:
        """A job cancelled while it waited for a slot: its outcome, without a run."""
        assert self._executor is not None
        self._executor.withdrawn(job)
        self._jobs.discard(job)
        self._freed()

    def _freed(self) -> None:
        fetcher = self._fetcher
        if fetcher is not None and (not self._jobs or self._free_capacity() >= fetcher.wanted):
            fetcher.wakeup.set()

    def _leases(self, executor: Executor, queue: str) -> list[float]:
        """The leases of this queue's tasks (the app's default for a queue of none)."""
        leases = [executor.lease_for(t.name) for t in self._tasks.values() if t.queue == queue]
        return leases or [executor.lease_for(None)]

    def _read_vt(self, executor: Executor, queue: str) -> int:
        return math.ceil(max(self._leases(executor, queue)))

    def _on_cancel(self, payload: str) -> None:
        """A request to cancel a job (``queue:msg_id``): cancel it if it runs here."""
        queue, _, msg_id = payload.rpartition(":")
        for job in list(self._jobs):
            if job.queue == queue and str(job.msg_id) == msg_id and job.request_cancel():
                logger.info("%s: cancelling, as requested", job)
                if self._slots.withdraw(job):  # it had not started
                    self._withdrawn(job)

    def _on_notify(self, queue: str | None) -> None:
        """``queue`` may hold a visible message (None: any may, a notification may have been
        missed)."""
        if self._fetcher is not None:
            self._fetcher.notify(queue)

    def _free_capacity(self) -> int:
        """Jobs the fetcher may claim now: the free slots, and the prefetch."""
        return self.concurrency + self._slots.prefetch - len(self._jobs)

    def _submit(self, outcome: Outcome) -> None:
        assert self._completer is not None
        if outcome.kind == "release":
            self.stats["released"] += 1
        self._completer.submit(outcome)
