"""Scenario 2, killed connections: every pgtasks backend (the pools' and the listeners') is
terminated every 2 s during a drain. The workers carry on without a restart, everything
completes, and afterwards the listener is back: a notification wakes an idle worker at once
(the safety poll is 30 s, so nothing else could)."""

from __future__ import annotations

import random
import time
from functools import partial
from pathlib import Path

import anyio
import asyncpg
import pytest

import pgtasks
from pgtasks import DatabaseUnavailable
from tests.chaos._support import (
    TERMINATE_PGTASKS_BACKENDS,
    Fleet,
    count,
    queue_empty,
    wait_until,
    write_module,
)

pytestmark = pytest.mark.chaos

TASKS = """
import asyncio

import pgtasks

app = pgtasks.App(max_retries=20, retry_backoff=0.2, lease=5)


@app.task(queue="conns")
async def plain(n: int, ms: int) -> None:
    await asyncio.sleep(ms / 1000)
    pool = await app.pool()
    await pool.execute("INSERT INTO runs (n) VALUES ($1)", n)


@app.task(queue="conns", transactional=True)
async def pay(n: int, ms: int) -> None:
    job = pgtasks.current_job()
    await asyncio.sleep(ms / 1000)
    await job.connection.execute("INSERT INTO tx_effects (n) VALUES ($1)", n)


@app.task(queue="probe")
async def probe(n: int) -> None:
    pool = await app.pool()
    await pool.execute("INSERT INTO probes (n, started) VALUES ($1, clock_timestamp())", n)
"""

SCHEMA = """
CREATE TABLE runs (n integer NOT NULL);
CREATE TABLE tx_effects (n integer NOT NULL);
CREATE TABLE probes (n integer NOT NULL, started timestamptz NOT NULL);
"""


async def _stub(n: int, ms: int) -> None:
    raise AssertionError("deferred from the test, run by the CLI workers")


async def _probe_stub(n: int) -> None:
    raise AssertionError("deferred from the test, run by the CLI workers")


