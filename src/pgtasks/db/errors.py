"""What a database error means for the code that met it: one classification for every loop.

`classify` sorts an exception into one of three kinds, once, so that no call site decides
for itself what is worth retrying:

* ``TRANSIENT``: the same operation may well succeed if tried again after a pause. The
  connection broke or could not be opened, the server is shutting down or restarting, the
  statement was cancelled (``statement_timeout``, an operator), a deadlock or serialization
  failure, a lock not available, too many connections, out of memory or disk.
* ``BAD_DATA``: the database refused a *value* (SQLSTATE classes 22 and 23, and 54,
  program limits): a NUL character, a lone surrogate, a number or interval out of range, a
  constraint. Trying again with the same value fails again; the value must be reduced.
* ``PERMANENT``: anything else, foremost a schema or privilege problem (an undefined
  table or function, a missing schema, permission denied) and any error that is not the
  database's (a bug). Trying again will not help until a person changes something.

`translate` turns the database errors a user can do something about into `PgTasksError`
subclasses whose messages say what to do.
"""

from __future__ import annotations

import enum

import asyncpg

from ..exceptions import (
    DatabaseError,
    DatabaseUnavailable,
    PermissionDenied,
    PgTasksError,
    QueueNotFound,
    SchemaMissing,
)


class ErrorKind(enum.Enum):
    TRANSIENT = "transient"
    BAD_DATA = "bad data"
    PERMANENT = "permanent"


# Client-side failures of the connection itself (asyncpg's own classes and the OS's).
_CLIENT_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    DatabaseUnavailable,
)

LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout, or NOWAIT

# SQLSTATE classes and codes that a pause and another try can fix.
_TRANSIENT_CLASSES = frozenset({"08", "40", "53", "57", "58"})
_TRANSIENT_CODES = frozenset({LOCK_NOT_AVAILABLE, "55006"})
_BAD_DATA_CLASSES = frozenset({"22", "23", "54"})
# A database, schema or relation or function that does not exist.
_MISSING_CODES = frozenset({"3D000", "3F000", "42P01", "42883", "42704"})
# pgtasks' own (migration 0007): a job for a missing queue while queue creation is off.
QUEUE_NOT_FOUND = "PGQ01"


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error, else None."""
    if isinstance(exc, asyncpg.PostgresError):
        code = getattr(exc, "sqlstate", None)
        return code if isinstance(code, str) else None
    return None


def classify(exc: BaseException) -> ErrorKind:
    """Transient, bad data or permanent; see the module docstring."""
    code = sqlstate(exc)
    if code is not None:
        if code in _TRANSIENT_CODES or code[:2] in _TRANSIENT_CLASSES:
            return ErrorKind.TRANSIENT
        if code[:2] in _BAD_DATA_CLASSES:
            return ErrorKind.BAD_DATA
        return ErrorKind.PERMANENT
    if isinstance(exc, _CLIENT_TRANSIENT):
        return ErrorKind.TRANSIENT
    if isinstance(exc, UnicodeError | OverflowError):  # a value asyncpg could not encode
        return ErrorKind.BAD_DATA
    return ErrorKind.PERMANENT


def is_transient(exc: BaseException) -> bool:
    return classify(exc) is ErrorKind.TRANSIENT


def translate(exc: BaseException, what: str) -> PgTasksError | None:
    """A `PgTasksError` for a database error a user can act on (``what`` names the
    operation, as in "deferring 'x' to 'q'"), else None. Transient errors are not
    translated here: the caller knows whether anything may have been done."""
    if isinstance(exc, PgTasksError):
        return exc
    code = sqlstate(exc)
    if code is None:
        return None
    if code == QUEUE_NOT_FOUND:
        return QueueNotFound(f"{what} failed: {getattr(exc, 'message', None) or exc}")
    if code in _MISSING_CODES and _names_ours(exc):
        return SchemaMissing(
            f"{what} failed: the database has no pgtasks schema (or pgmq), or it is out of "
            f"date ({exc}); run 'python -m pgtasks migrate --app ...' first"
        )
    if code == "42501":
        return PermissionDenied(
            f"{what} failed: permission denied ({exc}); grant this role the privileges "
            "pgtasks needs (see docs/migrations.md, 'Roles and privileges')"
        )
    kind = classify(exc)
    if kind is ErrorKind.BAD_DATA:
        return DatabaseError(f"{what} failed: the database refused a value ({exc})")
    if kind is ErrorKind.PERMANENT:
        return DatabaseError(f"{what} failed: {type(exc).__name__}: {exc}")
    return None


def _names_ours(exc: BaseException) -> bool:
    text = str(exc)
    return "pgtasks" in text or "pgmq" in text or isinstance(exc, asyncpg.InvalidSchemaNameError)
