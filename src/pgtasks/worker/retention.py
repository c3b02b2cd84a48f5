"""Archive retention: a worker deletes the archived messages of the queues it serves once they
are older than the app's ``archive_retention``, so that a queue that runs for a year does
not keep a year of succeeded jobs, and nobody has to schedule anything for it.

A pass every ``retention_interval`` seconds (with 10% jitter, so that workers started
together spread out), the first within a minute of the start (a worker restarted more often
than the interval still prunes). A ``burst`` worker makes one pass, once it has drained its
queues, of at most `BURST_PASS_BUDGET` seconds of batches (cut short `BURST_PASS_GRACE`
seconds later), so that workers run only in bursts (from cron) bound the archive too.
Each pass opens a connection of its own, outside the app's pool (it never waits behind task
code, nor holds a connection between passes), and deletes through
`admin.maintenance.prune_archives`: a batch of 10,000 messages per transaction, the oldest
first, up to a cutoff taken on the database's clock. Any number of workers may prune the
same queue at once: they skip each other's rows (``SKIP LOCKED``). A queue whose archive
cannot be pruned (locked, or a missing grant) does not keep the others from it. A failed pass
is logged and the next one comes at the next interval (a burst worker's: at the next burst);
it never stops the worker.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import time
from collections.abc import Sequence

import anyio
import asyncpg

from ..admin.maintenance import prune_archives
from ..db.database import Database
from ..db.errors import ErrorKind, classify

logger = logging.getLogger("pgtasks")

FIRST_PASS_WITHIN = 60.0  # seconds after the start (at most the interval)

BURST_PASS_BUDGET = 10.0
"""Seconds of batches a burst worker's pass may start, so that its first pass over an
archive that grew for a year does not hold its exit for hours: the next burst goes on."""

BURST_PASS_GRACE = 10.0
"""Seconds a burst worker's pass may run past its budget (the batch started within it)
before it is cut short: a statement that waits on a locked archive without a lock timeout
(through PgBouncer, which refuses one) would otherwise hold the exit as long as the lock."""


class Retention:
    """Deletes the archived messages of ``queues`` older than ``retention``, every
    ``interval`` seconds; see the module."""

    def __init__(
        self,
        database: Database,
        queues: Sequence[str],
        retention: dt.timedelta,
        interval: float,
    ) -> None:
        self._database = database
        self.queues = list(queues)
        self.retention = retention
        self.interval = float(interval)
        self.deleted = 0
        """Archived messages this worker deleted since it started."""
        self.passes = 0

    async def run(self) -> None:
        """Run until cancelled."""
        await anyio.sleep(random.uniform(0, min(self.interval, FIRST_PASS_WITHIN)))
        while True:
            await self.prune_once()
            await anyio.sleep(self.interval * random.uniform(0.9, 1.1))

    async def prune_once(self, budget: float | None = None) -> int:
        """One pass (no batch started after ``budget`` seconds, when given, and cut short
        `BURST_PASS_GRACE` seconds later: a burst worker's); returns how many archived
        messages it deleted (0 when it failed)."""
        limit = None if budget is None else budget + BURST_PASS_GRACE
        try:
            with anyio.move_on_after(limit) as scope:
                deleted, failed = await self._prune(
                    None if budget is None else time.monotonic() + budget
                )
            if scope.cancelled_caught:
                raise TimeoutError(f"cut short after {limit:g} s")
            self.deleted += deleted  # the other queues' messages are gone all the same
            if failed:
                raise next(iter(failed.values()))
        except Exception as exc:
            level = logging.WARNING if classify(exc) is ErrorKind.TRANSIENT else logging.ERROR
            logger.log(
                level,
                "archive retention: a pass failed (%s: %s); %s",
                type(exc).__name__,
                exc,
                "the next burst tries again"
                if budget is not None
                else f"the next one is in {self.interval:.0f} s",
            )
            return 0
        self.passes += 1
        if deleted:
            logger.info(
                "archive retention: deleted %d archived message(s) older than %s from %s",
                deleted,
                self.retention,
                ", ".join(self.queues) if len(self.queues) <= 5 else f"{len(self.queues)} queues",
            )
        return deleted

    async def _prune(self, until: float | None) -> tuple[int, dict[str, asyncpg.PostgresError]]:
        """Messages deleted, and the queues whose archive could not be pruned (locked, or
        not this role's to delete from): the others are pruned all the same."""
        conn = await self._database.connect()
        failed: dict[str, asyncpg.PostgresError] = {}
        try:
            deleted = await prune_archives(
                conn, self.retention, self.queues, until=until, failed=failed
            )
        except BaseException:
            conn.terminate()  # a statement may still run: never wait on it
            raise
        await conn.close(timeout=5)
        return deleted, failed