async def test_killed_connections_recover_without_restart(
    tmp_path: Path, db_dsn: str, conn: asyncpg.Connection, chaos_full: bool
) -> None:
    jobs, rounds, every, workers, concurrency = (
        (4000, 10, 2.0, 2, 10) if chaos_full else (400, 3, 2.0, 2, 10)
    )
    rng = random.Random()
    ms = int(workers * concurrency * (rounds + 1) * every / jobs * 1000)
    write_module(tmp_path, "chaostasks", TASKS)
    await conn.execute(SCHEMA)

    app = pgtasks.App(db_dsn)  # the producer: its pool is a 'pgtasks' one too, and is killed
    plain = app.task(queue="conns", name="chaostasks.plain")(_stub)
    pay = app.task(queue="conns", name="chaostasks.pay")(_stub)
    probe = app.task(queue="probe", name="chaostasks.probe")(_probe_stub)
    n_pay = jobs // 4
    fleet = Fleet(tmp_path, db_dsn)
    terminated: list[int] = []
    produced = [0]
    producer_retries = [0]
    try:
        await app.defer_many(
            [pay.s(n, rng.randint(ms // 2, ms * 3 // 2)) for n in range(n_pay)]
            + [plain.s(n, rng.randint(ms // 2, ms * 3 // 2)) for n in range(n_pay, jobs)]
        )
        procs = [
            fleet.start("-c", str(concurrency), "--poll-interval", "30", "--log-level", "WARNING")
            for _ in range(workers)
        ]
        await wait_until(
            lambda: _listeners(conn, workers), timeout=30, what="the workers to listen", fleet=fleet
        )

        async def storm() -> None:
            for _ in range(rounds):
                await anyio.sleep(every)
                terminated.append(await count(conn, TERMINATE_PGTASKS_BACKENDS))

        async def trickle() -> None:
            # a producer deferring through the storm; keys make its retries safe
            n = jobs
            while len(terminated) < rounds:
                for attempt in range(5):
                    try:
                        await plain.options(idempotency_key=f"trickle-{n}").defer(n, 1)
                        break
                    except DatabaseUnavailable:
                        producer_retries[0] += 1
                        if attempt == 4:
                            raise
                n += 1
                produced[0] += 1
                await anyio.sleep(0.05)

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(storm)
            tg.start_soon(trickle)
        storm_end = time.monotonic()
        total = jobs + produced[0]
        await wait_until(
            lambda: _all_ran(conn, total),
            timeout=300 if chaos_full else 60,
            what="every job to run",
            fleet=fleet,
        )
        drained = time.monotonic()
        fleet.check_alive(procs)  # no restart: the same processes carried on
        await wait_until(
            lambda: _listeners(conn, workers),
            timeout=30,
            what="both listeners to reconnect",
            fleet=fleet,
        )
        latencies = []
        for i in range(5):
            msg_id = (await probe.defer(i)).id
            await wait_until(
                partial(_probe_ran, conn, msg_id),
                timeout=10,
                what="the probe job (a notification should wake the worker)",
                fleet=fleet,
                interval=0.01,
            )
            latencies.append(await _probe_latency(conn, msg_id))
            await anyio.sleep(0.2)
    finally:
        await app.close()
        fleet.close()
    for proc in procs:
        assert proc.popen.returncode == 0, proc.log()
        # no connection is ever used by two operations at once (each loop owns its own,
        # and one whose statement was interrupted is closed, never reused)
        assert "another operation is in progress" not in proc.log()

    runs = await count(conn, "SELECT count(*) FROM runs")
    print(
        f"\nkilled connections: {jobs} jobs + {produced[0]} deferred during the storm, "
        f"{workers} workers x {concurrency}; {rounds} rounds every {every:.0f}s terminated "
        f"{sum(terminated)} backends ({terminated}); producer retries {producer_retries[0]}; "
        f"drained {drained - storm_end:.1f}s after the storm ({drained - started:.1f}s in all); "
        f"duplicate runs {runs - (total - n_pay)}; wake-up latency after the storm "
        f"{', '.join(f'{x * 1000:.0f}' for x in latencies)} ms"
    )
    assert all(t > 0 for t in terminated)
    assert await count(conn, "SELECT count(*) FROM tx_effects") == n_pay
    assert await count(conn, "SELECT count(DISTINCT n) FROM tx_effects") == n_pay
    assert await queue_empty(conn, "conns")
    assert await count(conn, "SELECT count(*) FROM pgmq.a_conns") == total
    assert await count(conn, "SELECT count(*) FROM pgtasks.dead_letters") == 0
    assert max(latencies) < 0.5, latencies  # the safety poll is 30 s


async def _listeners(conn: asyncpg.Connection, workers: int) -> bool:
    n = await count(
        conn,
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = 'pgtasks-listener'",
    )
    return n == workers


async def _all_ran(conn: asyncpg.Connection, total: int) -> bool:
    done = await count(conn, "SELECT count(DISTINCT n) FROM runs") + await count(
        conn, "SELECT count(*) FROM tx_effects"
    )
    return done >= total and await queue_empty(conn, "conns")


async def _probe_ran(conn: asyncpg.Connection, msg_id: int) -> bool:
    return await count(conn, "SELECT count(*) FROM pgmq.a_probe WHERE msg_id = $1", msg_id) > 0


async def _probe_latency(conn: asyncpg.Connection, msg_id: int) -> float:
    value = await conn.fetchval(
        "SELECT extract(epoch FROM p.started - a.enqueued_at)::float8 "
        "FROM pgmq.a_probe AS a JOIN probes AS p ON p.n = (a.message -> 'kwargs' ->> 'n')::int "
        "WHERE a.msg_id = $1",
        msg_id,
    )
    return float(value)
