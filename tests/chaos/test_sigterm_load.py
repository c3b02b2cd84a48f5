"""Scenario 4, SIGTERM under load: a busy worker gets SIGTERM. It exits 0 within
shutdown-timeout + 2 s; the jobs it could not finish are handed back at once (visible to the
other workers immediately, long before their 120 s lease would expire); nothing is lost.

Long jobs hang on their first run (so a SIGTERM always catches some in flight) and finish
at once on the next; the loop SIGTERMs the worker holding most of them, starts a replacement,
and goes on until every long job is done."""

from __future__ import annotations

import random
import time
from pathlib import Path

import asyncpg
import pytest

import pgtasks
from tests.chaos._support import Fleet, Proc, count, queue_empty, wait_until, write_module

pytestmark = pytest.mark.chaos

TASKS = """
import asyncio
import os

import pgtasks

app = pgtasks.App(max_retries=20, retry_backoff=0.2, lease=120)


@app.task(queue="term")
async def work(n: int, ms: int, hang: bool) -> None:
    job = pgtasks.current_job()
    pool = await app.pool()
    first = await pool.fetchval(
        "SELECT NOT EXISTS (SELECT FROM starts WHERE msg_id = $1)", job.id
    )
    hanging = hang and first  # only its first run hangs
    await pool.execute(
        "INSERT INTO starts (n, msg_id, attempt, pid, hanging) VALUES ($1, $2, $3, $4, $5)",
        n, job.id, job.attempt, os.getpid(), hanging,
    )
    await asyncio.sleep(600 if hanging else ms / 1000)
    await pool.execute("INSERT INTO runs (n, pid) VALUES ($1, $2)", n, os.getpid())
"""

SCHEMA = """
CREATE TABLE starts (n integer, msg_id bigint, attempt integer, pid integer, hanging boolean,
                     at timestamptz DEFAULT clock_timestamp());
CREATE TABLE runs (n integer, pid integer, at timestamptz DEFAULT clock_timestamp());
"""

# what a worker holds now: the messages it started whose claim is still its own
HELD = """
SELECT s.n, s.msg_id, s.attempt, s.hanging AS hang
FROM starts AS s JOIN pgmq.q_term AS q ON q.msg_id = s.msg_id AND q.read_ct = s.attempt
WHERE s.pid = $1
"""


async def _stub(n: int, ms: int, hang: bool) -> None:
    raise AssertionError("deferred from the test, run by the CLI workers")


