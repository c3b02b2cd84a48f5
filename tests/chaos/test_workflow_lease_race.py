"""A chord member whose lease lapses while it runs (its worker's event loop is blocked), so
that a second worker process runs it too: the first run's acknowledgement, and with it the
chord's counter, is refused; the second counts once. Each member's transactional effect
exists once, the callback runs once with every result, and the counter ends at zero."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

import pgtasks
from pgtasks import chord
from tests.chaos._support import Fleet, count, wait_until, write_module

pytestmark = pytest.mark.chaos

TASKS = """
import os
import time

import pgtasks

app = pgtasks.App(lease=2, max_retries=5)
BLOCK = float(os.environ.get("CHAOS_BLOCK", "0"))  # seconds each member blocks the loop


@app.task(queue="wfrace", transactional=True)
async def member(i: int) -> int:
    job = pgtasks.current_job()
    pool = await app.pool()  # committed now: every run counts
    await pool.execute("INSERT INTO runs (i, pid) VALUES ($1, $2)", i, os.getpid())
    time.sleep(BLOCK)  # the lease keeper cannot run meanwhile
    await job.connection.execute("INSERT INTO effects (i) VALUES ($1)", i)
    return i * i


@app.task(queue="wfrace", transactional=True)
async def gather(values: list[int]) -> int:
    await pgtasks.current_job().connection.execute(
        "INSERT INTO effects (i) VALUES ($1)", -len(values)
    )
    return sum(values)
"""

SCHEMA = """
CREATE TABLE runs (i integer, pid integer);
CREATE TABLE effects (i integer NOT NULL);
"""


async def _stub(*args: object) -> int:
    raise AssertionError("deferred from the test, run by the CLI workers")


async def test_a_chord_member_run_twice_after_its_lease_lapsed_counts_once(
    tmp_path: Path, db_dsn: str, conn: asyncpg.Connection
) -> None:
    write_module(tmp_path, "chaostasks", TASKS)
    await conn.execute(SCHEMA)
    app = pgtasks.App(db_dsn)
    member = app.task(queue="wfrace", name="chaostasks.member")(_stub)
    gather = app.task(queue="wfrace", name="chaostasks.gather")(_stub)
    try:
        ref = await chord((member.s(i) for i in range(3)), gather.partial()).defer()
    finally:
        await app.close()

    fleet = Fleet(tmp_path, db_dsn)
    common = ("--poll-interval", "0.2", "--log-level", "WARNING")
    try:
        a = fleet.start("-c", "1", *common, env={"CHAOS_BLOCK": "4"})

        async def a_started() -> bool:
            return await count(conn, "SELECT count(*) FROM runs") > 0

        async def done() -> bool:
            return (
                await count(conn, "SELECT count(*) FROM pgtasks.workflows WHERE state <> 'running'")
                == 1
            )

        async def a_refused() -> bool:  # its transaction rolled back, or the loss was seen
            return any(r in a.log() for r in ("lost its lease", "lost the lease", "not written"))

        await wait_until(a_started, timeout=30, what="A to start a member", fleet=fleet)
        b = fleet.start("-c", "5", *common)  # takes the others, and A's after its lease
        await wait_until(done, timeout=60, what="the chord to end", fleet=fleet)
        await wait_until(a_refused, timeout=30, what="A's ack to be refused", fleet=fleet)
        fleet.check_alive([a, b])
    finally:
        fleet.close()

    runs = await conn.fetch("SELECT i, pid FROM runs ORDER BY i")
    assert len(runs) >= 4, f"no member ran twice: {runs}"  # A's member, again on B
    effects = sorted(r["i"] for r in await conn.fetch("SELECT i FROM effects"))
    assert effects == [-3, 0, 1, 2]  # each member once, the callback once with 3 results
    rows = await conn.fetch("SELECT state, pending FROM pgtasks.workflows WHERE id = $1", ref.id)
    assert [(r["state"], r["pending"]) for r in rows] == [("succeeded", 0)]
    assert await count(conn, "SELECT count(*) FROM pgmq.a_wfrace") == 4
