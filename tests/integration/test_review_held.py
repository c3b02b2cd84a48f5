"""Attacks from the review that the hardened worker withstood (kept as regression tests)."""

from __future__ import annotations

import asyncio
import contextlib
import json

import anyio
import asyncpg
import pytest

import pgtasks
from tests.helpers import Events


async def _released_row(conn: asyncpg.Connection, queue: str, msg_id: int) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"SELECT vt <= clock_timestamp() AS visible, headers::text AS headers, read_ct "
        f"FROM pgmq.q_{queue} WHERE msg_id = $1",
        msg_id,
    )
    assert row is not None
    return row


@pytest.mark.parametrize("how", ["anyio", "asyncio"])
async def test_run_cancelled_from_outside_releases_running_jobs(
    app: pgtasks.App, conn: asyncpg.Connection, how: str
) -> None:
    started = anyio.Event()

    @app.task(queue="outside")
    async def job(n: int) -> None:
        started.set()
        await anyio.sleep(60)

    refs = await app.defer_many([job.s(i) for i in range(5)])
    worker = app.worker(poll_interval=30)
    if how == "anyio":
        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)
                await started.wait()
                await anyio.sleep(0.2)
                tg.cancel_scope.cancel()
    else:
        task = asyncio.ensure_future(worker.run())
        with anyio.fail_after(15):
            await started.wait()
            await anyio.sleep(0.2)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    for ref in refs:
        row = await _released_row(conn, "outside", ref.id)
        assert row["visible"]
        assert json.loads(row["headers"]) == {"x-pgtasks-released": 1}


async def test_force_stop_during_a_transactional_commit_keeps_the_commit(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    await conn.execute(
        """
        CREATE TABLE effects (n integer NOT NULL);
        CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep(1.0); RETURN NULL; END $$;
        CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON effects
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
        """
    )

    @app.task(queue="txstop", transactional=True)
    async def pay(n: int) -> None:
        connection = pgtasks.current_job().connection
        assert connection is not None
        await connection.execute("INSERT INTO effects VALUES ($1)", n)

    await pay.defer(1)
    with anyio.fail_after(15):
        async with app.worker(poll_interval=30) as worker:
            events = Events(worker)
            await events.until(lambda: events.counts["started"] == 1)
            await anyio.sleep(0.3)  # inside the 1 s commit
            worker.stop(force=True)
    assert await conn.fetchval("SELECT count(*) FROM effects") == 1
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_txstop") == 0
    assert events.counts["succeeded"] == 1
    assert worker.stats["released"] == 0


async def test_a_task_that_raises_in_finally_after_a_stop_is_released(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="finally")
    async def job() -> None:
        try:
            await anyio.sleep(60)
        finally:
            raise ValueError("cleanup failed")

    ref = await job.defer()
    async with app.worker(poll_interval=30, shutdown_timeout=0) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["started"] == 1)
    row = await _released_row(conn, "finally", ref.id)
    assert row["visible"]
    assert json.loads(row["headers"]) == {"x-pgtasks-released": 1}
    assert events.counts["failed"] == 0


