"""kill -9 workers while they write results: a job's result exists if and only if its ack
does (they are one statement, or one transaction for a transactional task), and every
result is the one its job returned."""

from __future__ import annotations

import random
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

app = pgtasks.App(lease=2, max_retries=20, retry_backoff=0.1)


@app.task(queue="results9")
async def square(n: int) -> int:
    await asyncio.sleep(0.002 * (n % 5))
    return n * n


@app.task(queue="results9", transactional=True)
async def double(n: int) -> dict[str, int]:
    await pgtasks.current_job().connection.execute("INSERT INTO effects VALUES ($1)", n)
    return {"n": n, "twice": 2 * n}
"""


async def _stub(n: int) -> None:
    raise AssertionError("deferred from the test, run by the CLI workers")


async def test_kill9_during_result_writes_keeps_results_and_acks_together(
    tmp_path: Path, db_dsn: str, conn: asyncpg.Connection, chaos_full: bool
) -> None:
    jobs, kills = (6000, 12) if chaos_full else (1500, 4)
    write_module(tmp_path, "chaostasks", TASKS)
    await conn.execute("CREATE TABLE effects (n integer NOT NULL)")
    app = pgtasks.App(db_dsn)
    square = app.task(queue="results9", name="chaostasks.square")(_stub)
    double = app.task(queue="results9", name="chaostasks.double")(_stub)
    try:
        refs = await app.defer_many((double if n % 3 == 0 else square).s(n) for n in range(jobs))
    finally:
        await app.close()
    fleet = Fleet(tmp_path, db_dsn)
    common = ("-c", "20", "--poll-interval", "0.5", "--log-level", "WARNING", "--no-log-jobs")
    rng = random.Random()
    try:
        procs = [fleet.start(*common) for _ in range(2)]
        for _ in range(kills):
            await anyio.sleep(rng.uniform(0.3, 1.0))
            victim = rng.choice([p for p in procs if p.alive()])
            fleet.kill9(victim)
            procs.remove(victim)
            procs.append(fleet.start(*common))
        await wait_until(
            lambda: queue_empty(conn, "results9"), timeout=180, what="all jobs", fleet=fleet
        )
    finally:
        fleet.close()

    archived = {r[0] for r in await conn.fetch("SELECT msg_id FROM pgmq.a_results9")}
    kept = {
        r["msg_id"]: r["result"]
        for r in await conn.fetch(
            "SELECT msg_id, result::text AS result FROM pgtasks.job_results "
            "WHERE queue = 'results9' AND state = 'succeeded'"
        )
    }
    print(
        f"\nresults under kill -9: {jobs} jobs, {kills} kills; archived {len(archived)}, "
        f"results {len(kept)}, effects {await count(conn, 'SELECT count(*) FROM effects')}"
    )
    assert archived == {r.id for r in refs}  # every job acked, once
    assert set(kept) == archived  # a result exactly where there is an ack
    for n, ref in enumerate(refs):
        expected = f'{{"n": {n}, "twice": {2 * n}}}' if n % 3 == 0 else str(n * n)
        assert kept[ref.id] == expected, (n, kept[ref.id])
    # the transactional ones' effects: exactly once each (their result with them)
    assert await count(conn, "SELECT count(*) FROM effects") == len(range(0, jobs, 3))
    assert await count(conn, "SELECT count(DISTINCT n) FROM effects") == len(range(0, jobs, 3))
    assert await count(conn, "SELECT count(*) FROM pgtasks.dead_letters") == 0
