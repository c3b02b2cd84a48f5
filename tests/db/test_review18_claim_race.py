"""The claim statement under contention (review of issue 18): connections claiming from one
queue at once, with custom and generic plans, each lock and update exactly the rows they
return, and no row is claimed twice."""

from __future__ import annotations

import random

import anyio
import asyncpg
import pytest

from pgtasks.db import jobs

MESSAGES = 3000
CLAIMERS = 6


@pytest.mark.parametrize("mode", ["force_custom_plan", "force_generic_plan"])
async def test_concurrent_claims_take_each_message_once(
    conn: asyncpg.Connection, db_dsn: str, mode: str
) -> None:
    await conn.execute("SELECT pgmq.create('race')")
    await conn.execute(
        "INSERT INTO pgmq.q_race (vt, message) "
        "SELECT now() - (i || ' ms')::interval, '{}'::jsonb FROM generate_series(1, $1) AS i",
        MESSAGES,
    )
    claimed: list[int] = []

    async def claimer() -> None:
        c = await asyncpg.connect(db_dsn, server_settings={"plan_cache_mode": mode})
        try:
            while True:
                batch = await jobs.message_read(c, "race", 30, random.randint(1, 40), 1 << 20)
                if not batch:
                    # empty only once everything is claimed: a skipped lock is another
                    # claimer's, which gets it
                    left = await c.fetchval("SELECT count(*) FROM pgmq.q_race WHERE read_ct = 0")
                    if left == 0:
                        return
                    continue
                assert all(m.read_ct == 1 for m in batch)
                claimed.extend(m.msg_id for m in batch)
        finally:
            await c.close()

    async with anyio.create_task_group() as tg:
        for _ in range(CLAIMERS):
            tg.start_soon(claimer)
    assert len(claimed) == MESSAGES
    assert len(set(claimed)) == MESSAGES  # none twice
    rows = await conn.fetch("SELECT read_ct, count(*) FROM pgmq.q_race GROUP BY read_ct")
    assert [tuple(r) for r in rows] == [(1, MESSAGES)]  # each updated once, by its claimer