class _Nasty(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


class _NastyNotes(Exception):
    @property
    def __notes__(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("no notes")


class _NastyTraceback(Exception):
    pass


@pytest.mark.parametrize("kind", ["str", "notes", "cause_cycle", "deep_chain"])
async def test_hostile_exception_objects_are_recorded(
    app: pgtasks.App, conn: asyncpg.Connection, kind: str
) -> None:
    @app.task(queue="nasty", max_retries=0)
    async def job() -> None:
        if kind == "str":
            raise _Nasty()
        if kind == "notes":
            raise _NastyNotes("x")
        if kind == "cause_cycle":
            a, b = ValueError("a"), ValueError("b")
            a.__cause__, b.__cause__ = b, a
            raise a
        exc: BaseException = ValueError("0")
        for i in range(5000):
            new = ValueError(str(i))
            new.__cause__ = exc
            exc = new
        raise exc

    @app.task(queue="nasty")
    async def fine() -> None: ...

    await job.defer()
    await fine.defer()
    async with app.worker(poll_interval=0.2) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["dead"] == 1 and events.counts["succeeded"] == 1)
    assert await conn.fetchval("SELECT count(*) FROM pgtasks.dead_letters") == 1


async def test_thousands_of_outcomes_at_once(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    gate = anyio.Event()

    @app.task(queue="many", max_retries=1)
    async def job(n: int) -> None:
        await gate.wait()
        if n % 3 == 1:
            raise pgtasks.Retry(delay=600)
        if n % 3 == 2:
            raise pgtasks.Fail("no")

    await app.defer_many([job.s(i) for i in range(3000)])
    async with app.worker(concurrency=3000, poll_interval=30) as worker:
        events = Events(worker)
        await events.until(lambda: events.counts["started"] == 3000, timeout=60)
        gate.set()
        await events.until(
            lambda: (
                events.counts["succeeded"] == 1000
                and events.counts["retried"] == 1000
                and events.counts["dead"] == 1000
            ),
            timeout=60,
        )
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_many") == 1000
    assert await conn.fetchval("SELECT count(*) FROM pgmq.q_many") == 1000
    assert await conn.fetchval("SELECT count(*) FROM pgtasks.dead_letters") == 1000


async def test_the_completer_connection_killed_mid_flush(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    # a deferred trigger makes the completer's transaction (retry + attempt error) slow;
    # its backend is killed inside it; the outcome is written once, on the next try
    await conn.execute(
        """
        CREATE FUNCTION slow_err() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_sleep(1.0); RETURN NULL; END $$;
        CREATE CONSTRAINT TRIGGER slow_err AFTER INSERT ON pgtasks.attempt_errors
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_err();
        """
    )

    @app.task(queue="killed", max_retries=1)
    async def job(n: int) -> None:
        if n:
            raise pgtasks.Retry(delay=600)

    await app.defer_many([job.s(i) for i in range(4)])
    async with app.worker(poll_interval=30) as worker:
        events = Events(worker)
        await anyio.sleep(0.4)
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'pgtasks' AND state = 'active' "
            "AND query LIKE '%pg_sleep%' OR (application_name = 'pgtasks' AND "
            "wait_event = 'PgSleep')"
        )
        await events.until(
            lambda: events.counts["succeeded"] == 1 and events.counts["retried"] == 3, timeout=20
        )
    assert killed >= 1
    assert await conn.fetchval("SELECT count(*) FROM pgtasks.attempt_errors") == 3
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_killed") == 1


async def test_subscribers_that_raise_do_not_stop_anything(app: pgtasks.App) -> None:
    @app.task(queue="subs")
    async def job(n: int) -> None: ...

    await app.defer_many([job.s(i) for i in range(20)])
    async with app.worker(poll_interval=0.2) as worker:

        def broken(_event: pgtasks.JobEvent) -> None:
            raise ZeroDivisionError

        worker.subscribe(broken)
        events = Events(worker)
        await events.until(lambda: events.counts["succeeded"] == 20)


async def test_two_workers_one_second_lease_blocking_code(db_dsn: str) -> None:
    import threading
    import time

    def make_app() -> tuple[pgtasks.App, pgtasks.Task]:  # type: ignore[type-arg]
        a = pgtasks.App(db_dsn, lease=1, max_retries=6, retry_backoff=0.01)

        @a.task(queue="blocking", name="blocker")
        async def blocker(n: int) -> None:
            time.sleep(1.6)  # noqa: ASYNC251 - blocks the whole event loop past the lease

        return a, blocker

    results: dict[str, object] = {}

    def other_thread(stop: threading.Event) -> None:
        async def main() -> None:
            app_b, _ = make_app()
            try:
                async with app_b.worker(poll_interval=0.1) as worker_b:
                    ev = Events(worker_b)
                    while not stop.is_set():
                        await anyio.sleep(0.1)
                results["b"] = dict(ev.counts)
            finally:
                await app_b.close()

        asyncio.run(main())

    app_a, blocker = make_app()
    stop = threading.Event()
    thread = threading.Thread(target=other_thread, args=(stop,))
    try:
        await app_a.defer_many([blocker.s(i) for i in range(3)])
        thread.start()
        async with app_a.worker(poll_interval=0.1) as worker_a:
            ev_a = Events(worker_a)
            conn = await asyncpg.connect(db_dsn)
            try:
                with anyio.fail_after(60):
                    while await conn.fetchval("SELECT count(*) FROM pgmq.q_blocking"):
                        await anyio.sleep(0.2)
                await anyio.sleep(1)
                archived = await conn.fetchval("SELECT count(*) FROM pgmq.a_blocking")
                dead = await conn.fetchval("SELECT count(*) FROM pgtasks.dead_letters")
                per_msg = await conn.fetch(
                    "SELECT msg_id, count(*) FROM (SELECT msg_id FROM pgmq.a_blocking UNION ALL "
                    "SELECT msg_id FROM pgtasks.dead_letters) t GROUP BY msg_id"
                )
            finally:
                await conn.close()
        stop.set()
    finally:
        stop.set()
        thread.join(30)
        await app_a.close()
    b = results.get("b", {})
    assert isinstance(b, dict)
    succeeded = ev_a.counts["succeeded"] + b.get("succeeded", 0)
    assert archived + dead == 3
    assert all(r["count"] == 1 for r in per_msg)
    assert succeeded == archived, (dict(ev_a.counts), b, archived, dead)
