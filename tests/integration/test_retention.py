"""Archive retention, against the real database: a prune deletes the archived messages past
the cutoff a batch per statement, oldest first, and keeps the newer ones; `App.prune` by
default applies the app's ``archive_retention`` to the app's queues only; a running worker
deletes its queues' old archived messages by itself; and what ``status()`` says once a job's
archived message is gone."""

from __future__ import annotations

import datetime as dt
import time

import anyio
import asyncpg
import pytest

import pgtasks
from pgtasks import ConfigurationError
from pgtasks.admin import maintenance
from pgtasks.db import queues
from pgtasks.worker import worker as worker_module
from pgtasks.worker.retention import Retention

HOUR = dt.timedelta(hours=1)


async def archive_aged(conn: asyncpg.Connection, queue: str, n: int, age: dt.timedelta) -> None:
    """``n`` messages archived ``age`` ago in this queue's archive."""
    await conn.execute("SELECT pgtasks.ensure_queue($1)", queue)
    await conn.execute(
        f"INSERT INTO pgmq.a_{queue} (msg_id, vt, message, archived_at) "
        f"SELECT coalesce((SELECT max(msg_id) FROM pgmq.a_{queue}), 1000000) + i, now(), "
        "jsonb_build_object('task', 'old'), now() - $1::interval "
        "FROM generate_series(1, $2::integer) AS i",
        age,
        n,
    )


async def ages(conn: asyncpg.Connection, queue: str) -> list[int]:
    """The archived messages' ages, in whole hours, oldest first."""
    rows = await conn.fetch(
        f"SELECT extract(epoch FROM now() - archived_at)::bigint / 3600 FROM pgmq.a_{queue} "
        "ORDER BY archived_at"
    )
    return [r[0] for r in rows]


