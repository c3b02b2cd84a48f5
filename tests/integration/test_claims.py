"""How the worker claims (issue 18): from the queues that may hold work, not every queue on
every pass; and ahead of its slots for short jobs, with the jobs claimed ahead handed back
at a stop and cancellable while they wait."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import anyio
import asyncpg
import pytest

import pgtasks
from pgtasks.db import jobs
from pgtasks.serialization.envelope import HEADER_RELEASED
from pgtasks.worker import slots
from pgtasks.worker.connection import OwnConnection
from pgtasks.worker.fetcher import PROBE_CHUNK, Fetcher
from tests.helpers import Events

QUEUES = [f"many_{i:03d}" for i in range(PROBE_CHUNK * 2 + 20)]  # three probe chunks


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Claim statements sent, by queue (the real statement runs: this only counts)."""
    counts: Counter[str] = Counter()
    real = jobs.message_read

    async def counted(conn: Any, queue: str, *args: Any) -> list[jobs.Message]:
        counts[queue] += 1
        return await real(conn, queue, *args)

    monkeypatch.setattr(jobs, "message_read", counted)
    return counts


async def test_claims_go_to_the_queues_that_may_hold_work(
    db_dsn: str, conn: asyncpg.Connection, reads: Counter[str]
) -> None:
    for q in QUEUES:
        await conn.execute("SELECT pgmq.create($1)", q)
    claimed: list[tuple[str, int]] = []
    own = OwnConnection(lambda: asyncpg.connect(db_dsn))
    try:
        await _claims_go_to_the_queues_that_may_hold_work(own, conn, reads, claimed)
    finally:
        own.close()


async def _claims_go_to_the_queues_that_may_hold_work(
    own: OwnConnection,
    conn: asyncpg.Connection,
    reads: Counter[str],
    claimed: list[tuple[str, int]],
) -> None:
    busy, quiet, delayed = QUEUES[-1], QUEUES[3], QUEUES[PROBE_CHUNK + 7]
    fetcher = Fetcher(
        own,
        QUEUES,
        dict.fromkeys(QUEUES, 30),
        free_slots=lambda: 100,
        claimed=lambda q, msgs: claimed.extend((q, m.msg_id) for m in msgs),
        poll_interval=0.5,
        max_message_size=1 << 20,
    )
    # the first pass sweeps (one probe per chunk): nothing is visible, nothing is read
    assert await fetcher.claim_pass() == (0, True)
    assert sum(reads.values()) == 0

    # a notification names the busy queue: that queue alone is read, until it drains
    await conn.execute("SELECT pgmq.send($1, '{}'::jsonb)", busy)
    fetcher.notify(busy)
    assert await fetcher.claim_pass() == (1, True)
    assert reads == Counter({busy: 1})
    assert await fetcher.claim_pass() == (0, True)  # drained: not read again
    assert reads == Counter({busy: 1})

    # a delayed message is claimed at its time, not at the next sweep, and no other
    # queue is read meanwhile
    await conn.execute("SELECT pgmq.send($1, '{}'::jsonb, 1)", delayed)
    fetcher.notify(delayed)
    assert (await fetcher.claim_pass())[0] == 0  # notified, not yet visible
    began = time.monotonic()
    while not any(q == delayed for q, _ in claimed):
        await fetcher.idle_wait()
        await fetcher.claim_pass()
        assert time.monotonic() - began < 3
    assert set(reads) == {busy, delayed}

    # a message nothing announced (plain pgmq.send, no notification) is found by the next
    # sweep of every chunk, within the poll interval
    await conn.execute("SELECT pgmq.send($1, '{}'::jsonb)", quiet)
    began = time.monotonic()
    while not any(q == quiet for q, _ in claimed):
        await fetcher.idle_wait()
        await fetcher.claim_pass()
        assert time.monotonic() - began < 2
    assert set(reads) == {busy, delayed, quiet}


