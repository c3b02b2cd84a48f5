"""`Database`: one handle on the database, which the layers above share instead of an `App`.

It knows where the database is (the DSN given, else ``PGTASKS_DSN``, else ``DATABASE_URL``,
else the embedded server; resolved on first use, see `connect.resolve_dsn`), opens the pool
on first use on the running event loop (and again on another loop, after a test's loop has
gone), opens dedicated connections for a worker's loops with the same statement cache size,
and closes the pool it opened. The producer side (`client`), the operator side (`admin`) and
the worker each take a `Database`; `App` makes one from its settings.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import asyncpg

from .._options import Number, Option, OptionSet, Text
from ..exceptions import ConfigurationError, DatabaseUnavailable
from .connect import (
    APPLICATION_NAME,
    DsnSource,
    connect,
    create_pool,
    describe,
    materialize,
    resolve_dsn,
)

logger = logging.getLogger("pgtasks")


LOCK_TIMEOUT = "2s"  # of the worker's own connections


def _refuses_parameter(exc: BaseException | None, name: str) -> bool:
    """Whether a connection failed because the server (a PgBouncer) refuses the startup
    parameter ``name``."""
    return isinstance(exc, asyncpg.ProtocolViolationError) and (
        f"unsupported startup parameter: {name}" in str(exc)
    )


def _pool_sizes(values: Mapping[str, Any], where: str) -> None:
    low, high = values.get("pool_min_size"), values.get("pool_max_size")
    if low is not None and high is not None and low > high:
        raise ConfigurationError(
            f"{where}: pool_min_size must be at most pool_max_size "
            f"(got pool_min_size={low} and pool_max_size={high})"
        )


DATABASE_OPTIONS = OptionSet(
    Option(
        "dsn",
        None,
        "the database URL (postgresql://user:password@host:port/database)",
        Text("a postgresql:// URL", none="unset", empty=True),
        default_text="$PGTASKS_DSN, else $DATABASE_URL, else the embedded server (an "
        "empty value counts as unset)",
    ),
    Option("pool_min_size", 1, "connections the pool keeps open", Number(0, 1_000, integer=True)),
    Option(
        "pool_max_size",
        10,
        "connections the pool opens at most (a worker's own loops use 3 more)",
        Number(1, 1_000, integer=True),
    ),
    Option(
        "statement_cache_size",
        100,
        "prepared statements asyncpg keeps per connection; 0 for PgBouncer in transaction "
        "mode before 1.21",
        Number(0, 100_000, integer=True),
    ),
    relations=(_pool_sizes,),
)
"""The database's options, which `App` takes and passes on."""


