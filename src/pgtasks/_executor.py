"""The executor: runs one claimed message and decides its outcome.

decode the envelope -> find the task -> bind the arguments -> run under the job's cancel
scope (lease loss) and the task's timeout -> outcome. Nothing here writes to the database:
outcomes go to the completer. Broad exceptions are caught only here, at the job boundary;
cancellation (worker shutdown) always propagates, after queueing a release of the message.

Poison messages never loop: a body that is not an envelope, or arguments that do not bind,
go to the dead letters at once; an unknown task is retried with backoff (a rolling deploy
may bring a worker that knows it), then dead-lettered; a message whose attempts already
exceed the policy (runs that crashed the worker or lost the lease) is dead-lettered before
it runs again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import anyio
import asyncpg
import orjson

from . import envelope
from ._completer import Outcome
from ._db import queries
from ._db.connect import CONNECTION_ERRORS, acquire_clean
from ._db.queries import Message
from .context import JobContext, JobEvent, _current
from .exceptions import EnvelopeError, UnknownTask
from .retry import Fail, Retry, RetryPolicy
from .tasks import Task, TaskConfig

logger = logging.getLogger("pgtasks")


@dataclass(eq=False, slots=True)
class Job:
    """A claimed message while this worker holds it.

    Each job runs as an asyncio task of its own (``task``). Cancelling it either loses the
    lease (the lease keeper sets ``lost`` first: nothing is written back) or stops the
    worker (the message is handed back at once). A plain task, not an anyio task group
    member with a cancel scope of its own, because the worker starts thousands a second and
    that machinery cost about half of the worker's CPU per job.
    """

    queue: str
    message: Message
    lease: float
    task: asyncio.Task[None] | None = None
    extended_at: float = field(default_factory=time.monotonic)
    lost: bool = False
    task_name: str | None = None  # once the body is decoded
    transactional: bool = False

    def lose(self) -> None:
        """The lease is gone (another worker may hold the message): cancel this run."""
        self.lost = True
        if self.task is not None:
            self.task.cancel()

    @property
    def key(self) -> tuple[str, int]:
        return (self.queue, self.message.msg_id)


class _LeaseLost(Exception):
    """Raised inside a transactional job's transaction when its ack finds the message gone
    or taken: the transaction, and so the task's own writes, roll back."""


