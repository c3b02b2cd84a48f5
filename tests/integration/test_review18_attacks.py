"""Review of issue 18's worker changes: attacks on the claims ahead of the slots, the claim
statement and the per-queue claim policy, each against a real database."""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
import asyncpg
import pytest

import pgtasks
from pgtasks.db import jobs
from tests.helpers import Events


async def _two_waiting(
    conn: asyncpg.Connection, queue: str, started: list[int], after: int, held_count: int = 4
) -> set[int]:
    """Wait until two jobs run and two more are claimed ahead; their ids. Only messages
    sent after id ``after`` count (the short jobs before them may still be held, acking)."""
    held = f"SELECT msg_id FROM pgmq.q_{queue} WHERE read_ct > 0 AND vt > now() AND msg_id > $1"
    with anyio.fail_after(10):
        while (
            len(started) < 2
            or len(ids := {r[0] for r in await conn.fetch(held, after)}) < held_count
        ):
            await anyio.sleep(0.02)
    return ids


async def test_a_job_claimed_ahead_is_not_run_after_its_expiry(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    """A job claimed ahead of the slots waits for one; if its ``expires`` passes meanwhile,
    it has not started by then, and must end as expired rather than run (the documented
    rule: "a job that has not started by then is not run")."""
    gate = anyio.Event()
    started: list[int] = []

    @app.task(queue="ahead_expiry", on_success="delete")
    async def job(i: int) -> None:
        if i >= 1000:
            started.append(i)
            await gate.wait()

    quick = await app.defer_many([job.s(i) for i in range(300)])  # short: the worker claims ahead
    await app.defer_many([job.options(delay=0.5, expires=2.0).s(1000 + i) for i in range(4)])
    async with app.worker(concurrency=2, poll_interval=30) as worker:
        events = Events(worker)
        await _two_waiting(conn, "ahead_expiry", started, quick[-1].id)
        assert worker.running == 2
        await anyio.sleep(2.5)  # the two waiting in line expire there
        gate.set()
        await events.until(lambda: events.counts["succeeded"] == 302, timeout=10)
        await events.until(lambda: events.counts["expired"] == 2, timeout=5)
    assert len(started) == 2  # the two that waited past their expiry never ran


async def test_jobs_claimed_ahead_do_not_wait_behind_long_jobs(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    """A worker whose jobs turn from short to long holds the jobs it claimed ahead behind
    jobs that may run for hours, while another worker's free slot could run them. After a
    second in line they go back to the queue (their attempt given back), this worker stops
    claiming ahead, and another worker runs them while the long jobs still run here."""
    gate = anyio.Event()
    started: list[int] = []

    @app.task(queue="ahead_long", on_success="delete")
    async def job(i: int) -> None:
        if i >= 1000:
            started.append(i)
            await gate.wait()

    quick = await app.defer_many([job.s(i) for i in range(300)])
    await app.defer_many([job.options(delay=0.5).s(1000 + i) for i in range(4)])
    async with app.worker(concurrency=2, poll_interval=0.5) as first:
        await _two_waiting(conn, "ahead_long", started, quick[-1].id)
        assert first.running == 2
        held = (
            "SELECT count(*) FROM pgmq.q_ahead_long"
            f" WHERE read_ct > 0 AND vt > now() AND msg_id > {quick[-1].id}"
        )
        with anyio.fail_after(5):
            while await conn.fetchval(held) > 2:  # the two in line are handed back
                await anyio.sleep(0.05)
        await anyio.sleep(0.5)
        assert await conn.fetchval(held) == 2  # and not claimed again here
        async with app.worker(concurrency=2, poll_interval=0.5):
            with anyio.fail_after(5):
                while len(started) < 4:  # the other worker runs them
                    await anyio.sleep(0.05)
            gate.set()
    assert sorted(started) == [1000, 1001, 1002, 1003]
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_ahead_long") == 0


async def test_a_visible_message_locked_by_another_transaction_is_not_polled_hot(
    app: pgtasks.App, conn: asyncpg.Connection, db_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A visible message whose row another transaction holds locked (``pgtasks.cancel``
    inside a longer transaction, an operator's ``SELECT ... FOR UPDATE``) is skipped by
    every claim, while the probe keeps seeing it visible: the worker must not claim and
    probe it a hundred times a second for as long as the lock is held, yet it must claim
    the message soon after the lock goes."""
    counts: Counter[str] = Counter()
    real = jobs.message_read

    async def counted(c: Any, queue: str, *args: Any) -> list[jobs.Message]:
        counts[queue] += 1
        return await real(c, queue, *args)

    monkeypatch.setattr(jobs, "message_read", counted)
    ran: list[int] = []

    @app.task(queue="locked_row")
    async def job(i: int) -> None:
        ran.append(i)

    await job.defer(1)
    holder = await asyncpg.connect(db_dsn)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT * FROM pgmq.q_locked_row FOR UPDATE")
        async with app.worker(concurrency=4, poll_interval=30) as worker:
            events = Events(worker)
            await anyio.sleep(2.0)
            assert ran == []
            assert counts["locked_row"] < 30, counts  # a few a second, not a hundred
            await tx.rollback()
            await events.until(lambda: ran == [1], timeout=3)
    finally:
        await holder.close()


async def test_a_job_sent_while_the_listener_is_down_is_claimed_after_it_reconnects(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    """The listener's backend is terminated and a job is deferred before it listens again:
    its notification is lost. The reconnect's sweep finds it, well before the poll."""
    ran: list[int] = []

    @app.task(queue="relisten")
    async def job(i: int) -> None:
        ran.append(i)

    async with app.worker(concurrency=2, poll_interval=60) as worker:
        events = Events(worker)
        await job.defer(0)
        await events.until(lambda: ran == [0], timeout=5)
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'pgtasks-listener' AND datname = current_database()"
        )
        assert killed == 1
        await job.defer(1)  # nobody listens now
        await events.until(lambda: ran == [0, 1], timeout=5)
        assert worker.listener is not None
        assert worker.listener.reconnects >= 1


async def test_a_dropped_queue_does_not_starve_or_spin_the_others(
    app: pgtasks.App, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One of a worker's queues is dropped under it (so the probe of its chunk fails): the
    other queues are still served at once, and the dropped one costs a few claims, not a
    loop."""
    counts: Counter[str] = Counter()
    real = jobs.message_read

    async def counted(c: Any, queue: str, *args: Any) -> list[jobs.Message]:
        counts[queue] += 1
        return await real(c, queue, *args)

    monkeypatch.setattr(jobs, "message_read", counted)
    ran: list[str] = []

    @app.task(queue="keep_a")
    async def a() -> None:
        ran.append("a")

    @app.task(queue="gone")
    async def g() -> None:
        ran.append("g")

    async with app.worker(concurrency=2, poll_interval=0.3) as worker:
        events = Events(worker)
        await a.defer()
        await events.until(lambda: ran == ["a"], timeout=5)
        await conn.execute("SELECT pgmq.drop_queue('gone')")
        await a.defer()
        await events.until(lambda: ran == ["a", "a"], timeout=3)
        counts.clear()
        await anyio.sleep(3)  # ten sweeps
        await a.defer()
        await events.until(lambda: ran == ["a", "a", "a"], timeout=3)
        assert counts["gone"] <= 4, counts  # backs off: 1 s, 2 s, ...
        assert counts["keep_a"] <= 25, counts
        assert "gone" in worker.failed_queues


async def test_the_prepared_lookup_answers_as_job_info_for_ended_and_reused_ids(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    """The prepared look-up the waiters use answers as ``pgtasks.job_info`` for cancelled,
    expired, deleted-on-success and dead jobs, and for ids a dropped and created again queue
    gives out anew."""
    from pgtasks.db.results import job_info, job_info_direct

    @app.task(queue="reinfo", on_success="delete", max_retries=0)
    async def job(fail: bool) -> int:
        if fail:
            raise ValueError("no")
        return 1

    old = [await job.defer(False), await job.defer(True)]
    await app.worker(queues=["reinfo"], burst=True).run()
    await conn.execute("SELECT pgmq.drop_queue('reinfo')")
    refs = [
        await job.defer(False),  # gets the id of an old job: answers for the new one
        await job.options(expires=0.01).defer(False),
        await job.options(delay=60).defer(False),
    ]
    await anyio.sleep(0.05)
    assert await refs[2].cancel() == "cancelled"
    await app.worker(queues=["reinfo"], burst=True).run()
    ids = sorted({r.id for r in old + refs} | {999})
    expected = sorted(await job_info(conn, "reinfo", ids))
    assert sorted(await job_info_direct(conn, "reinfo", ids)) == expected
    assert {i.state for i in expected} >= {"succeeded", "expired", "cancelled", "unknown"}
