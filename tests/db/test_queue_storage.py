"""Storage settings of queue tables (migration 0013): on every queue pgtasks creates (migrate,
a defer to a new queue, a batch, SQL's pgtasks.defer, a worker's start), set by migrate on a
queue made with plain pgmq.create (by the migrate that applies the migration, and by any
later one), a table an operator tuned left alone, migrate twice a no-op, and a migrate that
neither waits behind a running worker's writes nor for long behind a VACUUM's lock."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import asyncpg
import pytest

import pgtasks
from pgtasks.db import queues, schema

QUEUE_SETTINGS = [
    "autovacuum_vacuum_scale_factor=0.01",
    "autovacuum_vacuum_threshold=50",
    "autovacuum_vacuum_cost_delay=0",
    "autovacuum_analyze_scale_factor=0.05",
]
ARCHIVE_SETTINGS = [
    "autovacuum_vacuum_scale_factor=0.05",
    "autovacuum_vacuum_threshold=1000",
    "autovacuum_vacuum_insert_scale_factor=0.05",
    "autovacuum_analyze_scale_factor=0.05",
]


async def settings_of(conn: asyncpg.Connection, queue: str) -> tuple[list[str], list[str]]:
    """The reloptions of the queue's table and of its archive ([] for none)."""
    row = await conn.fetchrow(
        "SELECT coalesce((SELECT reloptions FROM pg_class WHERE oid = to_regclass($1)), '{}'), "
        "coalesce((SELECT reloptions FROM pg_class WHERE oid = to_regclass($2)), '{}')",
        f"pgmq.q_{queue}",
        f"pgmq.a_{queue}",
    )
    assert row is not None
    return list(row[0]), list(row[1])


