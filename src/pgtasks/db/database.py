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

import asyncpg

from ..exceptions import ConfigurationError
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
        if pool_max_size < 1 or pool_min_size < 0 or pool_min_size > pool_max_size:
            raise ConfigurationError(
                f"pool sizes must satisfy 0 <= pool_min_size <= pool_max_size >= 1 "
                f"(got {pool_min_size} and {pool_max_size})"
            )
        if statement_cache_size < 0:
            raise ConfigurationError(
                f"statement_cache_size must not be negative (got {statement_cache_size})"
            )
        self.pool_min_size = pool_min_size
        self.pool_max_size = pool_max_size
        self.statement_cache_size = statement_cache_size
        self._explicit_dsn = dsn
        self._dsn_source: DsnSource | None = None
        self._dsn: str | None = None
        self._pool: asyncpg.Pool | None = None
        self._pool_loop: asyncio.AbstractEventLoop | None = None
        self._pool_lock: asyncio.Lock | None = None

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
            if self._pool is not None:  # opened on an event loop that is gone
                self._pool.terminate()
                self._pool = None
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
        instead of stalling the loop that owns it."""
        return await connect(
            await self.dsn(),
            statement_cache_size=self.statement_cache_size,
            server_settings={"application_name": APPLICATION_NAME, "lock_timeout": LOCK_TIMEOUT},
        )

    async def close(self) -> None:
        """Close the pool (the embedded server, if any, stops when the process exits)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