class Database:
    """Where the database is, and the connections to it.

    Args:
        dsn: a ``postgresql://`` URL. Default: ``PGTASKS_DSN``, else ``DATABASE_URL``, else
            the embedded server.
        pool_min_size: connections the pool keeps open.
        pool_max_size: connections the pool opens at most.
        statement_cache_size: prepared statements asyncpg keeps per connection (the pool's
            and the dedicated ones); 0 for PgBouncer in transaction mode before 1.21.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool_min_size: int = 1,
        pool_max_size: int = 10,
        statement_cache_size: int = 100,
    ) -> None:
        DATABASE_OPTIONS.check(
            {
                "dsn": dsn,
                "pool_min_size": pool_min_size,
                "pool_max_size": pool_max_size,
                "statement_cache_size": statement_cache_size,
            },
            "App",
        )
        self.pool_min_size = pool_min_size
        self.pool_max_size = pool_max_size
        self.statement_cache_size = statement_cache_size
        self._lock_timeout_refused = False  # by PgBouncer: see `connect`
        self._explicit_dsn = dsn
        self._dsn_source: DsnSource | None = None
        self._dsn: str | None = None
        self._pool: asyncpg.Pool | None = None
        self._pool_loop: asyncio.AbstractEventLoop | None = None
        self._pool_lock: asyncio.Lock | None = None

    def sibling(self) -> Database:
        """Another handle on the same database, with the same settings and a pool of its
        own: for another event loop (a pool belongs to the loop it was opened on)."""
        other = Database(
            self._explicit_dsn,
            pool_min_size=self.pool_min_size,
            pool_max_size=self.pool_max_size,
            statement_cache_size=self.statement_cache_size,
        )
        other._dsn_source, other._dsn = self._dsn_source, self._dsn
        return other

    def use_dsn(self, dsn: str | None) -> None:
        """Connect to ``dsn`` instead of what was configured (the CLI's ``--dsn``), as if it
        had been given at construction. Only before first use."""
        self._explicit_dsn = dsn
        self._dsn_source = None
        self._dsn = None

    @property
    def dsn_source(self) -> DsnSource:
        """The DSN and where it came from (resolved on first use)."""
        if self._dsn_source is None:
            self._dsn_source = resolve_dsn(self._explicit_dsn)
        return self._dsn_source

    async def dsn(self) -> str:
        """The DSN in use (starting the embedded server if that is the source)."""
        if self._dsn is None:
            self._dsn = await materialize(self.dsn_source)
        return self._dsn

    def where(self) -> str:
        """The database for messages: ``user@host:port/database``, without the password."""
        return describe(self._dsn) if self._dsn else "the database"

    async def pool(self) -> asyncpg.Pool:
        """The connection pool, opened on first use on the running event loop."""
        loop = asyncio.get_running_loop()
        if self._pool is not None and self._pool_loop is loop:
            return self._pool
        if self._pool_lock is None or self._pool_loop is not loop:
            self._pool_lock = asyncio.Lock()
            self._forget_pool()  # one opened on another event loop
            self._pool_loop = loop
        async with self._pool_lock:
            if self._pool is None:
                dsn = await self.dsn()
                self._pool = await create_pool(
                    dsn,
                    min_size=self.pool_min_size,
                    max_size=self.pool_max_size,
                    statement_cache_size=self.statement_cache_size,
                )
                logger.info(
                    "using PostgreSQL at %s (from %s)",
                    describe(dsn),
                    self.dsn_source.origin,
                )
            return self._pool

    async def connect(self) -> asyncpg.Connection:
        """A connection of its own, outside the pool, with the pool's statement cache size
        (a worker's fetcher and completer each hold one). A statement on it that waits on a
        lock (a VACUUM FULL or ALTER of a queue table, say) gives up after ``LOCK_TIMEOUT``
        instead of stalling the loop that owns it.

        PgBouncer refuses ``lock_timeout`` as a connection parameter: then (logged once) the
        connection is made without it, and the lock timeout is the role's or the server's
        (``ALTER ROLE ... SET lock_timeout`` keeps it)."""
        dsn = await self.dsn()
        settings = {"application_name": APPLICATION_NAME}
        if not self._lock_timeout_refused:
            try:
                return await connect(
                    dsn,
                    statement_cache_size=self.statement_cache_size,
                    server_settings={**settings, "lock_timeout": LOCK_TIMEOUT},
                )
            except DatabaseUnavailable as exc:
                if not _refuses_parameter(exc.__cause__, "lock_timeout"):
                    raise
            self._lock_timeout_refused = True
            logger.warning(
                "%s refuses lock_timeout as a connection parameter (PgBouncer does): the "
                "worker's own connections run without their %s lock timeout, so a statement "
                "waiting on a locked queue table waits as long as the role's lock_timeout "
                "allows; to keep it, run ALTER ROLE <the worker's role> SET lock_timeout = "
                "'%s'",
                describe(dsn),
                LOCK_TIMEOUT,
                LOCK_TIMEOUT,
            )
        return await connect(
            dsn, statement_cache_size=self.statement_cache_size, server_settings=settings
        )

    async def close(self) -> None:
        """Close the pool (the embedded server, if any, stops when the process exits)."""
        if self._pool is not None and self._pool_loop is not asyncio.get_running_loop():
            self._forget_pool()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    def _forget_pool(self) -> None:
        """Drop a pool opened on an event loop other than the running one: terminated when
        that loop is still open; left alone when it is closed (an ``asyncio.run()`` that
        ended), since nothing can run on a closed loop, not even a terminate: its sockets
        close when it is collected."""
        pool, self._pool = self._pool, None
        if pool is not None and self._pool_loop is not None and not self._pool_loop.is_closed():
            pool.terminate()