class Executor:
    def __init__(
        self,
        tasks: dict[str, Task[Any, Any]],
        defaults: TaskConfig,
        pool: asyncpg.Pool,
        submit: Callable[[Outcome], None],
        emit: Callable[[JobEvent], None],
        *,
        key_retention: float,
    ) -> None:
        self._tasks = tasks
        self._defaults = defaults
        self._default_policy = RetryPolicy.from_config(TaskConfig(), defaults)
        self._pool = pool
        self._submit = submit
        self._emit = emit
        self._key_retention = key_retention
        self._policies: dict[str, RetryPolicy] = {}

    def lease_for(self, task_name: str | None) -> float:
        task = self._tasks.get(task_name or "")
        lease = task.config.lease if task is not None else None
        return lease or self._defaults.lease or 30.0

    async def run(self, job: Job) -> None:
        """Run one job to its outcome. Cancelled by a lost lease, it writes nothing and
        returns; cancelled by a stop, it hands the message back and re-raises."""
        try:
            await self._run(job)
        except asyncio.CancelledError:
            if job.lost:
                self._log_lost(job)
                return
            self._submit(Outcome("release", job.queue, job.message.msg_id, job.message.read_ct))
            raise

    def _log_lost(self, job: Job) -> None:
        msg = job.message
        logger.warning(
            "%s (id %d, attempt %d, queue %s) lost its lease; this run is not acked%s",
            job.task_name or "message",
            msg.msg_id,
            msg.read_ct,
            job.queue,
            " and its transaction was rolled back" if job.transactional else "",
        )

    async def _run(self, job: Job) -> None:
        msg = job.message
        headers = _headers(msg.headers)
        try:
            env = envelope.decode(msg.body)
        except EnvelopeError as exc:
            self._dead(job, None, f"malformed message: {exc}", exc)
            return
        job.task_name = env.task
        task = self._tasks.get(env.task)
        if task is None:
            known = ", ".join(sorted(self._tasks)) or "none"
            unknown = UnknownTask(
                f"task {env.task!r} is not registered in this worker (known: {known})"
            )
            self._failed(job, env.task, self._default_policy, unknown, 0.0)
            return
        job.lease = self.lease_for(env.task)
        policy = self._policies.get(env.task)
        if policy is None:
            policy = self._policies[env.task] = task.retry_policy(self._defaults)
        if msg.read_ct > policy.max_retries + 1:
            self._dead(
                job,
                env.task,
                f"attempt {msg.read_ct} exceeds max_retries={policy.max_retries}: the last "
                "run(s) never finished (the worker crashed or lost the lease)",
                None,
            )
            return
        try:
            args, kwargs = task.bind_message(env)
        except Exception as exc:  # the job boundary: type hints' converters raise anything
            reason = exc if isinstance(exc, TypeError | ValueError) else _describe(exc)
            self._dead(
                job, env.task, f"arguments do not fit the signature of {env.task!r}: {reason}", exc
            )
            return
        key = headers.get(envelope.HEADER_IDEMPOTENCY_KEY)
        ctx = JobContext(
            id=msg.msg_id,
            queue=job.queue,
            task=env.task,
            attempt=msg.read_ct,
            enqueued_at=msg.enqueued_at,
            idempotency_key=key if isinstance(key, str) else None,
            headers=headers,
        )
        if ctx.idempotency_key and await self._already_done(job, ctx, task):
            return
        await self._execute(job, task, policy, ctx, args, kwargs)

    async def _already_done(self, job: Job, ctx: JobContext, task: Task[Any, Any]) -> bool:
        """A job whose key another job already completed is acked without running. True
        when the job is dealt with here (also: handed back, as the check could not run)."""
        assert ctx.idempotency_key is not None
        try:
            async with acquire_clean(self._pool) as conn:
                other = await queries.key_succeeded_elsewhere(conn, ctx.idempotency_key, ctx.id)
        except CONNECTION_ERRORS as exc:
            # the job has not run: hand it back now rather than let it wait out its lease
            logger.warning(
                "%s (id %d): could not check its idempotency key (%s); handing it back",
                ctx.task,
                ctx.id,
                exc,
            )
            self._submit(Outcome("release", job.queue, ctx.id, ctx.attempt))
            return True
        if other is None:
            return False
        logger.info(
            "%s (id %d) skipped: idempotency key %r already succeeded with job %d",
            ctx.task,
            ctx.id,
            ctx.idempotency_key,
            other,
        )
        event = JobEvent(
            "succeeded", ctx.queue, ctx.id, ctx.attempt, ctx.task, reason="already done"
        )
        self._submit(
            Outcome("ack", job.queue, ctx.id, ctx.attempt, self._archive(task), event=event)
        )
        return True

    def _archive(self, task: Task[Any, Any]) -> bool:
        return (task.config.on_success or self._defaults.on_success) != "delete"

    async def _execute(
        self,
        job: Job,
        task: Task[Any, Any],
        policy: RetryPolicy,
        ctx: JobContext,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self._emit(JobEvent("started", ctx.queue, ctx.id, ctx.attempt, ctx.task))
        logger.debug("running %s (id %d, attempt %d)", ctx.task, ctx.id, ctx.attempt)
        timeout = task.config.timeout if task.config.timeout is not None else self._defaults.timeout
        started = time.monotonic()
        error: BaseException | None = None
        acked = False
        job.transactional = task.config.transactional
        try:
            with anyio.fail_after(timeout) if timeout is not None else nullcontext():
                if task.config.transactional:
                    await self._run_in_transaction(job, task, ctx, args, kwargs)
                    acked = True
                else:
                    token = _current.set(ctx)
                    try:
                        await task.fn(*args, **kwargs)
                    finally:
                        _current.reset(token)
        except _LeaseLost:  # the ack found the message gone: the transaction rolled back
            job.lost = True
            self._log_lost(job)
            return
        except Exception as exc:  # the job boundary (cancellation is not an Exception)
            error = exc
        duration = time.monotonic() - started
        if job.lost:  # the task swallowed the cancellation: still, no outcome is ours to write
            self._log_lost(job)
            return
        if error is None:
            logger.debug("%s (id %d) succeeded in %.3fs", ctx.task, ctx.id, duration)
            event = JobEvent("succeeded", ctx.queue, ctx.id, ctx.attempt, ctx.task, None, duration)
            if acked:
                self._emit(event)
            else:
                self._submit(
                    Outcome("ack", job.queue, ctx.id, ctx.attempt, self._archive(task), event=event)
                )
            return
        self._failed(job, ctx.task, policy, error, duration)

    async def _run_in_transaction(
        self,
        job: Job,
        task: Task[Any, Any],
        ctx: JobContext,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        """The task's writes, its ack and its key commit together, or not at all."""
        async with self._pool.acquire() as conn, conn.transaction():
            token = _current.set(ctx._replace(connection=conn))
            try:
                await task.fn(*args, **kwargs)
            finally:
                _current.reset(token)
            acked = await queries.messages_ack(
                conn,
                job.queue,
                [(ctx.id, ctx.attempt)],
                archive=self._archive(task),
                key_retention=self._key_retention,
            )
            if not acked:
                raise _LeaseLost

    def _failed(
        self,
        job: Job,
        task_name: str,
        policy: RetryPolicy,
        error: BaseException,
        duration: float,
    ) -> None:
        msg = job.message
        failed = JobEvent("failed", job.queue, msg.msg_id, msg.read_ct, task_name, error, duration)
        self._emit(failed)
        if policy.should_retry(error, msg.read_ct):
            delay = error.delay if isinstance(error, Retry) and error.delay is not None else None
            if delay is None:
                delay = policy.backoff(msg.read_ct)
            logger.warning(
                "%s (id %d, queue %s) failed on attempt %d after %.3fs: %s; retrying in %.2fs",
                task_name,
                msg.msg_id,
                job.queue,
                msg.read_ct,
                duration,
                _describe(error),
                delay,
            )
            event = JobEvent(
                "retried", job.queue, msg.msg_id, msg.read_ct, task_name, error, duration, delay
            )
            self._submit(
                Outcome(
                    "retry",
                    job.queue,
                    msg.msg_id,
                    msg.read_ct,
                    delay=delay,
                    attempt_error=_attempt_error(msg, task_name, error),
                    event=event,
                )
            )
            return
        if isinstance(error, Fail):
            reason = f"failed: {error.reason}"
        elif policy.should_retry(error, 1):
            reason = f"retries exhausted after {msg.read_ct} attempt(s): {_describe(error)}"
        else:
            reason = f"not retryable: {_describe(error)}"
        self._dead(job, task_name, reason, error, duration)

    def _dead(
        self,
        job: Job,
        task_name: str | None,
        reason: str,
        error: BaseException | None,
        duration: float | None = None,
    ) -> None:
        msg = job.message
        logger.error(
            "message %d in queue %s (task %s, attempt %d) moved to dead letters: %s",
            msg.msg_id,
            job.queue,
            task_name or "?",
            msg.read_ct,
            reason,
        )
        event = JobEvent(
            "dead", job.queue, msg.msg_id, msg.read_ct, task_name, error, duration, reason=reason
        )
        record = _attempt_error(msg, task_name, error) if error is not None else None
        self._submit(
            Outcome(
                "dead",
                job.queue,
                msg.msg_id,
                msg.read_ct,
                task=task_name,
                reason=reason,
                error=_error_json(record),
                attempt_error=record,
                event=event,
            )
        )


def _headers(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _attempt_error(
    msg: Message, task_name: str | None, error: BaseException
) -> queries.AttemptError:
    tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return queries.AttemptError(
        msg.msg_id, task_name, msg.read_ct, type(error).__qualname__, str(error), tb[-8000:]
    )


def _error_json(record: queries.AttemptError | None) -> str | None:
    if record is None:
        return None
    return orjson.dumps(
        {"type": record.error_type, "message": record.message, "traceback": record.traceback}
    ).decode()
