"""A claim in a queue that holds many jobs scheduled far ahead (issue 18): it reads the due
rows and stops, whatever the plan (custom, or the generic plan a prepared statement gets
after five runs), instead of walking every invisible row behind them."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson
import pytest

from pgtasks.db import jobs

SCHEDULED = 20_000


def scanned(plan: dict[str, Any]) -> int:
    """Rows every scan of a queue's table returned or filtered out, in a JSON plan."""
    total = 0
    if plan.get("Relation Name") == "q_ahead":
        total += int(plan.get("Actual Rows", 0)) + int(plan.get("Rows Removed by Filter", 0))
    for child in plan.get("Plans", []):
        total += scanned(child)
    return total


@pytest.mark.parametrize("mode", ["force_custom_plan", "force_generic_plan"])
async def test_a_claim_reads_the_due_rows_not_the_scheduled_ones(
    conn: asyncpg.Connection, mode: str
) -> None:
    await conn.execute("SELECT pgmq.create('ahead')")
    body = '{"v": 1, "task": "t"}'
    await conn.execute(
        "INSERT INTO pgmq.q_ahead (vt, message) "
        "SELECT now() + interval '1 day', $1::jsonb FROM generate_series(1, $2::integer)",
        body,
        SCHEDULED,
    )
    await conn.execute("VACUUM ANALYZE pgmq.q_ahead")
    await conn.execute(
        "INSERT INTO pgmq.q_ahead (vt, message) SELECT now(), $1::jsonb FROM generate_series(1, 3)",
        body,
    )
    await conn.execute(f"SET plan_cache_mode = {mode}")
    await conn.execute(f"PREPARE claim(integer, integer, integer) AS {jobs._read_sql('ahead')}")
    # asks for more than is due: the scan must still stop at the first row not yet due
    text = await conn.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE claim(30, 100, 1048576)")
    plan = orjson.loads(text)[0]["Plan"]
    assert scanned(plan) <= 3 * 3  # the due rows, read by the claim and by its update
    claimed = await conn.fetchval("SELECT count(*) FROM pgmq.q_ahead WHERE read_ct = 1")
    assert claimed == 3
