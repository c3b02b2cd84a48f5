"""A producer that rotates over more queues than the statement cache holds (issue 18): every
job lands, and its defers go through ``pgtasks.send`` (one statement for every queue)
instead of preparing an INSERT per queue and evicting another's on every call; a queue
deferred to again and again keeps the prepared INSERT."""

from __future__ import annotations

import asyncpg

import pgtasks

INSERTS = """SELECT count(*) FROM pg_prepared_statements
WHERE statement LIKE '%INSERT INTO pgmq."q_%' AND statement NOT LIKE '%pg_prepared_statements%'"""


async def prepared_inserts(app: pgtasks.App) -> int:
    """The INSERT statements prepared on the app's one pooled connection."""
    pool = await app.pool()
    async with pool.acquire() as pooled:
        n: int = await pooled.fetchval(INSERTS)
    return n


async def rows(conn: asyncpg.Connection, queue: str) -> list[int]:
    return [
        r[0]
        for r in await conn.fetch(
            "SELECT coalesce(message->'args'->>0, message->'kwargs'->>'i')::int "
            f"FROM pgmq.q_{queue} ORDER BY msg_id"
        )
    ]


async def test_a_rotation_wider_than_the_cache_prepares_no_insert_per_queue(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    # a cache of 10 statements: the INSERT is kept for the last 5 queues deferred to
    app = pgtasks.App(db_dsn, pool_min_size=1, pool_max_size=1, statement_cache_size=10)
    queues = [f"wide_{k}" for k in range(12)]
    try:

        @app.task(queue="wide_0")
        async def job(i: int) -> None: ...

        for turn in range(3):
            for k, queue in enumerate(queues):
                await job.options(queue=queue).defer(turn * 100 + k)
        inserts = await prepared_inserts(app)
    finally:
        await app.close()
    assert inserts == 0
    for k, queue in enumerate(queues):
        assert await rows(conn, queue) == [k, 100 + k, 200 + k]


async def test_a_queue_deferred_to_again_keeps_its_prepared_insert(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    app = pgtasks.App(db_dsn, pool_min_size=1, pool_max_size=1, statement_cache_size=10)
    try:

        @app.task(queue="narrow")
        async def job(i: int) -> None: ...

        for i in range(4):  # the first through pgtasks.send (it creates the queue)
            await job.defer(i)
        for i in range(4, 8):  # a few queues in turn: within the cache
            await job.options(queue="narrow" if i % 2 else "narrow_b").defer(i)
        inserts = await prepared_inserts(app)
    finally:
        await app.close()
    assert inserts == 2  # one per queue, prepared once
    assert await rows(conn, "narrow") == [0, 1, 2, 3, 5, 7]
    assert await rows(conn, "narrow_b") == [4, 6]
