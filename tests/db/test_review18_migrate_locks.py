"""Migrate on a database with many queues (review of issue 18): setting the storage settings
of every queue's tables must not hold a lock on each of them until one transaction commits.
The shared lock table holds about ``max_locks_per_transaction x max_connections`` locks
(6,400 by default) for every session together: a migrate holding two per queue fails past a
few thousand queues ("out of shared memory"), and short of that leaves the other sessions
(the workers) without lock slots while it runs."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import asyncpg
import pytest

from pgtasks.db import schema

QUEUES = 60


@pytest.fixture
async def empty_conn(empty_db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(empty_db_dsn)
    try:
        yield connection
    finally:
        await connection.close()


HELD = """
SELECT count(*) FROM pg_locks AS l JOIN pg_class AS c ON c.oid = l.relation
WHERE l.pid = $1 AND l.granted AND l.mode = 'ShareUpdateExclusiveLock'
  AND c.relnamespace = 'pgmq'::regnamespace
"""


@pytest.mark.parametrize("upgrade", [True, False], ids=["migration 0013", "a later migrate"])
async def test_migrate_holds_no_lock_per_queue_until_it_commits(
    empty_conn: asyncpg.Connection,
    empty_db_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    upgrade: bool,
) -> None:
    if upgrade:  # a database of the previous release
        before = [m for m in schema.migrations() if m.version < 13]
        monkeypatch.setattr(schema, "migrations", lambda: before)
    await schema.migrate(empty_conn)
    monkeypatch.undo()
    names = [f"ml_{i:03d}" for i in range(QUEUES)]
    for i in range(0, QUEUES, 20):
        async with empty_conn.transaction():
            for name in names[i : i + 20]:
                await empty_conn.execute("SELECT pgmq.create($1)", name)  # no settings
    holder = await asyncpg.connect(empty_db_dsn)
    migrating = await asyncpg.connect(empty_db_dsn)
    held: list[int] = []
    try:
        # the last queue's table is locked (a VACUUM holds it): migrate waits there, up to
        # its 2 s lock timeout, having set the others' settings
        await holder.execute("BEGIN")
        await holder.execute(f"LOCK TABLE pgmq.q_{names[-1]} IN SHARE UPDATE EXCLUSIVE MODE")
        pid = migrating.get_server_pid()

        async def watch() -> None:
            while True:
                held.append(await empty_conn.fetchval(HELD, pid))
                await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await schema.migrate(migrating)
            tg.cancel_scope.cancel()
        await holder.execute("COMMIT")
    finally:
        await holder.close()
        await migrating.close()
    assert max(held) <= 2, max(held)  # one queue's tables at a time
    rows = await empty_conn.fetch(
        "SELECT relname FROM pg_class WHERE relnamespace = 'pgmq'::regnamespace "
        "AND relkind = 'r' AND relname ~ '^[qa]_ml_' AND reloptions IS NULL"
    )
    assert [r[0] for r in rows] == [f"q_{names[-1]}"]  # the locked one, left for next time
