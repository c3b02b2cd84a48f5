"""pgtasks through a real PgBouncer (Debian's package; the tests skip where it is missing),
as docs/operations.md describes it: in transaction mode, producers (with
``statement_cache_size=0``, since PgBouncer before 1.21 cannot keep prepared statements) and
a poll-only worker; in session mode, a listening worker woken by its notifications.

PgBouncer refuses ``lock_timeout`` as a connection parameter, which the worker's own
connections send: the worker then connects without it and says so once."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator

import anyio
import asyncpg
import pytest

import pgtasks
from pgtasks.worker import retention
from pgtasks.worker import worker as worker_module
from tests.helpers import Events
from tests.pgbouncer import PGBOUNCER, Bouncers

HOUR = dt.timedelta(hours=1)

pytestmark = pytest.mark.skipif(PGBOUNCER is None, reason="pgbouncer is not installed")


@pytest.fixture(scope="module")
def bouncer(server_dsn: str) -> Iterator[Callable[[str, str], str]]:
    """``bouncer(mode, dsn)``: ``dsn`` through a PgBouncer in ``mode``."""
    bouncers = Bouncers(server_dsn)
    try:
        yield bouncers.dsn
    finally:
        bouncers.stop()


async def test_producers_and_a_poll_only_worker_through_transaction_pooling(
    db_dsn: str,
    bouncer: Callable[[str, str], str],
    conn: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = pgtasks.App(bouncer("transaction", db_dsn), statement_cache_size=0)
    runs: list[int] = []

    @app.task(queue="bounced")
    async def square(n: int) -> int:
        runs.append(n)
        return n * n

    try:
        refs = [await square.defer(n) for n in range(50)]
        refs += await app.defer_many(square.s(n) for n in range(50, 200))
        first = await square.options(idempotency_key="once").defer(1000)
        again = await square.options(idempotency_key="once").defer(1000)
        assert again.id == first.id
        pool = await app.pool()
        async with pool.acquire() as held:  # the caller's transaction, through the bouncer
            tx = held.transaction()
            await tx.start()
            await square.options(connection=held).defer(-1)
            await tx.rollback()

        with caplog.at_level(logging.WARNING, logger="pgtasks"):
            async with app.worker(listen=False, poll_interval=0.1, concurrency=20) as worker:
                events = Events(worker)
                await events.until(lambda: events.counts["succeeded"] == 201, timeout=60)
                assert [await r.result(timeout=10) for r in refs[:3]] == [0, 1, 4]
        assert sorted(runs) == [*range(200), 1000]  # each once; the rolled-back one never
        refused = [r for r in caplog.records if "refuses lock_timeout" in r.getMessage()]
        assert len(refused) == 1  # said once, though the worker opened several connections
        assert "ALTER ROLE" in refused[0].getMessage()
    finally:
        await app.close()
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_bounced") == 0
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_bounced") == 201


async def test_a_listening_worker_through_session_pooling_is_woken_by_notifications(
    db_dsn: str, bouncer: Callable[[str, str], str]
) -> None:
    app = pgtasks.App(bouncer("session", db_dsn))
    started = anyio.Event()

    @app.task(queue="woken")
    async def ping() -> None:
        started.set()

    try:
        async with app.worker(poll_interval=30):  # only a notification wakes it in time
            await anyio.sleep(0.5)  # idle: listening
            before = time.monotonic()
            await ping.defer()
            with anyio.fail_after(5):
                await started.wait()
            assert time.monotonic() - before < 2
    finally:
        await app.close()


async def test_a_burst_workers_pass_does_not_wait_for_a_locked_archive_through_pgbouncer(
    db_dsn: str,
    bouncer: Callable[[str, str], str],
    conn: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # PgBouncer refuses lock_timeout: the pass's DELETE on a locked archive would wait for
    # as long as the lock is held, and with it the exit of a burst worker that had nothing
    # to do; the pass is cut short a grace after its budget instead
    monkeypatch.setattr(worker_module, "BURST_PASS_BUDGET", 0.5)
    monkeypatch.setattr(retention, "BURST_PASS_GRACE", 1.0, raising=False)
    app = pgtasks.App(
        bouncer("transaction", db_dsn), statement_cache_size=0, archive_retention=HOUR
    )
    app.task(queue="bounced_locked", name="tests.bounced.locked")(_noop)
    await conn.execute("SELECT pgtasks.ensure_queue('bounced_locked')")
    await conn.execute(
        "INSERT INTO pgmq.a_bounced_locked (msg_id, vt, message, archived_at) "
        "SELECT i, now(), '{}'::jsonb, now() - interval '2 hours' FROM generate_series(1, 5) i"
    )
    await conn.execute("BEGIN")
    await conn.execute("LOCK TABLE pgmq.a_bounced_locked IN ACCESS EXCLUSIVE MODE")
    try:
        worker = app.worker(burst=True, queues=["bounced_locked"], listen=False)
        before = time.monotonic()
        with anyio.fail_after(15):
            await worker.run()
        assert time.monotonic() - before < 5
        assert worker.retention is not None
        assert (worker.retention.passes, worker.retention.deleted) == (0, 0)
    finally:
        await conn.execute("ROLLBACK")
        await app.close()
    failed = [r.getMessage() for r in caplog.records if "a pass failed" in r.getMessage()]
    assert len(failed) == 1
    assert "cut short" in failed[0]


async def _noop() -> None: ...
