"""What becomes of a job once its run (or its check) is over: the outcome the executor
hands the completer, the log line, and the event.

Every decision marks the job decided first (`Job.finish`), so that a late lease extension
or cancellation cannot change it. Retries follow the task's policy: `Retry` asks for one
(its delay cleaned: a task's data is never trusted), `Fail` and exhausted attempts go to the
dead letters. A result is kept when the task returns something other than None (or keeps
results explicitly), encoded as its arguments are; one that cannot be kept as it was (its
encoding raised anything at all, it holds NaN, an infinity or a NUL character, or it is over
the size limit) is not kept, and the record says why: the job still succeeded, and is never
run again for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson

from ..context import JobContext
from ..db.attempt_errors import AttemptError
from ..db.workflows import StepEnd
from ..serialization import envelope
from ..tasks import Fail, Retry, RetryPolicy, Task, TaskConfig
from ..tasks.config import TASK_DEFAULTS
from .events import JobEvent
from .job import Job, JobState
from .outcome import Outcome, attempt_error, clean_delay, clean_text, describe_error, error_json

logger = logging.getLogger("pgtasks")


class Decisions:
    def __init__(
        self,
        defaults: TaskConfig,
        submit: Callable[[Outcome], None],
        emit: Callable[[JobEvent], None],
        *,
        max_result_size: int,
    ) -> None:
        self._defaults = defaults
        self._submit = submit
        self._emit = emit
        self._max_result_size = max_result_size

    def archive(self, task: Task[Any, Any]) -> bool:
        return (task.config.on_success or self._defaults.on_success) != "delete"

    def ttl(self, task: Task[Any, Any] | None) -> float:
        """Seconds a job's record (its result, cancellation, expiry) is kept."""
        ttl = task.config.result_ttl if task is not None else None
        if ttl is None:
            ttl = self._defaults.result_ttl
        return ttl if ttl is not None else TASK_DEFAULTS["result_ttl"].default

    # --- the run is over -----------------------------------------------------------------

    def succeeded(
        self, job: Job, task: Task[Any, Any], ctx: JobContext, duration: float, value: object
    ) -> None:
        if not job.finish():
            return
        logger.debug("%s succeeded in %.3fs", job, duration)
        event = JobEvent("succeeded", ctx.queue, ctx.id, ctx.attempt, ctx.task, None, duration)
        result, result_error = self.result(task, value)
        self._submit(
            Outcome(
                "ack",
                job,
                self.archive(task),
                result=result,
                result_error=result_error,
                ttl=self.ttl(task) if result is not None or result_error is not None else 0.0,
                event=event,
                step_end=self.step_succeeded(job, task, value),
            )
        )

    def step_succeeded(self, job: Job, task: Task[Any, Any], value: object) -> StepEnd | None:
        """For a workflow's step: its result, to pass on (always encoded, whatever the task
        keeps), or why it cannot be."""
        if job.workflow is None:
            return None
        result, error = self.encoded(task, value)
        return StepEnd(*job.workflow, "succeeded", result, error)

    def result(self, task: Task[Any, Any], value: object) -> tuple[str | None, str | None]:
        """The result to keep as JSON text, or why none is kept (JSON text); (None, None)
        when nothing is to be kept: what a task annotated ``-> None`` costs."""
        if not keeps(task, self._defaults, value):
            return None, None
        return self.encoded(task, value)

    def encoded(self, task: Task[Any, Any], value: object) -> tuple[str | None, str | None]:
        """``value`` as JSON text, or why it cannot be kept (JSON text)."""
        try:
            data = envelope.dumps_result(value)
        except ValueError as exc:  # whatever went wrong: the job succeeded all the same
            return None, _result_error("ResultNotStored", f"the result of {task.name!r} {exc}")
        if len(data) > self._max_result_size:
            return None, _result_error(
                "ResultTooLarge",
                f"the result of {task.name!r} is {len(data):,} bytes, over the limit of "
                f"{self._max_result_size:,} bytes (App(max_result_size=...)); return a "
                "reference to the data instead",
            )
        return data.decode(), None

    def transactional_succeeded(self, job: Job, ctx: JobContext, duration: float) -> None:
        """A transactional job acked in its own transaction: only the event is left."""
        logger.debug("%s succeeded in %.3fs", job, duration)
        job.done()
        self._emit(JobEvent("succeeded", ctx.queue, ctx.id, ctx.attempt, ctx.task, None, duration))

    def skip_done(self, job: Job, ctx: JobContext, task: Task[Any, Any], holder: int) -> None:
        """A job whose key another job already completed is acked without running."""
        logger.info(
            "%s skipped: idempotency key %r already succeeded with job %d",
            job,
            ctx.idempotency_key,
            holder,
        )
        event = JobEvent(
            "succeeded", ctx.queue, ctx.id, ctx.attempt, ctx.task, reason="already done"
        )
        if job.finish():
            self._submit(Outcome("ack", job, self.archive(task), event=event))

    def failed(self, job: Job, policy: RetryPolicy, error: BaseException, duration: float) -> None:
        # Decided now; a transactional job may be decided already, when its ack or its
        # commit failed: whether it committed is then settled by the guard of the write
        # below (a committed ack leaves nothing to retry).
        job.finish()
        name = job.task_name
        self._emit(JobEvent("failed", job.queue, job.msg_id, job.attempt, name, error, duration))
        if policy.should_retry(error, job.attempt):
            delay = clean_delay(error.delay) if isinstance(error, Retry) else None
            if delay is None:
                delay = policy.backoff(job.attempt)
            logger.warning(
                "%s failed after %.3fs: %s; retrying in %.2fs",
                job,
                duration,
                describe_error(error),
                delay,
            )
            event = JobEvent(
                "retried", job.queue, job.msg_id, job.attempt, name, error, duration, delay
            )
            record = attempt_error(job, name, error)
            self._submit(Outcome("retry", job, delay=delay, attempt_error=record, event=event))
            return
        if isinstance(error, Fail):
            reason = f"failed: {clean_text(error.reason)}"
        elif policy.should_retry(error, 1):
            reason = f"retries exhausted after {job.attempt} attempt(s): {describe_error(error)}"
        else:
            reason = f"not retryable: {describe_error(error)}"
        self.dead(job, name, reason, error, duration, decided=True)

    def dead(
        self,
        job: Job,
        task_name: str | None,
        reason: str,
        error: BaseException | None,
        duration: float | None = None,
        *,
        decided: bool = False,
    ) -> None:
        if not job.finish() and not decided:
            return
        reason = clean_text(reason)
        logger.error("%s moved to dead letters: %s", job, reason)
        event = JobEvent(
            "dead", job.queue, job.msg_id, job.attempt, task_name, error, duration, reason=reason
        )
        record = attempt_error(job, task_name, error) if error is not None else None
        self._submit(
            Outcome(
                "dead",
                job,
                reason=reason,
                error=error_json(record),
                attempt_error=record,
                event=event,
                step_end=_step_end(job, "failed", reason, record),
            )
        )

    def cancelled(
        self,
        job: Job,
        task: Task[Any, Any] | None,
        error: BaseException | None,
        duration: float,
        *,
        ran: bool = True,
    ) -> None:
        """Cancelled as someone asked: recorded as such, never retried. Not ``ran``: the
        request came while an earlier claim ran, whose worker stopped or died before it
        heard; this claim ends the job without running it again. A job asked to cancel
        while it waited here for a slot ends so too, before it ran."""
        waited = ran and job.state is JobState.CLAIMED  # it never started
        if not job.finish():
            return
        if ran and not waited:
            how = (
                "its run ended" if error is None else f"its run ended with {describe_error(error)}"
            )
        elif waited:
            how = "it had not started (it waited for a slot or a connection); not run"
        else:
            how = "its cancellation was asked while an earlier claim of it ran; not run again"
        logger.info("%s cancelled, as requested; %s", job, how)
        reason = "cancelled before it ran" if waited else "cancelled while it ran"
        event = JobEvent(
            "cancelled",
            job.queue,
            job.msg_id,
            job.attempt,
            job.task_name,
            None,
            duration,
            reason=reason,
        )
        note = orjson.dumps({"reason": reason}).decode()
        end = _step_end(job, "cancelled", reason, None)
        self._submit(
            Outcome("cancel", job, error=note, ttl=self.ttl(task), event=event, step_end=end)
        )

    def expired(self, job: Job, task: Task[Any, Any] | None, when: str) -> None:
        """Not started before its ``expires``: recorded as expired, not run, not dead."""
        if not job.finish():
            return
        logger.info("%s expired at %s before it started; not run", job, when)
        event = JobEvent(
            "expired",
            job.queue,
            job.msg_id,
            job.attempt,
            job.task_name,
            reason=f"expired at {when}",
        )
        note = orjson.dumps({"reason": f"expired at {when} before it started"}).decode()
        end = _step_end(job, "expired", f"expired at {when} before it started", None)
        self._submit(
            Outcome("expire", job, error=note, ttl=self.ttl(task), event=event, step_end=end)
        )

    def released(self, job: Job, *, give_back: bool) -> None:
        if job.finish():
            self._submit(Outcome("release", job, give_back=give_back))

    def lost(self, job: Job) -> None:
        logger.warning(
            "%s lost its lease; this run is not acked%s",
            job,
            " and its transaction was rolled back" if job.transactional else "",
        )
        job.done()


def _step_end(job: Job, outcome: str, reason: str, record: AttemptError | None) -> StepEnd | None:
    """For a workflow's step that did not succeed: how, for the workflow (and its error
    callback)."""
    if job.workflow is None:
        return None
    error: dict[str, Any] = {"reason": reason}
    if record is not None:
        error.update(type=record.error_type, message=record.message)
    return StepEnd(*job.workflow, outcome, None, orjson.dumps(error).decode())


def keeps(task: Task[Any, Any], defaults: TaskConfig, value: object) -> bool:
    """Whether this return value is kept. ``keep_result`` (the task's, else the app's) says
    so when set; by default a task annotated ``-> None`` keeps nothing (and costs nothing
    more per job), one annotated with another type keeps every result (None too, so that
    ``result()`` can tell it from a pruned record), and one not annotated keeps what is not
    None."""
    keep = task.config.keep_result if task.config.keep_result is not None else defaults.keep_result
    if keep is not None:
        return keep
    returns = task.returns
    if returns is None:
        return False
    return value is not None or returns is not Any


def _result_error(kind: str, message: str) -> str:
    message = clean_text(message)  # it quotes the value's own errors
    logger.warning("%s", message)
    return orjson.dumps({"type": kind, "message": message}).decode()