async def test_a_prune_deletes_in_batches_oldest_first_and_keeps_the_newer(
    app: pgtasks.App, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    await archive_aged(conn, "ret_batches", 10, 5 * HOUR)
    await archive_aged(conn, "ret_batches", 15, 3 * HOUR)
    await archive_aged(conn, "ret_batches", 5, 0 * HOUR)
    cutoff = await queues.ago(conn, 2 * HOUR)

    # one statement deletes one batch at most, the oldest first
    assert await queues.archive_prune(conn, "ret_batches", cutoff, 10) == 10
    assert await ages(conn, "ret_batches") == [3] * 15 + [0] * 5

    statements: list[int] = []
    real = queues.archive_prune

    async def counted(*args: object) -> int:
        n = await real(*args)  # type: ignore[arg-type]
        statements.append(n)
        return n

    monkeypatch.setattr(queues, "archive_prune", counted)
    await archive_aged(conn, "ret_batches", 10, 4 * HOUR)
    pool = await app.pool()
    deleted = await maintenance.prune_archives(pool, 2 * HOUR, ["ret_batches"], batch=10)
    assert (deleted, statements) == (25, [10, 10, 5])
    assert await ages(conn, "ret_batches") == [0] * 5


async def test_app_prune_applies_the_apps_retention_to_its_own_queues(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    for queue in ("ret_mine", "ret_theirs"):
        await archive_aged(conn, queue, 3, 50 * HOUR)
        await archive_aged(conn, queue, 2, 30 * HOUR)
    app = pgtasks.App(db_dsn, archive_retention=dt.timedelta(days=2))
    keep_all = pgtasks.App(db_dsn, archive_retention=None)

    async def job() -> None: ...

    app.task(queue="ret_mine", name="tests.ret.mine")(job)
    keep_all.task(queue="ret_mine", name="tests.ret.mine")(job)
    try:
        assert (await keep_all.prune())["archived"] == 0
        assert (await app.prune())["archived"] == 3  # its queue, its retention
        assert await ages(conn, "ret_mine") == [30, 30]
        assert len(await ages(conn, "ret_theirs")) == 5
        # an explicit age is for every queue
        assert (await app.prune(archive_older_than=dt.timedelta(days=1)))["archived"] == 7
        assert await ages(conn, "ret_mine") == await ages(conn, "ret_theirs") == []
    finally:
        await app.close()
        await keep_all.close()


async def test_a_worker_deletes_its_queues_old_archive_by_itself(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    app = pgtasks.App(db_dsn, archive_retention=HOUR)

    @app.task(queue="ret_worker")
    async def job(n: int) -> int:
        return n

    await archive_aged(conn, "ret_worker", 25_000, 2 * HOUR)  # three batches
    await archive_aged(conn, "ret_other", 3, 2 * HOUR)  # no worker of this app serves it
    try:
        refs = [await job.defer(i) for i in range(3)]
        async with app.worker(retention_interval=1) as worker:
            assert worker.retention is not None
            with anyio.fail_after(20):  # the rows go as each batch commits; the count of
                while (  # the pass is kept once its connection is closed
                    await conn.fetchval("SELECT count(*) FROM pgmq.a_ret_worker") != 3
                    or worker.retention.passes == 0
                ):
                    await anyio.sleep(0.2)
            assert worker.retention.deleted == 25_000
        assert [r.id for r in refs] == [
            r[0] for r in await conn.fetch("SELECT msg_id FROM pgmq.a_ret_worker ORDER BY 1")
        ]
        assert len(await ages(conn, "ret_other")) == 3
        assert app.worker(retention_interval=None).retention is None
        assert (
            pgtasks.App(db_dsn, archive_retention=None).worker(queues=["ret_worker"]).retention
            is None
        )
    finally:
        await app.close()


async def test_a_burst_worker_prunes_once_it_has_drained_its_queues(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    # workers run only in bursts (from cron) must bound the archive too: one pass at the end
    app = pgtasks.App(db_dsn, archive_retention=HOUR)

    @app.task(queue="ret_burst")
    async def job(n: int) -> int:
        return n

    await archive_aged(conn, "ret_burst", 12_000, 2 * HOUR)  # two batches
    await archive_aged(conn, "ret_burst", 4, dt.timedelta(minutes=10))  # within the retention
    try:
        refs = [await job.defer(i) for i in range(5)]
        worker = app.worker(burst=True, queues=["ret_burst"])
        with anyio.fail_after(30):
            await worker.run()  # returns once the queue is drained and the pass is done
        assert worker.retention is not None
        assert (worker.retention.passes, worker.retention.deleted) == (1, 12_000)
        archived = {r[0] for r in await conn.fetch("SELECT msg_id FROM pgmq.a_ret_burst")}
        assert len(archived) == 4 + 5
        assert {r.id for r in refs} <= archived
        # and with retention_interval=None it does not prune
        assert app.worker(burst=True, retention_interval=None).retention is None
    finally:
        await app.close()


async def test_a_burst_pass_stops_at_its_budget_and_the_next_burst_goes_on(
    db_dsn: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = pgtasks.App(db_dsn, archive_retention=HOUR)
    await archive_aged(conn, "ret_budget", 25_000, 2 * HOUR)
    try:
        monkeypatch.setattr(worker_module, "BURST_PASS_BUDGET", 0.0)  # spent at once
        first = app.worker(burst=True, queues=["ret_budget"])
        with anyio.fail_after(30):
            await first.run()
        assert first.retention is not None
        assert (first.retention.passes, first.retention.deleted) == (1, 0)
        assert len(await ages(conn, "ret_budget")) == 25_000
        monkeypatch.undo()
        second = app.worker(burst=True, queues=["ret_budget"])
        with anyio.fail_after(30):
            await second.run()
        assert second.retention is not None
        assert second.retention.deleted == 25_000
    finally:
        await app.close()


async def test_a_prune_starts_no_batch_after_its_deadline(conn: asyncpg.Connection) -> None:
    await archive_aged(conn, "ret_until", 25_000, 2 * HOUR)
    late = time.monotonic() - 1.0
    assert await maintenance.prune_archives(conn, HOUR, ["ret_until"], until=late) == 0
    assert len(await ages(conn, "ret_until")) == 25_000
    statements: list[str] = []
    conn.add_query_logger(lambda record: statements.append(record.query))
    soon = time.monotonic() + 60.0
    assert await maintenance.prune_archives(conn, HOUR, ["ret_until"], until=soon) == 25_000
    await anyio.sleep(0.05)  # asyncpg calls query loggers soon after, not at once
    assert sum("DELETE" in q for q in statements) == 3  # batches of 10,000: 2 full, 1 not


async def test_a_pass_over_many_queues_logs_their_number_not_their_names(
    app: pgtasks.App, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    names = [f"ret_many_{i}" for i in range(6)]
    for name in names:
        await archive_aged(conn, name, 1, 2 * HOUR)
    caplog.set_level("INFO", logger="pgtasks")
    assert await Retention(app.database, names, HOUR, 60).prune_once() == 6
    assert "deleted 6 archived message(s) older than 1:00:00 from 6 queues" in caplog.text
    assert await Retention(app.database, names[:2], HOUR, 60).prune_once() == 0  # none left
    await archive_aged(conn, names[0], 1, 2 * HOUR)
    assert await Retention(app.database, names[:2], HOUR, 60).prune_once() == 1
    assert "from ret_many_0, ret_many_1" in caplog.text


async def test_a_failed_pass_is_logged_and_the_worker_goes_on(
    app: pgtasks.App, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    await archive_aged(conn, "ret_locked", 3, 2 * HOUR)
    retention = Retention(app.database, ["ret_locked"], HOUR, 60)
    await conn.execute("BEGIN")
    await conn.execute("LOCK TABLE pgmq.a_ret_locked IN ACCESS EXCLUSIVE MODE")
    assert await retention.prune_once() == 0  # its lock_timeout, 2 s
    await conn.execute("ROLLBACK")
    assert "archive retention: a pass failed (LockNotAvailableError" in caplog.text
    assert await retention.prune_once() == 3


async def test_status_once_the_archived_message_is_gone(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="ret_status")
    async def kept() -> str:
        return "done"

    @app.task(queue="ret_status", keep_result=False)
    async def unkept() -> None: ...

    with_result, without = await kept.defer(), await unkept.defer()
    await app.worker(burst=True).run()
    assert (await with_result.status()).state == (await without.status()).state == "succeeded"

    await conn.execute("UPDATE pgmq.a_ret_status SET archived_at = now() - interval '8 days'")
    assert (await app.prune())["archived"] == 2
    status = await with_result.status()
    assert (status.state, await with_result.result()) == ("succeeded", "done")  # its record
    assert status.attempts is None  # counted in the archived message only
    assert (await without.status()).state == "unknown"


def test_the_options_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="archive_retention must be a datetime"):
        pgtasks.App(archive_retention=dt.timedelta(minutes=5))
    with pytest.raises(ConfigurationError, match="archive_retention"):
        pgtasks.App(archive_retention=7)  # type: ignore[arg-type]
    app = pgtasks.App()

    @app.task
    async def job() -> None: ...

    with pytest.raises(ConfigurationError, match="retention_interval must be"):
        app.worker(retention_interval=0.5)
    assert pgtasks.App().archive_retention == dt.timedelta(days=7)
    assert app.worker().retention is not None


async def test_a_burst_workers_failed_pass_does_not_promise_a_next_one_within_the_hour(
    db_dsn: str, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    # a burst worker makes no other pass: the next burst does, whenever it runs
    app = pgtasks.App(db_dsn, archive_retention=HOUR)
    app.task(queue="ret_burst_locked", name="tests.ret.burst_locked")(_noop)
    await archive_aged(conn, "ret_burst_locked", 3, 2 * HOUR)
    await conn.execute("BEGIN")
    await conn.execute("LOCK TABLE pgmq.a_ret_burst_locked IN ACCESS EXCLUSIVE MODE")
    try:
        worker = app.worker(burst=True, queues=["ret_burst_locked"])
        with anyio.fail_after(30):
            await worker.run()  # its lock_timeout, 2 s
    finally:
        await conn.execute("ROLLBACK")
        await app.close()
    failed = [r.getMessage() for r in caplog.records if "a pass failed" in r.getMessage()]
    assert len(failed) == 1
    assert "LockNotAvailableError" in failed[0]
    assert failed[0].endswith("; the next burst tries again"), failed[0]


async def test_a_queue_whose_archive_cannot_be_pruned_does_not_keep_the_others_from_it(
    db_dsn: str, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    # a locked archive (or one this role may not delete from) is that queue's problem, as
    # it is for claims: every burst would otherwise stop at it and never reach the others
    app = pgtasks.App(db_dsn, archive_retention=HOUR)
    for queue in ("ret_first_locked", "ret_then_free"):
        app.task(queue=queue, name=f"tests.ret.{queue}")(_noop)
        await archive_aged(conn, queue, 3, 2 * HOUR)
    await conn.execute("BEGIN")
    await conn.execute("LOCK TABLE pgmq.a_ret_first_locked IN ACCESS EXCLUSIVE MODE")
    try:
        worker = app.worker(burst=True, queues=["ret_first_locked", "ret_then_free"])
        with anyio.fail_after(30):
            await worker.run()
    finally:
        await conn.execute("ROLLBACK")
        await app.close()
    assert len(await ages(conn, "ret_first_locked")) == 3
    assert await ages(conn, "ret_then_free") == []
    assert worker.retention is not None
    assert worker.retention.deleted == 3
    assert "a pass failed (LockNotAvailableError" in caplog.text


async def test_a_prune_told_to_go_on_records_the_queue_it_cannot_prune(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    for queue in ("ret_go_locked", "ret_go_free"):
        await archive_aged(conn, queue, 3, 2 * HOUR)
    own = await app.database.connect()  # the worker's settings: a 2 s lock_timeout
    await conn.execute("BEGIN")
    await conn.execute("LOCK TABLE pgmq.a_ret_go_locked IN ACCESS EXCLUSIVE MODE")
    try:
        with pytest.raises(asyncpg.LockNotAvailableError):  # by default, the error
            await maintenance.prune_archives(own, HOUR, ["ret_go_locked", "ret_go_free"])
        failed: dict[str, asyncpg.PostgresError] = {}
        names = ["ret_go_locked", "ret_go_free"]
        assert await maintenance.prune_archives(own, HOUR, names, failed=failed) == 3
        assert list(failed) == ["ret_go_locked"]
        assert isinstance(failed["ret_go_locked"], asyncpg.LockNotAvailableError)
    finally:
        await conn.execute("ROLLBACK")
        await own.close()
    assert len(await ages(conn, "ret_go_locked")) == 3
    assert await ages(conn, "ret_go_free") == []


async def _noop() -> None: ...
