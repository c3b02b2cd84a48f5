"""Periodic jobs under process-level chaos (issue 14's review): five CLI workers, each running
a scheduler, race for a one-second schedule while workers are killed with SIGKILL at the
instant of a tick (when their scheduler is sending it) and every pgtasks connection is
terminated; and the PostgreSQL server is stopped and started under three of them. Each
tick is enqueued once, none early, none skipped while any scheduler runs, and after the
outage only the catch-up policy's ticks are sent: never a flood."""

from __future__ import annotations

import datetime as dt
import itertools
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from tests.chaos._support import TERMINATE_PGTASKS_BACKENDS, Fleet, wait_until, write_module

from .test_server_restart import Checker, dsn, server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.chaos

TASKS = """
import datetime as dt

import pgtasks

app = pgtasks.App()


@app.periodic(every=dt.timedelta(seconds=1), name="chaos-second", catch_up=2)
@app.task(queue="chaos_periodic")
async def tick() -> None:
    pass
"""

# every message a tick sent, wherever it is now: waiting, done, or dead
TICKS = """
SELECT (headers ->> 'x-pgtasks-scheduled-at')::timestamptz AS tick, enqueued_at
FROM pgmq.q_chaos_periodic
UNION ALL SELECT (headers ->> 'x-pgtasks-scheduled-at')::timestamptz, enqueued_at
FROM pgmq.a_chaos_periodic
UNION ALL SELECT (headers ->> 'x-pgtasks-scheduled-at')::timestamptz, enqueued_at
FROM pgtasks.dead_letters WHERE queue = 'chaos_periodic'
ORDER BY 1
"""
SECOND = dt.timedelta(seconds=1)
LISTENERS = """
SELECT count(*) = $1 FROM pg_stat_activity
WHERE datname = current_database() AND application_name = 'pgtasks-listener'
"""


async def ticks_of(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    if await conn.fetchval("SELECT to_regclass('pgmq.q_chaos_periodic') IS NULL"):
        return []
    return list(await conn.fetch(TICKS))


def check_once_each(rows: list[asyncpg.Record]) -> list[dt.datetime]:
    ticks = [r["tick"] for r in rows]
    assert len(ticks) == len(set(ticks)), Counter(ticks).most_common(3)  # never twice
    assert all(r["enqueued_at"] >= r["tick"] for r in rows)  # never early
    return ticks


async def test_workers_killed_at_the_tick_and_connections_killed_make_one_job_per_tick(
    tmp_path: Path, db_dsn: str, chaos_full: bool
) -> None:
    rounds = 30 if chaos_full else 8
    write_module(tmp_path, "chaostasks", TASKS)
    fleet = Fleet(tmp_path, db_dsn)
    conn = await asyncpg.connect(db_dsn)
    rng = random.Random()
    kills = terminated = 0
    try:
        for _ in range(5):
            fleet.start("--log-level", "WARNING")

        async def started() -> bool:
            return len(await ticks_of(conn)) >= 2

        async def listening() -> bool:
            return bool(await conn.fetchval(LISTENERS, len(fleet.running())))

        await wait_until(started, timeout=60, what="the first ticks", fleet=fleet)
        begin: dt.datetime = await conn.fetchval("SELECT clock_timestamp()")
        for r in range(rounds):
            # just after a tick on the database's clock: the schedulers are firing it
            now: dt.datetime = await conn.fetchval("SELECT clock_timestamp()")
            await anyio.sleep(1 - now.timestamp() % 1 + rng.uniform(0.0, 0.015))
            if r % 3 == 2:
                terminated += await conn.fetchval(TERMINATE_PGTASKS_BACKENDS)
            else:
                fleet.kill9(rng.choice(fleet.running()))
                kills += 1
                fleet.start("--log-level", "WARNING")
                # started (listening) before its connections may be killed: a worker whose
                # connection dies while it starts exits, by design (the listener's first
                # connection, docs/worker.md), and that is not what this test is about
                await wait_until(listening, timeout=60, what="the new worker", fleet=fleet)
            await anyio.sleep(rng.uniform(0.2, 1.2))
        await anyio.sleep(2.0)
        end: dt.datetime = await conn.fetchval("SELECT clock_timestamp()")
        fleet.check_no_crash()
        survivors = fleet.running()
    finally:
        fleet.close()
    try:
        for proc in survivors:
            assert proc.popen.returncode == 0, proc.log()
        ticks = check_once_each(await ticks_of(conn))
        during = [t for t in ticks if begin < t <= end]
        # no tick skipped: some scheduler was always running, and reconnects are quick
        assert all(b - a == SECOND for a, b in itertools.pairwise(during)), (during, fleet.logs())
        assert len(during) >= int((end - begin).total_seconds()) - 1
        assert kills >= rounds // 2
        assert terminated > 0
    finally:
        await conn.close()


async def test_a_server_restart_under_the_schedulers_resumes_without_duplicates_or_a_flood(
    tmp_path: Path,
    server: Any,  # noqa: F811 (the fixture)
    dsn: str,  # noqa: F811
    chaos_full: bool,
) -> None:
    outage = 20.0 if chaos_full else 5.0
    write_module(tmp_path, "chaostasks", TASKS)
    fleet = Fleet(tmp_path, dsn)
    check = Checker(dsn)
    await check.value("SELECT pgtasks.ensure_queue('chaos_periodic')")
    try:
        procs = [fleet.start("--log-level", "WARNING") for _ in range(3)]

        async def ticking() -> bool:
            return await check.count("SELECT count(*) FROM pgmq.a_chaos_periodic") >= 3

        await wait_until(ticking, timeout=60, what="the first ticks", fleet=fleet)
        await check.close()
        # the embedded server runs on this host: its clock is this process's wall clock
        stopped_at = time.time()
        await anyio.to_thread.run_sync(server.stop)
        await anyio.sleep(outage)
        await anyio.to_thread.run_sync(server.start)
        started_at = time.time()

        async def resumed() -> bool:
            return (
                await check.count(
                    "SELECT count(*) FROM pgmq.a_chaos_periodic WHERE "
                    f"(headers ->> 'x-pgtasks-scheduled-at')::timestamptz > "
                    f"to_timestamp({started_at + 2})"
                )
                >= 3
            )

        await wait_until(resumed, timeout=60, what="ticks after the restart", fleet=fleet)
        fleet.check_alive(procs)  # the same processes: their schedulers carried on
        end = time.time()
    finally:
        await check.close()
        fleet.close()
    for proc in procs:
        assert proc.popen.returncode == 0, proc.log()
    conn = await asyncpg.connect(dsn)
    try:
        ticks = check_once_each(await ticks_of(conn))
    finally:
        await conn.close()
    at = [t.timestamp() for t in ticks]
    # the outage's ticks: at most the two of catch_up=2, never all of them
    assert len([t for t in at if stopped_at + 1 < t < started_at - 1]) <= 2, ticks
    # before and after: every second
    for low, high in ((at[0], stopped_at - 1), (started_at + 2, end - 1)):
        window = [t for t in at if low <= t <= high]
        assert window
        assert all(b - a == 1 for a, b in itertools.pairwise(window)), (low, high, ticks)
