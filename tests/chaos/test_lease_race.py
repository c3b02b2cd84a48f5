"""Scenario 7, lease races: worker A runs jobs past their 2 s lease without heartbeats, either
because its lease keeper is disabled (monkeypatched off in that process) or because a task
blocks A's event loop with ``time.sleep`` so the keeper cannot run. Worker B takes the jobs
when the leases expire; B's runs are slower than A's, so A finishes while B still holds the
messages. A's acks are refused (plain jobs) and its transactions roll back (transactional
jobs), or its lease keeper, once the loop runs again, sees the loss and cancels the run. From
the queue's view each job completed exactly once, by B's claim; a transactional job's effect
exists exactly once."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

import pgtasks
from tests.chaos._support import Fleet, count, queue_empty, wait_until, write_module

pytestmark = pytest.mark.chaos

TASKS = """
import asyncio
import os
import time

import pgtasks
import pgtasks.worker.leases

app = pgtasks.App(lease=2, max_retries=5, pool_max_size=25)
SLOW = float(os.environ.get("CHAOS_SLOW", "0"))  # how long each run takes in this worker
BLOCK = bool(os.environ.get("CHAOS_BLOCK"))  # ... with the event loop blocked

if os.environ.get("CHAOS_NO_KEEPER"):
    def _never_extend(self) -> None:
        return None

    pgtasks.worker.leases.LeaseKeeper.extend_due = _never_extend  # no heartbeats in this worker


async def _record(table: str, n: int) -> None:
    job = pgtasks.current_job()
    pool = await app.pool()  # autocommit, outside the job's transaction
    await pool.execute(
        f"INSERT INTO {table} (n, msg_id, attempt, pid) VALUES ($1, $2, $3, $4)",
        n, job.id, job.attempt, os.getpid(),
    )


async def _run(n: int) -> None:
    await _record("starts", n)
    if BLOCK:
        time.sleep(SLOW)  # the lease keeper cannot run meanwhile
    else:
        await asyncio.sleep(SLOW)
    await _record("runs", n)


@app.task(queue="race")
async def plain(n: int) -> None:
    await _run(n)


@app.task(queue="race", transactional=True)
async def pay(n: int) -> None:
    await _run(n)
    await pgtasks.current_job().connection.execute("INSERT INTO tx_effects VALUES ($1)", n)
"""

SCHEMA = """
CREATE TABLE starts (n integer, msg_id bigint, attempt integer, pid integer);
CREATE TABLE runs (n integer, msg_id bigint, attempt integer, pid integer,
                   at timestamptz DEFAULT clock_timestamp());
CREATE TABLE tx_effects (n integer NOT NULL);
"""


async def _stub(n: int) -> None:
    raise AssertionError("deferred from the test, run by the CLI workers")


@pytest.mark.parametrize("how", ["keeper_disabled", "loop_blocked"])
async def test_lease_race_first_ack_is_refused(
    tmp_path: Path, db_dsn: str, conn: asyncpg.Connection, chaos_full: bool, how: str
) -> None:
    blocking = how == "loop_blocked"
    # A blocked loop runs its jobs one after another, so that form takes one transactional
    # job. B's runs outlast A's, so A tries to ack while B holds the message.
    jobs = 1 if blocking else (20 if chaos_full else 4)
    slow_a, slow_b = 4.0, 4.5
    write_module(tmp_path, "chaostasks", TASKS)
    await conn.execute(SCHEMA)
    app = pgtasks.App(db_dsn)
    plain = app.task(queue="race", name="chaostasks.plain")(_stub)
    pay = app.task(queue="race", name="chaostasks.pay")(_stub)
    kinds = [pay] if blocking else [plain, pay] * (jobs // 2)
    try:
        refs = await app.defer_many(task.s(n) for n, task in enumerate(kinds))
    finally:
        await app.close()
    plain_ids = {r.id for r, task in zip(refs, kinds, strict=True) if task is plain}
    pay_ids = {r.id for r, task in zip(refs, kinds, strict=True) if task is pay}

    fleet = Fleet(tmp_path, db_dsn)
    env_a = {"CHAOS_SLOW": str(slow_a)}
    env_a.update({"CHAOS_BLOCK": "1"} if blocking else {"CHAOS_NO_KEEPER": "1"})
    common = ("--poll-interval", "0.5", "--log-level", "WARNING")
    try:
        a = fleet.start("-c", str(jobs), *common, env=env_a)
        await wait_until(
            lambda: _started_by(conn, a.pid, jobs),
            timeout=30,
            what="A to start",
            fleet=fleet,
        )
        b = fleet.start("-c", str(jobs), *common, env={"CHAOS_SLOW": str(slow_b)})
        await wait_until(
            lambda: queue_empty(conn, "race"), timeout=60, what="B to finish", fleet=fleet
        )

        async def a_refused() -> bool:
            lines = a.log().splitlines()
            refused = ("not written", "lost its lease", "lost the lease")  # ack refused,
            return all(  # transaction rolled back, or the loss seen on an extension
                any(
                    f"(id {i}, attempt 1, queue race)" in line and any(r in line for r in refused)
                    for line in lines
                )
                for i in plain_ids | pay_ids
            )

        await wait_until(a_refused, timeout=60, what="A's acks to be refused", fleet=fleet)
        fleet.check_alive([a, b])
    finally:
        fleet.close()

    archived = await conn.fetch("SELECT msg_id, read_ct FROM pgmq.a_race ORDER BY msg_id")
    runs = await conn.fetch("SELECT msg_id, attempt, pid FROM runs ORDER BY msg_id, attempt")
    # A's runs that ended while B still held the message (B's run ended, and it acked, later)
    overlapped = await count(
        conn,
        "SELECT count(*) FROM runs AS ra JOIN runs AS rb USING (msg_id) "
        "WHERE ra.pid = $1 AND rb.pid = $2 AND ra.at < rb.at",
        a.pid,
        b.pid,
    )
    print(
        f"\nlease race ({how}): {jobs} job(s) with a 2s lease ran {slow_a:.1f}s in worker A; "
        f"worker B took all {jobs} when the leases expired; none of A's {jobs} acks "
        f"({overlapped} sent while B still held the message) was "
        f"applied ({len(pay_ids)} of them transactional: rolled back); runs {len(runs)} "
        f"(A's and B's), archived {len(archived)} (each once, at B's attempt 2)"
    )
    # the queue's view: each job acked exactly once, by B's claim (attempt 2), none dead
    assert [(r["msg_id"], r["read_ct"]) for r in archived] == [(r.id, 2) for r in refs]
    assert await count(conn, "SELECT count(*) FROM pgtasks.dead_letters") == 0
    # B ran every job, and so did A (at-least-once), but only B's claim was acked. With its
    # loop unblocked, A's lease keeper may see the loss first and cancel the rest of the run.
    a_runs = {(r["msg_id"], r["attempt"]) for r in runs if r["pid"] == a.pid}
    b_runs = {(r["msg_id"], r["attempt"]) for r in runs if r["pid"] == b.pid}
    assert b_runs == {(r.id, 2) for r in refs}
    if blocking:
        assert a_runs <= {(r.id, 1) for r in refs}
    else:
        assert a_runs == {(r.id, 1) for r in refs}
        assert overlapped == jobs
    assert await count(conn, "SELECT count(*) FROM tx_effects") == len(pay_ids)
    assert await count(conn, "SELECT count(DISTINCT n) FROM tx_effects") == len(pay_ids)


async def _started_by(conn: asyncpg.Connection, pid: int, jobs: int) -> bool:
    return await count(conn, "SELECT count(*) FROM starts WHERE pid = $1", pid) >= jobs
