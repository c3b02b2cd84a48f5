"""The one classification of database errors that every loop and the producer use."""

from __future__ import annotations

import asyncpg
import pytest

from pgtasks import DatabaseError, DatabaseUnavailable, PermissionDenied, SchemaMissing
from pgtasks.db.errors import ErrorKind, classify, translate


def _pg(cls: type[asyncpg.PostgresError], message: str = "boom") -> asyncpg.PostgresError:
    return cls(message)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ConnectionResetError(), ErrorKind.TRANSIENT),
        (TimeoutError(), ErrorKind.TRANSIENT),
        (asyncpg.InterfaceError("cannot switch state"), ErrorKind.TRANSIENT),
        (DatabaseUnavailable("down"), ErrorKind.TRANSIENT),
        (_pg(asyncpg.QueryCanceledError), ErrorKind.TRANSIENT),
        (_pg(asyncpg.DeadlockDetectedError), ErrorKind.TRANSIENT),
        (_pg(asyncpg.SerializationError), ErrorKind.TRANSIENT),
        (_pg(asyncpg.LockNotAvailableError), ErrorKind.TRANSIENT),
        (_pg(asyncpg.TooManyConnectionsError), ErrorKind.TRANSIENT),
        (_pg(asyncpg.AdminShutdownError), ErrorKind.TRANSIENT),
        (_pg(asyncpg.CannotConnectNowError), ErrorKind.TRANSIENT),
        (_pg(asyncpg.UndefinedTableError), ErrorKind.PERMANENT),
        (_pg(asyncpg.InsufficientPrivilegeError), ErrorKind.PERMANENT),
        (_pg(asyncpg.InvalidSchemaNameError), ErrorKind.PERMANENT),
        (_pg(asyncpg.UndefinedFunctionError), ErrorKind.PERMANENT),
        (_pg(asyncpg.CharacterNotInRepertoireError), ErrorKind.BAD_DATA),
        (_pg(asyncpg.DatetimeFieldOverflowError), ErrorKind.BAD_DATA),
        (_pg(asyncpg.DataError), ErrorKind.BAD_DATA),
        (_pg(asyncpg.UniqueViolationError), ErrorKind.BAD_DATA),
        (_pg(asyncpg.ProgramLimitExceededError), ErrorKind.BAD_DATA),
        (UnicodeEncodeError("utf-8", "\udc80", 0, 1, "surrogates not allowed"), ErrorKind.BAD_DATA),
        (RuntimeError("a bug"), ErrorKind.PERMANENT),
    ],
)
def test_classify(exc: BaseException, kind: ErrorKind) -> None:
    assert classify(exc) is kind


def test_translate_names_what_to_do() -> None:
    missing = translate(
        _pg(asyncpg.InvalidSchemaNameError, 'schema "pgtasks" does not exist'), "deferring 'x'"
    )
    assert isinstance(missing, SchemaMissing)
    assert "pgtasks migrate" in str(missing)
    denied = translate(
        _pg(asyncpg.InsufficientPrivilegeError, "permission denied for table q_x"), "deferring"
    )
    assert isinstance(denied, PermissionDenied)
    assert "permission denied for table q_x" in str(denied)
    refused = translate(_pg(asyncpg.DatetimeFieldOverflowError, "interval out of range"), "d")
    assert isinstance(refused, DatabaseError)
    assert translate(ConnectionResetError(), "d") is None