@pytest.fixture
async def empty_conn(empty_db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(empty_db_dsn)
    try:
        yield connection
    finally:
        await connection.close()


async def test_the_settings_are_defined_once_in_the_database(conn: asyncpg.Connection) -> None:
    for kind, expected in (("q", QUEUE_SETTINGS), ("a", ARCHIVE_SETTINGS)):
        assert await conn.fetchval("SELECT pgtasks.queue_storage_options($1)", kind) == expected


async def test_every_queue_pgtasks_creates_has_them(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    @app.task(queue="st_migrated")
    async def migrated() -> None: ...

    await app.migrate()
    await migrated.options(queue="st_deferred").defer()
    await app.defer_many([migrated.options(queue="st_batch").s()])
    await anyio.to_thread.run_sync(migrated.options(queue="st_sync").defer_sync)
    await anyio.to_thread.run_sync(app.close_sync)
    await conn.fetchval("SELECT pgtasks.defer('st_sql', 'some.task', '{}')")
    await conn.execute("SELECT pgtasks.ensure_queue('st_ensured')")
    await app.worker(queues=["st_served"], burst=True).run()  # creates its queue at start
    assert app.queues == ["st_migrated"]

    created = ["migrated", "deferred", "batch", "sync", "sql", "ensured", "served"]
    for name in created:
        assert await settings_of(conn, f"st_{name}") == (QUEUE_SETTINGS, ARCHIVE_SETTINGS), name
    assert await schema.plan(conn, app.queues) == []


async def test_migrate_sets_them_on_a_plain_pgmq_queue_then_does_nothing(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    await conn.execute("SELECT pgmq.create('st_plain')")
    await conn.execute("SELECT pgmq.create('NotOurs')")  # not a pgtasks name: left alone
    assert await settings_of(conn, "st_plain") == ([], [])

    steps = await app.migrate()
    assert [s.description for s in steps] == [
        "set the storage settings of pgmq.q_st_plain, pgmq.a_st_plain"
    ]
    assert await settings_of(conn, "st_plain") == (QUEUE_SETTINGS, ARCHIVE_SETTINGS)
    assert await settings_of(conn, "notours") == ([], [])
    assert await app.migrate() == []


async def test_the_migration_sets_them_on_the_queues_that_exist(
    empty_conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = [m for m in schema.migrations() if m.version < 13]
    monkeypatch.setattr(schema, "migrations", lambda: before)
    await schema.migrate(empty_conn, ["st_old"])  # a database of the previous release
    monkeypatch.undo()
    await empty_conn.execute("SELECT pgmq.create('st_older')")
    assert await settings_of(empty_conn, "st_old") == ([], [])

    steps = await schema.migrate(empty_conn, ["st_old"])
    assert "pgtasks migration 0013 queue_storage" in [s.description for s in steps]
    for queue in ("st_old", "st_older"):
        assert await settings_of(empty_conn, queue) == (QUEUE_SETTINGS, ARCHIVE_SETTINGS)
    assert await schema.migrate(empty_conn, ["st_old"]) == []


async def test_a_table_an_operator_tuned_is_left_alone(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    await conn.execute("SELECT pgmq.create('st_tuned')")
    await conn.execute("ALTER TABLE pgmq.q_st_tuned SET (autovacuum_vacuum_scale_factor = 0.3)")
    await app.migrate()
    own, archive = await settings_of(conn, "st_tuned")
    assert own == ["autovacuum_vacuum_scale_factor=0.3"]
    assert archive == ARCHIVE_SETTINGS  # it had none
    assert await app.migrate() == []


async def test_migrate_does_not_wait_behind_a_workers_open_write(
    app: pgtasks.App, conn: asyncpg.Connection, db_dsn: str
) -> None:
    await conn.execute("SELECT pgmq.create('st_busy')")
    await conn.execute("SELECT pgmq.send('st_busy', '{}'::jsonb)")
    worker = await asyncpg.connect(db_dsn)
    try:
        # a claim (ROW EXCLUSIVE on the table, a row lock) not committed yet
        await worker.execute("BEGIN")
        await worker.execute("UPDATE pgmq.q_st_busy SET vt = now() + interval '30 seconds'")
        started = time.monotonic()
        await app.migrate()
        assert time.monotonic() - started < 1.5
        assert await settings_of(conn, "st_busy") == (QUEUE_SETTINGS, ARCHIVE_SETTINGS)
        await worker.execute("COMMIT")
    finally:
        await worker.close()


async def test_a_table_vacuum_holds_is_left_for_the_next_migrate(
    app: pgtasks.App, conn: asyncpg.Connection, db_dsn: str
) -> None:
    await conn.execute("SELECT pgmq.create('st_vacuumed')")
    holder = await asyncpg.connect(db_dsn)
    try:
        # the lock a VACUUM (or CREATE INDEX CONCURRENTLY) holds on the queue table
        await holder.execute("BEGIN")
        await holder.execute("LOCK TABLE pgmq.q_st_vacuumed IN SHARE UPDATE EXCLUSIVE MODE")
        warnings: list[str] = []
        migrating = await asyncpg.connect(db_dsn)
        try:
            migrating.add_log_listener(lambda _c, m: warnings.append(str(m)))
            started = time.monotonic()
            steps = await schema.migrate(migrating)
            waited = time.monotonic() - started
        finally:
            await migrating.close()
        assert 1.5 < waited < 5  # lock_timeout 2 s, then on with the rest
        assert len(steps) == 1
        assert any("pgmq.q_st_vacuumed is locked" in w for w in warnings)
        assert await settings_of(conn, "st_vacuumed") == ([], ARCHIVE_SETTINGS)
        await holder.execute("COMMIT")
    finally:
        await holder.close()
    steps = await app.migrate()
    assert [s.description for s in steps] == ["set the storage settings of pgmq.q_st_vacuumed"]
    assert await settings_of(conn, "st_vacuumed") == (QUEUE_SETTINGS, ARCHIVE_SETTINGS)


async def test_queue_storage_reports_what_it_sets(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pgmq.create('st_direct')")
    assert await queues.queue_storage(conn, "st_direct", dry_run=True) == [
        "pgmq.q_st_direct",
        "pgmq.a_st_direct",
    ]
    assert await settings_of(conn, "st_direct") == ([], [])
    assert await queues.queue_storage(conn, "st_direct") == [
        "pgmq.q_st_direct",
        "pgmq.a_st_direct",
    ]
    assert await queues.queue_storage(conn, "st_direct") == []
    with pytest.raises(asyncpg.InvalidParameterValueError):
        await queues.queue_storage(conn, "Bad-Name")


async def test_a_running_worker_goes_on_while_migrate_sets_them(
    app: pgtasks.App, conn: asyncpg.Connection
) -> None:
    await conn.execute("SELECT pgmq.create('st_live')")

    @app.task(queue="st_live")
    async def job(n: int) -> int:
        return n

    async with app.worker(concurrency=4):
        with anyio.fail_after(20):
            await app.wait_for([await job.defer(i) for i in range(20)])
            # its prepared claims and acks on the table being altered keep working
            steps = await app.migrate()
            await app.wait_for([await job.defer(i) for i in range(20)])
    assert [s.description for s in steps] == [
        "set the storage settings of pgmq.q_st_live, pgmq.a_st_live"
    ]
    assert await conn.fetchval("SELECT count(*) FROM pgmq.a_st_live") == 40
    assert await settings_of(conn, "st_live") == (QUEUE_SETTINGS, ARCHIVE_SETTINGS)
