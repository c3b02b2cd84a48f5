"""A connection owned by one of the worker's loops, outside the app's pool.

The worker's own loops (the fetcher's claims, the completer's writes) each hold one
connection of their own, so they never wait for a connection behind task code (a
transactional job holds a pooled connection for its whole run) and no connection is ever
used by two operations at once: each is used by one loop, one statement after another.

A connection whose statement was interrupted (cancelled, timed out, broken) is closed at
once and replaced on next use, never reused: after an interrupted statement, asyncpg may
still be waiting for the server's reply, and a new statement on it would fail with
"another operation is in progress".
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg

from ..db.errors import ErrorKind, classify


class OwnConnection:
    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]]) -> None:
        self._connect = connect
        self._conn: asyncpg.Connection | None = None

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[asyncpg.Connection]:
        """The connection, opened if needed (`DatabaseUnavailable` when it cannot be). Any
        failure but a server error on a healthy connection closes it."""
        conn = self._conn
        if conn is None or conn.is_closed():
            conn = self._conn = await self._connect()
        try:
            yield conn
        except BaseException as exc:
            if not _keeps_connection(conn, exc):
                self.close()
            raise

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()


def _keeps_connection(conn: asyncpg.Connection, exc: BaseException) -> bool:
    """A statement the server refused leaves the connection usable, unless the error is
    about the connection itself or a transaction was left open."""
    return (
        isinstance(exc, asyncpg.PostgresError)
        and classify(exc) is not ErrorKind.TRANSIENT
        and not conn.is_closed()
        and not conn.is_in_transaction()
    )
