"""The executor: runs one claimed message and decides its outcome.

decode the envelope -> find the task -> bind the arguments -> run it as the job's asyncio
task, under its time limit -> outcome. Nothing here writes a message row except a
transactional job's ack, which commits in the job's own transaction: every other outcome
goes to the completer. Broad exceptions are caught only here, at the job boundary, and
every one of them (``SystemExit``, ``KeyboardInterrupt``, a ``CancelledError`` the task
raised itself) is a failed attempt, except a cancellation whose reason the worker set
(see `job.py`): a stop hands the message back, a lost lease writes nothing, a request
records the job as cancelled. What becomes of a job is `decisions.py`'s to say.

The app's execute hooks (`pgtasks.hooks`), if any, run around the task's function, inside
the job boundary: what a hook raises is the job's failure. A plain ``def`` task runs in a
thread (`threads.py`); the hooks run on the loop, around the wait for that thread.

Poison messages never loop: a body that is not an envelope, is over the size limit, or whose
arguments do not bind goes to the dead letters at once; an unknown task is retried with
backoff (a rolling deploy may bring a worker that knows it), then dead-lettered; a message
whose attempts already exceed the policy (runs that crashed the worker or lost the lease) is
dead-lettered before it runs again. A job whose ``expires`` passed before it started is
recorded as expired, not run; one whose cancellation was asked while an earlier claim ran
(its worker was killed or stopped before it heard) is recorded as cancelled, not run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ..context import JobContext, _current
from ..db import jobs, workflows
from ..db.connect import acquire
from ..exceptions import DatabaseUnavailable, EnvelopeError, UnknownTask
from ..hooks import ExecuteHook, run_with_hooks
from ..periodic.schedule import scheduled_at
from ..serialization import envelope
from ..tasks import RetryPolicy, Task, TaskConfig
from ..tasks.config import TASK_DEFAULTS
from .decisions import Decisions
from .events import JobEvent
from .job import CancelReason, Job, JobTimeout, claimed
from .outcome import Outcome, clean_text, describe_error, missing_body
from .threads import Threads

logger = logging.getLogger("pgtasks")

DEFAULT_LEASE: float = TASK_DEFAULTS["lease"].default


class _LeaseLost(Exception):
    """Raised inside a transactional job's transaction when its ack finds the message gone
    or taken: the transaction, and so the task's own writes, roll back."""


