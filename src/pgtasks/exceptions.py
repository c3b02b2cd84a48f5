"""Errors raised by pgtasks.

Every error pgtasks raises on purpose derives from `PgTasksError`, so one ``except`` clause
catches them all::

    PgTasksError
    ├── ConfigurationError          no DSN, bad option, app that cannot be loaded
    │   ├── SchemaMissing           the database was never migrated (run `pgtasks migrate`)
    │   └── QueueNotFound           a job for a missing queue, with queue creation off
    ├── DatabaseUnavailable         connection refused, auth failed, missing database
    ├── DatabaseError               the database refused an operation or a value
    │   └── PermissionDenied        the role lacks a privilege pgtasks needs
    ├── MigrationError              pgmq or the pgtasks schema could not be installed
    ├── QueueNameError (ValueError) a queue name outside ^[a-z][a-z0-9_]{0,39}$
    ├── SerializationError          arguments orjson cannot encode, or a message over the limit
    │   └── MessageTooLarge
    ├── EnvelopeError               a message body that is not a pgtasks envelope
    ├── UnknownTask                 a message names a task this process does not know
    ├── JobNotFound                 an id that names no job
    ├── JobFailed                   the job awaited ended in the dead letters
    │   └── WorkflowFailed          a step of the workflow awaited failed for good
    ├── JobCancelled                the job awaited was cancelled
    │   └── JobExpired              ... or expired before it started
    ├── ResultUnavailable           the job succeeded, and no result was kept
    ├── AppClosed                   the app was closed while a result was awaited
    └── ScheduleNotFound            a name that names no schedule

`Retry` and `Fail` are signals a task raises to steer its own retries. They are not errors
and live in `pgtasks.retry`, outside this tree.
"""

from __future__ import annotations


class PgTasksError(Exception):
    """Base class of every error pgtasks raises on purpose."""


class ConfigurationError(PgTasksError):
    """The configuration is incomplete or contradictory; the message says what to set."""


class SchemaMissing(ConfigurationError):
    """The database has no pgtasks schema (or no pgmq): run ``python -m pgtasks migrate``."""


class QueueNotFound(ConfigurationError):
    """A job was deferred to a queue that does not exist while queue creation on enqueue is
    off (``App(create_queues=False)``, or the database's setting): nothing was sent. Create
    the queue with ``python -m pgtasks migrate`` (the app's tasks' queues), or fix the
    queue name."""


class DatabaseUnavailable(PgTasksError):
    """The database could not be reached or refused the connection.

    The message names host, port and database (never the password) and the cause.
    """


class DatabaseError(PgTasksError):
    """The database refused an operation or a value; the message says which and why."""


class PermissionDenied(DatabaseError):
    """The database role lacks a privilege pgtasks needs; see docs/migrations.md."""


class MigrationError(PgTasksError):
    """pgmq or the pgtasks schema could not be installed or upgraded."""


class QueueNameError(PgTasksError, ValueError):
    """A queue name pgtasks does not accept."""


class SerializationError(PgTasksError):
    """Task arguments could not be encoded as a message; nothing was sent."""


class MessageTooLarge(SerializationError):
    """An encoded message is over the configured size limit; nothing was sent."""


class EnvelopeError(PgTasksError):
    """A message body is not a valid pgtasks envelope."""


class UnknownTask(PgTasksError):
    """A message names a task that is not registered in this process."""


class JobNotFound(PgTasksError):
    """No job with that id exists (any more) where it was looked for."""


class JobFailed(PgTasksError):
    """The job whose result was awaited failed for good (it is in the dead letters, or was
    retried from there as a new job).

    Attributes:
        error_type: the type name of its last attempt's exception (or None).
        error_message: that exception's message.
        traceback: its traceback, as text.
        reason: why it was dead-lettered (e.g. "retries exhausted after 4 attempt(s)").
        retried_as: the id of the job its dead letter was retried as (same queue), if it
            was: ``await app.job(queue, retried_as).result()`` waits for that one.
    """

    def __init__(
        self,
        message: str,
        *,
        error_type: str | None = None,
        error_message: str | None = None,
        traceback: str | None = None,
        reason: str | None = None,
        retried_as: int | None = None,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.error_message = error_message
        self.traceback = traceback
        self.reason = reason
        self.retried_as = retried_as


class JobCancelled(PgTasksError):
    """The job whose result was awaited was cancelled."""


class JobExpired(JobCancelled):
    """The job whose result was awaited expired before it started (``options(expires=)``)."""


class ResultUnavailable(PgTasksError):
    """The job succeeded, and no result of it was kept: its task keeps none
    (``keep_result=False``), the result was too large or could not be encoded, or its
    record was pruned after ``result_ttl``."""


class AppClosed(PgTasksError):
    """The app was closed (``await app.close()``) while a coroutine awaited a job's result
    (or a workflow's): the wait ends with this error instead of hanging. The job itself is
    not affected; a handle from an app that is open again can wait for it."""


class WorkflowFailed(JobFailed):
    """A step of the workflow whose result was awaited failed for good (or expired).

    Attributes:
        step: the step's place in the workflow (0 is the first).
        error: its error (``type``, ``message``, ``reason``, ``outcome``).
    """

    def __init__(self, message: str, *, step: int | None, error: dict[str, object]) -> None:
        super().__init__(
            message,
            error_type=str(error["type"]) if "type" in error else None,
            error_message=str(error["message"]) if "message" in error else None,
            traceback=str(error["traceback"]) if "traceback" in error else None,
            reason=str(error["reason"]) if "reason" in error else None,
        )
        self.step = step
        self.error = error


class ScheduleNotFound(PgTasksError):
    """No schedule of that name is in ``pgtasks.schedules`` (or it is orphaned, for an
    action that needs a live one)."""
