"""The scheduler: enqueues the ticks of an app's schedules, on the database clock.

Every worker runs one (``worker(schedule=False)`` or ``--no-schedule`` turns it off), and
``pgtasks scheduler`` runs one alone. Any number may run at once: a tick becomes exactly one
job because ``pgtasks.schedule_fire`` enqueues it under the schedule's row lock, with an
idempotency key of the schedule's name and the tick's instant, in the transaction that moves
the schedule's watermark past it (migrations/0008_schedules.sql). No leader is elected.

Each pass reads the database's clock and the rows of its schedules in one statement, works
out which ticks are due (`periodic.schedule.plan`: on time, or missed and caught up by the
schedule's policy), and fires the schedules that have any, one statement each. Then it
sleeps until the next tick. Instants come only from the database; the host's clock is read
only for durations (`host_clock`, a monotonic clock): how long to sleep until the next tick,
counted from when the database said what time it was. So a host whose clock is minutes off
enqueues nothing early (the database refuses a tick ahead of its clock anyway) and nothing
twice.

It uses one connection of its own, outside the app's pool (like the worker's other loops),
opened on first use. Its rows: at start it writes its definitions (the process started
last wins, which in a rolling deploy is the new code); every ``sync_interval`` it says that
it still defines them (``seen_at``), and marks the rows that no running scheduler has
defined for ``orphan_after`` seconds as orphaned: they no longer fire. A scheduler whose
definition of a schedule differs from the row's leaves that schedule alone.

No error ends it: a transient one (the connection) is retried after a short backoff,
anything else is logged and retried after ``ERROR_PAUSE``; after a failed pass the
scheduler counts as just started (see `periodic.schedule` on missed ticks). A lock timeout
(another transaction holds a schedule's row or its queue) is one schedule's problem, not
the pass's: that schedule waits, the others fire.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence

import anyio
import asyncpg

from ..db import schedules as sql
from ..db.database import Database
from ..db.errors import LOCK_NOT_AVAILABLE, ErrorKind, classify, sqlstate
from ..exceptions import ConfigurationError
from ..periodic.schedule import Definition, Schedule, plan
from .connection import OwnConnection

logger = logging.getLogger("pgtasks")

host_clock: Callable[[], float] = time.monotonic
"""The only host time the scheduler reads, for durations (tests shift it)."""

SYNC_INTERVAL = 60.0
ORPHAN_AFTER = 300.0
WAKE_AFTER = 0.001  # seconds after a tick to wake: never before it on the database clock
ERROR_PAUSE = 30.0  # after an error that is not transient
LOCKED_RETRY = 10.0  # seconds before writing the rows again when one was locked


def check_schedules(schedules: Sequence[Schedule]) -> list[Schedule]:
    names: set[str] = set()
    for s in schedules:
        if s.name in names:
            raise ConfigurationError(f"two schedules are named {s.name!r}")
        names.add(s.name)
    return list(schedules)


class Scheduler:
    """Enqueues the ticks of these schedules; see the module.

    Args:
        database: where the schedules' rows and queues are.
        schedules: what to schedule (`App.schedules`).
        max_message_size: the largest message body (each schedule's is encoded now, so a
            schedule whose arguments cannot be sent fails here, not at its first tick).
        sync_interval: seconds between the refreshes of its rows (``seen_at``).
        orphan_after: seconds after which a row that no running scheduler defines is
            marked orphaned.
    """

    def __init__(
        self,
        database: Database,
        schedules: Sequence[Schedule],
        *,
        max_message_size: int = 1024 * 1024,
        sync_interval: float = SYNC_INTERVAL,
        orphan_after: float = ORPHAN_AFTER,
    ) -> None:
        self._database = database
        self.schedules = {s.name: s for s in check_schedules(schedules)}
        self._definitions: dict[str, Definition] = {
            s.name: s.definition(max_message_size) for s in self.schedules.values()
        }
        self.sync_interval = float(sync_interval)
        self.orphan_after = float(orphan_after)
        self.stats: Counter[str] = Counter()
        """``passes``, ``enqueued`` (jobs sent), ``failed`` (passes)."""
        self._defined = False
        self._next_sync = -math.inf  # the host clock may be shifted (tests): any value is later
        self._watching_since: dt.datetime | None = None
        self._set_aside: set[str] = set()  # schedules another definition took over (logged)
        self._refused_now: set[str] = set()  # schedules whose fire fails (logged)
        self._failing_since: float | None = None
        self._locked_rows = False  # the last writing of the rows waited for a lock (logged)

    def __repr__(self) -> str:
        return f"<pgtasks.Scheduler schedules={len(self.schedules)}>"

    async def run(self) -> None:
        """Run until cancelled."""
        if not self.schedules:
            await anyio.sleep_forever()
        own = OwnConnection(self._database.connect)
        backoff = 0.05
        logger.info(
            "scheduler started: %s",
            ", ".join(f"{s.name} ({s.describe()})" for s in self.schedules.values()),
        )
        try:
            while True:
                try:
                    delay = await self._pass(own)
                    if self._failing_since is not None:
                        logger.info(
                            "scheduler: passes work again after %.1fs",
                            host_clock() - self._failing_since,
                        )
                        self._failing_since = None
                    backoff = 0.05
                except Exception as exc:
                    delay, backoff = self._failed(exc, backoff)
                await anyio.sleep(max(delay, 0.0))
        finally:
            own.close()
            logger.info("scheduler stopped: %d job(s) enqueued", self.stats["enqueued"])

    def _failed(self, exc: Exception, backoff: float) -> tuple[float, float]:
        self.stats["failed"] += 1
        self._watching_since = None  # what came due meanwhile was missed
        first = self._failing_since is None
        if first:
            self._failing_since = host_clock()
        if classify(exc) is ErrorKind.TRANSIENT:
            if first:
                logger.warning("scheduler: a pass failed (%s); retrying", exc)
            else:
                logger.debug("scheduler: a pass failed (%s); retrying in %.2fs", exc, backoff)
            return backoff * random.uniform(0.5, 1.0), min(backoff * 2, 5.0)
        logger.error(
            "scheduler: a pass failed; trying again in %.0fs: %s: %s",
            ERROR_PAUSE,
            type(exc).__name__,
            exc,
            exc_info=first,
        )
        return ERROR_PAUSE, backoff

    async def _pass(self, own: OwnConnection) -> float:
        """One pass over every schedule; returns the seconds until the next one is due."""
        async with own.use() as conn:
            try:
                await self._sync(conn)
            except Exception as exc:
                if sqlstate(exc) != LOCK_NOT_AVAILABLE:
                    raise
                self._sync_locked(exc)
            before = host_clock()
            now, rows = await sql.schedules_state(conn, list(self._definitions))
            at = (before + host_clock()) / 2  # when the database read its clock, about
            self.stats["passes"] += 1
            wake: dt.datetime | None = None
            for name, definition in self._definitions.items():
                row = rows.get(name)
                if row is None or row.orphaned:  # deleted or marked meanwhile: ours again
                    self._resync_soon()
                    continue
                if row.fingerprint != definition.fingerprint:
                    self._set_aside_once(name)
                    continue
                self._set_aside.discard(name)
                schedule = self.schedules[name]
                next_tick = schedule.timing.next_after(now)
                if next_tick is not None and (wake is None or next_tick < wake):
                    wake = next_tick
                if row.paused:
                    continue
                todo = plan(
                    schedule.timing, schedule.catch_up, row.watermark, now, self._watching_since
                )
                if todo.advance_to is None:
                    if row.next_tick != next_tick:  # not due since its start or resume
                        await sql.schedule_next_tick(conn, name, definition.fingerprint, next_tick)
                    continue
                if todo.missed:
                    logger.info(
                        "schedule %r missed ticks up to %s (catch_up=%r): enqueueing %d",
                        name,
                        f"{todo.advance_to:%Y-%m-%d %H:%M:%S%z}",
                        schedule.catch_up,
                        len(todo.ticks),
                    )
                try:
                    fired = await sql.schedule_fire(
                        conn, name, definition.fingerprint, todo.ticks, todo.advance_to, next_tick
                    )
                except Exception as exc:
                    if classify(exc) is ErrorKind.TRANSIENT and sqlstate(exc) != LOCK_NOT_AVAILABLE:
                        raise  # the connection, or the database: the whole pass again
                    # this schedule only (its row or its queue locked by another
                    # transaction, say): the others go on
                    self._refused(name, exc)
                    continue
                self._refused_now.discard(name)
                self._fired(name, fired)
            self._watching_since = now
        sync_in = self._next_sync - host_clock()
        if wake is None:
            return sync_in
        until_tick = (wake - now).total_seconds() - (host_clock() - at) + WAKE_AFTER
        return min(until_tick, sync_in)

    async def _sync(self, conn: asyncpg.Connection) -> None:
        """Write the definitions (at start), say that they are still defined and mark the
        orphaned rows (every sync interval)."""
        if host_clock() < self._next_sync:
            return
        definitions = list(self._definitions.values())
        if not self._defined:
            await sql.schedules_define(conn, definitions)
            self._defined = True
        await sql.schedules_refresh(conn, definitions)
        for name in await sql.schedules_sweep(conn, self.orphan_after):
            logger.warning(
                "schedule %r is orphaned: no running scheduler has defined it for "
                "%.0fs; it no longer fires (pgtasks schedules delete %s removes it)",
                name,
                self.orphan_after,
                name,
            )
        self._next_sync = host_clock() + self.sync_interval
        self._locked_rows = False

    def _sync_locked(self, exc: Exception) -> None:
        """A row is locked by another transaction (an operator's, left open): the passes go
        on without writing the rows (those that exist fire), and write them a little
        later."""
        self._next_sync = host_clock() + LOCKED_RETRY
        if not self._locked_rows:
            self._locked_rows = True
            logger.warning(
                "scheduler: a schedule's row is locked by another transaction (%s); the "
                "schedules go on firing, and their rows are written again in %.0fs",
                exc,
                LOCKED_RETRY,
            )

    def _fired(self, name: str, fired: sql.Fired) -> None:
        if fired.state == "fired":
            for tick, msg_id, deduplicated in fired.sent:
                if not deduplicated:
                    self.stats["enqueued"] += 1
                logger.debug(
                    "schedule %r: tick %s %s job %d",
                    name,
                    f"{tick:%Y-%m-%d %H:%M:%S.%f%z}",
                    "joined" if deduplicated else "enqueued as",
                    msg_id,
                )
        elif fired.state in ("missing", "orphaned"):
            self._resync_soon()
        elif fired.state == "changed":
            self._set_aside_once(name)

    def _refused(self, name: str, exc: Exception) -> None:
        if name not in self._refused_now:
            self._refused_now.add(name)
            logger.error(
                "schedule %r: the database refused its ticks (%s: %s); the other schedules "
                "go on, and this one is tried again at every pass",
                name,
                type(exc).__name__,
                exc,
            )

    def _resync_soon(self) -> None:
        """Refresh the rows at the next pass, but not in a tight loop."""
        self._next_sync = min(self._next_sync, host_clock() + 1.0)

    def _set_aside_once(self, name: str) -> None:
        if name not in self._set_aside:
            self._set_aside.add(name)
            logger.warning(
                "schedule %r is defined differently by a scheduler that started later (a "
                "newer deploy?); this one leaves it to that one",
                name,
            )
