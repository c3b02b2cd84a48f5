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

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson

from . import envelope
from ._completer import Outcome
from ._db.queries import Message
from .context import JobContext, JobEvent, _current
from .exceptions import EnvelopeError, UnknownTask
from .retry import Fail, Retry, RetryPolicy
from .task import Task, TaskConfig

logger = logging.getLogger("pgtasks")


@dataclass(eq=False)
class Job:
    """A claimed message while this worker holds it."""

    queue: str
    message: Message
    lease: float
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    extended_at: float = field(default_factory=time.monotonic)
    lost: bool = False

    @property
    def key(self) -> tuple[str, int]:
        return (self.queue, self.message.msg_id)


class Executor:
    def __init__(
        self,
        tasks: dict[str, Task[Any, Any]],
        defaults: TaskConfig,
        submit: Callable[[Outcome], None],
        emit: Callable[[JobEvent], None],
    ) -> None:
        self._tasks = tasks
        self._defaults = defaults
        self._default_policy = RetryPolicy.from_config(TaskConfig(), defaults)
        self._submit = submit
        self._emit = emit

    def lease_for(self, task_name: str | None) -> float:
        task = self._tasks.get(task_name or "")
        lease = task.config.lease if task is not None else None
        return lease or self._defaults.lease or 30.0

    async def run(self, job: Job) -> None:
        msg = job.message
        headers = _headers(msg.headers)
        try:
            env = envelope.decode(msg.body)
        except EnvelopeError as exc:
            self._dead(job, None, f"malformed message: {exc}", exc)
            return
        task = self._tasks.get(env.task)
        if task is None:
            known = ", ".join(sorted(self._tasks)) or "none"
            exc2 = UnknownTask(
                f"task {env.task!r} is not registered in this worker (known: {known})"
            )
            self._failed(job, env.task, self._default_policy, exc2, 0.0)
            return
        job.lease = self.lease_for(env.task)
        policy = task.retry_policy(self._defaults)
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
            bound = task.bind_message(env.args, env.kwargs)
        except (TypeError, ValueError, KeyError) as exc:
            self._dead(
                job, env.task, f"arguments do not fit the signature of {env.task!r}: {exc}", exc
            )
            return
        ctx = JobContext(
            id=msg.msg_id,
            queue=job.queue,
            task=env.task,
            attempt=msg.read_ct,
            enqueued_at=msg.enqueued_at,
            idempotency_key=headers.get(envelope.HEADER_IDEMPOTENCY_KEY),
            headers=headers,
        )
        await self._execute(job, task, policy, ctx, bound.args, bound.kwargs)

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
        logger.debug("pgtasks: running %s (id %d, attempt %d)", ctx.task, ctx.id, ctx.attempt)
        timeout = task.config.timeout if task.config.timeout is not None else self._defaults.timeout
        token = _current.set(ctx)
        started = time.monotonic()
        error: BaseException | None = None
        try:
            with job.scope:
                try:
                    with anyio.fail_after(timeout):
                        await task.fn(*args, **kwargs)
                except anyio.get_cancelled_exc_class():
                    raise
                except Exception as exc:  # the job boundary
                    error = exc
        except anyio.get_cancelled_exc_class():
            # worker shutdown: hand the message back at once, then let cancellation go on
            if not job.lost:
                self._submit(Outcome("release", job.queue, ctx.id, job.message.read_ct))
            raise
        finally:
            _current.reset(token)
        duration = time.monotonic() - started
        if job.lost:
            logger.warning(
                "pgtasks: %s (id %d, attempt %d) was cancelled because its lease was lost; "
                "it is not acked here",
                ctx.task,
                ctx.id,
                ctx.attempt,
            )
            return
        if error is None:
            logger.debug("pgtasks: %s (id %d) succeeded in %.3fs", ctx.task, ctx.id, duration)
            archive = (task.config.on_success or self._defaults.on_success) != "delete"
            event = JobEvent("succeeded", ctx.queue, ctx.id, ctx.attempt, ctx.task, None, duration)
            self._submit(
                Outcome("ack", job.queue, ctx.id, job.message.read_ct, archive, event=event)
            )
            return
        self._failed(job, ctx.task, policy, error, duration)

    def _failed(
        self,
        job: Job,
        task_name: str,
        policy: RetryPolicy,
        error: BaseException,
        duration: float,
    ) -> None:
        msg = job.message
        self._emit(
            JobEvent("failed", job.queue, msg.msg_id, msg.read_ct, task_name, error, duration)
        )
        if policy.should_retry(error, msg.read_ct):
            delay = error.delay if isinstance(error, Retry) and error.delay is not None else None
            if delay is None:
                delay = policy.backoff(msg.read_ct)
            logger.warning(
                "pgtasks: %s (id %d, queue %s) failed on attempt %d after %.3fs: %s; "
                "retrying in %.1fs",
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
                Outcome("retry", job.queue, msg.msg_id, msg.read_ct, delay=delay, event=event)
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
            "pgtasks: message %d in queue %s (task %s, attempt %d) moved to dead letters: %s",
            msg.msg_id,
            job.queue,
            task_name or "?",
            msg.read_ct,
            reason,
        )
        event = JobEvent(
            "dead", job.queue, msg.msg_id, msg.read_ct, task_name, error, duration, reason=reason
        )
        self._submit(
            Outcome(
                "dead",
                job.queue,
                msg.msg_id,
                msg.read_ct,
                task=task_name,
                reason=reason,
                error=_error_json(error),
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


def _error_json(error: BaseException | None) -> str | None:
    if error is None:
        return None
    tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return orjson.dumps(
        {"type": type(error).__qualname__, "message": str(error), "traceback": tb[-8000:]}
    ).decode()