async def test_a_notification_during_a_claim_is_not_lost(
    db_dsn: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim that comes back short while a notification for its queue arrived meanwhile
    leaves the queue ready: the message sent after the claim's snapshot is claimed next."""
    await conn.execute("SELECT pgmq.create('race')")
    fetcher: Fetcher | None = None
    real = jobs.message_read

    async def slow_read(c: Any, queue: str, *args: Any) -> list[jobs.Message]:
        messages = await real(c, queue, *args)
        if not messages:  # the empty read: a send and its notification land now
            await conn.execute("SELECT pgmq.send('race', '{}'::jsonb)")
            assert fetcher is not None
            fetcher.notify("race")
        return messages

    monkeypatch.setattr(jobs, "message_read", slow_read)
    claimed: list[int] = []
    own = OwnConnection(lambda: asyncpg.connect(db_dsn))
    fetcher = Fetcher(
        own,
        ["race"],
        {"race": 30},
        free_slots=lambda: 10,
        claimed=lambda q, msgs: claimed.extend(m.msg_id for m in msgs),
        poll_interval=3600,
        max_message_size=1 << 20,
    )
    try:
        fetcher.notify("race")
        assert await fetcher.claim_pass() == (0, False)  # short, but notified meanwhile
        monkeypatch.setattr(jobs, "message_read", real)
        assert await fetcher.claim_pass() == (1, True)
    finally:
        own.close()


async def test_short_jobs_are_claimed_ahead_and_handed_back_at_a_stop(
    app: pgtasks.App, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs that run for far less than a claim's round trip make the worker claim ahead of
    its slots; at a stop, the jobs claimed ahead (which never started) go back to the queue
    at once with their attempt given back, like the running ones."""
    # jobs in line here wait for the gate, not for slow runs: no hand-back after 1 s
    monkeypatch.setattr(slots, "PATIENCE", 60.0)
    monkeypatch.setattr(slots, "MAX_AHEAD", 4)  # a line of 4 at most (2 slots: 2 per slot)
    gate = anyio.Event()
    started: list[int] = []

    @app.task(queue="ahead", on_success="delete")
    async def job(i: int) -> None:
        if i >= 1000:
            started.append(i)
            await gate.wait()

    quick = await app.defer_many([job.s(i) for i in range(300)])
    await app.defer_many([job.options(delay=0.5).s(1000 + i) for i in range(10)])  # after
    async with app.worker(concurrency=2, shutdown_timeout=0.2, poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: len(started) == 2)
        held = (  # of the gated jobs (the short ones may still be held, acking)
            "SELECT count(*) FROM pgmq.q_ahead"
            f" WHERE read_ct > 0 AND vt > now() AND msg_id > {quick[-1].id}"
        )
        with anyio.fail_after(5):
            while await conn.fetchval(held) < 6:  # two running, four claimed ahead (the
                await anyio.sleep(0.02)  # most the line holds)
        await anyio.sleep(0.3)  # and no more than that
        assert await conn.fetchval(held) == 6
        assert worker.running == 2
    assert len(started) == 2  # the four claimed ahead never ran
    rows = await conn.fetch(
        "SELECT read_ct - coalesce((headers ->> $1)::int, 0) AS attempts, vt <= now() AS visible"
        " FROM pgmq.q_ahead",
        HEADER_RELEASED,
    )
    assert len(rows) == 10
    assert all(r["visible"] for r in rows)
    assert [r["attempts"] for r in rows] == [0] * 10  # every attempt given back


async def test_a_job_claimed_ahead_can_be_cancelled_before_it_runs(
    app: pgtasks.App, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # jobs in line here wait for the gate, not for slow runs: no hand-back after 1 s
    monkeypatch.setattr(slots, "PATIENCE", 60.0)
    gate = anyio.Event()
    started: list[int] = []

    @app.task(queue="ahead_cancel", on_success="delete")
    async def job(i: int) -> None:
        if i >= 1000:
            started.append(i)
            await gate.wait()

    quick = await app.defer_many([job.s(i) for i in range(300)])
    refs = await app.defer_many([job.options(delay=0.5).s(1000 + i) for i in range(4)])
    async with app.worker(concurrency=2, poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: len(started) == 2)
        held = (  # of the gated jobs (the short ones may still be held, acking)
            "SELECT msg_id FROM pgmq.q_ahead_cancel"
            f" WHERE read_ct > 0 AND vt > now() AND msg_id > {quick[-1].id}"
        )
        with anyio.fail_after(5):
            while len(ids := {r[0] for r in await conn.fetch(held)}) < 4:
                await anyio.sleep(0.02)
        waiting = [r for r in refs if r.id in ids and r.id - refs[0].id + 1000 not in started]
        assert len(waiting) == 2  # all four held: two run, two wait
        assert await waiting[0].cancel() == "requested"  # it is claimed: its worker hears
        await events.until(lambda: events.counts["cancelled"] == 1, timeout=5)
        status = await waiting[0].status()
        assert status.state == "cancelled"
        assert status.error is not None
        assert status.error["reason"] == "cancelled before it ran"
        gate.set()
        await events.until(lambda: events.counts["succeeded"] == 303, timeout=10)
    assert len(started) == 3  # the cancelled one never ran


async def test_a_message_handed_back_wakes_the_other_workers(app: pgtasks.App) -> None:
    """A worker claims only from queues that may hold work: a message another worker hands
    back at its stop must tell it so (a NOTIFY with the release), not wait for its sweep."""
    runs: list[str] = []
    release = anyio.Event()

    @app.task(queue="handed_back")
    async def job() -> None:
        runs.append(pgtasks.current_job().queue)
        if len(runs) == 1:
            await release.wait()  # the first run waits until its worker stops

    await job.defer()
    first = app.worker(poll_interval=60, shutdown_timeout=0.1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.run)
        with anyio.fail_after(5):
            while not runs:
                await anyio.sleep(0.01)
        other = app.worker(poll_interval=60)
        async with other:
            events = Events(other)
            await anyio.sleep(0.3)  # its first sweep is over: the message was leased then
            first.stop()  # the message goes back
            began = time.monotonic()
            await events.until(lambda: events.counts["succeeded"] == 1, timeout=5)
            assert time.monotonic() - began < 2  # not the next sweep, 60 s away
    assert len(runs) == 2
