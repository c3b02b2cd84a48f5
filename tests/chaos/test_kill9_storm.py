"""Scenario 1, kill -9 storm: workers die at random mid-drain and are replaced; nothing is
lost, keyed and transactional jobs take effect exactly once, and the duplicates of plain jobs
are counted and bounded by kills x concurrency."""

from __future__ import annotations

import random
import time
from pathlib import Path

import anyio
import asyncpg
import pytest

import pgtasks
from tests.chaos._support import Fleet, count, queue_empty, wait_until, write_module

pytestmark = pytest.mark.chaos

TASKS = """
import asyncio

import pgtasks

app = pgtasks.App(max_retries=20, retry_backoff=0.2, lease=3)


@app.task(queue="storm")
async def plain(n: int, ms: int) -> None:
    await asyncio.sleep(ms / 1000)
    pool = await app.pool()
    await pool.execute("INSERT INTO runs (kind, n) VALUES ('plain', $1)", n)


@app.task(queue="storm")
async def keyed(n: int, ms: int) -> None:
    # effectively-once through the key: the effect is an upsert on it
    key = pgtasks.current_job().idempotency_key
    await asyncio.sleep(ms / 1000)
    pool = await app.pool()
    await pool.execute("INSERT INTO runs (kind, n) VALUES ('keyed', $1)", n)
    await pool.execute(
        "INSERT INTO keyed_effects (key, n) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING", key, n
    )


@app.task(queue="storm", transactional=True)
async def pay(n: int, ms: int) -> None:
    job = pgtasks.current_job()
    await asyncio.sleep(ms / 1000)
    await job.connection.execute("INSERT INTO tx_effects (n) VALUES ($1)", n)
"""

SCHEMA = """
CREATE TABLE runs (kind text NOT NULL, n integer NOT NULL);
CREATE TABLE keyed_effects (key text PRIMARY KEY, n integer NOT NULL);
CREATE TABLE tx_effects (n integer NOT NULL);
"""


async def _stub(n: int, ms: int) -> None:
    raise AssertionError("deferred from the test, run by the CLI workers")


async def test_kill9_storm_loses_nothing(
    tmp_path: Path, db_dsn: str, conn: asyncpg.Connection, chaos_full: bool
) -> None:
    jobs, workers, kills, concurrency = (5000, 3, 10, 10) if chaos_full else (400, 3, 3, 10)
    interval = 1.0
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    # job length chosen so the drain outlasts the storm
    ms = int(workers * concurrency * (kills + 2) * interval / jobs * 1000)
    write_module(tmp_path, "chaostasks", TASKS)
    await conn.execute(SCHEMA)

    app = pgtasks.App(db_dsn)
    plain = app.task(queue="storm", name="chaostasks.plain")(_stub)
    keyed = app.task(queue="storm", name="chaostasks.keyed")(_stub)
    pay = app.task(queue="storm", name="chaostasks.pay")(_stub)
    kinds = ["plain", "keyed", "keyed", "pay"]  # a quarter plain, half keyed, a quarter tx
    plan = [(n, kinds[n % 4], rng.randint(ms // 2, ms * 3 // 2)) for n in range(jobs)]
    signatures = []
    for n, kind, length in plan:
        if kind == "plain":
            signatures.append(plain.s(n, length))
        elif kind == "keyed":
            signatures.append(keyed.options(idempotency_key=f"storm-{n}").s(n, length))
        else:
            signatures.append(pay.s(n, length))
    try:
        await app.defer_many(signatures)
        # a producer retrying the keyed half sends nothing twice
        again = await app.defer_many(
            keyed.options(idempotency_key=f"storm-{n}").s(n, length)
            for n, kind, length in plan
            if kind == "keyed"
        )
    finally:
        await app.close()
    assert all(ref.deduplicated for ref in again)
    n_plain = sum(kind == "plain" for _, kind, _ in plan)
    n_keyed = sum(kind == "keyed" for _, kind, _ in plan)
    n_pay = sum(kind == "pay" for _, kind, _ in plan)

    fleet = Fleet(tmp_path, db_dsn)
    args = ("-c", str(concurrency), "--poll-interval", "1", "--log-level", "WARNING")
    try:
        current = [fleet.start(*args) for _ in range(workers)]
        await wait_until(
            lambda: _started(conn), timeout=30, what="the first jobs to run", fleet=fleet
        )
        leased_at_kill = []
        for _ in range(kills):
            await anyio.sleep(interval)
            victim = rng.choice(current)
            leased_at_kill.append(
                await count(conn, "SELECT count(*) FROM pgmq.q_storm WHERE vt > clock_timestamp()")
            )
            fleet.kill9(victim)
            current[current.index(victim)] = fleet.start(*args)
        last_kill = time.monotonic()
        await wait_until(
            lambda: queue_empty(conn, "storm"),
            timeout=600 if chaos_full else 90,
            what="the queue to drain",
            fleet=fleet,
        )
        recovery = time.monotonic() - last_kill
        fleet.check_alive(current)
    finally:
        fleet.close()
    for proc in current:
        assert proc.popen.returncode == 0, proc.log()

    plain_runs = await count(conn, "SELECT count(*) FROM runs WHERE kind = 'plain'")
    keyed_runs = await count(conn, "SELECT count(*) FROM runs WHERE kind = 'keyed'")
    duplicates = plain_runs - n_plain + keyed_runs - n_keyed
    max_attempt = await count(conn, "SELECT max(read_ct) FROM pgmq.a_storm")
    print(
        f"\nkill -9 storm (seed {seed}): {jobs} jobs ({n_plain} plain, {n_keyed} keyed, "
        f"{n_pay} transactional), {workers} workers x {concurrency}, {kills} kills every "
        f"{interval:.0f}s (messages under lease at each kill: {leased_at_kill}); drained "
        f"{recovery:.1f}s after the last kill; duplicate runs {duplicates} (plain "
        f"{plain_runs - n_plain}, keyed {keyed_runs - n_keyed}; bound {kills * concurrency}); "
        f"highest attempt {max_attempt}"
    )
    # every job ran; keyed and transactional effects exactly once
    assert await count(conn, "SELECT count(DISTINCT n) FROM runs WHERE kind = 'plain'") == n_plain
    assert await count(conn, "SELECT count(DISTINCT n) FROM runs WHERE kind = 'keyed'") == n_keyed
    assert await count(conn, "SELECT count(*) FROM keyed_effects") == n_keyed
    assert await count(conn, "SELECT count(*) FROM tx_effects") == n_pay
    assert await count(conn, "SELECT count(DISTINCT n) FROM tx_effects") == n_pay
    # the queue's view: each message archived exactly once, none dead
    assert await count(conn, "SELECT count(*) FROM pgmq.a_storm") == jobs
    assert await count(conn, "SELECT count(DISTINCT msg_id) FROM pgmq.a_storm") == jobs
    assert await count(conn, "SELECT count(*) FROM pgtasks.dead_letters") == 0
    assert (
        await count(
            conn,
            "SELECT count(*) FROM pgtasks.idempotency_keys "
            "WHERE key LIKE 'storm-%' AND expires_at IS NOT NULL",
        )
        == n_keyed
    )
    assert 0 <= duplicates <= kills * concurrency


async def _started(conn: asyncpg.Connection) -> bool:
    return await count(conn, "SELECT count(*) FROM pgmq.q_storm WHERE read_ct > 0") > 0