async def test_sigterm_under_load_releases_at_once(
    tmp_path: Path, db_dsn: str, conn: asyncpg.Connection, chaos_full: bool
) -> None:
    # jobs that hang on their first run: each SIGTERM catches one or more of them
    jobs, hanging, workers, concurrency = (3000, 10, 2, 10) if chaos_full else (300, 2, 2, 10)
    grace = 2.0
    rng = random.Random()
    write_module(tmp_path, "chaostasks", TASKS)
    await conn.execute(SCHEMA)
    app = pgtasks.App(db_dsn)
    work = app.task(queue="term", name="chaostasks.work")(_stub)
    hang_at = set(rng.sample(range(jobs), hanging))
    try:
        await app.defer_many(work.s(n, rng.randint(50, 250), n in hang_at) for n in range(jobs))
    finally:
        await app.close()

    fleet = Fleet(tmp_path, db_dsn)
    args = ("-c", str(concurrency), "--shutdown-timeout", str(grace), "--log-level", "WARNING")
    exits: list[float] = []
    handed_back: list[float] = []
    released = 0
    try:
        current = [fleet.start(*args) for _ in range(workers)]
        while await _hanging_left(conn, hang_at):
            victim, held = await _busiest(conn, current, fleet)
            signalled_at = await conn.fetchval("SELECT clock_timestamp()")
            sent = time.monotonic()
            fleet.terminate(victim)
            victim.popen.wait(timeout=grace + 15)
            exited = time.monotonic()
            exits.append(exited - sent)
            assert victim.popen.returncode == 0, victim.log()
            # what it held is visible now, or already claimed again by another worker (a
            # release gives the attempt back, so a new claim has the same read_ct: tell them
            # apart by the time of the claim)
            still_leased = await conn.fetch(
                "SELECT msg_id FROM pgmq.q_term AS q JOIN unnest($1::bigint[], $2::int[]) "
                "AS h(id, ct) ON q.msg_id = h.id AND q.read_ct = h.ct "
                "WHERE q.vt > clock_timestamp() AND q.last_read_at < $3",
                [r["msg_id"] for r in held],
                [r["attempt"] for r in held],
                signalled_at,
            )
            assert still_leased == [], (still_leased, victim.log())
            long_ones = [r["n"] for r in held if r["hang"]]
            released += len(long_ones)
            current[current.index(victim)] = fleet.start(*args)

            async def rerun(long_ones: list[int] = long_ones) -> bool:
                done = await count(
                    conn, "SELECT count(DISTINCT n) FROM runs WHERE n = ANY($1)", long_ones
                )
                return done == len(long_ones)

            await wait_until(
                rerun, timeout=30, what="the released jobs to run elsewhere", fleet=fleet
            )
            handed_back.append(time.monotonic() - exited)
        try:
            await wait_until(
                lambda: queue_empty(conn, "term"),
                timeout=100,  # < the lease: a message stuck under a lease would fail this
                what="the queue to drain",
                fleet=fleet,
            )
        except pytest.fail.Exception:
            rows = await conn.fetch(
                "SELECT q.msg_id, q.read_ct, q.vt, q.last_read_at, "
                "(SELECT array_agg(s.pid || ':' || s.attempt) FROM starts AS s "
                " WHERE s.msg_id = q.msg_id) AS runs FROM pgmq.q_term AS q"
            )
            print("left in the queue:", [dict(r) for r in rows])
            raise
        fleet.check_alive(current)
    finally:
        fleet.close()

    runs = await count(conn, "SELECT count(*) FROM runs")
    print(
        f"\nSIGTERM under load: {jobs} jobs, {workers} workers x {concurrency}, "
        f"{len(exits)} SIGTERMs (grace {grace:.0f}s): exits after "
        f"{', '.join(f'{x:.2f}' for x in exits)}s; {released} unfinished job(s) handed back "
        f"and done elsewhere after {', '.join(f'{x:.2f}' for x in handed_back)}s "
        f"(lease 120s); duplicate runs {runs - jobs}"
    )
    # each victim held a hanging job, so it used its grace period, and no more than + 2 s
    assert all(grace <= x <= grace + 2 for x in exits), exits
    assert released >= len(exits)  # each SIGTERM caught at least one job it could not finish
    assert await count(conn, "SELECT count(DISTINCT n) FROM runs") == jobs
    assert runs == jobs  # a released job was never run to completion twice
    assert await count(conn, "SELECT count(*) FROM pgmq.a_term") == jobs
    assert await count(conn, "SELECT count(*) FROM pgtasks.dead_letters") == 0


async def _hanging_left(conn: asyncpg.Connection, hang_at: set[int]) -> bool:
    done = await count(conn, "SELECT count(DISTINCT n) FROM runs WHERE n = ANY($1)", hang_at)
    return done < len(hang_at)


async def _busiest(
    conn: asyncpg.Connection, current: list[Proc], fleet: Fleet
) -> tuple[Proc, list[asyncpg.Record]]:
    """The running worker holding the most hanging jobs (waiting until one holds some)."""
    best: list[tuple[Proc, list[asyncpg.Record]]] = []

    async def someone_holds_one() -> bool:
        best.clear()
        for proc in current:
            held = list(await conn.fetch(HELD, proc.pid))
            if any(r["hang"] for r in held):
                best.append((proc, held))
        best.sort(key=lambda b: sum(r["hang"] for r in b[1]), reverse=True)
        return bool(best)

    await wait_until(
        someone_holds_one, timeout=60, what="a worker to hold an unfinished job", fleet=fleet
    )
    fleet.check_alive(current)
    return best[0]
