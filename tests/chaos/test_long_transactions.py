"""Scenario 5, long transactions: a REPEATABLE READ transaction and an idle-in-transaction
session are held open during a drain. They stop VACUUM from removing the dead rows every
claim and ack leaves behind, so each ``pgmq.read`` walks more of them: the drain slows down,
but every job still completes. The slowdown is printed (and recorded in docs/reliability.md),
not asserted: it depends on the machine."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

import pgtasks
from tests.chaos._support import Fleet, count, wait_until, write_module

pytestmark = pytest.mark.chaos

TASKS = """
import pgtasks

app = pgtasks.App()


@app.task(queue="longtx")
async def noop(n: int) -> None:
    pass
"""


async def _stub(n: int) -> None:
    raise AssertionError("deferred from the test, run by the CLI workers")


async def test_long_transactions_slow_the_drain_but_jobs_complete(
    tmp_path: Path, db_dsn: str, conn: asyncpg.Connection, chaos_full: bool
) -> None:
    jobs, workers, concurrency = (20_000, 2, 20) if chaos_full else (5_000, 2, 20)
    write_module(tmp_path, "chaostasks", TASKS)
    await conn.execute("SELECT pgtasks.ensure_queue('longtx')")
    app = pgtasks.App(db_dsn)
    noop = app.task(queue="longtx", name="chaostasks.noop")(_stub)
    fleet = Fleet(tmp_path, db_dsn)
    snapshot = await asyncpg.connect(db_dsn)
    idle = await asyncpg.connect(db_dsn)
    figures: dict[str, tuple[float, int, int]] = {}
    try:
        procs = [
            fleet.start("-c", str(concurrency), "--log-level", "WARNING") for _ in range(workers)
        ]
        for phase in ("baseline", "long transactions"):
            await conn.execute("VACUUM pgmq.q_longtx")
            if phase == "long transactions":
                # a report running for minutes, and a session someone left in a transaction
                await snapshot.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
                await snapshot.fetchval("SELECT count(*) FROM pgmq.q_longtx")
                await idle.execute("BEGIN")
                await idle.fetchval("SELECT txid_current()")
            done_before = await count(conn, "SELECT count(*) FROM pgmq.a_longtx")
            first = (await app.defer_many(noop.s(n) for n in range(jobs)))[0].id

            async def drained(target: int = done_before + jobs) -> bool:
                return await count(conn, "SELECT count(*) FROM pgmq.a_longtx") >= target

            await wait_until(
                drained,
                timeout=600 if chaos_full else 90,
                what=f"the {phase} drain",
                fleet=fleet,
                interval=0.2,
            )
            seconds = await conn.fetchval(
                "SELECT extract(epoch FROM max(archived_at) - min(last_read_at))::float8 "
                "FROM pgmq.a_longtx WHERE msg_id >= $1",
                first,
            )
            # what VACUUM can clean up now: everything, unless a long transaction holds it
            await conn.execute("VACUUM pgmq.q_longtx")
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            dead = await count(
                conn,
                "SELECT n_dead_tup FROM pg_stat_user_tables "
                "WHERE schemaname = 'pgmq' AND relname = 'q_longtx'",
            )
            size = await count(conn, "SELECT pg_relation_size('pgmq.q_longtx')")
            figures[phase] = (float(seconds), dead, size)
            if phase == "long transactions":
                # still open while every job completed
                assert await snapshot.fetchval("SELECT txid_current_if_assigned() IS NULL")
                assert await idle.fetchval("SELECT txid_current_if_assigned() IS NOT NULL")
        fleet.check_alive(procs)
    finally:
        await snapshot.close()
        await idle.close()
        await app.close()
        fleet.close()

    base, slow = figures["baseline"], figures["long transactions"]
    print(
        f"\nlong transactions: {jobs} no-op jobs, {workers} workers x {concurrency}: "
        f"baseline {base[0]:.2f}s ({jobs / base[0]:.0f} jobs/s; then VACUUM left {base[1]} "
        f"dead rows, table {base[2] // 1024} KiB); with a REPEATABLE READ snapshot and an "
        f"idle-in-transaction session held open {slow[0]:.2f}s ({jobs / slow[0]:.0f} jobs/s; "
        f"VACUUM left {slow[1]} dead rows, table {slow[2] // 1024} KiB): "
        f"{slow[0] / base[0]:.1f}x slower"
    )
    assert await count(conn, "SELECT count(*) FROM pgmq.q_longtx") == 0
    assert await count(conn, "SELECT count(*) FROM pgmq.a_longtx") == 2 * jobs
    assert await count(conn, "SELECT count(*) FROM pgtasks.dead_letters") == 0
