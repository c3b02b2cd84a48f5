"""Errors raised by pgtasks.

Every error pgtasks raises on purpose derives from `PgTasksError`, so one ``except`` clause
catches them all::

    PgTasksError
    ├── ConfigurationError          no DSN, bad option, app that cannot be loaded
    │   └── SchemaMissing           the database was never migrated (run `pgtasks migrate`)
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


class ScheduleNotFound(PgTasksError):
    """No schedule of that name is in ``pgtasks.schedules`` (or it is orphaned, for an
    action that needs a live one)."""
