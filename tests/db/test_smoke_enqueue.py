import asyncpg

import pgtasks


async def test_defer_puts_one_message(app: pgtasks.App, conn: asyncpg.Connection) -> None:
    @app.task(queue="smoke")
    async def hello(name: str) -> None: ...

    ref = await hello.defer(name="x")
    assert ref.queue == "smoke"
    body = await conn.fetchval("SELECT message::text FROM pgmq.q_smoke WHERE msg_id = $1", ref.id)
    assert '"kwargs": {"name": "x"}' in body