class Executor:
    def __init__(
        self,
        tasks: dict[str, Task[Any, Any]],
        defaults: TaskConfig,
        submit: Callable[[Outcome], None],
        emit: Callable[[JobEvent], None],
        *,
        pool: Callable[[], Awaitable[asyncpg.Pool]],
        transactional_slots: asyncio.Semaphore | None,
        key_retention: float,
        max_message_size: int,
        max_result_size: int,
        hooks: list[ExecuteHook] | None = None,
        threads: Threads | None = None,
    ) -> None:
        self._tasks = tasks
        self.threads = threads or Threads(1)  # plain def tasks' threads, started on first use
        self._defaults = defaults
        self._default_policy = RetryPolicy.from_config(TaskConfig(), defaults)
        self._emit = emit
        self._pool = pool
        self._tx_slots = transactional_slots
        self._key_retention = key_retention
        self._max_message_size = max_message_size
        self._plans: dict[str, _Plan] = {}
        self._hooks: list[ExecuteHook] = hooks if hooks is not None else []
        self.decide = Decisions(defaults, submit, emit, max_result_size=max_result_size)

    def lease_for(self, task_name: str | None) -> float:
        task = self._tasks.get(task_name or "")
        lease = task.config.lease if task is not None else None
        return lease or self._defaults.lease or DEFAULT_LEASE

    def _plan(self, task: Task[Any, Any]) -> _Plan:
        """What every job of ``task`` needs of its configuration, worked out once."""
        plan = self._plans.get(task.name)
        if plan is None:
            timeout = task.config.timeout
            plan = self._plans[task.name] = _Plan(
                lease=self.lease_for(task.name),
                policy=task.retry_policy(self._defaults),
                timeout=timeout if timeout is not None else self._defaults.timeout,
            )
        return plan

    def new_job(self, queue: str, msg: jobs.Message, lease: float) -> Job:
        return claimed(queue, msg, lease)

    async def run(self, job: Job) -> None:
        """Run one job to its outcome. Never raises: this is the job boundary. (The checks
        are inline, not a coroutine of their own: a job pays for every level of coroutine
        between its task and its function as its run begins and again as it resumes.)"""
        try:
            msg = job.message
            headers = job.headers
            if msg.body is None:
                self.decide.dead(job, None, missing_body(msg.size, self._max_message_size), None)
                return
            try:
                env = envelope.decode(msg.body)
            except EnvelopeError as exc:
                self.decide.dead(job, None, f"malformed message: {clean_text(exc)}", exc)
                return
            job.task_name = env.task
            task = self._tasks.get(env.task)
            if msg.cancel_requested:  # asked while an earlier claim ran, which never heard
                self.decide.cancelled(job, task, None, 0.0, ran=False)
                return
            # before the task's own lease replaces the claim's (which dates the claim)
            expired = _expired(job) if envelope.HEADER_EXPIRES in headers else None
            if expired is not None:
                self.decide.expired(job, task, expired)
                return
            if task is None:
                known = ", ".join(sorted(self._tasks)) or "none"
                unknown = UnknownTask(
                    f"task {env.task!r} is not registered in this worker (known: {known})"
                )
                self.decide.failed(job, self._default_policy, unknown, 0.0)
                return
            plan = self._plan(task)
            job.lease = plan.lease
            job.policy = policy = plan.policy
            if job.attempt > policy.max_retries + 1:
                self.decide.dead(
                    job,
                    env.task,
                    f"attempt {job.attempt} exceeds max_retries={policy.max_retries}: the last "
                    "run(s) never finished (the worker crashed, lost the lease, or never "
                    "received the claim)",
                    None,
                )
                return
            try:
                args, kwargs = task.bind_message(env)
            except BaseException as exc:  # the job boundary: type hints' converters run user code
                reason = clean_text(exc) if isinstance(exc, TypeError | ValueError) else None
                self.decide.dead(
                    job,
                    env.task,
                    f"arguments do not fit the signature of {env.task!r}: "
                    f"{reason or describe_error(exc)}",
                    exc,
                )
                return
            key = headers.get(envelope.HEADER_IDEMPOTENCY_KEY)
            ctx = JobContext(  # by position: a job makes one, and keywords cost twice as much
                msg.msg_id,  # id
                job.queue,  # queue
                env.task,  # task
                job.attempt,  # attempt
                msg.enqueued_at,  # enqueued_at
                key if isinstance(key, str) else None,  # idempotency_key
                headers,  # headers
                None,  # connection (a transactional job's is added when it has one)
                scheduled_at(headers) if headers else None,  # scheduled_at
                job.control,  # control
            )
            if msg.key_holder is not None:
                self.decide.skip_done(job, ctx, task, msg.key_holder)
                return
            if not task.config.transactional:
                await self._execute_once(job, task, plan, ctx, args, kwargs, None)
            else:
                await self._execute_transactional(job, task, plan, ctx, args, kwargs)
        except BaseException as exc:  # a cancellation between the steps, or a pgtasks bug
            if self._interrupted(job, None, exc, 0.0):
                return
            logger.error("pgtasks failed to process %s: %s", job, describe_error(exc))
            self.decide.failed(job, job.policy or self._default_policy, exc, 0.0)

    def withdrawn(self, job: Job) -> None:
        """A job cancelled while it waited for a slot, before its run began: its outcome, by
        the reason (a stop hands it back, its attempt given back)."""
        if not self._interrupted(job, None, None, 0.0):
            self.decide.released(job, give_back=True)

    def _interrupted(
        self, job: Job, task: Task[Any, Any] | None, error: BaseException | None, duration: float
    ) -> bool:
        """Handle a run that ended by a cancellation with a reason; False if it had none (or
        a timeout: a failed attempt, which the caller records)."""
        reason = job.cancel_reason
        if reason is CancelReason.LOST_LEASE:
            self.decide.lost(job)
            return True
        if reason is CancelReason.STOP:
            self.decide.released(job, give_back=True)
            return True
        if reason is CancelReason.REQUESTED:
            self.decide.cancelled(job, task, error, duration)
            return True
        return False

    async def _execute_transactional(
        self,
        job: Job,
        task: Task[Any, Any],
        plan: _Plan,
        ctx: JobContext,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        job.transactional = True
        async with self._tx_slots or contextlib.nullcontext():  # leave a pooled connection
            pool, conn = await self._connection_for(job)
            try:
                await self._execute_once(job, task, plan, ctx, args, kwargs, conn)
            finally:
                await pool.release(conn)

    async def _connection_for(self, job: Job) -> tuple[asyncpg.Pool, PoolConnectionProxy]:
        """A pooled connection for a transactional job. While none can be opened (the
        database is down, at max_connections), the job waits, claimed, its lease kept,
        trying again after 0.1 s, 0.2 s, ... up to 5 s: handing it back at once would only
        claim it again in a hot loop, and it has not run, so it has not failed."""
        backoff = 0.1
        while True:
            try:
                pool = await self._pool()
                return pool, await acquire(pool)
            except DatabaseUnavailable as exc:
                logger.warning(
                    "%s waits for a database connection (%s); trying again in %.1fs",
                    job,
                    exc,
                    backoff,
                )
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _execute_once(
        self,
        job: Job,
        task: Task[Any, Any],
        plan: _Plan,
        ctx: JobContext,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        conn: PoolConnectionProxy | None,
    ) -> None:
        timeout = plan.timeout
        job.start()
        self._emit(JobEvent("started", ctx.queue, ctx.id, ctx.attempt, ctx.task))
        logger.debug("running %s", job)
        started = time.monotonic()
        timer = (
            asyncio.get_running_loop().call_later(timeout, job.cancel, CancelReason.TIMEOUT)
            if timeout is not None
            else None
        )
        error: BaseException | None = None
        value: object = None
        try:
            if conn is not None:
                await self._run_in_transaction(conn, job, task, ctx, args, kwargs)
            else:
                token = _current.set(ctx)
                try:
                    if self._hooks:
                        value = await run_with_hooks(
                            self._hooks, ctx, self._call(job, task, args, kwargs)
                        )
                    elif task.is_async:
                        value = await task.fn(*args, **kwargs)
                    else:  # a plain def: in a thread, whose end the job waits for
                        value = await self.threads.run(job, task.fn, args, kwargs)
                finally:
                    _current.reset(token)
        except _LeaseLost:  # the ack found the message gone: the transaction rolled back
            self.decide.lost(job)
            return
        except BaseException as exc:  # the job boundary: whatever the task raised
            if self._interrupted(job, task, exc, time.monotonic() - started):
                return
            error = exc
        finally:
            if timer is not None:
                timer.cancel()
        duration = time.monotonic() - started
        if job.cancel_reason is CancelReason.LOST_LEASE:  # it swallowed the cancellation
            self.decide.lost(job)
        elif error is None and conn is not None:
            self.decide.transactional_succeeded(job, ctx, duration)
        elif error is None:
            self.decide.succeeded(job, task, ctx, duration, value)
        else:
            if job.cancel_reason is CancelReason.TIMEOUT:
                error = JobTimeout(f"the run exceeded its time limit of {timeout:g}s")
            self.decide.failed(job, plan.policy, error, duration)

    def _call(
        self, job: Job, task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Callable[[], Awaitable[Any]]:
        """The run, as the execute hooks call it."""
        if task.is_async:
            return lambda: task.fn(*args, **kwargs)
        return lambda: self.threads.run(job, task.fn, args, kwargs)

    async def _run_in_transaction(
        self,
        conn: PoolConnectionProxy,
        job: Job,
        task: Task[Any, Any],
        ctx: JobContext,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """The task's writes, its ack, its key and its result commit together, or not at
        all. The job's outcome is decided before the ack is sent, so a lease extension that
        meets the commit cannot report it lost."""
        async with conn.transaction():
            job_ctx = ctx._replace(connection=conn)
            token = _current.set(job_ctx)
            try:
                if self._hooks:
                    call = lambda: task.fn(*args, **kwargs)  # noqa: E731
                    value = await run_with_hooks(self._hooks, job_ctx, call)
                else:
                    value = await task.fn(*args, **kwargs)
            finally:
                _current.reset(token)
            if not job.finish():  # its lease was lost (or it was cancelled) while it ran
                raise _LeaseLost
            result, result_error = self.decide.result(task, value)
            acked = await jobs.messages_ack(
                conn,
                job.queue,
                [job.token],
                archive=self.decide.archive(task),
                key_retention=self._key_retention,
                results=[(result, result_error, self.decide.ttl(task))]
                if result is not None or result_error is not None
                else None,
            )
            if not acked:
                raise _LeaseLost
            end = self.decide.step_succeeded(job, task, value)
            if end is not None:  # the next step, in this transaction
                await workflows.steps_ended(conn, [end])


@dataclass(frozen=True, slots=True)
class _Plan:
    """A task's configuration as its jobs use it, with the app's defaults filled in."""

    lease: float
    policy: RetryPolicy
    timeout: float | None


def _expired(job: Job) -> str | None:
    """When this job expired, if it did before it starts now (on the database's clock: the
    claim set vt to its time plus the lease, and a job claimed ahead of the slots has waited
    since); None if it has not, or the header is not a number of seconds (after the enqueue)
    or an ISO time."""
    value = job.headers.get(envelope.HEADER_EXPIRES)
    msg = job.message
    claimed_at = msg.vt - dt.timedelta(seconds=job.lease)  # the lease the claim took
    starts_at = claimed_at + dt.timedelta(seconds=time.monotonic() - job.claimed_at)
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            deadline = msg.enqueued_at + dt.timedelta(seconds=value)
        except (OverflowError, ValueError):
            return None
    elif isinstance(value, str):
        try:
            deadline = dt.datetime.fromisoformat(value)
        except ValueError:
            return None
        if deadline.tzinfo is None:
            return None
    else:
        return None
    return deadline.isoformat() if starts_at > deadline else None
